"""Free disk space, checked before a long run (train, adapt) reads or writes anything.

What the run's outputs need is known from the model's size: each run's checkpoint (weights and the optimiser's two
moments), a temporary copy of one while it is written, the model file and the loss logs. A disk with less free space
than that is refused at once, with the figures. The slice cache's need is only an upper bound (every slice of every
scan in every orientation, as many as the scan's longest side has voxels; a brain fills fewer, and a given cache
folder may hold the scans already), so a disk short of it is warned of, not refused.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import SimpleITK as sitk
import torch

from ..engine.config import ModelConfig
from ..engine.model import CeVAE
from ..errors import CeVAEError, Wording
from .cache import temporary_folder

log = logging.getLogger(__name__)
CHECKPOINT_EXTRA = 1 << 20  # a checkpoint's own records (random streams, run identity, parts) and pickle framing
LOG_BYTES = 1 << 20  # a run's loss log, and the small files beside the outputs
ENTRY_EXTRA = 1 << 13  # a slice cache entry's .npy header and its .json record


def weight_bytes(model: ModelConfig, half: bool = False) -> int:
    """The bytes of a model's weights (its state dict), float32 or, with ``half``, float16."""
    with torch.device("meta"):  # shapes only, no memory
        state = CeVAE(model).state_dict()
    return sum(t.numel() * (2 if half and t.is_floating_point() else t.element_size()) for t in state.values())


def checkpoint_bytes(model: ModelConfig) -> int:
    """About the size of a run's checkpoint: its float32 weights and Adam's two moments of each parameter."""
    with torch.device("meta"):
        params = sum(p.numel() * p.element_size() for p in CeVAE(model).parameters())
    return weight_bytes(model) + 2 * params + CHECKPOINT_EXTRA


def cache_bytes(images: Sequence[Path], orientations: int, side: int) -> int:
    """At most the slice cache's bytes for ``images`` in ``orientations`` orientations at ``side``: a model slice
    (float32) for each voxel along a scan's longest side, in each orientation; a scan whose header cannot be read (a
    series folder, a damaged file) is left out; a folder is not given to ITK, whose HDF5 reader prints C diagnostics
    to stderr on one."""
    slices = 0
    for image in images:
        if Path(image).is_dir():
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        slices += max(reader.GetSize())
    return orientations * (slices * side * side * 4 + len(images) * ENTRY_EXTRA)


def check_free_space(what: str, checkpoints: Sequence[Path], out: Path, model: ModelConfig, half: bool,
                     images: Sequence[Path], orientations: int, cache_dir: Optional[Path], wording: Wording) -> None:
    """Refuse the run ``what`` ('This training', 'This adaptation') where the disk of ``out`` has less free space
    than its ``checkpoints`` (those not written yet, and a temporary copy of one), its model file and loss logs need;
    warn where the disk of the slice cache (``cache_dir``, or the system's temporary folder) may be short of the
    slices of ``images`` in ``orientations`` orientations (:func:`cache_bytes`, an upper bound)."""
    each = checkpoint_bytes(model)
    new = [p for p in checkpoints if not p.is_file()]  # a resumed or replaced one is rewritten in place (+ a copy)
    outputs = each * (len(new) + 1) + weight_bytes(model, half) + LOG_BYTES * len(checkpoints)
    folder = _existing(out.parent)
    free = _free(folder)
    if free is not None and free < outputs:
        raise CeVAEError(f"{what} needs about {_mb(outputs)} MB in {folder} ({len(new)} new checkpoint(s) of "
                         f"{_mb(each)} MB, a temporary copy of one and the model), {_mb(free)} MB free. Free some "
                         f"space there, or choose another {wording.out} on a disk with room.")
    cache = cache_bytes(images, orientations, model.input_size)
    where = _existing(Path(cache_dir) if cache_dir is not None else temporary_folder(wording))
    shared = free is not None and _device(where) == _device(folder)
    room = (free - outputs) if shared else _free(where)
    if room is not None and room < cache:
        log.warning("The slice cache in %s may need up to %s MB (every slice of %d volume(s) in %d orientation(s)), "
                    "%s MB free%s: the run may stop for a full disk as it prepares the scans. %s.", where,
                    _mb(cache), len(images), orientations, _mb(max(room, 0)),
                    f" beside the {_mb(outputs)} MB of the outputs" if shared else "", wording.cache_room)


def _existing(folder: Path) -> Path:
    """``folder``, or the nearest folder above it that exists (where it will be made)."""
    folder = Path(os.path.abspath(folder))
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    return folder


def _free(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # unreadable: the write says what is wrong
        return None


def _device(folder: Path) -> Optional[int]:
    try:
        return os.stat(folder).st_dev
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f}" if n >= 1e7 else f"{n / 1e6:.2g}"
