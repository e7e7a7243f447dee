"""Volume -> normalised square model slices, with a record that maps slice maps back exactly.

Steps: permute/flip the voxel array to a canonical orientation (pure index operations, so
exactly invertible), mask the brain, scale intensities by robust brain percentiles, crop the
brain's bounding box padded to a square in millimetres, resize each slice to the model size.
The inverse resizes slice maps back into the box, zeroes everything outside the brain and
undoes the permutation, giving an image with the input's size, spacing, origin and direction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .axes import canonical_axes, to_canonical
from .brainmask import _said as _said_in_run  # what the run under way (brainmask.each_warning_once) has said
from .config import PreprocessConfig
from ..errors import CeVAEError
from ..io.images import MAX_LABELS, in_voxels, looks_like_an_image, same_grid

log = logging.getLogger(__name__)

_PERCENTILE_SAMPLES = 2_000_000


@dataclass
class SliceRecord:
    """Everything needed to map model-space slice maps back onto the input grid."""

    reference: sitk.Image  # geometry source (pixels not used)
    perm: Tuple[int, ...]
    flips: Tuple[bool, ...]
    box: Tuple[Tuple[int, int], ...]  # canonical [start, stop) per axis; rows/cols may exceed the array
    slice_index: np.ndarray  # canonical slice index of every model slice
    brain: np.ndarray  # canonical boolean brain mask (a view into the input-grid mask)
    input_size: int

    def input_slice_axis(self) -> Tuple[int, np.ndarray]:
        """The input's IJK axis that the slices step along and each model slice's index on it."""
        np_axis = self.perm[0]
        n = self.brain.shape[0]
        idx = (n - 1 - self.slice_index) if self.flips[0] else self.slice_index
        return 2 - np_axis, idx


@dataclass
class SliceStack:
    """Model inputs for one volume: normalised slices [N,S,S] and their brain masks."""

    slices: np.ndarray  # float32 [N,S,S]
    brain: np.ndarray  # bool [N,S,S]
    record: SliceRecord
    intensity_range: Tuple[float, float]


def brain_bounds(brain: np.ndarray) -> Tuple[Tuple[int, int], ...]:
    """[start, stop) of the mask's bounding box per axis."""
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(brain.any(axis=other))
        bounds.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(bounds)


def _square_box(bounds, spacing_rc: Tuple[float, float], margin_mm: float) -> Tuple[Tuple[int, int], ...]:
    """Pad the in-plane bounds to a square of equal physical side, centred on the brain."""
    (r0, r1), (c0, c1) = bounds[1], bounds[2]
    sr, sc = spacing_rc
    side_mm = max((r1 - r0) * sr, (c1 - c0) * sc) + 2 * margin_mm
    box = [bounds[0]]
    for (a0, a1), sp in (((r0, r1), sr), ((c0, c1), sc)):
        n = max(1, int(round(in_voxels(side_mm, sp))))  # (a voxel size one bit off crosses no rounding tie)
        start = int(np.floor((a0 + a1) / 2.0 - n / 2.0))
        box.append((start, start + n))
    return tuple(box)


