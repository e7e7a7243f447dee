"""The clean quality benchmark's labelmap rule: the minimum volume and the detector's peak filter."""
from __future__ import annotations

import importlib

import numpy as np

from conftest import REPO


def test_the_peak_filter_keeps_only_components_that_peak_above_its_multiple_of_the_threshold(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bq = importlib.import_module("benchmark_quality")
    z = np.zeros((12, 12, 30), np.float32)
    z[4:8, 4:8, 2:11] = 4.0
    z[4:8, 4:8, 5:9] = 10.0  # A: peaks at 10
    z[4:8, 4:8, 18:27] = 4.0  # B: stays at 4
    case = {"voxel_ml": 0.001}
    assert bq.MIN_PEAK == 0.0  # by default every component of 50 mm³ or more is kept
    both = bq.labelmap(z, case, 3.5)
    assert both.sum() == 2 * 4 * 4 * 9
    monkeypatch.setattr(bq, "MIN_PEAK", 2.0)  # 7: A's 10 passes, B's 4 does not
    only_a = bq.labelmap(z, case, 3.5)
    assert only_a.sum() == 4 * 4 * 9 and only_a[:, :, :15].sum() == 4 * 4 * 9  # A whole, B gone
