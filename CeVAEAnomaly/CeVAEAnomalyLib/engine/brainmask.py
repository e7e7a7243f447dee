"""Automatic brain mask for a T1 head MRI by affine registration of a bundled template.

The colin27 template (2 mm T1 with skull, plus its brain mask) is registered onto a 4 mm copy
of the input (Mattes mutual information; similarity, then affine), from the best of a few short coarse
registrations started at a few head pitches and shifts along the head's axis (a scan that covers part of the
head has its centre of mass far from the head's). The template's signed distance to its brain boundary is warped
onto the input grid and thresholded at a margin (by default a little outside that boundary; detection scores a mask a
little inside it). An input that is already skull-stripped is its own mask (no registration): its foreground,
everything above a near-background level, is no bigger than a brain, its background is one constant value (a head's
air is noise, even where the coverage is partial and the head's foreground is brain-sized), and, where it reaches the
image's edge, no dark band (skull) lies under its surface (a cut-off head whose air was set to zero). Either way the
result is hole-filled and reduced to its largest connected component. A process keeps its registrations' transforms
by their inputs' content, so that a scan masked at two margins (training, then scoring) is registered once; within
one run (:func:`each_warning_once`: ``train``, ``adapt``) a scan's warnings are said once, whatever the margins.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Optional, Set, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import CeVAEError, one_line
from ..interrupts import stops_held
from ..progress import Cancelled, ProgressCallback, report, scaled
from ..data import template_dir
from ..io.images import voxel_volume_ml

logger = logging.getLogger(__name__)

TEMPLATE_T1 = "colin27_t1_2mm.nii.gz"
TEMPLATE_MASK = "colin27_brainmask_2mm.nii.gz"

_ORDER = "LPS"  # the voxel order a mask is made in (any one order would do: the same for every scan)
_REGISTRATION_SPACING_MM = 4.0
_MIN_AXIS_VOXELS = 4  # the fewest voxels an axis keeps when fine voxels are averaged in blocks, and the fewest
# the registration's smoothing (ITK's recursive Gaussian) takes along each axis of the 4 mm grid
_SAMPLING_FRACTION = 0.25
_SEED = 20240601
_PITCH_STARTS_DEG = (0.0, 20.0, -20.0)  # head nodding is the largest pose difference in practice
_SHIFT_STARTS_MM = (0.0, 25.0, -25.0)  # along the superior axis: a head cut off by the field of view
MARGIN_MM = 2.0  # the template mask (BET) hugs the cortex; grow it a little
# Detection scores a mask reaching this far inside the template's brain boundary instead: the mask above holds a rim of
# non-brain tissue (40-100 ml) that thick noisy scans turn into false components (docs/benchmark.md, "Detection with
# the automatic brain mask").
SCORED_MARGIN_MM = -1.0
_BACKGROUND_LEVEL = 0.01  # foreground: above the minimum by this share of the robust range
_SPIKE_SPANS = 100.0  # a voxel this many tissue ranges beyond them is corrupt, not anatomy (see _without_spikes)
_STRIPPED_MAX_ML = 2500.0  # a foreground this small is a brain (adult heads are > 3 L)
_STRIPPED_MIN_CONSTANT = 0.1  # a skull-stripped image has at least this share of voxels at its minimum
_SHELL_MM = 4.0  # depth profile: median intensity in shells this thick, from the air inwards ...
_PROFILE_DEPTH_MM = 24.0  # ... down to this depth (scalp, skull and CSF of a head lie within it)
_SKULL_DIP = 0.12  # a head's profile falls by at least this share of its range after the scalp; a brain's rises
_PLAUSIBLE_ML = (500.0, 3000.0)
_MAX_MASK_OUTSIDE_HEAD = 0.05  # share of a fitting mask in the background (whole heads: 0 %; two heads: 22 %)
_MAX_MASK_ON_EDGE = 0.01  # share of the image's border in a fitting mask (whole heads: 0.03 % at most)
_KEPT_REGISTRATIONS = 128  # transforms kept per process (a few hundred bytes each): an adaptation's whole cohort


def default_template_dir() -> Path:
    """The packaged brain-mask template folder."""
    return template_dir()


def load_template(template_dir: Optional[Path] = None) -> tuple[sitk.Image, sitk.Image]:
    """Template T1 (float32) and brain mask (uint8) from ``template_dir``."""
    folder = Path(template_dir) if template_dir is not None else default_template_dir()
    paths = [folder / TEMPLATE_T1, folder / TEMPLATE_MASK]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CeVAEError(
            f"Brain-mask template files {missing} not found in {folder}; "
            "restore them or rebuild them with scripts/make_template.py."
        )
    return sitk.ReadImage(str(paths[0]), sitk.sitkFloat32), sitk.ReadImage(str(paths[1]), sitk.sitkUInt8)


def given_or_computed_mask(image: sitk.Image, mask_path: Optional[Path], name: str = "the image",
                           progress: Optional[ProgressCallback] = None, margin_mm: float = MARGIN_MM,
                           where: str = "") -> sitk.Image:
    """The brain mask read from ``mask_path``, or computed from ``image`` (at ``margin_mm``, as
    :func:`compute_brain_mask`, whose warnings ``where`` leads) when no mask is given."""
    if mask_path is not None:
        from ..io.images import read_image

        return read_image(mask_path, "brain mask")
    _say(name, "no mask", logging.INFO, "No brain mask for %s: computing one automatically.", name)  # once a run
    return compute_brain_mask(image, progress=progress, where=where, margin_mm=margin_mm)


def compute_brain_mask(
    image: sitk.Image,
    template_dir: Optional[Path] = None,
    progress: Optional[ProgressCallback] = None,
    where: str = "",
    margin_mm: float = MARGIN_MM,
) -> sitk.Image:
    """Brain mask (uint8 {0,1}) of a 3D scalar T1 head MRI, on exactly the input's grid.

    Works on heads with skull and on skull-stripped brains. ``margin_mm``: how far beyond the registered template's
    brain boundary the mask of a head reaches (negative: inside it); a skull-stripped input is its own mask whatever
    the margin. ``progress(fraction, message)`` is called as the steps advance; ``where`` (e.g. "scan.nii.gz: ")
    leads the warnings and the skull-stripped notice, so that a cohort's say which volume. The mask is made in one
    voxel order (LPS; a pure index operation, undone at the end): the registration samples by voxel index and
    averages blocks from index 0, so the same physical scan stored in another voxel order (a NIfTI's LAS, an NRRD's
    RAS) got a mask tens of millilitres apart.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CeVAEError(
            f"Brain masking needs a 3D scalar image; got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel."
        )
    _check_span(image)
    order = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)  # the same axes: whether the reordering undoes itself exactly
    probe.SetDirection(image.GetDirection())
    back = sitk.DICOMOrient(sitk.DICOMOrient(probe, _ORDER), order).GetDirection()
    reorder = order != _ORDER and np.allclose(back, image.GetDirection(), atol=1e-9)
    mask = _mask_in_order(image, reorder, template_dir, progress, where, margin_mm)
    if not reorder:
        return mask
    mask = sitk.DICOMOrient(mask, order)
    mask.CopyInformation(image)  # the same grid: the voxels are only put back in order
    return mask


