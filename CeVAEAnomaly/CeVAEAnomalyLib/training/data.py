"""Training data: manifests, the subject split, and one healthy volume to model slices."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..engine.config import PreprocessConfig
from ..errors import CeVAEError
from ..io.images import read_image
from ..engine.preprocess import mask_array, prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """One healthy volume and its optional brain mask."""

    image: Path
    mask: Optional[Path] = None

    @property
    def name(self) -> str:
        n = self.image.name
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
            if n.endswith(ext):
                return n[: -len(ext)]
        return n


def read_manifest(path: Path) -> List[Subject]:
    """Subjects from a CSV with columns ``image,mask`` (mask may be empty; paths relative to the CSV)."""
    path = Path(path)
    if not path.is_file():
        raise CeVAEError(f"The manifest {path} does not exist.")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise CeVAEError(f"The manifest {path} needs a header with an 'image' column (and optionally 'mask').")
        subjects = []
        for row in reader:
            img = (row.get("image") or "").strip()
            if not img:
                continue
            msk = (row.get("mask") or "").strip()
            subjects.append(Subject(path.parent / img, (path.parent / msk) if msk else None))
    if not subjects:
        raise CeVAEError(f"The manifest {path} lists no images.")
    return subjects


def unique_subjects(subjects: Sequence[Subject], checksums: Dict[Path, str]) -> List[Subject]:
    """The subjects without repeats of an image already listed (same content), in their order.

    A volume listed twice would otherwise land in training and in validation/calibration at once.
    """
    seen: Dict[str, Subject] = {}
    for s in subjects:
        first = seen.setdefault(checksums[s.image], s)
        if first is not s:
            log.warning("%s repeats the image %s (same content); it is used once.", s.image, first.image)
    return list(seen.values())


def split_subjects(subjects: Sequence[Subject], val_fraction: float, seed: int) -> Tuple[List[Subject], List[Subject]]:
    """Subject-level split (no subject in both); at least one training subject."""
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = int(round(len(subjects) * val_fraction))
    n_val = min(n_val, len(subjects) - 1)
    val = [subjects[i] for i in sorted(order[:n_val])]
    train = [subjects[i] for i in sorted(order[n_val:])]
    return train, val


def subject_slices(subject: Subject, cfg: PreprocessConfig, orientations: Sequence[str]) -> List[np.ndarray]:
    """Per orientation, the normalised float32 model slices [N,S,S] of one subject with enough brain in them."""
    image = read_image(subject.image)
    if subject.mask is not None:
        brain = mask_array(read_image(subject.mask, "brain mask"), image)
    else:
        from ..engine.brainmask import compute_brain_mask

        log.info("No mask for %s: computing one automatically.", subject.image.name)
        brain = mask_array(compute_brain_mask(image), image)
    out = []
    for orientation in orientations:
        stack = prepare(image, brain, cfg, orientation)
        keep = stack.brain.reshape(len(stack.brain), -1).mean(1) >= cfg.min_brain_fraction
        out.append(np.ascontiguousarray(stack.slices[keep], dtype=np.float32))
    return out
