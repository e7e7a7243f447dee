"""engine/modality.depth_contrast measures every slice's depth in one pass: the same figure as slice by slice."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.modality import DEEP_PX, RIM_PX, depth_contrast


def contrast_slice_by_slice(slices: np.ndarray) -> float:
    """The measure written out per 2D slice: holes filled, distance to the nearest pixel outside in that slice."""
    deep, rim = [], []
    for s in slices:
        filled = sitk.BinaryFillhole(sitk.GetImageFromArray((s > 0).astype(np.uint8)), fullyConnected=False)
        depth = np.maximum(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            filled == 0, insideIsPositive=False, squaredDistance=False, useImageSpacing=False)), 0)
        deep.append(s[depth > DEEP_PX])
        rim.append(s[(depth > 0) & (depth <= RIM_PX)])
    return round(float(np.median(np.concatenate(deep)) - np.median(np.concatenate(rim))), 4)


def test_the_contrast_of_a_stack_is_that_of_its_slices_one_by_one() -> None:
    """Slices whose holes must not leak into their neighbours, an empty slice, a slice of brain edge to edge (no
    pixel outside: all deep), brains touching the slice's edge, at the first and the last place of the stack."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:48, :48]
    slices = []
    for k in range(9):
        r = 8 + 2 * k
        brain = (yy - 24) ** 2 + (xx - 24 - k) ** 2 < r * r
        s = np.where(brain, 0.4 + 0.5 * np.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / (2 * 9.0 ** 2)), 0.0)
        s = s + np.where(brain, 0.02 * rng.standard_normal(s.shape), 0.0)
        if k % 3 == 1:
            s[20:28, 20:28] = 0  # a hole: filled in its own slice only
        slices.append(np.clip(s, 0, None))
    slices[4] = np.zeros((48, 48))  # no brain
    slices[6] = np.full((48, 48), 0.7) + 0.05 * rng.standard_normal((48, 48)) ** 2  # brain to every edge
    for order in (slices, slices[::-1], [slices[6], *slices[:6]]):
        stack = np.stack(order).astype(np.float32)
        assert depth_contrast(stack) == contrast_slice_by_slice(stack)
