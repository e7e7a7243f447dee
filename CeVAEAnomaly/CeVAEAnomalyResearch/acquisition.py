"""Acquisition variants of a brain volume: what other protocols and scanners make of the same brain.

For benchmarks with a known ground truth: lesions are inserted into the clean 1 mm volume first,
then the volume, its brain mask and its ground truth are degraded together by :func:`derive`, so
the lesions are degraded like the anatomy and the ground truth lives on the variant's grid.

Steps (each torch-free, deterministic for a seed, never modifying its input):
- :func:`post_contrast`: healthy enhancement simulated from anatomy: vessels in the sulcal CSF near
  the brain's surface, the falx and superior sagittal sinus along the mid-sagittal plane, and the
  choroid plexus in the lateral ventricles, brighter than the brain's 99th percentile;
- :func:`bias_field`: a smooth multiplicative field (low-order polynomial of position, exponentiated);
- :func:`gamma`: the intensity non-linearity x -> top (x / top)^g;
- :func:`slab_average`: thick slices as a scanner integrates them (each output slice is the
  overlap-weighted mean of the input slices its slab covers), and isotropic downsampling by slab
  averaging along every axis;
- :func:`crop_axial`: partial coverage, the top or the bottom of the brain cut off;
- :func:`rician_noise`: magnitude noise sqrt((x + n1)^2 + n2^2), sigma relative to the brain's 99th
  percentile.

Ground truth and brain mask go through the same resampling and crop as the image, as fractions,
and are thresholded at 0.5 (a voxel of the variant is lesion when at least half of it was).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from CeVAEAnomalyLib.engine.symmetry import estimate_midplane, plane_distance_mm
from CeVAEAnomalyLib.errors import CeVAEError

Seed = Union[int, np.random.Generator]


def _image_like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def _axial_axis(image: sitk.Image) -> int:
    """The SimpleITK index axis closest to the physical superior-inferior direction."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(d[2])))


def slab_average(image: sitk.Image, axis: int, thickness_mm: float) -> sitk.Image:
    """Slices of ``thickness_mm`` along the SimpleITK index ``axis``, each the overlap-weighted mean of the input.

    Slabs tile the input's extent from its first voxel's outer edge; a last partial slab is kept when it
    covers at least half a thickness. The output is float32 on a grid with ``thickness_mm`` spacing along
    ``axis`` (origin and direction follow the input).
    """
    spacing = image.GetSpacing()
    if not 0 <= axis < 3:
        raise CeVAEError(f"axis must be 0, 1 or 2, not {axis}.")
    step = float(spacing[axis])
    if thickness_mm < step:
        raise CeVAEError(f"A slab of {thickness_mm} mm is thinner than the input's {step} mm spacing.")
    n_in = image.GetSize()[axis]
    extent = n_in * step
    n_out = int(np.floor(extent / thickness_mm + 0.5))
    if n_out < 1:
        raise CeVAEError(f"The volume ({extent:.1f} mm along axis {axis}) is thinner than one {thickness_mm} mm slab.")
    edges_in = np.arange(n_in + 1) * step
    lo = np.arange(n_out)[:, None] * thickness_mm
    overlap = np.clip(np.minimum(edges_in[None, 1:], lo + thickness_mm) - np.maximum(edges_in[None, :-1], lo), 0, None)
    weights = overlap / overlap.sum(1, keepdims=True)
    arr = sitk.GetArrayViewFromImage(image).astype(np.float32)
    np_axis = 2 - axis
    out = np.moveaxis(np.tensordot(weights.astype(np.float32), np.moveaxis(arr, np_axis, 0), axes=1), 0, np_axis)
    result = sitk.GetImageFromArray(np.ascontiguousarray(out, np.float32))
    new_spacing = list(spacing)
    new_spacing[axis] = float(thickness_mm)
    result.SetSpacing(new_spacing)
    result.SetDirection(image.GetDirection())
    first = [0.0, 0.0, 0.0]
    first[axis] = (thickness_mm / step - 1) / 2  # centre of the first slab, in input index units
    result.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(first))
    return result


def downsample_isotropic(image: sitk.Image, mm: float) -> sitk.Image:
    """``image`` integrated into ``mm`` isotropic voxels (slab averaging along every axis)."""
    for axis in range(3):
        image = slab_average(image, axis, mm)
    return image


def crop_axial(image: sitk.Image, brain: sitk.Image, fraction: float, side: str) -> Tuple[int, int]:
    """Index range (start, stop) along the axial axis that cuts ``fraction`` of the brain's superior-inferior
    extent off its ``side`` ("top" = superior or "bottom"); apply it with :func:`crop_index`."""
    if side not in ("top", "bottom"):
        raise CeVAEError(f"side must be 'top' or 'bottom', not {side!r}.")
    if not 0 <= fraction < 1:
        raise CeVAEError(f"The fraction cut off must be in [0, 1), not {fraction}.")
    axis = _axial_axis(image)
    inside = np.flatnonzero(np.moveaxis(sitk.GetArrayViewFromImage(brain) > 0, 2 - axis, 0).reshape(
        image.GetSize()[axis], -1).any(1))
    if inside.size == 0:
        raise CeVAEError("The brain mask is empty.")
    first, last = int(inside[0]), int(inside[-1])
    cut = int(round(fraction * (last - first + 1)))
    superior_up = np.array(image.GetDirection()).reshape(3, 3)[2, axis] > 0  # index grows towards the top
    drop_high = (side == "top") == superior_up
    return (0, last + 1 - cut) if drop_high else (first + cut, image.GetSize()[axis])


