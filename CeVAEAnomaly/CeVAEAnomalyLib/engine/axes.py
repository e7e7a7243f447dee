"""Image axes and slicing orientations: which voxel axis a model slices along, torch-free (the evaluation and
the figures use it without the network)."""
from __future__ import annotations

from typing import Tuple

import numpy as np

# Physical (LPS) axis that indexes the slices, then rows, then columns.
ORIENTATIONS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


def canonical_axes(direction: np.ndarray, orientation: str = "axial") -> Tuple[Tuple[int, ...], Tuple[bool, ...]]:
    """Permutation of numpy axes (k,j,i) and flips that bring the array to canonical order.

    ``direction`` is the 3x3 direction matrix (columns = i, j, k axes in LPS). Each image
    axis is matched to the physical axis it is closest to (oblique volumes too); canonical
    array axis n is the image axis closest to physical axis ORIENTATIONS[orientation][n].
    """
    d = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    phys_of_img = [-1, -1, -1]  # image axis (i,j,k) -> physical axis
    for _ in range(3):  # greedy on the largest cosines gives a proper permutation
        masked = d.copy()
        for a in range(3):
            if phys_of_img[a] >= 0:
                masked[:, a] = -1
            for p in phys_of_img:
                if p >= 0:
                    masked[p, :] = -1
        p, a = np.unravel_index(np.argmax(masked), masked.shape)
        phys_of_img[a] = int(p)
    img_of_phys = {p: a for a, p in enumerate(phys_of_img)}
    perm, flips = [], []
    signed = np.asarray(direction, dtype=float).reshape(3, 3)
    for phys in ORIENTATIONS[orientation]:
        img_axis = img_of_phys[phys]  # 0=i, 1=j, 2=k; numpy axis is 2 - img_axis
        perm.append(2 - img_axis)
        flips.append(bool(signed[phys, img_axis] < 0))
    return tuple(perm), tuple(flips)


def to_canonical(arr: np.ndarray, perm: Tuple[int, ...], flips: Tuple[bool, ...]) -> np.ndarray:
    """A view of ``arr`` (k,j,i) in canonical order; flipped so physical coordinates increase."""
    out = arr.transpose(perm)
    return out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
