"""Automatic brain mask for a T1 head MRI by affine registration of a bundled template.

The colin27 template (2 mm T1 with skull, plus its brain mask) is registered onto a 4 mm copy
of the input (Mattes mutual information; similarity, then affine). The template's signed
distance to its brain boundary is warped onto the input grid and thresholded at a small
margin. If the input is already skull-stripped (the band just outside the warped brain is
background), the input's own foreground near the warped brain is used instead. The result is
hole-filled and reduced to its largest connected component.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import CeVAEError

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

TEMPLATE_T1 = "colin27_t1_2mm.nii.gz"
TEMPLATE_MASK = "colin27_brainmask_2mm.nii.gz"

_REGISTRATION_SPACING_MM = 4.0
_SAMPLING_FRACTION = 0.25
_SEED = 20240601
_MARGIN_MM = 2.0  # the template mask (BET) hugs the cortex; grow it a little
_SHELL_MM = (3.0, 10.0)  # band outside the warped brain used to detect skull-stripped input
_STRIPPED_FRACTION = 0.5  # background share of that band above which the input counts as stripped
_BACKGROUND_LEVEL = 0.01  # of the brain's robust intensity range, above the image minimum
_SEARCH_MM = 10.0  # how far outside the warped brain a stripped input's foreground may reach
_PLAUSIBLE_ML = (500.0, 3000.0)


def default_template_dir() -> Path:
    """The bundled ``Resources/Templates`` folder of the repository."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Templates"


def load_template(template_dir: Path | None = None) -> tuple[sitk.Image, sitk.Image]:
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