def crop_index(image: sitk.Image, axis: int, start: int, stop: int) -> sitk.Image:
    """The slices ``start:stop`` along SimpleITK index ``axis`` (geometry kept)."""
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    return image[tuple(index)]


def rician_noise(image: sitk.Image, brain: sitk.Image, sigma_fraction: float, rng: Seed) -> sitk.Image:
    """Magnitude (Rician) noise: sqrt((x + n1)^2 + n2^2), n ~ N(0, sigma), sigma = ``sigma_fraction`` × the
    brain's 99th percentile."""
    rng = np.random.default_rng(rng)
    arr = sitk.GetArrayViewFromImage(image).astype(np.float32)
    sigma = sigma_fraction * float(np.percentile(arr[sitk.GetArrayViewFromImage(brain) > 0], 99))
    real = arr + rng.normal(0, sigma, arr.shape).astype(np.float32)
    imag = rng.normal(0, sigma, arr.shape).astype(np.float32)
    return _image_like(np.sqrt(real * real + imag * imag), image)


def bias_field(image: sitk.Image, strength: float, rng: Seed) -> sitk.Image:
    """``image`` × exp(strength × f), f a random quadratic polynomial of position scaled to max |f| = 1 over
    the volume (strength 0.2: about ±20 %)."""
    rng = np.random.default_rng(rng)
    arr = sitk.GetArrayViewFromImage(image).astype(np.float32)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in arr.shape]
    k, j, i = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [k, j, i, k * j, k * i, j * i, k * k, j * j, i * i]
    field = sum(c * t for c, t in zip(rng.normal(size=len(terms)), terms))
    field = field / max(float(np.abs(field).max()), 1e-6)
    return _image_like((arr * np.exp(strength * field)).astype(np.float32), image)


def gamma(image: sitk.Image, g: float) -> sitk.Image:
    """x -> top × (x / top)^g for x >= 0 (top: the image maximum); negative values become 0."""
    if g <= 0:
        raise CeVAEError(f"gamma must be positive, not {g}.")
    arr = np.maximum(sitk.GetArrayViewFromImage(image).astype(np.float32), 0)
    top = max(float(arr.max()), 1e-6)
    return _image_like((top * (arr / top) ** g).astype(np.float32), image)


@dataclass(frozen=True)
class Enhancement:
    """Where :func:`post_contrast` brightens (fractions of the brain's voxels, for reports and tests)."""

    vessels: float
    midline: float
    choroid: float


def post_contrast(image: sitk.Image, brain: sitk.Image, rng: Seed, brightness: Tuple[float, float] = (1.1, 1.35),
                  ) -> Tuple[sitk.Image, Enhancement]:
    """Healthy post-contrast T1 appearance simulated from the anatomy.

    Enhanced (set to ``brightness`` × the brain's 99th percentile, blended over a 0.7 mm edge):
    vessels = thin tubes (where two smooth random fields both cross zero) in dark, sulcal tissue within
    8 mm of the brain's surface; falx and superior sagittal sinus = dark tissue within 1 mm of the
    mid-sagittal plane plus the top 4 mm of the upper brain within 3 mm of it; choroid plexus = random smooth
    blobs filling part of the deep CSF (lateral ventricles). Bilateral structures are not mirror images.
    """
    rng = np.random.default_rng(rng)
    full = sitk.GetArrayViewFromImage(image).astype(np.float32)
    inside_full = sitk.GetArrayViewFromImage(brain) > 0
    if not inside_full.any():
        raise CeVAEError("The brain mask is empty.")
    box = tuple(slice(max(0, a.min() - 3), a.max() + 4) for a in np.nonzero(inside_full))  # work on the brain's box
    arr, inside = full[box], inside_full[box]
    spacing = np.array(image.GetSpacing())[::-1]  # numpy order
    p = np.percentile(arr[inside], [15, 35, 99])
    depth = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]

    def smooth_noise(sigma_mm: float) -> np.ndarray:
        f = ndimage.gaussian_filter(rng.normal(size=arr.shape).astype(np.float32), sigma_mm / spacing)
        return f / max(float(f[inside].std()), 1e-12)

    dark = inside & (arr < p[1])
    a, b = smooth_noise(3.0), smooth_noise(3.0)
    vessels = dark & (depth < 8.0) & (np.abs(a) < 0.25) & (np.abs(b) < 0.25)
    to_plane = np.abs(plane_distance_mm(image, estimate_midplane(image, brain))[box])
    top_axis = _axial_axis(image)
    up = np.array(image.GetDirection()).reshape(3, 3)[2, top_axis] > 0
    np_top = 2 - top_axis
    extent = np.flatnonzero(np.moveaxis(inside, np_top, 0).reshape(arr.shape[np_top], -1).any(1))
    index = np.arange(arr.shape[np_top])
    half = (extent[0] + extent[-1]) / 2
    upper = _along((index > half) if up else (index < half), np_top, arr.shape)
    midline = inside & (((to_plane < 1.0) & (arr < p[1])) | ((to_plane < 3.0) & (depth < 4.0) & upper))
    ventricles = inside & (depth > 12.0) & (arr < p[0])
    choroid = ventricles & (smooth_noise(2.0) > 0.8)
    where = vessels | midline | choroid
    level = p[2] * rng.uniform(*brightness)
    weight = np.clip(ndimage.gaussian_filter(where.astype(np.float32), 0.7 / spacing) * 2, 0, 1) * inside
    out = full.copy()
    out[box] = np.maximum(arr, (1 - weight) * arr + weight * level)
    n = float(inside.sum())
    return _image_like(out, image), Enhancement(
        float(vessels.sum()) / n, float(midline.sum()) / n, float(choroid.sum()) / n)


