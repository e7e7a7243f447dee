"""Left-right symmetry of the brain: the mid-sagittal plane, mirrored images and asymmetry maps.

Brains are nearly left-right symmetric and most lesions are not. The mid-sagittal plane is found
by reflecting a coarse copy of the brain through candidate planes (near the physical x = const
plane through the brain's centre) and keeping the plane under which the brain best matches its
mirror image. A voxel's asymmetry is its intensity difference to the voxel at its mirror position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import numpy as np
import SimpleITK as sitk

_COARSE_MM = 3.0  # grid spacing used to find the plane
_SHIFTS_MM = (np.arange(-12.0, 12.01, 1.5), np.arange(-1.5, 1.51, 0.5))  # coarse, then fine
_TILTS_DEG = (np.arange(-10.0, 10.01, 2.0), np.arange(-1.5, 1.51, 0.5))


@dataclass(frozen=True)
class MidPlane:
    """The plane {p : normal · p = offset} in physical (LPS) millimetres; ``normal`` has unit length."""

    normal: Tuple[float, float, float]
    offset: float

    def reflection(self) -> sitk.AffineTransform:
        """The affine map p -> p - 2 (n·p - d) n (its own inverse)."""
        n = np.asarray(self.normal, float)
        t = sitk.AffineTransform(3)
        t.SetMatrix(tuple((np.eye(3) - 2 * np.outer(n, n)).ravel()))
        t.SetTranslation(tuple(2 * self.offset * n))
        return t

    def mirror_point(self, p: Iterable[float]) -> Tuple[float, float, float]:
        n = np.asarray(self.normal, float)
        q = np.asarray(list(p), float)
        return tuple(float(v) for v in q - 2 * (n @ q - self.offset) * n)


def plane_from(centre: np.ndarray, shift_mm: float, tan_yaw: float, tan_roll: float) -> MidPlane:
    """The plane through ``centre + (shift, 0, 0)`` with normal ∝ (1, tan_yaw, tan_roll)."""
    n = np.array([1.0, tan_yaw, tan_roll])
    n /= np.linalg.norm(n)
    point = np.asarray(centre, float) + np.array([shift_mm, 0.0, 0.0])
    return MidPlane(tuple(float(v) for v in n), float(n @ point))


def mirror(image: sitk.Image, plane: MidPlane, interpolator: int = sitk.sitkLinear,
           default: float = 0.0) -> sitk.Image:
    """``image`` reflected through ``plane``, on its own grid (voxels whose mirror lies outside get ``default``)."""
    return sitk.Resample(image, image, plane.reflection(), interpolator, default, image.GetPixelID())


def estimate_midplane(image: sitk.Image, brain: sitk.Image) -> MidPlane:
    """The mid-sagittal plane: the reflection under which the brain best matches itself.

    ``brain`` (> 0 inside) shares ``image``'s grid. Coarse-to-fine search over the plane's left-right
    shift (±12 mm) and its tilts about the vertical and the front-back axes (±10°), maximising the
    correlation of the 3 mm brain image with its mirror image.
    """
    coarse = _coarse_brain(image, brain)
    arr = sitk.GetArrayViewFromImage(coarse)
    ijk = np.argwhere(arr > 0)[:, ::-1]
    centre = np.asarray(coarse.TransformContinuousIndexToPhysicalPoint(ijk.mean(0).tolist()))
    best = [0.0, 0.0, 0.0]  # shift, tan yaw, tan roll

    def score(params) -> float:
        moved = sitk.GetArrayFromImage(mirror(coarse, plane_from(centre, *params)))
        both = (arr > 0) | (moved > 0)
        return float(np.corrcoef(arr[both], moved[both])[0, 1])

    for shifts, tilts in zip(_SHIFTS_MM, _TILTS_DEG):
        for k, grid in ((0, best[0] + shifts), (1, np.tan(np.radians(tilts)) + best[1]),
                        (2, np.tan(np.radians(tilts)) + best[2])):
            values = []
            for v in grid:
                trial = list(best)
                trial[k] = float(v)
                values.append(score(trial))
            best[k] = float(grid[int(np.argmax(values))])
    return plane_from(centre, *best)


def _coarse_brain(image: sitk.Image, brain: sitk.Image) -> sitk.Image:
    """Brain intensities scaled to [0, 1] by their 1st-99th percentiles, on a ~3 mm grid (0 outside)."""
    arr = sitk.GetArrayViewFromImage(image).astype(np.float32)
    inside = sitk.GetArrayViewFromImage(brain) > 0
    lo, hi = np.percentile(arr[inside], [1, 99])
    scaled = np.where(inside, np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1.5), 0).astype(np.float32)
    img = sitk.GetImageFromArray(scaled)
    img.CopyInformation(image)
    factor = [max(1, int(round(_COARSE_MM / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(img, factor)


def asymmetry(image: np.ndarray, mirrored: np.ndarray, both: np.ndarray, spacing: Tuple[float, float, float],
              sigma_mm: float = 2.0) -> np.ndarray:
    """Smoothed |image - mirrored| over voxels in ``both`` (brain here and at the mirror), 0 elsewhere.

    Arrays are numpy (k, j, i) on one grid with SimpleITK ``spacing`` (i, j, k); the absolute
    difference is smoothed with a Gaussian of ``sigma_mm`` (0: none) normalised by the smoothed
    mask, so voxels next to the mask's edge are not diluted by the zeros beyond it.
    """
    diff = np.where(both, np.abs(image.astype(np.float32) - mirrored.astype(np.float32)), 0).astype(np.float32)
    if sigma_mm <= 0:
        return diff
    num = _smooth(diff, spacing, sigma_mm)
    den = _smooth(both.astype(np.float32), spacing, sigma_mm)
    return np.where(both, num / np.maximum(den, 1e-6), 0).astype(np.float32)


def _smooth(arr: np.ndarray, spacing: Tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma_mm)))


def fuse(score: np.ndarray, asym: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """score × (floor + asymmetry): floor 0 is the plain product; a positive floor keeps part of the
    score where both sides agree (midline or bilateral anomalies)."""
    return (score * (floor + asym)).astype(np.float32)
