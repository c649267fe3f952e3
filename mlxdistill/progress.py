"""A dependency-free progress bar: rate and ETA on a terminal, silence elsewhere.

Non-TTY output (CI logs, pipes) and --quiet stay clean: the bar draws only when stderr is a
terminal, and the caller prints its own one-line summaries. On a terminal those lines go
through `message`, which lifts the bar out of the way so they stay on screen.
"""

from __future__ import annotations

import shutil
import sys
import time

BAR_MIN, BAR_MAX = 8, 30  # the bar itself, in columns: narrower says nothing, wider adds nothing


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def columns() -> int:
    """Usable width of the terminal. The last column is left free: a line that fills it
    makes some terminals wrap, and every redraw would then start a new line."""
    return max(1, shutil.get_terminal_size((80, 24)).columns - 1)


def fit_line(desc: str, frac: float, stats: str, postfix: str, width: int) -> str:
    """`desc [####----] stats postfix` in at most `width` columns. What gives way, in turn:
    the bar's length, the bar, the description, the postfix; the counts and times stay
    (cut only on a terminal narrower than they are)."""
    post = f" {postfix}" if postfix else ""
    n = min(BAR_MAX, width - len(desc) - len(stats) - len(post) - 4)  # "[", "] ", " "
    if n >= BAR_MIN:
        k = int(frac * n)
        return f"{desc} [{'#' * k}{'-' * (n - k)}] {stats}{post}"
    for line in (f"{desc} {stats}{post}", f"{stats}{post}", f"{desc} {stats}"):
        if len(line) <= width:
            return line
    return stats[:width]


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "tok", quiet: bool = False,
                 stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.units = 0.0
        self.start = time.time()
        self.postfix = ""
        self._last = 0.0
        self._shown = 0  # columns the bar occupies on screen now (0: not drawn)

    def update(self, n: int = 1, units: float = 0.0, postfix: str | None = None) -> None:
        self.done += n
        self.units += units
        if postfix is not None:
            self.postfix = postfix
        now = time.time()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def message(self, line: str, log) -> None:
        """`log(line)` as a line of its own above the bar: on a terminal the bar is blanked
        first and redrawn after, so the line is neither overwritten nor glued to it."""
        shown = self._shown
        if shown:
            self._clear()
        log(line)
        if shown:
            sys.stdout.flush()  # log may print to stdout: its line must land before the bar
            self._draw(time.time())

    def _clear(self) -> None:
        self.stream.write("\r" + " " * self._shown + "\r")
        self.stream.flush()
        self._shown = 0

    def _draw(self, now: float) -> None:
        el = now - self.start
        frac = min(1.0, self.done / max(self.total, 1))
        eta = el / frac - el if frac > 0 else 0.0
        stats = (f"{self.done}/{self.total} {self.units / max(el, 1e-9):,.0f} {self.unit}/s "
                 f"{_fmt_time(el)}<{_fmt_time(eta)}")
        width = columns()
        line = fit_line(self.desc, frac, stats, self.postfix, width)
        # Blank what a longer previous line left, without reaching the last column.
        pad = max(0, min(self._shown, width) - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._shown = len(line) + pad

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0
