"""Progress on the terminal for long commands, and the command's results on its standard output."""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from typing import Optional, TextIO

from ..errors import CeVAEError

ELLIPSIS = "..."


def print_result(text: str) -> None:
    """Print ``text`` (a command's result: a report, JSON, metrics) and a newline on the standard output, at once. A
    reader that stopped (`| head`) ends it quietly, the rest dropped; a closed standard output (`>&-`), or one that
    cannot take it (a full disk), is a one-line error, not a result said to be done."""
    if sys.stdout is None:
        raise CeVAEError("the standard output is closed (>&-): the result could not be printed; send it to a file or "
                         "a pipe instead.")
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as exc:  # what is left in the buffer goes nowhere: no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(exc, BrokenPipeError):
            raise CeVAEError(f"could not write to the standard output: {exc.strerror or exc}.") from None


class ConsoleProgress:
    """A one-line progress bar on a terminal; otherwise a line every 10 s (and a last one) for long runs.
    ``columns``: the terminal's width (default: asked at each line, so a resized window is followed)."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, columns: Optional[int] = None) -> None:
        self.label, self.stream = label, stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.columns = columns
        self.t0 = time.perf_counter()
        self.last = self.t0  # non-terminal: a line every 10 s, none for quick runs

    def __call__(self, fraction: float, message: str) -> None:
        now = time.perf_counter()
        if self.tty:
            width = (self.columns or shutil.get_terminal_size().columns) - 1  # a full last column wraps the line
            bar = 30 if width >= 110 else 10 if width >= 90 else 0  # a narrow terminal: the message first
            head = f"{self.label} [{'#' * int(bar * fraction):<{bar}}]" if bar else self.label
            head += f" {100 * fraction:5.1f}% "
            room = max(len(ELLIPSIS) + 2, width - len(head))
            self.stream.write(f"\r{head}{fitted(message, room):<{room}}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last >= 10.0 or (fraction >= 1.0 and self.last > self.t0):
            self.last = now
            self.stream.write(f"{self.label}: {100 * fraction:5.1f}% {message} ({now - self.t0:.0f} s)\n")
            self.stream.flush()


def fitted(message: str, room: int) -> str:
    """``message`` in ``room`` characters: too long, its middle gives way, so that its end (a run's pace and the time
    left, in parentheses) stays in view beside its start."""
    if len(message) <= room:
        return message
    last = re.search(r" \([^()]*\)$", message)  # the closing parenthesis, whole where it leaves room for the start
    tail = len(last.group()) if last and len(last.group()) <= room - len(ELLIPSIS) - 8 else room // 2
    return message[:room - len(ELLIPSIS) - tail] + ELLIPSIS + message[len(message) - tail:]