def _mask_in_order(given: sitk.Image, reorder: bool, template_dir: Optional[Path],
                   progress: Optional[ProgressCallback], where: str, margin_mm: float) -> sitk.Image:
    """:func:`compute_brain_mask` of ``given`` (as the user gave it: the image whose axes a refusal names), made in
    the voxel order :data:`_ORDER`: of a copy in that order where ``reorder``."""
    intensities = _check_input(_reordered(given) if reorder else given)
    small = _downsampled(intensities)
    background = _background_level(small)
    grid = _grid(intensities)
    foreground = sitk.GetArrayViewFromImage(intensities) > background  # a new array, not a view
    mask = intensities > background if _looks_stripped(intensities, small, background) else None
    del intensities  # (a reordered copy of the scan) not held while the template is registered, warped and cleaned
    stripped = mask is not None
    scan = _scan_key(small, where)
    if stripped:
        _say(scan, "stripped", logging.INFO, "%sInput looks skull-stripped: its foreground is the brain mask", where)
    else:
        _check_extent(given)
        report(progress, 0.05, "Loading brain template")
        template, template_mask = load_template(template_dir)
        report(progress, 0.1, "Registering brain template")
        transform = _registered(small, template, scaled(progress, 0.1, 0.8))
        report(progress, 0.8, "Warping brain mask")
        mask = _warped_distance(template_mask, grid, transform) <= margin_mm
    report(progress, 0.9, "Cleaning brain mask")
    mask = _largest_filled_component(mask)
    _check_volume(mask, where, scan)
    _check_fit(sitk.GetArrayViewFromImage(mask) > 0, foreground, stripped, where, scan)
    report(progress, 1.0, "Brain mask done")
    return mask


