"""Left-right symmetry of the brain: the mid-sagittal plane, mirrored images and asymmetry maps.

Brains are nearly left-right symmetric and most lesions are not. The mid-sagittal plane is found
by reflecting a coarse copy of the brain through candidate planes (near the physical x = const
plane through the brain's centre) and keeping the plane under which the brain best matches its
mirror image. A voxel's asymmetry is its intensity difference to the voxel at its mirror position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..io.images import in_voxels
from .preprocess import Region, brain_region, region_image

_COARSE_MM = 4.0  # grid spacing used to find the plane
# Coordinate search, coarse to fine: the tilts reach ±20° (a patient's head rolled or turned in the scanner;
# with ±8° a 10° roll left the plane 5° off), the middle stage corrects what one axis at a time missed.
_SHIFTS_MM = (np.arange(-10.0, 10.01, 2.0), np.arange(-10.0, 10.01, 2.0), np.arange(-1.0, 1.01, 0.5))
_TILTS_DEG = (np.arange(-20.0, 20.01, 2.0), np.arange(-4.0, 4.01, 1.0), np.arange(-1.0, 1.01, 0.5))


@dataclass(frozen=True)
class MidPlane:
    """The plane {p : normal · p = offset} in physical (LPS) millimetres; ``normal`` has unit length. ``match``: for
    an estimated plane, the correlation of the brain's coarse image with its mirror image about it (the search's
    score; not compared); None for a plane not estimated."""

    normal: Tuple[float, float, float]
    offset: float
    match: Optional[float] = field(default=None, compare=False)

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


def plane_distance_mm(image: sitk.Image, plane: MidPlane) -> np.ndarray:
    """Signed distance (mm) of every voxel centre of ``image`` to ``plane``, float32 (k, j, i)."""
    normal = np.asarray(plane.normal, float)
    ci, cj, ck = normal @ (np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing()))
    k, j, i = (np.arange(n, dtype=np.float32) for n in image.GetSize()[::-1])
    base = float(normal @ np.asarray(image.GetOrigin(), float) - plane.offset)
    return (base + ck * k[:, None, None] + cj * j[None, :, None] + ci * i[None, None, :]).astype(np.float32)


def estimate_midplane(image: sitk.Image, brain: sitk.Image) -> MidPlane:
    """The mid-sagittal plane: the reflection under which the brain best matches itself.

    ``brain`` (> 0 inside) shares ``image``'s grid. Coarse-to-fine search over the plane's left-right
    shift (±10 mm) and its tilts about the vertical and the front-back axes (±20°), maximising the
    correlation of the brain's coarse (~4 mm) image with its mirror image over the brain.
    """
    arr = sitk.GetArrayViewFromImage(image)
    inside = sitk.GetArrayViewFromImage(brain) > 0
    scaled = np.zeros(arr.shape, np.float32)
    scaled[inside] = _unit_scaled(arr[inside])
    img = sitk.GetImageFromArray(scaled)
    img.CopyInformation(image)
    return _search(img)


def _unit_scaled(values: np.ndarray) -> np.ndarray:
    """Brain intensities scaled by their 1st-99th percentiles and clipped to [0, 1.5], as float32; float64
    input is scaled in float64 first (huge values would overflow float32). Scaled alike in any units (a volume
    in units 10⁻⁸ as large gives the same values); equal percentiles scale by 1."""
    values = values.astype(np.float64 if values.dtype == np.float64 else np.float32, copy=False)
    lo, hi = np.percentile(values, [1, 99])
    span = float(hi - lo)
    return np.clip((values - lo) / (span if span > 0 else 1.0), 0, 1.5).astype(np.float32, copy=False)


def _search(scaled: sitk.Image) -> MidPlane:
    """:func:`estimate_midplane` on brain intensities scaled to about [0, 1], 0 outside the brain.

    The image is first brought to one voxel order (LPS; a pure index operation), so that the ~4 mm bins,
    which start at index 0 and drop the remainder, and hence the plane, do not depend on how the same
    physical image is stored. A bin factor is at most the axis' size (thin slabs); it is rounded from
    :func:`~..io.images.in_voxels`, so that a voxel size read a few bits off (from Slicer's IJK-to-RAS matrix)
    does not cross a rounding tie (4 mm is 2.5 voxels of 1.6 mm).
    """
    scaled = sitk.DICOMOrient(scaled, "LPS")
    factor = [min(n, max(1, int(round(in_voxels(_COARSE_MM, s))))) for n, s in zip(scaled.GetSize(),
                                                                                  scaled.GetSpacing())]
    coarse = sitk.BinShrink(scaled, factor)
    arr = sitk.GetArrayFromImage(coarse)
    where = np.flatnonzero(arr.ravel() > 0)
    ref = arr.ravel()[where]
    ijk = np.argwhere(arr > 0)[:, ::-1]
    centre = np.asarray(coarse.TransformContinuousIndexToPhysicalPoint(ijk.mean(0).tolist()))
    best = [0.0, 0.0, 0.0]  # shift, tan yaw, tan roll
    # each plane is scored once: every stage but the first tries the best plane so far again (its step 0), and a
    # stage that starts where the last one did tries its shifts again
    scores: Dict[Tuple[float, ...], float] = {}

    def score(params: List[float]) -> float:
        key = tuple(params)
        if key not in scores:
            moved = sitk.GetArrayFromImage(mirror(coarse, plane_from(centre, *params))).ravel()[where]
            scores[key] = float(np.corrcoef(ref, moved)[0, 1]) if moved.std() > 0 else -1.0
        return scores[key]

    for shifts, tilts in zip(_SHIFTS_MM, _TILTS_DEG):
        for k, grid in ((0, best[0] + shifts), (1, np.tan(np.radians(tilts)) + best[1]),
                        (2, np.tan(np.radians(tilts)) + best[2])):
            values = []
            for v in grid:
                trial = list(best)
                trial[k] = float(v)
                values.append(score(trial))
            best[k] = float(grid[int(np.argmax(values))])
    plane = plane_from(centre, *best)
    return MidPlane(plane.normal, plane.offset, scores[tuple(best)])


def asymmetry(image: np.ndarray, mirrored: np.ndarray, both: np.ndarray, spacing: Tuple[float, float, float],
              sigma_mm: float = 2.0) -> np.ndarray:
    """Smoothed |image - mirrored| over voxels in ``both`` (brain here and at the mirror), 0 elsewhere.

    Arrays are numpy (k, j, i) on one grid with SimpleITK ``spacing`` (i, j, k); the absolute
    difference is smoothed with a Gaussian of ``sigma_mm`` (0: none) normalised by the smoothed
    mask, so voxels next to the mask's edge are not diluted by the zeros beyond it.
    """
    diff = np.abs(image.astype(np.float32) - mirrored.astype(np.float32))
    return _smooth_within(diff, both, spacing, sigma_mm)


def _smooth_within(diff: np.ndarray, both: np.ndarray, spacing: Tuple[float, float, float],
                   sigma_mm: float) -> np.ndarray:
    """:func:`asymmetry` of the float32 absolute difference ``diff``, which it overwrites and returns
    (large volumes: besides ``diff``, at most two more arrays of its size alive at once).

    Both smoothings run on the bounding box of ``both`` grown by :data:`_LINE_ENDS` voxels: ITK's recursive
    Gaussian starts each line from its end value held constant, so a line with at least that many zeros at
    each end is filtered exactly as the same line with more zeros (the whole array) is, and the values
    outside the box, all zeros before and outside ``both`` after, are not needed.
    """
    diff[~both] = 0
    if sigma_mm <= 0 or not both.any():
        return diff
    box = brain_region(both, _LINE_ENDS)
    part, inside = diff[box], both[box]  # (``part`` is a view: written below, it writes ``diff``)
    num = _smooth(sitk.GetImageFromArray(part), spacing, sigma_mm)
    part[...] = sitk.GetArrayViewFromImage(num)  # from here ``part`` holds the smoothed difference
    del num
    den = _smooth(sitk.Cast(sitk.GetImageFromArray(inside.view(np.uint8)), sitk.sitkFloat32), spacing, sigma_mm)
    clamped = np.maximum(sitk.GetArrayViewFromImage(den), 1e-6)
    del den
    np.divide(part, clamped, out=part)
    del clamped
    part[~inside] = 0
    return diff


# The values at each end of a line that ITK's recursive Gaussian (4th-order causal and anti-causal passes) takes
# into its boundary terms; zeros there and beyond leave every value of the line alike.
_LINE_ENDS = 4


def _smooth(img: sitk.Image, spacing: Tuple[float, float, float], sigma_mm: float) -> sitk.Image:
    """``img`` (float32, a fresh copy: its spacing is set here) smoothed with a Gaussian of ``sigma_mm``."""
    img.SetSpacing(tuple(float(s) for s in spacing))
    return sitk.SmoothingRecursiveGaussian(img, float(sigma_mm))


@dataclass(frozen=True)
class BoxAsymmetry:
    """The smoothed intensity asymmetry of a volume on a box of its grid, with the plane it mirrored about.

    It depends on the image and its brain only, so one serves every score map of that volume.
    """

    asymmetry: np.ndarray  # float32 (k, j, i) on the box
    plane: MidPlane  # the estimated mid-sagittal plane
    image: sitk.Image  # the volume whose grid holds the box (its voxels are not used)
    region: Region  # the box

    @property
    def reflection(self) -> sitk.AffineTransform:
        """The reflection about :attr:`plane`."""
        return self.plane.reflection()


def box_asymmetry(image: sitk.Image, brain: np.ndarray, region: Region, sigma_mm: float) -> BoxAsymmetry:
    """The asymmetry of ``image`` on ``region`` of its grid (a box that holds the whole brain).

    ``brain``: bool (k, j, i) mask on the region. Intensities are scaled by the brain's
    1st-99th percentiles (clipped to [0, 1.5], as the model sees them) and mirrored about the
    estimated mid-sagittal plane; voxels whose mirror is not brain get asymmetry 0. Everything is
    computed on the box only (a mirror outside it is outside the brain).
    """
    norm = _scaled_box(image, brain, region)
    plane = _search(norm)
    reflection = plane.reflection()
    mirrored = sitk.Resample(norm, norm, reflection, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = region_image(brain.view(np.uint8), image, region)
    mask = sitk.Resample(mask, mask, reflection, sitk.sitkNearestNeighbor, 0)
    both = brain & (sitk.GetArrayViewFromImage(mask) > 0)  # brain here and at the mirror position
    del mask
    diff = np.subtract(sitk.GetArrayViewFromImage(norm), sitk.GetArrayViewFromImage(mirrored))  # |image - mirrored|
    del norm, mirrored
    np.abs(diff, out=diff)
    a = _smooth_within(diff, both, image.GetSpacing(), sigma_mm)
    return BoxAsymmetry(a, plane, image, region)


def box_midplane(image: sitk.Image, brain: np.ndarray, region: Region) -> MidPlane:
    """The mid-sagittal plane :func:`box_asymmetry` estimates, without the asymmetry (``brain``: bool (k, j, i) on
    ``region`` of ``image``'s grid, a box that holds the whole brain)."""
    return _search(_scaled_box(image, brain, region))


def _scaled_box(image: sitk.Image, brain: np.ndarray, region: Region) -> sitk.Image:
    """``region`` of ``image`` with its ``brain`` intensities scaled by :func:`_unit_scaled`, 0 elsewhere."""
    scaled = np.zeros(brain.shape, np.float32)
    scaled[brain] = _unit_scaled(sitk.GetArrayViewFromImage(image)[region][brain])
    return region_image(scaled, image, region)  # (large volumes: the plane search makes copies of its own)


def fuse_with_asymmetry(score: np.ndarray, box: BoxAsymmetry, floor: float = 0.0, power: float = 1.0,
                        side: bool = False) -> np.ndarray:
    """``score`` (float32 on the box :func:`box_asymmetry` used) fused with the asymmetry by :func:`fuse`.

    ``side``: the asymmetry is weighted by :func:`side_weight` of the score and the score mirrored
    about the same plane, so a lesion lights up its healthy mirror position much less (reduced,
    not removed).
    """
    if not side:
        return fuse(score, box.asymmetry, floor, power)
    here = region_image(score, box.image, box.region)
    mirrored = sitk.Resample(here, here, box.reflection, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    del here
    total = np.maximum(sitk.GetArrayViewFromImage(mirrored), 0, dtype=np.result_type(score, np.float32))
    del mirrored
    factor = _side_weight(score, total)
    np.multiply(box.asymmetry, factor, out=factor)
    same = np.result_type(factor, floor) == factor.dtype
    return _fused(score, np.add(factor, floor, out=factor) if same else floor + factor, power)


def side_weight(score: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """min(1, 2 s / (s + m)) for the score s here and m at the mirror position (negatives as 0): 1 where
    this side scores at least as high as its mirror, falling to 0 where only the mirror scores."""
    return _side_weight(score, np.maximum(mirrored, 0, dtype=np.result_type(score, mirrored)))


def _side_weight(score: np.ndarray, total: np.ndarray) -> np.ndarray:
    """:func:`side_weight` of ``score`` and ``total``, the mirrored score's positive part in the dtype of both,
    written into ``total`` (large volumes: one more array of its size alive at once)."""
    s = np.maximum(score, 0, dtype=total.dtype)
    total += s
    scored = total > 0
    total[~scored] = 1
    s *= 2
    weight = np.divide(s, total, out=total)
    del s
    np.minimum(weight, 1, out=weight)
    weight[~scored] = 0
    return weight.astype(np.float32, copy=False)


def fuse(score: np.ndarray, asym: np.ndarray, floor: float = 0.0, power: float = 1.0) -> np.ndarray:
    """score^power × (floor + asymmetry) for score >= 0: floor 0 is the plain product; a positive floor
    keeps part of the score where both sides agree (midline or bilateral anomalies); power < 1 gives
    the asymmetry more say in the ranking."""
    return _fused(score, floor + asym, power)


# powers taken by the correctly rounded ufunc, as NumPy 2's np.power takes them; NumPy 1.26 (Slicer 5.6, 5.8) takes
# them by powf, up to 1 ulp off in float32, and a map would differ between the two
_EXACT_POWERS = {0.5: np.sqrt, 2.0: np.square}


def _fused(score: np.ndarray, factor: np.ndarray, power: float) -> np.ndarray:
    """score^power × ``factor`` (:func:`fuse`), written into ``factor`` where its dtype holds the product."""
    s = score
    if power != 1:
        s = np.maximum(score, 0)
        dtype = np.result_type(s, power)
        out = s if dtype == s.dtype else None
        exact = _EXACT_POWERS.get(float(power))
        s = np.power(s, power, out=out) if exact is None else exact(s, out=out, dtype=dtype)
    out = np.multiply(s, factor, out=factor if factor.dtype == np.result_type(s, factor) else None)
    return out.astype(np.float32, copy=False)
