"""`edgelr report`: one HTML page from a run's JSON files. Parses, calls the library, prints."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page from the JSON of compress --report and profile --json")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="report.html")


def run(args) -> int:
    from edgelr.report.html import write_html_report

    page, data = write_html_report(args.run_dir, args.output)
    print(f"wrote {page} and {data}")
    return 0
