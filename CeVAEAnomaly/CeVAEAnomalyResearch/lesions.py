"""Synthetic lesions inserted into healthy brain MRI, for benchmarks with a known ground truth.

Each lesion is a randomly oriented ellipsoid whose border may be perturbed by a smooth
direction-dependent bump field (irregular but star-shaped, so one connected blob), blended
into the image with a soft alpha falloff. Intensities are set relative to robust statistics
of the brain (percentiles inside the mask), so uint8 and float images behave alike.

Kinds: ``hypo``/``hyper`` (CSF-dark or above the brain's 99th percentile, a quarter of the
anatomy kept), ``ring`` (bright rim, dark core), ``texture`` (own values shuffled plus noise,
same mean), ``shift`` (the anatomy kept, intensity shifted by ``contrast_sd`` brain standard
deviations up or down: subtle to strong) and ``moved`` (tissue copied from another place in the
brain: real texture in the wrong place). Sites: ``any`` place deep enough, next to the ``cortex``
(the brain's edge), next to the ``ventricles`` (dark, deep CSF) or across the ``midline`` (the
estimated mid-sagittal plane runs through the lesion: both hemispheres). ``strength`` < 1 blends a
lesion only partly into the anatomy (low contrast; the ground truth keeps its shape).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from CeVAEAnomalyLib.engine.symmetry import estimate_midplane, plane_distance_mm
from CeVAEAnomalyLib.errors import CeVAEError
from .evaluate import check_same_grid

log = logging.getLogger(__name__)

LESION_KINDS = ("hypo", "hyper", "ring", "texture", "shift", "moved")
SITES = ("any", "cortex", "ventricles", "midline")

_MIN_AXIS_RATIO = 0.6  # shortest / longest semi-axis, drawn uniformly in [ratio, 1]
_N_BUMPS = 4  # cosine terms of the border perturbation
_TEXTURE_KEEP = 0.25  # fraction of the underlying anatomy kept inside hypo/hyper/ring lesions
_PLACEMENT_TRIES = 20
_SITE_REACH_MM = 4.0  # a lesion "next to" the cortex or the ventricles comes this close to it
# a lesion "across" the midline has its centre this close to the plane, as a fraction of its extent (its shortest
# semi-axis, dented, is at least 0.42 of it: the plane runs through the lesion)
_MIDLINE_CENTRE_FRACTION = 0.2
_VENTRICLE_DEPTH_MM = 12.0  # CSF deeper than this inside the brain counts as ventricle


@dataclass(frozen=True)
class Lesion:
    """One inserted lesion.

    ``center_index`` is the SimpleITK (i, j, k) index of the centre voxel, ``center_mm`` its
    physical point in SimpleITK's LPS coordinates (Slicer and the component tables use RAS: negate x and y).
    ``radius_mm`` is the longest semi-axis: no ground-truth voxel lies farther
    than this from the centre. ``n_voxels`` counts its ground-truth voxels.
    """

    kind: str
    center_index: tuple[int, int, int]
    center_mm: tuple[float, float, float]
    radius_mm: float
    semi_axes_mm: tuple[float, float, float]
    n_voxels: int
    volume_ml: float


@dataclass(frozen=True)
class _BrainStats:
    low: float  # 1st percentile inside the brain
    median: float
    high: float  # 99th percentile inside the brain
    floor: float  # image minimum: no output goes below it
    sd: float  # standard deviation inside the brain

    @property
    def spread(self) -> float:
        return self.high - self.low


def insert_lesions(
    image: sitk.Image,
    brain_mask: sitk.Image,
    rng: Union[np.random.Generator, int],
    n: int = 1,
    kinds: Sequence[str] = LESION_KINDS,
    radius_mm: tuple[float, float] = (3.0, 15.0),
    min_separation_mm: Optional[float] = 0.0,
    border_mm: float = 1.5,
    irregularity: float = 0.3,
    contrast_sd: tuple[float, float] = (0.5, 3.0),
    sites: Sequence[str] = ("any",),
    strength: tuple[float, float] = (1.0, 1.0),
) -> tuple[sitk.Image, sitk.Image, list[Lesion]]:
    """Insert ``n`` lesions inside the brain; return (float32 image, uint8 ground truth, lesions).

    Kinds are drawn uniformly from ``kinds`` and radii uniformly from ``radius_mm`` (capped
    by what fits in the brain). Lesions lie fully inside ``brain_mask`` including their soft
    border (``border_mm`` wide, centred on the surface); the ground truth is where the blend
    weight is >= 0.5. Lesions, soft borders included, are at least ``min_separation_mm`` apart
    (``None`` lets them overlap). ``irregularity`` is the largest relative inward dent of the border (0: smooth
    ellipsoids). Outputs share the input's geometry; the input is not modified. The result is
    fully determined by the seed. ``contrast_sd``: range of the ``shift`` kind's contrast in brain
    standard deviations. ``sites``: where each lesion may go, one drawn per lesion (a site with no
    room falls back to ``any``). ``strength``: range of each lesion's blend weight (1: the lesion replaces
    the anatomy; 0.3: 30 % lesion, 70 % anatomy).
    """
    _check_arguments(image, n, kinds, radius_mm, min_separation_mm, border_mm, irregularity)
    if not sites or set(sites) - set(SITES):
        raise CeVAEError(f"Lesion sites must be a non-empty choice of {SITES}; got {tuple(sites)}.")
    if not 0 < contrast_sd[0] <= contrast_sd[1]:
        raise CeVAEError(f"The contrast range must satisfy 0 < min <= max; got {contrast_sd}.")
    if not 0 < strength[0] <= strength[1] <= 1:
        raise CeVAEError(f"The strength range must satisfy 0 < min <= max <= 1; got {strength}.")
    check_same_grid(image, brain_mask, "image", "brain mask")
    rng = np.random.default_rng(rng)

    array = sitk.GetArrayFromImage(image).astype(np.float32)
    brain = sitk.GetArrayViewFromImage(brain_mask) > 0  # as detect and evaluate: a background of -1 or NaN is none
    if not brain.any():
        raise CeVAEError("The brain mask is empty: lesions must be placed inside the brain.")
    stats = _brain_stats(array, brain)

    spacing = np.array(image.GetSpacing())
    index_to_mm = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(spacing)
    depth = _depth_in_brain(brain, spacing)
    near = {"cortex": depth}  # distance (mm) to what each site must be next to
    if "ventricles" in sites:
        near["ventricles"] = _distance_to_ventricles(array, brain, depth, spacing, stats)
    if "midline" in sites:
        near["midline"] = np.abs(plane_distance_mm(image, estimate_midplane(image, brain_mask)))
    truth = np.zeros(array.shape, dtype=np.uint8)
    placed: list[tuple[np.ndarray, float]] = []  # (centre (k, j, i), extent mm)
    lesions = []
    for number in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        site = sites[int(rng.integers(len(sites)))]
        center, radius = _place(
            depth, placed, radius_mm, border_mm, min_separation_mm, index_to_mm, rng, number, n,
            near.get(site), site == "midline",
        )
        extent = radius + border_mm / 2
        placed.append((center, extent))
        box, offsets_mm = _local_box(center, extent, index_to_mm, array.shape)
        semi_axes = radius * np.array([1.0, *rng.uniform(_MIN_AXIS_RATIO, 1.0, size=2)])
        distance = _surface_distance(offsets_mm, semi_axes, _random_rotation(rng), irregularity, rng)
        alpha = _soft_alpha(distance, border_mm)
        region = array[box]
        content = _moved_tissue(array, depth, center, extent, box, index_to_mm, rng) if kind == "moved" else None
        if content is None:  # not "moved", or no room to take tissue from: shuffled texture instead
            content = _content(kind if kind != "moved" else "texture", region, alpha > 0, distance, radius,
                               stats, rng, contrast_sd)
        weight = alpha * float(rng.uniform(*strength)) if strength != (1.0, 1.0) else alpha
        array[box] = np.maximum((1 - weight) * region + weight * content, stats.floor)
        inside = alpha >= 0.5
        truth[box] |= inside.astype(np.uint8)
        lesions.append(_describe(image, kind, center, radius, semi_axes, int(inside.sum()), spacing))
        log.debug("Inserted %s", lesions[-1])

    lesioned = sitk.GetImageFromArray(array)
    lesioned.CopyInformation(image)
    ground_truth = sitk.GetImageFromArray(truth)
    ground_truth.CopyInformation(image)
    return lesioned, ground_truth, lesions


def _check_arguments(
    image: sitk.Image,
    n: int,
    kinds: Sequence[str],
    radius_mm: tuple[float, float],
    min_separation_mm: Optional[float],
    border_mm: float,
    irregularity: float,
) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CeVAEError("Lesions can only be inserted into a 3D single-channel image.")
    if n < 0:
        raise CeVAEError(f"The number of lesions must be >= 0, not {n}.")
    unknown = sorted(set(kinds) - set(LESION_KINDS))
    if not kinds or unknown:
        raise CeVAEError(f"Lesion kinds must be a non-empty choice of {LESION_KINDS}; got {tuple(kinds)}.")
    low, high = radius_mm
    if not 0 < low <= high:
        raise CeVAEError(f"The lesion radius range must satisfy 0 < min <= max mm; got {radius_mm}.")
    if min_separation_mm is not None and min_separation_mm < 0:
        raise CeVAEError(f"min_separation_mm must be >= 0 or None, not {min_separation_mm}.")
    if border_mm < 0:
        raise CeVAEError(f"border_mm must be >= 0, not {border_mm}.")
    if not 0 <= irregularity < 1:
        raise CeVAEError(f"irregularity must be in [0, 1), not {irregularity}.")


def _brain_stats(array: np.ndarray, brain: np.ndarray) -> _BrainStats:
    values = array[brain]
    low, median, high = np.percentile(values, [1, 50, 99])
    if high <= low:
        raise CeVAEError("Intensities inside the brain mask are (nearly) constant: check the image and mask.")
    return _BrainStats(float(low), float(median), float(high), float(array.min()), float(values.std()))


def _depth_in_brain(brain: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel to the nearest non-brain voxel (the array border counts)."""
    depth = np.zeros(brain.shape, dtype=np.float32)
    box = ndimage.find_objects(brain.astype(np.uint8))[0]
    padded = np.pad(brain[box], 1)
    depth[box] = ndimage.distance_transform_edt(padded, sampling=spacing[::-1])[1:-1, 1:-1, 1:-1]
    return depth