def _reordered(image: sitk.Image) -> sitk.Image:
    """``image`` with its voxels in the order :data:`_ORDER`. Where only axes flip (as from a NIfTI's RAS or LAS),
    one flip copies the voxels once; DICOMOrient (kept for a permutation) permutes, even to the same order, then flips,
    holding two copies of the scan at once."""
    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation(_ORDER)
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    probe.SetDirection(image.GetDirection())
    orient.Execute(probe)
    if list(orient.GetPermuteOrder()) == [0, 1, 2]:
        return sitk.Flip(image, orient.GetFlipAxes())  # the same voxels and grid as DICOMOrient's
    return sitk.DICOMOrient(image, _ORDER)


def _grid(image: sitk.Image) -> Tuple[tuple, tuple, tuple, tuple]:
    """``image``'s size, origin, spacing and direction: its grid, without its voxels."""
    return image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def _looks_stripped(intensities: sitk.Image, small: sitk.Image, background: float) -> bool:
    """Whether the scan (its float32 ``intensities``, their 4 mm copy ``small``) is skull-stripped: the module's
    tests of its foreground's volume, its background and, where it reaches the image's edge, its depth profile."""
    return (_foreground_volume_ml(small, background) <= _STRIPPED_MAX_ML and _constant_background(intensities)
            and not (_reaches_edge(intensities, background) and _skull_under_surface(small, background)))


def _check_input(image: sitk.Image) -> sitk.Image:
    """The float32 intensities to mask, NaN/Inf voxels set to the lowest finite value (background) and corrupt
    spikes far outside the tissue range clipped (:func:`_without_spikes`).

    Non-finite voxels would spread through smoothing and resampling and break the percentiles;
    the pipeline leaves them out of the brain afterwards (with a warning), as with a given mask.
    """
    intensities = _float32(_in_float32_range(image))
    values = sitk.GetArrayViewFromImage(intensities)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise CeVAEError("Every voxel of the image is NaN or infinite; the image holds no data.")
        arr = np.where(finite, values, values[finite].min())
        intensities = sitk.GetImageFromArray(arr)
        intensities.CopyInformation(image)
    values = sitk.GetArrayViewFromImage(intensities)
    lowest, highest = float(values.min()), float(values.max())
    if not highest > lowest:
        raise CeVAEError("Brain masking needs a T1 image with contrast; this image is constant.")
    return _without_spikes(intensities, lowest, highest)


def _without_spikes(intensities: sitk.Image, lowest: float, highest: float) -> sitk.Image:
    """``intensities`` (its ``lowest`` and ``highest`` values), or a copy whose voxels beyond ``_SPIKE_SPANS`` times the
    tissue range (0.1-99.9th percentile of every 4th voxel on each axis) from its ends are set to that limit: smoothed
    for the registration copy, one corrupt voxel of 1e20 became a blob that took the mask (Dice 0.38). Real heads stay
    within 1.5 ranges of the 99.9th percentile (vessels, fat), so their masks are unchanged. (A copy keeps values at
    both percentiles, so it is no more constant than ``intensities``.)"""
    values = sitk.GetArrayViewFromImage(intensities)
    low, high = (float(v) for v in np.percentile(values[::4, ::4, ::4], [0.1, 99.9]))
    span = _SPIKE_SPANS * (high - low)
    floor, ceiling = low - span, high + span
    if not high > low or (lowest >= floor and highest <= ceiling):
        return intensities
    clipped = sitk.GetImageFromArray(np.clip(values, floor, ceiling).astype(np.float32))
    clipped.CopyInformation(intensities)
    return clipped


def _float32(image: sitk.Image) -> sitk.Image:
    """``image`` cast to float32; a float32 image itself, not a copy (ITK's cast copies every voxel)."""
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _in_float32_range(image: sitk.Image) -> sitk.Image:
    """``image``, or, where its finite float64 values exceed float32's range or are so small that float32 would
    flush them to 0 (a scan in units of 1e-50), a copy scaled by a power of two to a largest magnitude of about 1
    (exact; the mask does not depend on the intensity scale)."""
    if image.GetPixelID() != sitk.sitkFloat64:
        return image
    arr = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(arr)
    big = max(-float(np.min(arr, where=finite, initial=0.0)), float(np.max(arr, where=finite, initial=0.0)))
    smallest, largest = float(np.finfo(np.float32).tiny) * 2.0**24, float(np.finfo(np.float32).max)  # (Python floats)
    if big == 0.0 or smallest <= big <= largest:
        return image
    scaled = sitk.GetImageFromArray(np.ldexp(arr, -int(np.frexp(big)[1])))
    scaled.CopyInformation(image)
    return scaled


