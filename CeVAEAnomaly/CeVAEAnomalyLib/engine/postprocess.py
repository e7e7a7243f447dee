"""Score refinement, thresholding and connected anomaly components.

Maps are numpy (k, j, i) arrays with their SimpleITK spacing (i, j, k) given explicitly; SimpleITK
images appear only where ITK computes (connected components, the statistics of :func:`components`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import CeVAEError
from ..io.images import in_voxels, voxel_volume_ml
from ..options import SPREADS, PostprocessOptions
from ..result import Component

if TYPE_CHECKING:
    from .symmetry import MidPlane


def _radius_vox(spacing: Sequence[float], mm: float) -> List[int]:
    """The radius of ``mm`` in voxels along each SimpleITK axis (i, j, k) of ``spacing``."""
    return [max(0, int(round(in_voxels(mm, s)))) for s in spacing]


def refine_reach(opts: PostprocessOptions, spacing: Sequence[float]) -> int:
    """How many voxels beyond a voxel :func:`refine_scores` looks (so a crop this much larger than the brain
    gives the same scores as the whole volume)."""
    return max(max(_radius_vox(spacing, opts.rim_mm)) if opts.rim_mm > 0 else 0, int(opts.median_radius))


def refine_scores(score: np.ndarray, brain: np.ndarray, spacing: Sequence[float],
                  opts: PostprocessOptions) -> np.ndarray:
    """Apply the rim mask and median filter; scores outside the brain become 0.

    ``score`` and ``brain`` (bool) are (k, j, i) arrays on one grid of SimpleITK ``spacing`` (i, j, k).
    The result is ITK's ``Mask(Median(score), eroded brain)`` with a rim, ``Mask(Median(score), brain)``
    without. The median (box of side 2r+1, border voxels repeated, as ITK's filter) is computed only
    where the mask keeps it, which is several times faster than filtering the whole volume.
    """
    keep = None  # the voxels whose score survives (None: all)
    if opts.rim_mm > 0:
        radius = _radius_vox(spacing, opts.rim_mm)
        keep = _erode_ball(brain, radius) if any(radius) else brain  # (a rim under half a voxel: the brain)
    elif opts.median_radius > 0:
        keep = brain
    out = np.zeros(score.shape, score.dtype)
    if opts.median_radius <= 0:
        if keep is None:
            return score
        np.copyto(out, score, where=keep)
        return out
    where = np.ones(score.shape, bool) if keep is None else keep
    out[where] = _box_median_at(score, where, int(opts.median_radius))
    return out


_MAX_KERNEL_RADIUS = 15  # voxels: ITK's ball kernel of this radius holds 31^3 offsets


def _erode_by_distance(brain: np.ndarray, radius: List[int]) -> np.ndarray:
    """ITK's ball erosion of ``brain`` by ``radius`` voxels (i, j, k) from a Euclidean distance map, in memory of
    the image's size: ITK's ball holds the offsets d with sum((d / (r + 1/2))^2) <= 1, so a voxel stays where its
    nearest non-brain voxel lies further than that in units of r + 1/2 per axis (voxels beyond the border count as
    brain, as in ITK's erosion)."""
    if brain.all():
        return brain.copy()
    outside = sitk.GetImageFromArray((~brain).astype(np.uint8))
    outside.SetSpacing([1.0 / (r + 0.5) for r in radius])
    distance = sitk.SignedMaurerDistanceMap(outside, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return brain & (sitk.GetArrayViewFromImage(distance) > 1.0)


def _erode_ball(brain: np.ndarray, radius: List[int]) -> np.ndarray:
    """``sitk.BinaryErode(brain, radius, sitkBall, 0, 1)`` of a bool (k, j, i) mask (voxels beyond the
    border count as brain); ``radius`` in voxels along (i, j, k).

    ITK's ball holds the offsets d with sum((d / (r + 1/2))^2) <= 1, in integers sum(w d^2) <= reach
    (:func:`_ball_weights`), so the erosion is a test on the weighted squared distance to the nearest non-brain
    voxel, found axis by axis: several times faster than ITK's filter, for isotropic and anisotropic radii (whose
    ITK kernel cost grows with its surface) alike. Radii beyond :data:`_MAX_KERNEL_RADIUS` (a 3 mm rim on voxels of
    hundredths of a millimetre, whose (2r+1)^3 kernel ITK could not allocate) go to a distance map.
    """
    if max(radius) > _MAX_KERNEL_RADIUS:
        return _erode_by_distance(brain, radius)
    radius = [int(r) for r in radius]
    if not _itk_ball_is_distance(tuple(radius)):
        eroded = sitk.BinaryErode(sitk.GetImageFromArray(brain.astype(np.uint8)), radius, sitk.sitkBall, 0, 1)
        return sitk.GetArrayViewFromImage(eroded) != 0
    weights, reach = _ball_weights(tuple(radius))
    top = reach + 1 + max(w * r * r for w, r in zip(weights, radius))  # the largest sum formed below
    kind = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    dist = np.where(brain, kind(reach + 1), kind(0))  # weighted squared distance to non-brain, capped
    for axis, r, w in zip((2, 1, 0), radius, weights):
        if r == 0:
            continue
        src = dist.copy()
        for d in range(1, r + 1):
            lo = tuple(slice(None, -d) if a == axis else slice(None) for a in range(3))
            hi = tuple(slice(d, None) if a == axis else slice(None) for a in range(3))
            step = kind(w * d * d)
            np.minimum(dist[lo], src[hi] + step, out=dist[lo])
            np.minimum(dist[hi], src[lo] + step, out=dist[hi])
        del src
    return dist > reach


def _ball_weights(radius: Tuple[int, ...]) -> Tuple[List[int], int]:
    """Integer weights w (per axis of ``radius``) and ``reach`` such that sum((d / (r + 1/2))^2) <= 1 exactly when
    sum(w d^2) <= reach for integer offsets d: both sides times the product of (2r + 1)^2, divided by the weights'
    common factor (isotropic r: weights 1, reach r^2 + r). Equality cannot occur (4 sum(...) is even, the product
    odd), so rounding the bound down loses nothing."""
    sizes = [(2 * r + 1) ** 2 for r in radius]
    product = math.prod(sizes)
    weights = [4 * product // s for s in sizes]
    common = math.gcd(*weights)
    return [w // common for w in weights], product // common


@lru_cache(maxsize=16)
def _itk_ball_is_distance(radius: Tuple[int, ...]) -> bool:
    """Whether ITK's ball of ``radius`` (i, j, k) is exactly the offsets d with sum(w d^2) <= reach
    (:func:`_ball_weights`)."""
    point = np.zeros([2 * r + 1 for r in radius[::-1]], np.uint8)
    point[tuple(radius[::-1])] = 1
    ball = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(point), list(radius), sitk.sitkBall, 0, 1))
    weights, reach = _ball_weights(radius)
    k, j, i = (w * np.arange(-r, r + 1) ** 2 for w, r in zip(weights[::-1], radius[::-1]))
    return bool(np.array_equal(ball > 0, k[:, None, None] + j[None, :, None] + i[None, None, :] <= reach))


def _box_median_at(values: np.ndarray, where: np.ndarray, r: int, slab: int = 8, chunk: int = 1 << 16) -> np.ndarray:
    """Median of the (2r+1)^3 box around each voxel of ``where`` (C order), array borders repeated."""
    nz = values.shape[0]
    d = np.arange(2 * r + 1)
    sy, sx = (values.shape[1] + 2 * r) * (values.shape[2] + 2 * r), values.shape[2] + 2 * r
    offsets = (d[:, None, None] * sy + d[None, :, None] * sx + d[None, None, :]).ravel()
    mid = len(offsets) // 2
    out = np.empty(int(np.count_nonzero(where)), values.dtype)
    done = 0
    for z0 in range(0, nz, slab):
        zz, yy, xx = np.nonzero(where[z0 : z0 + slab])
        if not len(zz):
            continue
        rows = np.clip(np.arange(z0 - r, min(z0 + slab, nz) + r), 0, nz - 1)  # this slab and r around it
        block = np.pad(values[rows], ((0, 0), (r, r), (r, r)), mode="edge").ravel()
        first = zz * sy + yy * sx + xx  # the box's first voxel in ``block``
        for s in range(0, len(first), chunk):
            box = block[first[s : s + chunk, None] + offsets]
            box.partition(mid, axis=1)
            out[done : done + len(box)] = box[:, mid]
            done += len(box)
    return out


def threshold_labelmap(score: np.ndarray, spacing: Sequence[float], threshold: float, min_volume_mm3: float = 0.0,
                       hysteresis_fraction: float = 0.0, min_peak: float = 1.0) -> np.ndarray:
    """uint8 {0,1} (k, j, i): score >= threshold (with ``hysteresis_fraction`` > 0: the components of
    score > fraction·threshold that reach above the threshold), without components smaller than
    ``min_volume_mm3`` or whose highest score stays below ``min_peak``·threshold (26-connected, on a grid of
    SimpleITK ``spacing``)."""
    if hysteresis_fraction > 0 and np.isfinite(threshold):
        label = hysteresis(score, hysteresis_fraction * threshold, threshold)
    else:
        label = _at_least(score, threshold)
    peaked = min_peak > 1 and np.isfinite(threshold)
    if (min_volume_mm3 > 0 or peaked) and label.any():  # (nothing flagged, as in most scans: nothing to filter)
        cc_image = sitk.ConnectedComponent(sitk.GetImageFromArray(label.view(np.uint8)), True)
        cc = sitk.GetArrayViewFromImage(cc_image)
        keep = np.ones(int(cc.max()) + 1, bool)
        if min_volume_mm3 > 0:
            min_voxels = int(np.ceil(in_voxels(min_volume_mm3, float(np.prod(spacing)))))
            keep &= _label_sizes(cc, len(keep)) >= min_voxels
        if peaked:
            reached = np.zeros(len(keep), bool)
            reached[np.unique(cc[_at_least(score, min_peak * threshold)])] = True
            keep &= reached
        keep[0] = False
        label = keep[cc]
        del cc, cc_image
    return label.view(np.uint8)


def _label_sizes(labels: np.ndarray, n: int, slab: int = 8) -> np.ndarray:
    """The voxel count of each label 0 .. ``n`` - 1 of an integer (k, j, i) array, counted ``slab`` planes at a
    time: np.bincount copies its input to 64 bits, twice a 32-bit label array's size at once."""
    sizes = np.zeros(n, np.int64)
    for k in range(0, labels.shape[0], slab):
        sizes += np.bincount(labels[k : k + slab].ravel(), minlength=n)
    return sizes


def _at_least(score: np.ndarray, threshold: float) -> np.ndarray:
    """``score >= threshold`` in the score's precision, as ITK's BinaryThreshold compares (:func:`_compared`)."""
    return _compared(score, threshold, np.greater_equal)


def _above(score: np.ndarray, cut: float) -> np.ndarray:
    """``score > cut`` in the score's precision (:func:`_compared`)."""
    return _compared(score, cut, np.greater)


def _compared(score: np.ndarray, value: float, compare: Callable[..., np.ndarray]) -> np.ndarray:
    """``compare(score, value)`` with ``value`` rounded to a float score's precision; a finite value beyond that
    precision's range (e.g. --threshold 1e308 on a float32 map) is above every score or below every one but NaN,
    without NumPy's overflow warning."""
    if score.dtype.kind != "f":
        return compare(score, value)
    with np.errstate(over="ignore"):
        cut = score.dtype.type(value)
    if np.isinf(cut) and np.isfinite(value):
        return np.zeros(score.shape, bool) if value > 0 else ~np.isnan(score)
    return compare(score, cut)


COMPONENT_ORDERS = {
    "volume": lambda c: c.voxels,
    "max": lambda c: c.max_score,
    "mean": lambda c: c.mean_score,
    "summed": lambda c: c.summed_score,
}
# Order of the lesion table (its first row is where "jump" goes when there is a component).
COMPONENT_ORDER = "summed"


# A component is on one side of the mid-sagittal plane when more than this share of its voxels (their centres) lie
# on that side; otherwise it crosses the midline ("both": at least 10 % of it lies on the other side or on the plane).
SIDE_SHARE = 0.9
# No side is said where the estimated plane's match (the brain's correlation with its mirror image) is below this.
# Five heads (1-2 mm): whole 0.84-0.995; with a mass pushing the midline 6-10 mm 0.73-0.95, 6.5 mm slices, 40 % of
# the brain cut off at the top or bottom, turned or rolled 22° 0.81 or more (plane within 3.2° and 3.5 mm). A
# hemisphere largely resected or cut at the midline by the field of view left the plane 14-30 mm or up to 28° off at
# 0.19-0.66, but on the most symmetric head (0.945 whole) a field of view cut at the midline matched 0.76-0.77;
# resections whose plane was right matched 0.29-0.62 as well (a poor match cannot tell them apart).
SIDE_MIN_MATCH = 0.7


def components(labelmap: sitk.Image, score: sitk.Image, order: str = "volume",
               plane: Optional["MidPlane"] = None) -> List[Component]:
    """Connected components (26-connectivity) with size and score statistics and their highest-scoring voxel,
    ranked by ``order`` (a key of :data:`COMPONENT_ORDERS`, highest first) and labelled 1, 2, ... in that order;
    with the brain's mid-sagittal ``plane``, the patient's side each lies on (:func:`component_sides`; None: "")."""
    if not sitk.GetArrayViewFromImage(labelmap).any():  # nothing flagged, as in most scans: no ITK passes
        return []
    cc = connected_components(labelmap)
    out = ranked_components(cc, score, order)
    peaks = _peak_voxels(cc, score, {c.label: c.max_score for c in out})
    sides = {} if plane is None else component_sides(cc, plane)
    for rank, c in enumerate(out, 1):
        peak = peaks.get(c.label)
        c.peak_lps = None if peak is None else tuple(float(v) for v in score.TransformIndexToPhysicalPoint(peak))
        c.side = sides.get(c.label, "")
        c.label = rank
    return out


def connected_components(labelmap: sitk.Image) -> sitk.Image:
    """The 26-connected components (8 in 2D) of a labelmap's non-zero voxels, labelled 1, 2, ... by size."""
    return sitk.RelabelComponent(sitk.ConnectedComponent(labelmap, True))


def ranked_components(cc: sitk.Image, score: sitk.Image, order: str = "volume") -> List[Component]:
    """The components of ``cc`` (labels 1, 2, ...: :func:`connected_components`) with their size and score
    statistics, each keeping its label in ``cc``, in the order :func:`components` lists them: by ``order`` highest
    first, then the larger, then the lower label (no peak voxel or side)."""
    stats = sitk.LabelIntensityStatisticsImageFilter()
    stats.Execute(cc, score)
    voxel_ml = voxel_volume_ml(score)
    out = []
    for lab in (int(lab) for lab in stats.GetLabels()):
        n = int(stats.GetNumberOfPixels(lab))
        out.append(Component(label=lab, voxels=n, volume_ml=n * voxel_ml, max_score=float(stats.GetMaximum(lab)),
                             mean_score=float(stats.GetMean(lab)),
                             centroid_lps=tuple(float(v) for v in stats.GetCentroid(lab))))
    out.sort(key=lambda c: (-COMPONENT_ORDERS[order](c), -c.voxels, c.label))
    return out


def component_sides(labels: sitk.Image, plane: "MidPlane") -> Dict[int, str]:
    """The patient's side of ``plane`` (the brain's mid-sagittal plane, LPS mm) each label > 0 of ``labels`` lies on:
    "left" (+x in LPS: the patient's left) or "right" where more than :data:`SIDE_SHARE` of its voxel centres lie on
    that side, "both" (crossing the midline) otherwise; "" for each where the brain matches its mirror image about
    ``plane`` poorly (:func:`sides_known`: the plane may be far off). Physical positions, so the same in any voxel
    order or tilt of the grid."""
    flat = sitk.GetArrayViewFromImage(labels).ravel()
    inside = np.flatnonzero(flat)
    label_of = flat[inside]
    n = int(label_of.max()) + 1 if len(label_of) else 1
    total = np.bincount(label_of, minlength=n)
    if not sides_known(plane):
        return {lab: "" for lab in map(int, np.flatnonzero(total[1:]) + 1)}
    k, j, i = np.unravel_index(inside, labels.GetSize()[::-1])
    sign = 1.0 if plane.normal[0] >= 0 else -1.0  # so that the normal points to +x, the patient's left
    normal = sign * np.asarray(plane.normal, float)
    ci, cj, ck = normal @ (np.array(labels.GetDirection()).reshape(3, 3) @ np.diag(labels.GetSpacing()))
    distance = float(normal @ np.asarray(labels.GetOrigin(), float)) - sign * plane.offset + ci * i + cj * j + ck * k
    left = np.bincount(label_of[distance > 0], minlength=n)
    right = np.bincount(label_of[distance < 0], minlength=n)
    return {lab: "left" if left[lab] > SIDE_SHARE * total[lab] else "right" if right[lab] > SIDE_SHARE * total[lab]
            else "both" for lab in map(int, np.flatnonzero(total[1:]) + 1)}


def sides_known(plane: "MidPlane") -> bool:
    """Whether sides are said about ``plane``: its match is not measured or at least :data:`SIDE_MIN_MATCH`."""
    return plane.match is None or plane.match >= SIDE_MIN_MATCH


def _peak_voxels(labels: sitk.Image, score: sitk.Image, maxima: Dict[int, float]) -> Dict[int, Tuple[int, int, int]]:
    """The (i, j, k) index of each label's voxel that scores its maximum (``maxima``, by label; of equal ones the
    first in array order): one pass over the labelled voxels, no sort."""
    flat = sitk.GetArrayViewFromImage(labels).ravel()
    inside = np.flatnonzero(flat)
    label_of = flat[inside]
    top = np.zeros(max(maxima, default=0) + 1, np.float64)  # each label's maximum, by label
    top[list(maxima)] = list(maxima.values())
    at_top = inside[sitk.GetArrayViewFromImage(score).ravel()[inside] == top[label_of]]
    found, first = np.unique(flat[at_top], return_index=True)  # (at_top is in array order)
    k, j, i = np.unravel_index(at_top[first], labels.GetSize()[::-1])
    return {int(lab): (int(a), int(b), int(c)) for lab, a, b, c in zip(found, i, j, k)}


def normalised(score: np.ndarray, brain: np.ndarray, spread: str = "mad") -> np.ndarray:
    """:func:`robust_normalise` over ``brain``, negative values set to 0 (at or below this brain's median)."""
    out = robust_normalise(score, brain, spread)
    return np.maximum(out, 0, out=out)


TAIL_Z = 1.645  # the 95th percentile of a standard normal distribution


def robust_normalise(score: np.ndarray, brain: np.ndarray, spread: str = "mad", slab: int = 8) -> np.ndarray:
    """Scores in units of this brain's own score spread: (score - median) / spread over ``brain``.

    ``spread`` (:data:`~..options.SPREADS`): ``mad``, 1.4826 · the median absolute deviation from the
    median; ``tail``, (95th percentile − median) / 1.645, the width of the upper tail alone (linearly
    interpolated percentiles, as ``np.percentile``). Both are the standard deviation of normally distributed
    scores. Voxels outside ``brain`` become 0. Where a spread is 0 because many voxels share one
    value (a sparse map), the next is used: tail, then MAD, then 1.2533 · the mean absolute deviation
    from the median (again the standard deviation of a normal distribution), then 1 (a constant map).
    Computed in float64 ``slab`` planes at a time into a float32 result, so a large volume needs no
    full-size float64 copy.
    """
    values = score[brain].astype(np.float64)
    out = np.zeros(score.shape, np.float32)
    if values.size == 0:
        return out
    median, width = _median_and_spread(values, spread)
    del values
    for k in range(0, score.shape[0], slab):
        part = (score[k : k + slab].astype(np.float64) - median) / width
        out[k : k + slab] = np.where(brain[k : k + slab], part, 0.0)
    return out


def _median_and_spread(values: np.ndarray, spread: str) -> Tuple[float, float]:
    """(median, spread) of a float64 array of brain scores, which this reorders and overwrites."""
    if spread not in SPREADS:
        raise CeVAEError(f"Unknown spread {spread!r}; choose one of {', '.join(SPREADS)}.")
    if spread == "tail":
        median, p95 = (float(v) for v in np.percentile(values, [50, 95], overwrite_input=True))
        width = (p95 - median) / TAIL_Z
    else:
        median, width = float(np.median(values, overwrite_input=True)), 0.0
    if width <= 0:
        deviation = np.abs(np.subtract(values, median, out=values), out=values)
        width = 1.4826 * float(np.median(deviation)) or 1.2533 * float(deviation.mean()) or 1.0
    return median, width


def hysteresis(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """bool map: ``score >= high``, grown by the 26-connected components of ``score > low`` that reach it (so it
    holds every voxel the plain threshold ``high`` labels)."""
    seeds = _at_least(score, high)
    above = sitk.GetImageFromArray(_above(score, low).view(np.uint8))
    labelled = sitk.ConnectedComponent(above, True)
    del above
    labels = sitk.GetArrayViewFromImage(labelled)  # (a view: ``labelled`` holds it)
    n = int(labels.max())
    if n == 0:
        return seeds
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[seeds])] = True
    keep[0] = False
    return np.logical_or(keep[labels], seeds, out=seeds)
