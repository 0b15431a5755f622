"""Progress bars, made one way for every stage. On a terminal (or in a notebook): tqdm's bar, cleared when
done. Anywhere else (stderr a log file, a pipe, CI): tqdm's redraws would land there as carriage-return
fragments, so a bar stays silent unless it runs for longer than LINE_EVERY_S, and then it writes a whole
line that often, and one when it ends. EDGELR_PROGRESS=bars|lines overrides the choice (a parent that
relays its children's stderr to a terminal, as `edgelr distill --nproc` does, sets it for them)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import std
from tqdm.auto import tqdm

MODE_VARIABLE = "EDGELR_PROGRESS"
LINE_EVERY_S = 30.0
LINE_FORMAT = "{desc}: {percentage:3.0f}%| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"  # no bar glyphs
_NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto picked the widget


def progress_mode() -> str:
    """'bars' where redraws show as one moving bar, else 'lines'."""
    chosen = os.environ.get(MODE_VARIABLE)
    if chosen in ("bars", "lines"):
        return chosen
    terminal = getattr(sys.stderr, "isatty", lambda: False)()
    return "bars" if terminal or _NOTEBOOK else "lines"


class _Lines(std.tqdm):
    """tqdm's meter as whole lines, at most one per LINE_EVERY_S: no '\\r' redraw, nothing for a short bar."""

    _line_t = _line_n = None  # when the last line was written, and at what count; None: none yet

    def display(self, msg=None, pos=None) -> bool:
        now = self._time()
        if msg == "":  # tqdm clears a bar with an empty message on close: say where it ended, if it spoke
            due = self._line_t is not None and self.n != self._line_n
        else:  # a redraw; set_postfix asks for one at every call, so keep to one line per LINE_EVERY_S
            due = self._line_t is None or now - self._line_t >= LINE_EVERY_S
        if due:
            self._line_t, self._line_n = now, self.n
            self.fp.write(f"{self}\n")
            self.fp.flush()
        return False  # so close() adds no '\r'


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **options) -> std.tqdm:
    """A tqdm bar over ITERABLE (or updated by hand, with total=), drawn only if SHOW; options as tqdm's."""
    if show and progress_mode() == "lines":
        return _Lines(iterable, delay=LINE_EVERY_S, mininterval=LINE_EVERY_S, leave=False, bar_format=LINE_FORMAT,
                       **options)
    return tqdm(iterable, disable=not show, leave=False, **options)