def _downsampled(image: sitk.Image) -> sitk.Image:
    """Smoothed float copy of ``image`` on an isotropic 4 mm grid over the same extent. Voxels finer than 1 mm
    are first averaged in blocks of about 1 mm (a 0.5 mm scan is smoothed on an eighth of its voxels)."""
    target = _REGISTRATION_SPACING_MM
    minimum = float(sitk.GetArrayViewFromImage(image).min())
    blocks = [b if n // b >= _MIN_AXIS_VOXELS else 1  # the smoothing needs a few voxels on each axis
              for n, b in zip(image.GetSize(), (max(1, int(np.floor(1.0 / s))) for s in image.GetSpacing()))]
    block_grid = sitk.BinShrink(_float32(image), blocks) if max(blocks) > 1 else image
    size = np.array(image.GetSize())
    new_size = _registration_size(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    grid = sitk.Image(new_size.tolist(), sitk.sitkFloat32)
    grid.SetSpacing([target] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin((centre - direction @ ((new_size - 1) / 2.0 * target)).tolist())
    sigmas = 0.5 * np.sqrt(np.maximum(target**2 - np.array(block_grid.GetSpacing()) ** 2, 0.0))
    smoothed = _float32(block_grid)
    if sigmas.max() > 0:
        smoothed = sitk.SmoothingRecursiveGaussian(smoothed, np.maximum(sigmas, 1e-3).tolist())
    return sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, minimum, sitk.sitkFloat32)


def _registration_size(image: sitk.Image) -> np.ndarray:
    """The voxels along each axis of :func:`_downsampled`'s 4 mm grid over ``image``'s extent."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    return np.maximum(1, np.round(extent / _REGISTRATION_SPACING_MM)).astype(int)


def _check_span(image: sitk.Image) -> None:
    """Refuse, before anything, a volume under :data:`_MIN_SPAN_MM` along its longest axis (a head in voxels of
    hundredths of a millimetre: a header in other units): its downsampled copy, whose background level both kinds of
    mask take, is one voxel (it ended in an IndexError before :func:`_check_extent` could say so)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    extent = [n * s for n, s in zip(size, spacing)]
    i = int(np.argmax(extent))
    if extent[i] < _MIN_SPAN_MM:
        raise CeVAEError(f"The image spans at most {extent[i]:g} mm ({size[i]} voxels of {spacing[i]:g} mm along its "
                         f"{'ijk'[i]} axis): too little for the automatic brain mask, and an MRI of a head spans "
                         "several centimetres, so its header's voxel size may be wrong (or in other units). Fix the "
                         "header, or give a brain mask with --mask (in Slicer: choose a brain mask).")


_MIN_SPAN_MM = 14.0  # along the longest axis: 4 voxels of the registration's 4 mm grid (_check_extent: each axis)


def _check_extent(image: sitk.Image) -> None:
    """Refuse, before registering, a scan too thin along an axis for the registration's 4 mm grid: its smoothing
    needs :data:`_MIN_AXIS_VOXELS` voxels along each axis (ITK failed with "The number of pixels along dimension 2
    is less than 4")."""
    short = [axis for axis, n in enumerate(_registration_size(image)) if n < _MIN_AXIS_VOXELS]
    if not short:
        return
    axis = short[0]
    need = (_MIN_AXIS_VOXELS - 0.5) * _REGISTRATION_SPACING_MM  # rounded to the grid, this gives the fewest voxels
    covered = image.GetSize()[axis] * image.GetSpacing()[axis]
    raise CeVAEError(
        f"The scan covers only {covered:g} mm along its {'ijk'[axis]} axis ({image.GetSize()[axis]} voxels of "
        f"{image.GetSpacing()[axis]:g} mm): too little for the automatic brain mask, which registers a template on "
        f"a {_REGISTRATION_SPACING_MM:g} mm grid and needs {_MIN_AXIS_VOXELS} of its voxels along each axis (at least "
        f"{need:g} mm). Give a brain mask with --mask (in Slicer: choose a brain mask)."
    )


def _normalised(image: sitk.Image) -> sitk.Image:
    """Intensities clipped to the 0.5-99.5 percentiles (or min-max if those coincide), scaled to [0, 1]."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        low, high = values.min(), values.max()
    scaled = (sitk.Cast(image, sitk.sitkFloat32) - float(low)) / float(high - low)
    return sitk.Clamp(scaled, sitk.sitkFloat32, 0.0, 1.0)


def _background_level(image: sitk.Image) -> float:
    """Intensity just above the minimum: a small share of the robust range of the rest."""
    values = sitk.GetArrayViewFromImage(image)
    minimum = float(values.min())
    high = float(np.percentile(values[values > minimum], 99.5))
    return minimum + _BACKGROUND_LEVEL * (high - minimum)


def _constant_background(image: sitk.Image) -> bool:
    """Whether at least a tenth of the voxels hold exactly the minimum: the background a skull-stripping
    tool leaves (noise-free), unlike the magnitude noise of a scanner's air around a head."""
    values = sitk.GetArrayViewFromImage(image)
    return np.count_nonzero(values == values.min()) >= _STRIPPED_MIN_CONSTANT * values.size


def _reaches_edge(image: sitk.Image, background: float) -> bool:
    """Whether the foreground covers more than 1 % of the image's border: a partial field of view (a head cut off
    by it can be as small as a brain; whole stripped brains, thick slabs included, cover at most 0.4 %). The skull
    test is kept to those images: a whole skull-stripped brain of another contrast (T2: bright CSF at its
    surface, darker tissue inside) would look like a dark band under a surface."""
    return _edge_share(sitk.GetArrayViewFromImage(image) > background) > _MAX_MASK_ON_EDGE


def _edge_share(mask: np.ndarray) -> float:
    """The share of the array's border voxels (its six faces) that are in ``mask``."""
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    return sum(int(np.count_nonzero(f)) for f in faces) / sum(f.size for f in faces)


def _skull_under_surface(image: sitk.Image, background: float) -> bool:
    """Whether the foreground's intensity, going inwards from the air, falls again after its first rise: the dark
    skull and CSF under a head's scalp. A skull-stripped brain only grows brighter (cortex, then white matter).
    Depth is measured from the air alone, so the cut face of a partial field of view does not count as surface;
    this tells a cut-off head whose air is exactly zero (as brain-sized as a brain) from a stripped brain."""
    values = sitk.GetArrayViewFromImage(image)
    foreground = values > background
    distance = sitk.SignedMaurerDistanceMap(image <= background, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    depth = sitk.GetArrayViewFromImage(distance)  # a view into `distance`'s buffer: it lives as long as this name
    top = float(np.percentile(values[foreground], 99))
    profile = []
    for start in np.arange(0.0, _PROFILE_DEPTH_MM, _SHELL_MM):
        shell = foreground & (depth > start) & (depth <= start + _SHELL_MM)
        if shell.any():
            profile.append(float(np.median(values[shell])))
    dip = max((a - min(profile[i + 1:]) for i, a in enumerate(profile[:-1])), default=0.0)
    logger.debug("Depth profile %s, dip %.2f", np.round(profile, 1), dip / max(top - background, 1e-12))
    return dip > _SKULL_DIP * (top - background)


def _foreground_volume_ml(image: sitk.Image, background: float) -> float:
    """Volume of the largest hole-filled component above ``background``."""
    foreground = _largest_filled_component(image > background)
    voxel_ml = voxel_volume_ml(image)
    volume = np.count_nonzero(sitk.GetArrayViewFromImage(foreground)) * voxel_ml
    logger.debug("Foreground volume %.0f mL", volume)
    return volume


def _registration_method(
    shrink: list[int], smoothing_mm: list[float], max_step_mm: float, iterations: int, gradient_images: bool = True
) -> sitk.ImageRegistrationMethod:
    """``gradient_images=False``: the metric's gradients at its samples by finite differences, not from gradient
    images of both whole images, which take three quarters of a short start's time."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(_SAMPLING_FRACTION, _SEED)
    method.SetMetricUseFixedImageGradientFilter(gradient_images)
    method.SetMetricUseMovingImageGradientFilter(gradient_images)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsGradientDescent(
        learningRate=max_step_mm, numberOfIterations=iterations, convergenceMinimumValue=1e-6,
        convergenceWindowSize=10, estimateLearningRate=method.EachIteration,
        maximumStepSizeInPhysicalUnits=max_step_mm,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smoothing_mm)
    return method


def _best_start(fixed: sitk.Image, moving: sitk.Image, progress: Optional[ProgressCallback]
                ) -> sitk.Similarity3DTransform:
    """Short coarse similarity registrations from each of :func:`_starts`; the best one (a start that ITK cannot run,
    e.g. shifted off a small field of view, is passed over)."""
    starts = list(_starts(fixed, moving))
    best, best_value, failure = None, float("inf"), None
    for n, start in enumerate(starts):
        method = _registration_method([2], [4.0], max_step_mm=2.0, iterations=30, gradient_images=False)
        method.SetInitialTransform(start, inPlace=True)
        part = scaled(progress, n / len(starts), (n + 1) / len(starts))
        try:
            _execute(method, fixed, moving, part, 30, "Registering brain template (initial pose)")
        except RuntimeError as exc:
            logger.debug("Start %d failed: %s", n, one_line(exc))
            failure = exc
            continue
        logger.debug("Start %d: metric %.4f", n, method.GetMetricValue())
        if method.GetMetricValue() < best_value:
            best, best_value = start, method.GetMetricValue()
    if best is None:
        raise failure if failure is not None else RuntimeError("no start")
    return best


def _starts(fixed: sitk.Image, moving: sitk.Image) -> Iterator[sitk.Similarity3DTransform]:
    """Similarity transforms that put the centres of mass of ``moving`` and ``fixed`` together, pitched by each of
    :data:`_PITCH_STARTS_DEG` and shifted along the superior axis by each of :data:`_SHIFT_STARTS_MM`."""
    centred = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    for shift in _SHIFT_STARTS_MM:
        for pitch in _PITCH_STARTS_DEG:
            start = sitk.Similarity3DTransform(centred)
            start.SetRotation((1.0, 0.0, 0.0), float(np.deg2rad(pitch)))
            translation = np.array(start.GetTranslation())
            translation[2] += shift  # physical z is the superior axis (LPS), whatever the voxel order
            start.SetTranslation(translation.tolist())
            yield start


_KEPT_LOCK = threading.Lock()
_kept: OrderedDict[str, sitk.AffineTransform] = OrderedDict()  # registration key -> transform, oldest use first


def forget_registrations() -> None:
    """Forget the registrations :func:`_registered` kept: the next mask of any scan registers the template again."""
    with _KEPT_LOCK:
        _kept.clear()


def _registered(small: sitk.Image, template: sitk.Image, progress: Optional[ProgressCallback]
                ) -> sitk.AffineTransform:
    """:func:`_register` of the scan's 4 mm copy ``small`` and the template, or the transform that an earlier
    registration of the very same inputs found in this process: a scan masked for training and then for scoring
    (another margin) is registered once. Kept by the registration's inputs (their voxels and grids, the starts and
    sampling), never by a file name: a scan changed under the same name registers again."""
    key = _registration_key(small, template)
    with _KEPT_LOCK:
        known = _kept.get(key)
        if known is not None:
            _kept.move_to_end(key)
    if known is not None:
        logger.debug("Brain template already registered to this scan: its transform is reused")
        return sitk.AffineTransform(known)
    transform = _register(_normalised(small), _normalised(template), progress)
    with _KEPT_LOCK:
        _kept[key] = sitk.AffineTransform(transform)
        while len(_kept) > _KEPT_REGISTRATIONS:
            _kept.popitem(last=False)
    return transform


def _registration_key(small: sitk.Image, template: sitk.Image) -> str:
    """sha256 of all that :func:`_register` depends on: both images' voxels, voxel type and grid, and the starts,
    seed and sampling of its registrations."""
    digest = hashlib.sha256(repr((_SAMPLING_FRACTION, _SEED, _PITCH_STARTS_DEG, _SHIFT_STARTS_MM)).encode())
    for image in (small, template):
        digest.update(repr((image.GetPixelIDValue(), _grid(image))).encode())
        digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).data)
    return digest.hexdigest()


def _register(
    fixed: sitk.Image, moving: sitk.Image, progress: Optional[ProgressCallback]
) -> sitk.AffineTransform:
    """Affine transform mapping input (fixed) points to template (moving) points.

    ``progress`` (fractions of the registration) is called at every optimiser iteration.
    """
    # One thread: ITK's metric sums per thread, and how the samples fall to the threads of its pool
    # varies from run to run, so with more threads one input gave slightly different masks. (The
    # method's own SetNumberOfThreads does not reach the metric.) The registration is on a 4 mm grid.
    with _single_threaded_itk():
        return _register_single_threaded(fixed, moving, progress)


_ITK_THREADS = threading.Lock()
_itk_single = {"users": 0, "saved": 1}  # registrations under way, and ITK's thread count before the first


@contextmanager
def _single_threaded_itk() -> Iterator[None]:
    """ITK's default thread count set to 1 while any registration (of any thread) runs, and restored when the last
    one ends: registrations that overlap in two threads neither restore it too early nor leave it at 1."""
    with _ITK_THREADS:
        if _itk_single["users"] == 0:
            _itk_single["saved"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _itk_single["users"] += 1
    try:
        yield
    finally:
        with _ITK_THREADS:
            _itk_single["users"] -= 1
            if _itk_single["users"] == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_itk_single["saved"])


def _register_single_threaded(
    fixed: sitk.Image, moving: sitk.Image, progress: Optional[ProgressCallback]
) -> sitk.AffineTransform:
    """:func:`_register`'s work, with ITK on one thread."""
    try:
        similarity = _best_start(fixed, moving, scaled(progress, 0.0, 0.3))
        method = _registration_method([2, 1], [4.0, 0.0], max_step_mm=2.0, iterations=100)
        method.SetInitialTransform(similarity, inPlace=True)
        _execute(method, fixed, moving, scaled(progress, 0.3, 0.65), 200, "Registering brain template (similarity)")
        affine = sitk.AffineTransform(3)
        affine.SetCenter(similarity.GetCenter())
        affine.SetMatrix(similarity.GetMatrix())
        affine.SetTranslation(similarity.GetTranslation())
        method = _registration_method([1], [0.0], max_step_mm=1.0, iterations=100)
        method.SetInitialTransform(affine, inPlace=True)
        _execute(method, fixed, moving, scaled(progress, 0.65, 1.0), 100, "Registering brain template (affine)")
        logger.debug("Affine: metric %.4f after %d iterations", method.GetMetricValue(),
                     method.GetOptimizerIteration())
    except RuntimeError as exc:
        raise CeVAEError(f"Brain-mask registration failed ({one_line(exc)}); is this a 3D T1 head MRI?") from None
    return affine


def _execute(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image,
             progress: Optional[ProgressCallback], iterations: int, message: str) -> None:
    """Run a registration, reporting every optimiser iteration (at most ``iterations`` in all levels).

    An exception cannot cross SimpleITK's C++ callback: it would come out as a failed registration. So a
    :class:`Cancelled` raised by ``progress`` stops the optimiser and is re-raised when it has returned, and
    Ctrl-C and SIGTERM are held during the registration: they stop the optimiser at its next iteration and
    act when it has returned.
    """
    state: dict = {"count": 0, "cancelled": None, "stopped": False}

    def step() -> None:
        if state["stopped"] or state["cancelled"] is not None:  # StopRegistration ends one level: end each
            method.StopRegistration()
            return
        state["count"] += 1
        try:
            report(progress, min(1.0, state["count"] / iterations), message)
        except Cancelled as exc:
            state["cancelled"] = exc
            method.StopRegistration()

    def stop() -> None:
        state["stopped"] = True
        method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, step)
    with stops_held(on_stop=stop):
        method.Execute(fixed, moving)
    if state["cancelled"] is not None:
        raise state["cancelled"]


