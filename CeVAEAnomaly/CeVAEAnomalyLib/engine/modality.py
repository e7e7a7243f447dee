"""Does a scan have the contrast a model was trained on? A check of where the brain is bright.

The model sees each brain scaled by its own 1st and 99th intensity percentiles (engine/preprocess),
so the overall brightness tells nothing; the order of the tissues does. In a T1-weighted brain the
deep brain (white matter) is bright and the rim (cortex, sulcal CSF) dark; in a T2-weighted brain
it is the other way round. The *depth contrast* of a scan is the median of its model-slice pixels
more than :data:`DEEP_PX` pixels inside the brain's edge minus the median of those within
:data:`RIM_PX` of it, on that scale. Resolution, slice thickness, noise and contrast changes of one
modality move it little; reversing the contrast moves it a lot (docs/adapt.md has the measurements).

A scan is refused (``adapt``) or warned of (``calibrate``, detection) when its depth contrast lies further than
:data:`TOLERANCE` from the model's: the value recorded by an adapted model (its site scans') or a trained one (its
training volumes'), or for a T1 model without either, :data:`T1_DEPTH_CONTRAST`.

The *bright tail* (:func:`bright_tail`) tells a post-contrast look from a plain one: enhancing vessels, dura
and choroid plexus lie above the white matter, the brightest tissue of a plain T1 brain.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .config import PreprocessConfig
from .header import BundleHeader
from ..errors import CeVAEError

DEEP_PX = 6  # about 15 mm at the default 64 px model size
RIM_PX = 2
# The three healthy T1 volumes' axial model slices pooled (Colin27, MNI152 2009a, ROBEX reference
# subject; default preprocessing): scripts/benchmark_adapt.py --profiles.
T1_DEPTH_CONTRAST = 0.595
# T1 scans of six heads lie within 0.23 of it but two point-sampled template copies, reversed contrasts 0.49 or
# more away (docs/adapt.md)
TOLERANCE = 0.3


def depth_contrast(slices: np.ndarray) -> float:
    """Median of the deep brain minus median of the brain's rim, over model slices [N, S, S] (brain: > 0)."""
    if len(slices) == 0:
        raise CeVAEError("The scan has no model slices with brain to tell its contrast.")
    slices = np.asarray(slices, np.float32)
    depth = _depth_px(slices > 0)
    deep_px, rim_px = slices[depth > DEEP_PX], slices[(depth > 0) & (depth <= RIM_PX)]
    if deep_px.size == 0 or rim_px.size == 0:
        raise CeVAEError("The scan's brain is too small in its model slices to tell its contrast.")
    return round(float(np.median(deep_px) - np.median(rim_px)), 4)


def scan_depth_contrast(image: sitk.Image, mask: sitk.Image, preprocess: PreprocessConfig) -> float:
    """:func:`depth_contrast` of a volume's axial model slices (as training and adaptation prepare them). Its
    warnings about the mask or the voxels are left to the scoring of the same volume, which gives them once."""
    from . import preprocess as prep

    with _preprocessing_quiet():
        return depth_contrast(prep.prepare(image, prep.mask_array(mask, image), preprocess, "axial").slices)


@contextmanager
def _preprocessing_quiet() -> Iterator[None]:
    """The preprocessing's warnings (about the mask or the voxels) off in the block: a measure of a volume leaves
    them to the scoring of the same volume, which gives them once."""
    from . import preprocess as prep

    quiet, prep.log.disabled = prep.log.disabled, True
    try:
        yield
    finally:
        prep.log.disabled = quiet


BRIGHT_TAIL_BLOCKS = 3  # per axis of the brain's bounding box
_BLOCK_SHARE = 0.01  # blocks with less of the brain are left out
_STRIDE_FROM = 64


def bright_tail(arr: np.ndarray, brain: np.ndarray) -> Optional[float]:
    """How far a brain's brightest voxels lie above its white matter: (99.5th − 90th percentile) / (90th − 50th) of
    the brain's intensities, the median over blocks of its bounding box (3 per axis). Enhancement after contrast is
    spread over the brain and raises most blocks; one bright lesion raises a few. ``arr``, ``brain``: the volume
    and its boolean brain mask (non-finite voxels are left out); None when there is nothing to measure (an empty
    mask, flat intensities). Measured on every second voxel along axes of
    :data:`_STRIDE_FROM` voxels or more (a few hundredths from the full measure, a tenth of its time)."""
    step = tuple(slice(None, None, 2 if n >= _STRIDE_FROM else 1) for n in arr.shape)
    arr, brain = arr[step], brain[step]
    inside = brain & np.isfinite(arr) if arr.dtype.kind == "f" else brain
    where = np.nonzero(inside)
    if where[0].size == 0:
        return None
    edges = [np.linspace(w.min(), w.max() + 1, BRIGHT_TAIL_BLOCKS + 1).astype(int) for w in where]
    values = []
    for block in np.ndindex(*(BRIGHT_TAIL_BLOCKS,) * 3):
        box = tuple(slice(e[b], e[b + 1]) for e, b in zip(edges, block))
        v = arr[box][inside[box]]
        if v.size >= _BLOCK_SHARE * where[0].size:
            p50, p90, p995 = np.percentile(v.astype(np.float64), [50, 90, 99.5])
            if p90 > p50:
                values.append((p995 - p90) / (p90 - p50))
    return round(float(np.median(values)), 3) if values else None