def robust_range(values: np.ndarray, cfg: PreprocessConfig) -> Tuple[float, float]:
    """Low/high percentiles of brain intensities (on a strided subsample for speed)."""
    step = max(1, values.size // _PERCENTILE_SAMPLES)
    lo, hi = (float(v) for v in np.percentile(values[::step], [cfg.low_percentile, cfg.high_percentile]))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-6 * max(abs(hi), abs(lo)):  # relative: any units
        raise CeVAEError(
            "The intensities inside the brain are (nearly) constant, so there is no image to analyse; check that the "
            "image is not blank and that its brain mask covers the brain."
        )
    if not np.isfinite(hi - lo):
        raise CeVAEError(f"The intensities inside the brain span more than floating point holds ({lo:g} to {hi:g}); "
                         "rescale the image.")
    return lo, hi


def finite_brain(arr: np.ndarray, brain_mask: np.ndarray, where: str = "") -> np.ndarray:
    """The brain mask without NaN/infinite voxels (they score 0), with a warning if there are any (led by
    ``where``, e.g. "scan.nii.gz: ", so that a cohort's says which volume)."""
    if arr.dtype.kind != "f" or (np.isfinite(arr.min()) and np.isfinite(arr.max())):  # NaN propagates
        return brain_mask
    kept = brain_mask & np.isfinite(arr)
    removed = int(brain_mask.sum()) - int(kept.sum())
    if removed:
        log.warning("%s%d brain voxels are NaN or infinite; they are left out of the brain.", where, removed)
    if not kept.any() and brain_mask.any():
        raise CeVAEError("Every voxel inside the brain mask is NaN or infinite; the image holds no data.")
    return kept


def brain_array(image: sitk.Image, mask: sitk.Image, where: str = "") -> np.ndarray:
    """:func:`mask_array` without the image's non-finite voxels (:func:`finite_brain`); ``where`` leads the
    warnings of both."""
    return finite_brain(sitk.GetArrayViewFromImage(image), mask_array(mask, image, where), where)


def prepare(
    image: sitk.Image,
    brain_mask: np.ndarray,
    cfg: PreprocessConfig,
    orientation: str = "axial",
    chunk: int = 32,
) -> SliceStack:
    """Turn a volume and its boolean brain mask (numpy, same grid, k,j,i order) into model slices."""
    arr = sitk.GetArrayViewFromImage(image)
    if brain_mask.shape != arr.shape:
        raise CeVAEError("The brain mask does not match the image grid.")
    brain_mask = finite_brain(arr, brain_mask)
    if not brain_mask.any():
        raise CeVAEError("The brain mask is empty: no voxel is inside the brain (> 0). Give the brain mask of this "
                         "scan, or none for the automatic one.")
    perm, flips = canonical_axes(np.array(image.GetDirection()), orientation)
    can = to_canonical(arr, perm, flips)
    brain = to_canonical(brain_mask, perm, flips)
    spacing = np.array(image.GetSpacing())[::-1][list(perm)]  # canonical axis spacing
    bounds = brain_bounds(brain)
    box = _square_box(bounds, (spacing[1], spacing[2]), cfg.margin_mm)
    lo, hi = robust_range(_brain_values(can, brain, bounds), cfg)
    s = cfg.input_size
    n = bounds[0][1] - bounds[0][0]
    slices = np.empty((n, s, s), np.float32)
    brain_s = np.empty((n, s, s), bool)
    work = np.float64 if arr.dtype == np.float64 else np.float32  # huge float64 values would overflow float32
    for start in range(0, n, chunk):
        ks = slice(bounds[0][0] + start, min(bounds[0][0] + start + chunk, bounds[0][1]))
        img_c = _crop(can[ks], box).astype(work, copy=False)
        msk_c = _crop(brain[ks], box)
        img_c = np.clip((img_c - lo) / (hi - lo), 0.0, cfg.clip_max).astype(np.float32, copy=False)
        img_c[~msk_c] = 0.0
        out = slice(start, start + img_c.shape[0])
        slices[out] = _resize(img_c, s)
        brain_s[out] = _resize(msk_c.astype(np.float32), s) > 0.5
    record = SliceRecord(image, perm, flips, box, np.arange(bounds[0][0], bounds[0][1]), brain, s)
    return SliceStack(slices, brain_s, record, (lo, hi))


def _brain_values(can: np.ndarray, brain: np.ndarray, bounds) -> np.ndarray:
    sub = tuple(slice(a, b) for a, b in bounds)
    return can[sub][brain[sub]]


def _crop(vol: np.ndarray, box) -> np.ndarray:
    """Crop rows/cols of a [n,R,C] array to the box, zero-padding where it leaves the array."""
    (r0, r1), (c0, c1) = box[1], box[2]
    out = np.zeros((vol.shape[0], r1 - r0, c1 - c0), vol.dtype)
    rs, re = max(r0, 0), min(r1, vol.shape[1])
    cs, ce = max(c0, 0), min(c1, vol.shape[2])
    out[:, rs - r0 : re - r0, cs - c0 : ce - c0] = vol[:, rs:re, cs:ce]
    return out


def _resize(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize [n,H,W] float32 slices to [n,size,size] (antialiased bilinear)."""
    t = torch.from_numpy(np.ascontiguousarray(stack))[:, None]
    down = t.shape[-1] > size or t.shape[-2] > size
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return out[:, 0].numpy()


def iter_inverse_chunks(
    record: SliceRecord, maps: torch.Tensor, chunk: int = 32
) -> Iterator[Tuple[slice, np.ndarray]]:
    """Yield (canonical slice range, maps resized into the box rows/cols) chunk by chunk."""
    (r0, r1), (c0, c1) = record.box[1], record.box[2]
    for start in range(0, maps.shape[0], chunk):
        m = maps[start : start + chunk, None].float()
        up = F.interpolate(m, size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)
        k0 = int(record.slice_index[start])
        yield slice(k0, k0 + up.shape[0]), up[:, 0].cpu().numpy()


Region = Tuple[slice, slice, slice]  # a box of the input array (k,j,i order)


def brain_region(brain: np.ndarray, pad: int = 0) -> Region:
    """The bounding box of a (non-empty) boolean mask [k,j,i], grown by ``pad`` voxels, within the array."""
    flat = brain.reshape(brain.shape[0], -1).any(axis=1)
    plane = brain.any(axis=0)
    region = []
    for n, hit in zip(brain.shape, (flat, plane.any(axis=1), plane.any(axis=0))):
        nz = np.flatnonzero(hit)
        region.append(slice(max(int(nz[0]) - pad, 0), min(int(nz[-1]) + 1 + pad, n)))
    return tuple(region)


def region_image(arr: np.ndarray, ref: sitk.Image, region: Region) -> sitk.Image:
    """An image of ``arr`` (a copy) placed on ``region`` of ``ref``'s grid."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(ref.GetSpacing())
    img.SetDirection(ref.GetDirection())
    img.SetOrigin(ref.TransformIndexToPhysicalPoint([r.start for r in region[::-1]]))
    return img


def invert_region(record: SliceRecord, maps: torch.Tensor, region: Region, chunk: int = 32) -> np.ndarray:
    """Map model-space maps [N,S,S] back onto ``region`` of the input grid: float32 array of its shape.

    Voxels outside the brain are 0. Only the region is allocated, so it should hold the whole
    brain (:func:`brain_region`); brain outside it is left out.
    """
    shape = record.reference.GetSize()[::-1]  # k,j,i
    out = np.zeros(tuple(r.stop - r.start for r in region), np.float32)
    can = to_canonical(out, record.perm, record.flips)  # writable view into ``out``
    # canonical index of the view's first element on each canonical axis
    first = [shape[a] - region[a].stop if f else region[a].start for a, f in zip(record.perm, record.flips)]
    (r0, r1), (c0, c1) = record.box[1], record.box[2]
    rs, re = max(r0, first[1]), min(r1, first[1] + can.shape[1])
    cs, ce = max(c0, first[2]), min(c1, first[2] + can.shape[2])
    if rs >= re or cs >= ce:
        return out
    for ks, up in iter_inverse_chunks(record, maps, chunk):
        k0, k1 = max(ks.start, first[0]), min(ks.stop, first[0] + can.shape[0])
        if k0 >= k1:
            continue
        part = up[k0 - ks.start : k1 - ks.start, rs - r0 : re - r0, cs - c0 : ce - c0]
        part *= record.brain[k0:k1, rs:re, cs:ce]
        can[k0 - first[0] : k1 - first[0], rs - first[1] : re - first[1], cs - first[2] : ce - first[2]] = part
    return out


def invert(record: SliceRecord, maps: torch.Tensor, chunk: int = 32) -> sitk.Image:
    """Map model-space maps [N,S,S] back to a float32 image on the input's exact grid.

    Voxels outside the brain, and slices without brain, are 0.
    """
    ref = record.reference
    full = tuple(slice(0, n) for n in ref.GetSize()[::-1])
    img = sitk.GetImageFromArray(invert_region(record, maps, full, chunk))
    img.CopyInformation(ref)
    return img


def mask_array(mask: Optional[sitk.Image], image: sitk.Image, where: str = "") -> np.ndarray:
    """Boolean brain mask (>0 is brain) on the image grid; a mask on another grid is resampled.
    ``where`` (e.g. "scan.nii.gz: ") leads the warnings, so that a cohort's says which volume."""
    if mask is None:
        raise CeVAEError("No brain mask given.")
    mask = label_image(mask)
    if mask.GetDimension() == 4 and mask.GetSize()[3] == 1:  # a 4D file of one volume, as the image may be
        mask = mask[:, :, :, 0]
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetDimension() != 3:
        raise CeVAEError("The brain mask must be a single-channel 3D image.")
    resampled = not same_grid(mask, image)
    if resampled:
        _warn_of_another_grid(mask, image, where)
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    values = sitk.GetArrayViewFromImage(mask)
    brain = values > 0
    if resampled and not brain.any():
        raise CeVAEError("The brain mask does not overlap the image in space (after resampling it onto the "
                         "image grid no voxel is brain); check that the mask belongs to this image.")
    labels = values[brain if values.dtype.kind in "ub" else values != 0]  # unsigned: nonzero is brain
    several = _several_values(labels)  # "" for a mask of one label (the usual case: nothing more to check)
    if several and looks_like_an_image(labels):
        raise CeVAEError(f"{where}The brain mask holds more than {MAX_LABELS} different values ({several}) "
                         "and no plateau: it looks like an image, not a mask. Give a labelmap or segmentation of the "
                         "brain (> 0 is brain), or no mask for the automatic one.")
    if several:
        log.warning("%sThe brain mask holds several values (%s); every voxel above 0 is taken as brain.",
                    where, several)
    return brain


def _warn_of_another_grid(mask: sitk.Image, image: sitk.Image, where: str) -> None:
    """Warn (led by ``where``) that ``mask`` is resampled onto the grid of ``image``: once per scan (its ``where``
    and the two grids) in a run of :func:`.brainmask.each_warning_once`, which masks a scan for its slices and for its
    scores; every time outside a run. Kept quiet (a measure's, :mod:`.modality`), it is not counted as said."""
    said = _said_in_run.get()
    fact = (repr([where] + [(i.GetSize(), i.GetSpacing(), i.GetOrigin(), i.GetDirection()) for i in (image, mask)]),
            "another grid")
    if said is not None and log.isEnabledFor(logging.WARNING):
        if fact in said:
            return
        said.add(fact)
    log.warning("%sThe brain mask is on another grid than the image; resampling it (nearest neighbour).", where)


def warn_unlike_a_brain(brain: np.ndarray, image: sitk.Image, where: str = "") -> None:
    """Warn when a given brain mask holds far more than a brain (a head mask, a mask of every voxel) or far less (a
    few voxels): the brain's statistics, and so every score, would come from what is not a brain. (The automatic
    mask has a check of its own.)"""
    ml = float(np.count_nonzero(brain)) * float(np.prod(image.GetSpacing())) / 1000.0
    if ml > BRAIN_ML[1]:
        log.warning("%sThe brain mask covers %.1f L, more than a brain (at most about %g L): is it a head mask? "
                    "Every score is relative to what it holds.", where, ml / 1000.0, BRAIN_ML[1] / 1000.0)
    elif ml < BRAIN_ML[0]:
        log.warning("%sThe brain mask covers only %.1f ml: too little of a brain for its scores to mean much; "
                    "check that it is the brain mask of this scan.", where, ml)


BRAIN_ML = (1.0, 3000.0)  # ml: a given brain mask outside this is no brain mask (a thin partial scan holds little)


def _several_values(labels: np.ndarray) -> str:
    """The nonzero mask values described ("1 to 3", "1, and NaN") when they are not all one number; else ""."""
    nan = int(np.count_nonzero(np.isnan(labels))) if labels.dtype.kind == "f" else 0
    numbers = labels[~np.isnan(labels)] if nan else labels
    if not nan and (not numbers.size or numbers.min() == numbers.max()):
        return ""
    spans = [f"{numbers.min():g}" + (f" to {numbers.max():g}" if numbers.max() != numbers.min() else "")] \
        if numbers.size else []
    return ", and ".join(spans + ([f"NaN in {nan} voxel(s), taken as outside the brain"] if nan else []))


_LABEL_MAPS = (sitk.sitkLabelUInt8, sitk.sitkLabelUInt16, sitk.sitkLabelUInt32, sitk.sitkLabelUInt64)


def label_image(image: sitk.Image) -> sitk.Image:
    """``image``, or, if it is a SimpleITK LabelMap (label objects, which numpy cannot view), its plain label image."""
    return sitk.LabelMapToLabel(image) if image.GetPixelID() in _LABEL_MAPS else image
