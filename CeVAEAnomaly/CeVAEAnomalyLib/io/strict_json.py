"""JSON that every standard parser reads: a non-finite number (a threshold of inf: nothing labelled) is written as
the text "inf", "-inf" or "nan", never as the Infinity or NaN tokens that Python alone accepts."""
from __future__ import annotations

import json
import math
from typing import Any

_WORDS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` of ``value`` with its non-finite numbers as text."""
    return json.dumps(_plain(value), allow_nan=False, **options)


def number(value: Any) -> Any:
    """A number field read back from :func:`dumps`: the text "inf", "-inf" or "nan" as the number it stands for
    (anything else as it is, for the caller's type check). Only for fields that hold numbers: a text field may
    hold these words."""
    return _WORDS.get(value, value) if isinstance(value, str) else value


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
