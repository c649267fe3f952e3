"""A dependency-free progress bar: rate and ETA on a terminal, silence elsewhere.

Non-TTY output (CI logs, pipes) and --quiet stay clean: the bar draws only when stderr is a
terminal, and the caller prints its own one-line summaries.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


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

    def update(self, n: int = 1, units: float = 0.0, postfix: str | None = None) -> None:
        self.done += n
        self.units += units
        if postfix is not None:
            self.postfix = postfix
        now = time.time()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        el = now - self.start
        frac = min(1.0, self.done / max(self.total, 1))
        eta = el / frac - el if frac > 0 else 0.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (f"\r{self.desc} [{bar}] {self.done}/{self.total} "
                f"{self.units / max(el, 1e-9):,.0f} {self.unit}/s "
                f"{_fmt_time(el)}<{_fmt_time(eta)} {self.postfix}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
