"""Training data: the subject split, and one healthy volume to model slices."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..engine.config import PreprocessConfig
from ..io.images import read_image
from ..io.labels import refuse_label_image
from ..io.manifest import Subject
from ..engine.preprocess import brain_array, prepare

log = logging.getLogger(__name__)


_VOXELS: Dict[str, str] = {}  # file sha256 -> voxel sha256, for this process (adapt's runs read each scan once)


def voxel_checksums(images: Sequence[Path], checksums: Optional[Mapping[Path, str]] = None) -> Dict[Path, str]:
    """:func:`~..io.checksum.voxel_sha256` of each image (one digest for the same scan saved in two formats, or
    compressed and not), for :func:`unique_subjects`; with ``checksums`` (each file's sha256) a file content
    already read in this process is not read again."""
    from ..io.checksum import voxel_sha256

    out = {}
    for image in images:
        known = checksums.get(image) if checksums is not None else None
        if known is None:
            out[image] = voxel_sha256(image)
        else:
            out[image] = _VOXELS.get(known) or _VOXELS.setdefault(known, voxel_sha256(image))
    return out


def unique_subjects(subjects: Sequence[Subject], checksums: Dict[Path, str]) -> List[Subject]:
    """The subjects without repeats of an image already listed (same content: by ``checksums``; train, calibrate
    and adapt give :func:`voxel_checksums`), in their order.

    A volume listed twice would otherwise land in training and in validation/calibration at once. A brain mask
    given only on a repeat is kept (the first listing would have had it computed), and the warning says which
    mask is used.
    """
    seen: Dict[str, Subject] = {}
    for s in subjects:
        key = checksums[s.image]
        first = seen.setdefault(key, s)
        if first is s:
            continue
        if first.mask is None and s.mask is not None:
            seen[key] = replace(first, mask=s.mask)
            used = f", with the brain mask {s.mask} given on its repeat"
        elif s.mask is not None and Path(os.path.abspath(s.mask)) != Path(os.path.abspath(first.mask)):
            used = f", with the brain mask {first.mask} (the repeat's {s.mask} is not used)"
        else:
            used = ""
        log.warning("%s repeats the image %s (same content); it is used once%s.", s.image, first.image, used)
    return list(seen.values())


def person_groups(subjects: Sequence[Subject]) -> List[List[int]]:
    """The indices of ``subjects`` by person scanned (:attr:`Subject.group`), in order of first appearance."""
    groups: Dict[Tuple[str, str], List[int]] = {}
    for i, s in enumerate(subjects):
        groups.setdefault(s.group, []).append(i)
    return list(groups.values())


def split_subjects(subjects: Sequence[Subject], val_fraction: float, seed: int) -> Tuple[List[Subject], List[Subject]]:
    """Split by person (no person's scans on both sides; a volume of unknown person is a person of its own): the
    share ``val_fraction`` of the persons is held out, at least one is trained on."""
    groups = person_groups(subjects)
    order = np.random.default_rng(seed).permutation(len(groups))
    held = {i for g in order[:_held_out(len(groups), val_fraction)] for i in groups[g]}
    val = [s for i, s in enumerate(subjects) if i in held]
    train = [s for i, s in enumerate(subjects) if i not in held]
    return train, val


def _held_out(n: int, val_fraction: float) -> int:
    """How many of ``n`` persons :func:`split_subjects` holds out: the share, rounded, leaving one to train on."""
    return min(int(round(n * val_fraction)), n - 1)


def persons_to_hold_out(val_fraction: float) -> Optional[int]:
    """The fewest persons with which :func:`split_subjects` holds one out at ``val_fraction``; None if none do."""
    for n in range(2, 100_000):
        if _held_out(n, val_fraction) >= 1:
            return n
    return None


def subject_slices(subject: Subject, cfg: PreprocessConfig, orientations: Sequence[str]) -> List[np.ndarray]:
    """Per orientation, the normalised float32 model slices [N,S,S] of one subject with enough brain in them.
    A problem of the subject's image or mask is reported naming its image (in a cohort, which one)."""
    from ..engine.brainmask import given_or_computed_mask

    image = read_image(subject.image)
    with subject.named_errors():
        refuse_label_image(image, subject.mask is not None)  # a mask or a segmentation listed as a scan
        brain = brain_array(image, given_or_computed_mask(image, subject.mask, str(subject.image),
                                                          where=f"{subject.image}: "), f"{subject.image}: ")
        out = []
        for orientation in orientations:
            stack = prepare(image, brain, cfg, orientation)
            keep = stack.brain.reshape(len(stack.brain), -1).mean(1) >= cfg.min_brain_fraction
            out.append(np.ascontiguousarray(stack.slices[keep], dtype=np.float32))
    return out
