"""Slice scores from a voxel anomaly map, to rank slices by the lesion they hold rather than by anatomy.

Arrays are numpy (k, j, i); ``axis`` is the numpy axis along which slices are taken.
"""
from __future__ import annotations

import numpy as np


def _slices(score: np.ndarray, brain: np.ndarray, axis: int):
    s = np.moveaxis(score, axis, 0)
    b = np.moveaxis(brain, axis, 0)
    return s.reshape(s.shape[0], -1), b.reshape(b.shape[0], -1)


def slice_quantile(score: np.ndarray, brain: np.ndarray, axis: int, q: float) -> np.ndarray:
    """The ``q``-quantile (linear interpolation) of each slice's brain-voxel scores; 0 for a slice without brain."""
    s, b = _slices(score, brain, axis)
    out = np.zeros(s.shape[0])
    for i in np.flatnonzero(b.any(1)):
        out[i] = np.quantile(s[i][b[i]], q)
    return out


def slice_excess(score: np.ndarray, brain: np.ndarray, axis: int, threshold: float) -> np.ndarray:
    """Each slice's summed excess of brain-voxel scores over ``threshold``: sum of max(score - threshold, 0)."""
    s, b = _slices(score, brain, axis)
    return np.where(b, np.maximum(s - threshold, 0.0), 0.0).sum(1)
