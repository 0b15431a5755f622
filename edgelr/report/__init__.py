"""report/: what a run says to people and machines: text tables and JSON (tables), one self-contained HTML
page (html). May import every stage below it (to read their results); nothing imports it but api and cli."""
