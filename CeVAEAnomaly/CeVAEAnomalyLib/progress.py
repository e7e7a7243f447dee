"""Progress reporting and cancellation shared by the command line and the Slicer module.

A progress callback takes ``(fraction, message)``. To cancel, the callback raises
:class:`Cancelled`; the core calls it between chunks of work, so nothing is left half-done.
"""
from __future__ import annotations

from typing import Callable, Optional

from .errors import CeVAEError

ProgressCallback = Callable[[float, str], None]


class Cancelled(CeVAEError):
    """The user cancelled the run."""


def checked(callback: object, name: str = "progress") -> Optional[ProgressCallback]:
    """``callback`` if it is None or callable; otherwise a one-line :class:`CeVAEError` naming the argument
    ``name``, so that a wrong value is refused before any work, not as a TypeError where it is first called."""
    if callback is not None and not callable(callback):
        raise CeVAEError(f"{name} must be a function taking (fraction, message), or None; got "
                         f"{type(callback).__name__} {callback!r:.60}.")
    return callback  # type: ignore[return-value]


def report(callback: Optional[ProgressCallback], fraction: float, message: str) -> None:
    """Call ``callback`` if given, clamping the fraction to [0, 1]."""
    if callback is not None:
        callback(min(1.0, max(0.0, fraction)), message)


def scaled(callback: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """A callback that maps a sub-task's [0, 1] onto [start, stop] of the parent's progress."""
    if callback is None:
        return None
    return lambda f, msg: callback(start + (stop - start) * f, msg)


def labelled(callback: Optional[ProgressCallback], prefix: str) -> Optional[ProgressCallback]:
    """A callback that prefixes every message with ``prefix: ``."""
    if callback is None:
        return None
    return lambda f, msg: callback(f, f"{prefix}: {msg}")