def _warped_distance(template_mask: sitk.Image, grid: Tuple[tuple, tuple, tuple, tuple],
                     transform: sitk.Transform) -> sitk.Image:
    """Signed distance (mm, negative inside) to the template brain boundary, on the input's ``grid``."""
    distance = sitk.SignedMaurerDistanceMap(
        template_mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    far = float(np.abs(sitk.GetArrayViewFromImage(distance)).max())
    size, origin, spacing, direction = grid
    return sitk.Resample(distance, size, transform, sitk.sitkLinear, origin, spacing, direction, far, sitk.sitkFloat32)


def _largest_filled_component(mask: sitk.Image) -> sitk.Image:
    """Largest connected component of ``mask``, holes filled, uint8 {0,1}.

    Labelled within the bounding box of ``mask``: the same components, in the same raster order, and the same holes
    (what lies outside the box is background joined to the image's border, which the box's border background
    touches). Labelling the whole grid held two 32-bit copies of it (ConnectedComponent, RelabelComponent): 600 MB
    for a 512x512x300 scan, of which a brain's box is about a third.
    """
    voxels = sitk.GetArrayViewFromImage(mask)
    spans = [np.flatnonzero(voxels.max(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    if any(len(span) == 0 for span in spans):
        return sitk.Cast(mask, sitk.sitkUInt8)  # empty: no component
    lower = [int(span[0]) for span in spans]
    upper = [int(span[-1]) + 1 for span in spans]
    box = sitk.Cast(mask[lower[0]:upper[0], lower[1]:upper[1], lower[2]:upper[2]], sitk.sitkUInt8)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(box), sortByObjectSize=True)
    filled = sitk.BinaryFillhole(components == 1)
    del box, components
    largest = sitk.ConstantPad(filled, lower, [n - u for n, u in zip(mask.GetSize(), upper)], 0)
    largest.CopyInformation(mask)
    return largest


# what the run under way (each_warning_once) has said: (scan key, fact) pairs; None outside a run
_said: ContextVar[Optional[Set[Tuple[str, str]]]] = ContextVar("cevae_brainmask_said", default=None)


@contextmanager
def each_warning_once() -> Iterator[None]:
    """One run (``train``, ``adapt``; usable as a decorator) in which an automatic mask says each of its warnings (and
    the skull-stripped notice) about a scan once: a scan masked for its slices, again for another orientation's, and
    then for its scores (another margin: other figures) said the same fact each time. Outside a run (a detection, a
    batch's scan) every mask says what it finds; a run within a run is the same run. Kept per thread and task (a
    context variable): another thread's masks are not in this run."""
    if _said.get() is not None:
        yield
        return
    token = _said.set(set())
    try:
        yield
    finally:
        _said.reset(token)


def _scan_key(small: sitk.Image, where: str) -> str:
    """sha256 of a scan, by the voxels and grid of its 4 mm copy ``small`` and the words ``where`` that name it in its
    warnings: a changed scan under the same name is another scan."""
    digest = hashlib.sha256(repr((where, small.GetPixelIDValue(), _grid(small))).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(small)).data)
    return digest.hexdigest()


def _say(scan: str, fact: str, level: int, message: str, *args: object) -> None:
    """Log ``message % args`` at ``level``, unless the run under way (:func:`each_warning_once`) said ``fact`` (a
    name for what the message says) of ``scan`` already."""
    said = _said.get()
    if said is not None:
        if (scan, fact) in said:
            return
        said.add((scan, fact))
    logger.log(level, message, *args)


def _check_fit(mask: np.ndarray, foreground: np.ndarray, stripped: bool, where: str, scan: str) -> None:
    """Warn (led by ``where``, of ``scan``: :func:`_say`) where the automatic mask cannot be trusted: much of it outside
    the head (the template did not register: an unusual pose or header, two heads), or reaching the image's edge (a
    partial field of view, where a registered template may hold more than the brain). ``stripped``: the mask is a
    skull-stripped scan's own foreground, so reaching the edge says only that the scan may cover part of the brain."""
    outside = float(np.mean(~foreground[mask]))
    if outside > _MAX_MASK_OUTSIDE_HEAD:
        _say(scan, "outside", logging.WARNING, "%sThe automatic brain mask fits the image poorly: %.0f %% of it lies "
             "outside the head (an unusual head position or header?); check it, or give a brain mask.", where,
             100 * outside)
    edge = _edge_share(mask)
    if edge <= _MAX_MASK_ON_EDGE:
        return
    if stripped:
        _say(scan, "edge", logging.WARNING, "%sThe automatic brain mask reaches the edge of the image (%.0f %% of its "
             "border): the skull-stripped scan may cover part of the brain only; its mask is its foreground (no "
             "template was registered); check the scan's coverage.", where, 100 * edge)
    else:
        _say(scan, "edge", logging.WARNING, "%sThe automatic brain mask reaches the edge of the image (%.0f %% of its "
             "border): the scan covers part of the head, and the template registered to it may put more than the "
             "brain in the mask; check it, or give a brain mask.", where, 100 * edge)


def _check_volume(mask: sitk.Image, where: str, scan: str) -> None:
    """Raise on an empty mask; warn (led by ``where``, of ``scan``: :func:`_say`) on an implausible brain volume. A
    mask that reaches the image's edge (a scan of part of the head, which :func:`_check_fit` warns of) holds part of a
    brain: a small volume is what it should have."""
    voxels = sitk.GetArrayViewFromImage(mask)
    count = np.count_nonzero(voxels)
    if count == 0:
        raise CeVAEError("The automatic brain mask is empty; is this a T1 head MRI? Provide a brain mask.")
    volume_ml = count * voxel_volume_ml(mask)
    if volume_ml > _PLAUSIBLE_ML[1] or (volume_ml < _PLAUSIBLE_ML[0] and _edge_share(voxels) <= _MAX_MASK_ON_EDGE):
        _say(scan, "volume", logging.WARNING, "%sBrain mask volume %.0f mL is implausible; check the image and the "
             "mask.", where, volume_ml)