def compute_brain_mask(
    image: sitk.Image,
    template_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> sitk.Image:
    """Brain mask (uint8 {0,1}) of a 3D scalar T1 head MRI, on exactly the input's grid.

    Works on heads with skull and on skull-stripped brains. ``progress(fraction, message)``
    is called as the steps advance.
    """
    report = progress or (lambda fraction, message: None)
    _check_input(image)
    report(0.0, "Loading brain template")
    template, template_mask = load_template(template_dir)
    report(0.1, "Registering brain template")
    transform = _register(_registration_image(image), _normalised(template), report)
    report(0.8, "Warping brain mask")
    distance = _warped_distance(template_mask, image, transform)
    intensities = sitk.Cast(image, sitk.sitkFloat32)
    background = _background_threshold(intensities, distance)
    if _looks_skull_stripped(intensities, distance, background):
        logger.info("Input looks skull-stripped: using its foreground near the warped brain")
        mask = (intensities > background) & (distance <= _SEARCH_MM)
    else:
        mask = distance <= _MARGIN_MM
    report(0.9, "Cleaning brain mask")
    mask = _largest_filled_component(mask)
    _warn_if_implausible(mask)
    report(1.0, "Brain mask done")
    return mask


def _check_input(image: sitk.Image) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CeVAEError(
            f"Brain masking needs a 3D scalar image; got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel."
        )
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if not stats.GetMaximum() > stats.GetMinimum():
        raise CeVAEError("Brain masking needs a T1 image with contrast; this image is constant.")


def _registration_image(image: sitk.Image) -> sitk.Image:
    """Smoothed, normalised copy of ``image`` on an isotropic 4 mm grid over the same extent."""
    target = _REGISTRATION_SPACING_MM
    spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    new_size = np.maximum(1, np.round(size * spacing / target)).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    grid = sitk.Image(new_size.tolist(), sitk.sitkFloat32)
    grid.SetSpacing([target] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin((centre - direction @ ((new_size - 1) / 2.0 * target)).tolist())
    sigmas = 0.5 * np.sqrt(np.maximum(target**2 - spacing**2, 0.0))
    smoothed = sitk.Cast(image, sitk.sitkFloat32)
    if sigmas.max() > 0:
        smoothed = sitk.SmoothingRecursiveGaussian(smoothed, np.maximum(sigmas, 1e-3).tolist())
    return _normalised(sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def _normalised(image: sitk.Image) -> sitk.Image:
    """Intensities clipped to the 0.5-99.5 percentiles and scaled to [0, 1]."""
    low, high = np.percentile(sitk.GetArrayViewFromImage(image), [0.5, 99.5])
    if high <= low:
        low, high = float(sitk.GetArrayViewFromImage(image).min()), float(sitk.GetArrayViewFromImage(image).max())
    scaled = (sitk.Cast(image, sitk.sitkFloat32) - float(low)) / float(high - low)
    return sitk.Clamp(scaled, sitk.sitkFloat32, 0.0, 1.0)


def _registration_method(shrink: list[int], smoothing_mm: list[float], learning_rate: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(_SAMPLING_FRACTION, _SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=0.01, numberOfIterations=100, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smoothing_mm)
    return method


def _register(fixed: sitk.Image, moving: sitk.Image, report: ProgressCallback) -> sitk.AffineTransform:
    """Affine transform mapping input (fixed) points to template (moving) points."""
    try:
        similarity = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        method = _registration_method([2, 1], [4.0, 0.0], learning_rate=2.0)
        method.SetInitialTransform(similarity, inPlace=True)
        method.Execute(fixed, moving)
        logger.debug("Similarity: metric %.4f after %d iterations", method.GetMetricValue(),
                     method.GetOptimizerIteration())
        report(0.45, "Refining registration (affine)")
        affine = sitk.AffineTransform(3)
        affine.SetCenter(similarity.GetCenter())
        affine.SetMatrix(similarity.GetMatrix())
        affine.SetTranslation(similarity.GetTranslation())
        method = _registration_method([1], [0.0], learning_rate=0.5)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(fixed, moving)
        logger.debug("Affine: metric %.4f after %d iterations", method.GetMetricValue(),
                     method.GetOptimizerIteration())
    except RuntimeError as exc:
        raise CeVAEError(f"Brain-mask registration failed ({exc}); is this a 3D T1 head MRI?") from exc
    return affine


def _warped_distance(template_mask: sitk.Image, image: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Signed distance (mm, negative inside) to the template brain boundary, on the input grid."""
    distance = sitk.SignedMaurerDistanceMap(
        template_mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    far = float(np.abs(sitk.GetArrayViewFromImage(distance)).max())
    return sitk.Resample(distance, image, transform, sitk.sitkLinear, far, sitk.sitkFloat32)


def _background_threshold(image: sitk.Image, distance: sitk.Image) -> float:
    """Intensity just above the image minimum, relative to the brain's robust range."""
    values = sitk.GetArrayViewFromImage(image)
    inside = values[sitk.GetArrayViewFromImage(distance) <= 0]
    minimum = float(values.min())
    high = float(np.percentile(inside, 99)) if inside.size else float(values.max())
    return minimum + _BACKGROUND_LEVEL * (high - minimum)


def _looks_skull_stripped(image: sitk.Image, distance: sitk.Image, background: float) -> bool:
    """True when most of the band just outside the warped brain is background."""
    dist = sitk.GetArrayViewFromImage(distance)
    shell = (dist > _SHELL_MM[0]) & (dist <= _SHELL_MM[1])
    if not shell.any():
        return False
    fraction = float(np.mean(sitk.GetArrayViewFromImage(image)[shell] <= background))
    logger.debug("Background share of the band outside the brain: %.3f", fraction)
    return fraction > _STRIPPED_FRACTION


def _largest_filled_component(mask: sitk.Image) -> sitk.Image:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.Cast(mask, sitk.sitkUInt8)), sortByObjectSize=True)
    return sitk.Cast(sitk.BinaryFillhole(components == 1), sitk.sitkUInt8)


def _warn_if_implausible(mask: sitk.Image) -> None:
    volume_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(mask.GetSpacing())) / 1000.0
    if not _PLAUSIBLE_ML[0] <= volume_ml <= _PLAUSIBLE_ML[1]:
        logger.warning("Brain mask volume %.0f mL is implausible; check the image and the mask.", volume_ml)