def scan_bright_tail(image: sitk.Image, mask: sitk.Image) -> Optional[float]:
    """:func:`bright_tail` of a volume and its brain mask (on any grid); warnings about the mask or the voxels are
    left to the scoring of the same volume, as in :func:`scan_depth_contrast`."""
    from . import preprocess as prep

    with _preprocessing_quiet():
        return bright_tail(sitk.GetArrayViewFromImage(image), prep.brain_array(image, mask))


def _depth_px(brains: np.ndarray) -> np.ndarray:
    """Each pixel of each hole-filled 2D slice of ``brains`` [N, S, S]: its distance in pixels to the nearest pixel
    outside in its slice (0 outside). All slices in two filter passes, not two per slice (which took about 1 s a
    volume, a training start-up of minutes over a cohort of thousands): the slices are stacked with an all-brain
    slice between them and at both ends, so that no background connects across slices or to the stack's ends, and
    the distance runs at a slice spacing far beyond any in-plane distance. A slice without an outside pixel gets
    distances of at least that spacing: all deep, as it was slice by slice. SimpleITK, not SciPy: this runs in
    Slicer's and a plain install's Python, which need not have SciPy."""
    n, height, width = brains.shape
    stack = np.ones((2 * n + 1, height, width), np.uint8)
    stack[1::2] = brains
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(stack), fullyConnected=False)
    outside = filled == 0
    outside.SetSpacing((1.0, 1.0, _APART))
    distance = sitk.SignedMaurerDistanceMap(outside, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(distance)[1::2], 0.0)


_APART = 1e6  # the stacked slices' spacing: beyond any distance within a slice (pixels)


def reference_contrast(header: BundleHeader) -> Optional[Tuple[float, str]]:
    """(depth contrast, what it describes) to compare a model's new scans with; None when the model offers none."""
    for key, what in (("adaptation", "the site scans this model was adapted to"),
                      ("training_contrast", "the volumes this model was trained on")):
        record = header.extra.get(key)
        if isinstance(record, dict) and isinstance(record.get("depth_contrast"), (int, float)):
            return float(record["depth_contrast"]), what
    if header.modality.upper() == "T1":
        return T1_DEPTH_CONTRAST, "T1-weighted brains"
    return None


def unlike(contrast: float, reference: float) -> bool:
    """Whether a scan's depth contrast is not the model's ``reference``: further than :data:`TOLERANCE` from it (the
    one rule of detection's warning, calibrate's warning and adapt's refusal)."""
    return abs(contrast - reference) > TOLERANCE


def contrast_problem(names: Sequence[str], contrasts: Sequence[float], header: BundleHeader) -> str:
    """What is wrong with scans whose depth contrast is not the model's (names them, with their values); ""."""
    reference = reference_contrast(header)
    if reference is None:
        return ""
    value, what = reference
    far = [(n, c) for n, c in zip(names, contrasts) if unlike(c, value)]
    if not far:
        return ""
    listed = ", ".join(f"{n} ({c:+.2f})" for n, c in far)
    return (f"Scan(s) of another contrast than the model's {header.modality} scans: {listed}; {what} have a depth "
            f"contrast of {value:+.2f} (deep brain minus brain rim, on the 1st-99th percentile scale; accepted within "
            f"{TOLERANCE}).")


def scan_contrast_warning(slices: np.ndarray, header: BundleHeader) -> str:
    """What a detection says of a scan whose model slices [N, S, S] do not have the model's depth contrast (a T2
    for a T1 model); "" when they do, or when the model offers no reference or the brain is too small to tell."""
    reference = reference_contrast(header)
    if reference is None:
        return ""
    try:
        contrast = depth_contrast(slices)
    except CeVAEError:  # too little brain to tell: nothing known against the scan
        return ""
    value, what = reference
    if not unlike(contrast, value):
        return ""
    return (f"The scan has another contrast than the model's {header.modality} scans: its depth contrast is "
            f"{contrast:+.2f}, where {what} have {value:+.3f} (deep brain minus brain rim, on the 1st-99th percentile "
            f"scale; accepted within {TOLERANCE}), as in a T2-weighted or other scan. The scores will not mean what "
            "they mean on the model's scans: use a model of this contrast, or check the brain mask (a mask that holds "
            "the head, not the brain, measures differently).")


def check_modality(names: Sequence[str], contrasts: Sequence[float], header: BundleHeader) -> None:
    """Refuse scans whose depth contrast is not the model's (``adapt``: it would train on them)."""
    problem = contrast_problem(names, contrasts, header)
    if problem:
        raise CeVAEError(f"{problem} Adapt a model of their own modality, or check their brain masks: a mask that "
                         "holds the head, not the brain, changes this too.")
