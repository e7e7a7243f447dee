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


def _unit_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks of ``values`` scaled to [0, 1] (lowest 0, highest 1; ties share their mean rank)."""
    v = np.asarray(values, float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size)
    sorted_v = v[order]
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    for a, b in zip(starts, ends):  # ties: their mean rank
        ranks[order[a:b]] = (a + b - 1) / 2.0
    return ranks / max(v.size - 1, 1)


_FUSION_DECIMALS = 12  # far below the gap between distinct fused values, far above the rounding error


def fused_slice_rank(map_score: np.ndarray, neg_elbo: np.ndarray, weight: float) -> np.ndarray:
    """Rank fusion of two slice scores of one volume: ``weight`` x rank of the map score plus
    (1 - ``weight``) x rank of the negative ELBO, ranks scaled to [0, 1] (ties share their mean rank). Rounded to
    12 decimals, so that slices equally anomalous by the fusion (0.7 x 8/8 + 0.3 x 1/8 = 0.7 x 5/8 + 0.3 x 8/8) get
    one value whatever the floating-point rounding, and the slice table's tie-break decides between them."""
    return np.round(weight * _unit_ranks(map_score) + (1.0 - weight) * _unit_ranks(neg_elbo), _FUSION_DECIMALS)


def slice_flags(labelmap: np.ndarray, axis: int) -> np.ndarray:
    """Whether each slice along ``axis`` holds a labelled voxel (bool per slice)."""
    m = np.moveaxis(np.asarray(labelmap) > 0, axis, 0)
    return m.reshape(m.shape[0], -1).any(1)
