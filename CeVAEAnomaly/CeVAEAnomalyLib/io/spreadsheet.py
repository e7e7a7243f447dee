"""Text cells of the CSV tables written (batch summary, evaluate's metrics), kept text in a spreadsheet.

Excel and LibreOffice take a cell that starts with ``=``, ``+``, ``-`` or ``@`` (OWASP adds a tab and a carriage
return) for a formula: a scan named ``=HYPERLINK(...)`` would run as one. Such a text cell is written with a single
quote before it (OWASP's advice on CSV injection), and so is one that starts with a quote, so that reading a cell
back (:func:`read_cell`) gives every text as it was. Numbers (``-1.5``, ``-inf``) are written as they are.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"
_NUMBER = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)")


def written_cell(value: object) -> object:
    """``value`` as a table writes it: text that a spreadsheet would take for a formula, or that starts with a
    quote, led by a quote; a number (or its text) and anything else as it is."""
    if isinstance(value, str) and value.startswith((QUOTE, *FORMULA_STARTS)) and not _NUMBER.fullmatch(value):
        return QUOTE + value
    return value


def written_row(values: Iterable[object]) -> List[object]:
    """A row's cells as a table writes them (:func:`written_cell`)."""
    return [written_cell(v) for v in values]


def read_cell(text: str) -> str:
    """A cell's text as it was before :func:`written_cell`: without one leading quote."""
    return text[len(QUOTE):] if text.startswith(QUOTE) else text


def read_row(row: Dict[str, str]) -> Dict[str, str]:
    """A csv.DictReader row of such a table with its text cells as they were (:func:`read_cell`); a short row's
    missing cells (None) and a long row's extra ones (a list) as they are."""
    return {k: read_cell(v) if isinstance(v, str) else v for k, v in row.items()}
