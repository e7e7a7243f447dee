"""Progress on the terminal for long commands."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ConsoleProgress:
    """A one-line progress bar on a terminal; otherwise a line every 10 s (and a last one) for long runs."""

    def __init__(self, label: str, stream: Optional[TextIO] = None) -> None:
        self.label, self.stream = label, stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = self.t0  # non-terminal: a line every 10 s, none for quick runs

    def __call__(self, fraction: float, message: str) -> None:
        now = time.perf_counter()
        if self.tty:
            bar = "#" * int(30 * fraction)
            self.stream.write(f"\r{self.label} [{bar:<30}] {100 * fraction:5.1f}% {message[:50]:<50}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last >= 10.0 or (fraction >= 1.0 and self.last > self.t0):
            self.last = now
            self.stream.write(f"{self.label}: {100 * fraction:5.1f}% {message} ({now - self.t0:.0f} s)\n")
            self.stream.flush()
