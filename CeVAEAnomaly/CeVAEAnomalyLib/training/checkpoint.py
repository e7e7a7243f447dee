"""Checkpoints: the resumable state of a run, written atomically and verified before it replaces the last.

The training log is trimmed back to a checkpoint on resume.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict

import torch

from ..errors import CeVAEError
from ..io.atomic import atomic_path

CHECKPOINT_VERSION = 1


def write_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write ``state`` beside ``path``, read it back, then rename: a failed write keeps the previous one."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
            if torch.load(tmp, map_location="cpu", weights_only=True).get("step") != state["step"]:
                raise OSError("the file read back differs from what was written")
    except (OSError, RuntimeError, EOFError) as exc:  # torch reports failed writes as RuntimeError
        raise CeVAEError(f"Could not write the checkpoint {path}: {_reason(exc)}; the previous one is kept.") from None


def _reason(exc: BaseException) -> str:
    """The cause of a failed write in words (torch's own messages name C++ source lines)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "the file could not be written completely (disk full or a file-size limit?)"


def read_checkpoint(path: Path, model_cfg: Dict[str, Any], shared_hint: str = "") -> Dict[str, Any]:
    """The state saved at ``path`` for a model of configuration ``model_cfg``."""
    if not path.is_file():
        raise CeVAEError(f"--resume was given but there is no checkpoint at {path}{shared_hint}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling is restricted to tensors and plain containers
        raise CeVAEError(f"The checkpoint {path} cannot be read safely: {exc}") from None
    if state.get("version") != CHECKPOINT_VERSION or state.get("model_cfg") != model_cfg:
        raise CeVAEError(f"The checkpoint {path} belongs to another model configuration.")
    return state


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from (they are trained again)."""
    if not path.is_file():
        return
    from ..io.atomic import atomic_write_text

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) < len(rows):
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write_text(path, text.getvalue())
