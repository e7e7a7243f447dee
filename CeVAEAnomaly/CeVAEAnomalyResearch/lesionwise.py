"""Lesion-wise detection figures of a labelmap against a ground truth, as lesion-detection challenges report them.

Lesions are the connected components of the ground truth inside the evaluated voxels, and the labelmap's components
those of all its voxels above 0 (as detect's lesion table lists them), both 26-connected (8 in 2D) as the detector's
components (engine.postprocess.connected_components). A lesion is detected where at least one labelmap voxel overlaps
it; a labelmap component is false where it overlaps no (evaluated) ground-truth voxel. The first component is the one
detect's lesion table lists first (engine.postprocess.COMPONENT_ORDER of the score map).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.postprocess import COMPONENT_ORDER, connected_components, ranked_components


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise counts of one case's labelmap."""

    n_lesions: int  # ground-truth lesions (components of the truth inside the evaluated voxels)
    lesions_detected: int  # lesions at least one labelmap voxel overlaps
    false_components: int  # labelmap components overlapping no ground-truth voxel
    first_is_lesion: Optional[bool]  # a lesion case: whether the first component overlaps a lesion (False without
    # any component); None for a healthy case


def lesion_counts(truth: np.ndarray, flagged: np.ndarray, score: sitk.Image) -> LesionCounts:
    """The counts of the labelmap voxels ``flagged`` against the lesion voxels ``truth`` (bool arrays on the grid of
    ``score``, ``truth`` already cut to the evaluated voxels); ``score`` (finite at every flagged voxel) ranks the
    labelmap's components as detect's lesion table does."""
    hits = lesion_hits(truth, flagged, score)
    components = connected_components(_image(flagged, score))
    parts = sitk.GetArrayViewFromImage(components)
    n_components = int(parts.max(initial=0))
    touched = np.unique(parts[flagged & truth])
    first_is_lesion = None
    if hits:
        first = ranked_components(components, score, COMPONENT_ORDER)[0].label if n_components else 0
        first_is_lesion = first != 0 and bool(np.isin(first, touched))
    return LesionCounts(len(hits), sum(hit for _, hit in hits), n_components - int(np.count_nonzero(touched)),
                        first_is_lesion)


def lesion_hits(truth: np.ndarray, flagged: np.ndarray, like: sitk.Image) -> List[Tuple[int, bool]]:
    """Each ground-truth lesion of ``truth`` (as :func:`lesion_counts` counts them; bool arrays on the grid of
    ``like``): its number of voxels and whether a voxel of ``flagged`` overlaps it."""
    lesions = _labels(truth, like)
    n = int(lesions.max(initial=0))
    sizes = np.bincount(lesions.ravel(), minlength=n + 1)[1:]
    hit = np.zeros(n + 1, bool)
    hit[lesions[flagged & truth]] = True
    return [(int(size), bool(found)) for size, found in zip(sizes, hit[1:])]


def pooled_lesion_figures(cases: Sequence[Optional[LesionCounts]]) -> dict:
    """Lesion-wise figures over the cases with a labelmap (None: without one; all None: {}): ``n_lesions`` and
    ``lesions_detected`` summed, ``lesion_sensitivity`` (detected / all lesions; None without a lesion),
    ``false_components`` (mean per case), ``healthy_false_components`` (mean per healthy case; None without one) and
    ``first_is_lesion`` (the share of lesion cases whose first component is a lesion, a case without any component
    counting as a miss; None without a lesion case)."""
    counted = [case for case in cases if case is not None]
    if not counted:
        return {}
    lesions = sum(case.n_lesions for case in counted)
    detected = sum(case.lesions_detected for case in counted)
    healthy = [case.false_components for case in counted if not case.n_lesions]
    firsts = [case.first_is_lesion for case in counted if case.n_lesions]
    return {
        "n_lesions": lesions,
        "lesions_detected": detected,
        "lesion_sensitivity": detected / lesions if lesions else None,
        "false_components": float(np.mean([case.false_components for case in counted])),
        "healthy_false_components": float(np.mean(healthy)) if healthy else None,
        "first_is_lesion": float(np.mean(firsts)) if firsts else None,
    }


def _labels(voxels: np.ndarray, like: sitk.Image) -> np.ndarray:
    """The connected components of ``voxels`` (labels 1, 2, ...; 0 elsewhere) as the detector's."""
    return sitk.GetArrayFromImage(connected_components(_image(voxels, like)))


def _image(voxels: np.ndarray, like: sitk.Image) -> sitk.Image:
    """``voxels`` (bool) as a uint8 image on the grid of ``like``."""
    image = sitk.GetImageFromArray(voxels.astype(np.uint8))
    image.CopyInformation(like)
    return image
