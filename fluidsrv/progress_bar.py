"""A download progress bar for a terminal, and byte sizes written for people."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

ProgressCallback = Callable[[int, int | None], None]
"""Called as ``progress(bytes_done, bytes_total_or_None)`` while a file downloads."""


class ProgressBar:
    """A one-line download progress bar (redrawn at most ten times a second) for a terminal stream."""

    def __init__(self, label: str, stream: IO[str] | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._first_done: int | None = None
        self._last_draw = 0.0
        self._last_line = ""

    def __call__(self, done: int, total: int | None) -> None:
        """Record progress; redraw when due (every call's state is kept for :meth:`close`)."""
        if self._first_done is None:
            self._first_done = done
        self._last_line = self._render(done, total)
        now = time.monotonic()
        if self.interactive and (now - self._last_draw >= 0.1 or (total is not None and done >= total)):
            self._last_draw = now
            self.stream.write("\r" + self._last_line)
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a non-terminal stream gets the final state once)."""
        if not self._last_line:
            return
        self.stream.write(("\r" if self.interactive else "") + self._last_line + "\n")
        self.stream.flush()

    def _render(self, done: int, total: int | None) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (done - (self._first_done or 0)) / elapsed
        speed = f"{rate / 1e6:.1f} MB/s"
        if total:
            fraction = min(done / total, 1.0)
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            return f"{self.label} [{bar}] {fraction:4.0%} {megabytes(done)}/{megabytes(total)} {speed}"
        return f"{self.label} {megabytes(done)} {speed}"


def megabytes(size: int) -> str:
    """Return ``size`` bytes in megabytes with one decimal, e.g. ``12.3 MB``."""
    return f"{size / 1e6:.1f} MB"


def human_size(size: int | None) -> str:
    """Return a short size such as ``381.5 MB`` (``?`` when unknown)."""
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