def _along(values: np.ndarray, axis: int, shape: Tuple[int, ...]) -> np.ndarray:
    """1D ``values`` broadcast along numpy ``axis`` of ``shape``."""
    view = [1, 1, 1]
    view[axis] = len(values)
    return np.broadcast_to(values.reshape(view), shape)


@dataclass(frozen=True)
class Recipe:
    """One acquisition variant: the steps :func:`derive` applies, in this order."""

    contrast: bool = False  # post-contrast enhancement
    bias: float = 0.0  # bias field strength
    gamma: float = 1.0
    slice_mm: float = 0.0  # thick axial slices (0: none)
    iso_mm: float = 0.0  # isotropic downsampling (0: none)
    crop: Optional[Tuple[str, float]] = None  # ("top" | "bottom", fraction of the brain cut off)
    noise: float = 0.0  # Rician noise sigma / brain 99th percentile

    @property
    def thickness_mm(self) -> float:
        """The variant's slice thickness (0 when the input's is kept)."""
        return max(self.slice_mm, self.iso_mm)


VARIANTS: Dict[str, Recipe] = {
    "clean": Recipe(),
    "thick 3 mm": Recipe(slice_mm=3.0),
    "thick 5 mm": Recipe(slice_mm=5.0),
    "thick 6.5 mm": Recipe(slice_mm=6.5),
    "2 mm isotropic": Recipe(iso_mm=2.0),
    "top cut off": Recipe(crop=("top", 0.3)),
    "bottom cut off": Recipe(crop=("bottom", 0.3)),
    "noise 3 %": Recipe(noise=0.03),
    "noise 7 %": Recipe(noise=0.07),
    "bias field": Recipe(bias=0.25),
    "gamma 0.7": Recipe(gamma=0.7),
    "gamma 1.4": Recipe(gamma=1.4),
    "post-contrast": Recipe(contrast=True),
    "clinical: post-contrast, 6.5 mm, noise 3 %": Recipe(contrast=True, slice_mm=6.5, noise=0.03),
    "2x2x3 mm, top cut off, bias, noise 3 %": Recipe(iso_mm=2.0, slice_mm=3.0, crop=("top", 0.2), bias=0.2,
                                                     noise=0.03),
}


def derive(recipe: Recipe, image: sitk.Image, brain: sitk.Image, truth: sitk.Image, seed: int
           ) -> Tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(image, brain mask, ground truth) of the variant ``recipe``, on the variant's grid.

    The image becomes float32, mask and truth uint8 (a voxel is in when at least half of it was).
    Deterministic for ``seed``; the inputs are not modified.
    """
    rng = np.random.default_rng(seed)
    img = sitk.Cast(image, sitk.sitkFloat32)
    if recipe.contrast:
        img, _ = post_contrast(img, brain, rng)
    if recipe.bias:
        img = bias_field(img, recipe.bias, rng)
    if recipe.gamma != 1.0:
        img = gamma(img, recipe.gamma)
    masks = [sitk.Cast(brain > 0, sitk.sitkFloat32), sitk.Cast(truth > 0, sitk.sitkFloat32)]
    axial = _axial_axis(img)

    def resample(im: sitk.Image) -> sitk.Image:
        if recipe.iso_mm:
            im = downsample_isotropic(im, recipe.iso_mm)
        if recipe.slice_mm:
            im = slab_average(im, axial, recipe.slice_mm)
        return im

    img, masks = resample(img), [resample(m) > 0.5 for m in masks]
    masks = [sitk.Cast(m, sitk.sitkUInt8) for m in masks]
    if recipe.crop is not None:
        start, stop = crop_axial(img, masks[0], recipe.crop[1], recipe.crop[0])
        img, masks = crop_index(img, axial, start, stop), [crop_index(m, axial, start, stop) for m in masks]
    if recipe.noise:
        img = rician_noise(img, masks[0], recipe.noise, rng)
    return img, masks[0], masks[1]
