"""The progress bar on a terminal: the line fits the terminal's width and keeps the end of a long message (an
adaptation's pace and time left), which was cut at 50 characters."""
from __future__ import annotations

import io

from CeVAEAnomalyLib.cli.console import ConsoleProgress, fitted

MESSAGE = ("Fine-tuning 2/3 (without colin27_t1): step 18 loss 0.0568 "
           "(1.4 steps/s; fine-tuning ends in about 2 min)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_message_keeps_its_time_left_on_a_terminal_line_that_fits_its_width():
    for columns in (80, 100, 160):
        stream = Terminal()
        ConsoleProgress("adapt", stream, columns=columns)(0.33, MESSAGE)
        line = stream.getvalue()
        assert line.startswith("\radapt ") and "33.0%" in line and len(line) - 1 <= columns - 1
        assert line.rstrip().endswith("(1.4 steps/s; fine-tuning ends in about 2 min)"), line
        assert "Fine-tun" in line
    stream = Terminal()
    ConsoleProgress("adapt", stream, columns=200)(0.33, MESSAGE)
    assert MESSAGE in stream.getvalue()  # room enough: whole


def test_fitted_gives_way_in_the_middle():
    assert fitted("short", 20) == "short"
    text = fitted("a" * 50 + " (the end)", 30)
    assert len(text) == 30 and text.endswith("... (the end)") and text.startswith("a")
    text = fitted("b" * 100, 20)
    assert len(text) == 20 and "..." in text
