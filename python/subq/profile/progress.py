"""A progress bar on stderr, with no dependency: redrawn in place on a terminal; one line per size in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.start = time.monotonic()

    def begin(self, what: str) -> None:
        """A new size starts: in a log, one line saying which."""
        if self.enabled and not self.tty:
            print(f"[{self.done}/{self.total}] {what}", file=self.stream, flush=True)

    def step(self, what: str) -> None:
        """One measurement is about to run."""
        if self.tty:
            filled = WIDTH * self.done // self.total
            elapsed = time.monotonic() - self.start
            bar = "#" * filled + "." * (WIDTH - filled)
            self.stream.write(f"\r\033[K[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {what}")
            self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
