"""Telling a label image (a brain mask, a segmentation, a parcellation) given where a scan belongs: detection's
image, and each healthy scan that training, preparing and adapting read."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import CeVAEError


def refuse_label_image(image: sitk.Image, masked: bool) -> None:
    """Refuse an image of two values (a mask given as the image; with a mask, ``masked``: the two swapped) or of a
    few whole values from 0 up (a segmentation: tissue classes, labelled lesions): the "brain" of a binary image is
    constant where it is no mask's, and a uint8 scan given as the mask was taken as one (every voxel above 0 brain),
    so its detection ran on the mask, with warnings only; a segmentation was scored as a scan, with no warning at
    all. A strided sample tells a scan at once; the whole volume is counted only when the sample holds few values."""
    values = sitk.GetArrayViewFromImage(image).ravel()
    for sample in (values[:: max(1, values.size // SAMPLED_VOXELS)], values):
        distinct = np.unique(sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample)
        if distinct.size > 2 and not _label_values(distinct):
            return
        if distinct.size > _LABEL_VALUES:
            _refuse_a_parcellation(sitk.GetArrayViewFromImage(image), masked)
            return
    if distinct.size < 2:
        return  # a constant image: check_volume's to refuse
    swapped = _SWAPPED if masked else ""
    if distinct.size == 2:
        raise CeVAEError(f"The image holds only the values {distinct[0]:g} and {distinct[1]:g}: it is a mask or a "
                         f"labelmap, not an MRI scan{swapped}; give the scan as the image.")
    listed = ", ".join(f"{v:g}" for v in distinct[:-1])
    raise CeVAEError(f"The image holds only the {distinct.size} whole values {listed} and {distinct[-1]:g}: it is a "
                     f"segmentation or a labelmap, not an MRI scan{swapped}; give the scan as the image.")


def _refuse_a_parcellation(voxels: np.ndarray, masked: bool) -> None:
    """Refuse whole values of more than a few labels (FreeSurfer's aseg, a parcel map): mostly background 0, the
    rest in regions of one value each. A scan's neighbouring brain voxels share their value in at most 18 % of
    pairs (six heads, uint8 and float, with skull or stripped); a parcellation's in over 90 %."""
    sample = voxels[:: max(1, len(voxels) // _SAMPLED_SLICES)]  # (every slice: 33 ms on a 256^3 scan)
    if np.count_nonzero(sample) > sample.size * _LABELLED_SHARE:
        return
    ahead, behind = sample[..., 1:], sample[..., :-1]
    both = (ahead != 0) & (behind != 0)
    pairs = np.count_nonzero(both)
    if pairs == 0 or np.count_nonzero(both & (ahead == behind)) < _SAME_NEIGHBOUR_SHARE * pairs:
        return
    distinct = np.unique(voxels)
    if not _label_values(distinct):
        return
    swapped = _SWAPPED if masked else ""
    listed = ", ".join(f"{v:g}" for v in distinct[:3])
    raise CeVAEError(f"The image holds {distinct.size} whole values ({listed}, ..., {distinct[-1]:g}) in regions of "
                     "one value each: it is a segmentation or a parcellation (such as FreeSurfer's aseg), not an MRI "
                     f"scan{swapped}; give the scan as the image.")


def _label_values(values: np.ndarray) -> bool:
    """Whether ``values`` could all be a segmentation's labels: whole numbers from 0 to 65535."""
    return bool(np.all((values == np.round(values)) & (values >= 0) & (values <= 65535)))


SAMPLED_VOXELS = 100_000  # voxels of the image sampled to tell a scan from a mask
_LABEL_VALUES = 12  # at most this many whole values: a segmentation (an 8-bit scan at 2 mm still holds 60)
_SAMPLED_SLICES = 32  # of the image's first axis, for the parcellation's shares
_LABELLED_SHARE = 0.5  # a parcellation labels at most this share of its voxels (the head's box: the brain, 10-25 %)
_SAME_NEIGHBOUR_SHARE = 0.6  # neighbouring labelled voxels of one value: a scan's at most 0.18, a parcellation's 0.9
_SWAPPED = " (are the image and the mask swapped?)"