def _distance_to_ventricles(
    array: np.ndarray, brain: np.ndarray, depth: np.ndarray, spacing: np.ndarray, stats: _BrainStats
) -> np.ndarray:
    """Distance in mm to the nearest deep CSF voxel (darkest decile, deeper than the ventricle depth)."""
    dark = brain & (depth > _VENTRICLE_DEPTH_MM) & (array <= np.percentile(array[brain], 10))
    if not dark.any():
        return np.full(array.shape, np.inf, np.float32)
    return ndimage.distance_transform_edt(~dark, sampling=spacing[::-1]).astype(np.float32)


def _place(
    depth: np.ndarray,
    placed: list[tuple[np.ndarray, float]],
    radius_mm: tuple[float, float],
    border_mm: float,
    min_separation_mm: Optional[float],
    index_to_mm: np.ndarray,
    rng: np.random.Generator,
    number: int,
    n: int,
    near: Optional[np.ndarray] = None,
    through: bool = False,
) -> tuple[np.ndarray, float]:
    """Draw a radius and a centre (k, j, i) deep enough in the brain and away from other lesions.

    ``near``: distance (mm) to a structure the lesion's border must come within ``_SITE_REACH_MM`` of, or
    with ``through`` that must run through the lesion near its centre (ignored when nowhere qualifies).
    """
    largest = float(depth.max()) - border_mm / 2 - 1e-3
    if largest < radius_mm[0]:
        raise CeVAEError(
            f"The brain mask is too small for lesions of radius {radius_mm[0]} mm "
            f"(at most {max(largest, 0):.1f} mm fits); use a smaller radius."
        )
    for _ in range(_PLACEMENT_TRIES):
        radius = float(rng.uniform(radius_mm[0], min(radius_mm[1], largest)))
        extent = radius + border_mm / 2
        allowed = depth > extent
        if near is not None:
            limit = _MIDLINE_CENTRE_FRACTION * extent if through else extent + _SITE_REACH_MM
            site = allowed & (near <= limit)
            allowed = site if site.any() else allowed
        if min_separation_mm is not None:
            for center, other_extent in placed:
                reach = extent + other_extent + min_separation_mm
                box, offsets_mm = _local_box(center, reach, index_to_mm, depth.shape)
                allowed[box] &= np.linalg.norm(offsets_mm, axis=-1) >= reach
        candidates = np.flatnonzero(allowed)
        if candidates.size:
            choice = candidates[int(rng.integers(candidates.size))]
            return np.array(np.unravel_index(choice, depth.shape)), radius
    raise CeVAEError(
        f"Could not place lesion {number + 1} of {n} inside the brain without overlap; "
        "ask for fewer or smaller lesions, or a smaller min_separation_mm."
    )


