"""One long run's warnings about its scans, each said once.

A run (``train``, ``adapt``) masks a scan for its slices and again for its scores (the calibration): the automatic
mask's warnings are said once by :func:`~..engine.brainmask.each_warning_once`, and the preprocessing's of a given mask
or the scan's voxels (a mask of several values, NaN voxels in the brain) by the filter here, which drops a warning the
run said already in the same words (which name the scan: a changed scan says other figures).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Set

from ..engine import brainmask, preprocess

# what the run under way has said of its scans' preprocessing, in words; None outside a run (per thread and task)
_said: ContextVar[Optional[Set[str]]] = ContextVar("cevae_preprocessing_said", default=None)


class _SaidOnce(logging.Filter):
    """Drops a record of the preprocessing that the run under way (in the logging thread's context) said already;
    outside a run every record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        said = _said.get()
        if said is None:
            return True
        message = record.getMessage()
        if message in said:
            return False
        said.add(message)
        return True


preprocess.log.addFilter(_SaidOnce())  # (inert outside a run: a detection's scan says what it finds)


@contextmanager
def each_warning_once() -> Iterator[None]:
    """One run (usable as a decorator) in which each warning about a scan, the automatic mask's and the
    preprocessing's, is said once; a run within a run is the same run."""
    if _said.get() is not None:
        yield
        return
    token = _said.set(set())
    try:
        with brainmask.each_warning_once():
            yield
    finally:
        _said.reset(token)
