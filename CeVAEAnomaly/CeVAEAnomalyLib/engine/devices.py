"""Choosing the compute device."""
from __future__ import annotations

import logging

import torch

from ..errors import CeVAEError
from ..options import RunOptions

log = logging.getLogger(__name__)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda > mps > cpu. An unavailable accelerator falls back to the CPU with a warning; a GPU index the
    machine lacks is refused."""
    RunOptions(device=name)  # the name checked as everywhere (cuda:N, no other suffix)
    base, _, index = name.partition(":")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA was requested but is not available; using the CPU.")
        return torch.device("cpu")
    if base == "mps" and not _mps_available():
        log.warning("MPS was requested but is not available; using the CPU.")
        return torch.device("cpu")
    if base == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise CeVAEError(f"There is no GPU {name!r}: this machine has {torch.cuda.device_count()} (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}).")
    return torch.device(name)