def _local_box(
    center: np.ndarray, reach_mm: float, index_to_mm: np.ndarray, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Array slices covering a ball of ``reach_mm`` around ``center`` (k, j, i), clipped to the
    array, and each voxel's physical offset from the centre (shape box + (3,))."""
    # Index steps needed along each SimpleITK axis to cover the ball, then reversed to numpy order.
    steps = reach_mm * np.linalg.norm(np.linalg.inv(index_to_mm), axis=1)
    half = np.ceil(steps[::-1]).astype(int)
    starts = np.maximum(center - half, 0)
    stops = np.minimum(center + half + 1, shape)
    k, j, i = np.meshgrid(
        *(np.arange(a, b) - c for a, b, c in zip(starts, stops, center)), indexing="ij"
    )
    offsets_mm = np.stack([i, j, k], axis=-1) @ index_to_mm.T
    return tuple(slice(a, b) for a, b in zip(starts, stops)), offsets_mm


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _surface_distance(
    offsets_mm: np.ndarray,
    semi_axes: np.ndarray,
    rotation: np.ndarray,
    irregularity: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Signed distance in mm to the lesion surface along the ray from the centre (< 0 inside).

    The surface sits at normalised radius ``1 - dent(u)`` in the ellipsoid's own frame, with
    ``dent`` a smooth function of direction ``u`` in [0, irregularity]: never beyond the ellipsoid.
    """
    q = (offsets_mm @ rotation) / semi_axes  # ellipsoid frame, unit sphere = ellipsoid surface
    r = np.linalg.norm(q, axis=-1)
    length = np.linalg.norm(offsets_mm, axis=-1)
    safe_r = np.where(r > 0, r, 1.0)
    u = q / safe_r[..., None]
    frequencies = rng.normal(size=(_N_BUMPS, 3))
    phases = rng.uniform(0, 2 * math.pi, size=_N_BUMPS)
    weights = rng.uniform(0.5, 1.0, size=_N_BUMPS)
    bumps = np.cos(2 * math.pi * (u @ frequencies.T) + phases) @ weights / weights.sum()
    surface = 1 - rng.uniform(0, irregularity) * (bumps + 1) / 2
    mm_per_unit = np.where(r > 0, length / safe_r, semi_axes.min())
    return (r - surface) * mm_per_unit


def _soft_alpha(distance: np.ndarray, border_mm: float) -> np.ndarray:
    """Blend weight: 1 deep inside, 0.5 on the surface, 0 beyond ``border_mm / 2`` (smoothstep)."""
    if border_mm == 0:
        return (distance <= 0).astype(np.float32)
    t = np.clip(0.5 - distance / border_mm, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def _content(
    kind: str,
    region: np.ndarray,
    touched: np.ndarray,
    distance: np.ndarray,
    radius: float,
    stats: _BrainStats,
    rng: np.random.Generator,
    contrast_sd: tuple[float, float] = (0.5, 3.0),
) -> np.ndarray:
    """Lesion intensities over the box ``region`` (only voxels where ``touched`` matter)."""
    dark = stats.low + rng.uniform(0.0, 0.15) * stats.spread  # CSF-like
    bright = stats.high + rng.uniform(0.1, 0.4) * stats.spread  # above the brain's 99th percentile
    anatomy = _TEXTURE_KEEP * (region - stats.median)
    if kind == "hypo":
        return dark + anatomy
    if kind == "hyper":
        return bright + anatomy
    if kind == "shift":
        return region + rng.choice((-1.0, 1.0)) * rng.uniform(*contrast_sd) * stats.sd
    if kind == "ring":
        rim_mm = max(1.5, rng.uniform(0.25, 0.4) * radius)
        t = np.clip(rim_mm + 0.5 + distance, 0.0, 1.0)  # 1 within the rim, 0 in the core, 1 mm ramp
        rim = t * t * (3 - 2 * t)
        return rim * bright + (1 - rim) * dark + anatomy
    # texture: the region's own values shuffled, plus zero-mean white noise; same mean
    content = region.copy()
    values = region[touched]
    noise = rng.normal(0.0, rng.uniform(0.2, 0.4) * stats.spread, size=values.size)
    content[touched] = rng.permutation(values) + (noise - noise.mean())
    return content


def _moved_tissue(
    array: np.ndarray,
    depth: np.ndarray,
    center: np.ndarray,
    extent: float,
    box: tuple[slice, ...],
    index_to_mm: np.ndarray,
    rng: np.random.Generator,
) -> Optional[np.ndarray]:
    """The box's content taken from another brain place at least two extents away (same shape),
    flipped along the column axis half the time: real tissue texture where it does not belong.
    None if no such place is found."""
    shape = tuple(b.stop - b.start for b in box)
    offset = center - np.array([b.start for b in box])
    candidates = np.flatnonzero(depth > extent)
    for _ in range(50):
        source = np.array(np.unravel_index(candidates[int(rng.integers(candidates.size))], depth.shape))
        start = source - offset
        stop = start + np.array(shape)
        far = np.linalg.norm((source - center)[::-1] @ index_to_mm.T) >= 2 * extent
        if far and (start >= 0).all() and (stop <= depth.shape).all():
            patch = array[tuple(slice(a, b) for a, b in zip(start, stop))].copy()
            return patch[:, :, ::-1].copy() if rng.random() < 0.5 else patch
    return None


def _describe(
    image: sitk.Image,
    kind: str,
    center: np.ndarray,
    radius: float,
    semi_axes: np.ndarray,
    n_voxels: int,
    spacing: np.ndarray,
) -> Lesion:
    index = tuple(int(c) for c in center[::-1])
    return Lesion(
        kind=kind,
        center_index=index,
        center_mm=tuple(float(c) for c in image.TransformIndexToPhysicalPoint(index)),
        radius_mm=radius,
        semi_axes_mm=tuple(float(a) for a in semi_axes),
        n_voxels=n_voxels,
        volume_ml=n_voxels * float(np.prod(spacing)) / 1000,
    )
