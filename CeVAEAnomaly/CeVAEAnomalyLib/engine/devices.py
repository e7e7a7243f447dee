"""Choosing the compute device."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import ContextManager

import torch

from ..errors import COMMAND_LINE_TRAIN, CeVAEError
from ..options import RunOptions

log = logging.getLogger(__name__)


class DeviceUnavailable(CeVAEError):
    """An accelerator asked for by name is missing where training needs it. Its message offers the CPU in the
    command line's words; :meth:`offering` in another front end's (errors.Wording.cpu_choice)."""

    def __init__(self, problem: str, cpu_choice: str = COMMAND_LINE_TRAIN.cpu_choice) -> None:
        self.problem = problem
        super().__init__(f"{problem} To train on the CPU, {cpu_choice}.")

    def offering(self, cpu_choice: str) -> "DeviceUnavailable":
        """The same problem, saying ``cpu_choice`` for how to choose the CPU instead."""
        return DeviceUnavailable(self.problem, cpu_choice)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str = "auto", strict: bool = False) -> torch.device:
    """auto: cuda > mps > cpu. An unavailable accelerator falls back to the CPU with a warning, or, ``strict`` (for
    training, where the CPU takes hours instead of minutes), is refused; a GPU index the machine lacks is refused."""
    RunOptions(device=name)  # the name checked as everywhere (cuda:N, no other suffix)
    base, _, index = name.partition(":")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    missing = (base == "cuda" and not torch.cuda.is_available()) or (base == "mps" and not _mps_available())
    if missing and strict:
        build = (" This PyTorch is a CPU-only build: install a CUDA build of torch (see the README's installation)."
                 if base == "cuda" and torch.version.cuda is None else "")
        raise DeviceUnavailable(f"{base.upper()} was asked for (device {name}) but is not available, and training on "
                                f"the CPU instead would take far longer.{build}")
    if missing:
        log.warning("%s was requested but is not available; using the CPU.", base.upper())
        return torch.device("cpu")
    if base == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise CeVAEError(f"There is no GPU {name!r}: this machine has {torch.cuda.device_count()} (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}).")
    return torch.device(name)


def mixed_precision(device: torch.device, enabled: bool) -> ContextManager[object]:
    """The autocast of ``--amp`` on ``device`` (bfloat16 on the CPU, float16 on a GPU); without ``enabled`` no autocast
    at all: torch before 2.5 has none for an Apple GPU (mps) and refuses to make one even disabled."""
    if not enabled:
        return nullcontext()
    try:
        return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)
    except RuntimeError as exc:  # e.g. torch < 2.5 on mps: "User specified an unsupported autocast device_type"
        raise CeVAEError(f"Mixed precision (--amp) is not available on {device.type} with torch {torch.__version__} "
                         f"({exc}); run without it, or on mps update torch to 2.5 or later.") from None
