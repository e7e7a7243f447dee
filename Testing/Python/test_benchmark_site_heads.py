"""The site-calibration study script: its operating points and the calibration heads' peak rule."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import REPO


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("benchmark_site_heads")


def two_blobs() -> np.ndarray:
    """A 1 mm map with a 64 mm³ blob peaking at 9 and a 27 mm³ blob (below 50 mm³) peaking at 20."""
    z = np.zeros((10, 10, 20), np.float32)
    z[1:5, 1:5, 1:5] = 5.0
    z[2, 2, 2] = 9.0
    z[6:9, 6:9, 12:15] = 20.0
    return z


def test_highest_component_peak_ignores_components_the_volume_rule_removes(study):
    scan = (two_blobs(), (1.0, 1.0, 1.0))
    assert study.highest_component_peak(scan, 4.0) == 9.0
    assert study.highest_component_peak(scan, 30.0) == 30.0  # nothing flagged: the threshold itself


def test_peak_rule_keeps_only_components_reaching_the_absolute_peak(study):
    scan = (two_blobs(), (1.0, 1.0, 1.0))
    assert study.labelmap(scan, 4.0, 8.0).sum() == 64
    assert study.labelmap(scan, 4.0, 10.0).sum() == 0
    assert study.dice(study.labelmap(scan, 4.0, 4.0), scan[0] >= 4.0) == pytest.approx(2 * 64 / (64 + 91))


def test_operating_points_use_each_threshold_as_the_table_says(study):
    points = study.operating_points(bundled=5.0, site=8.0, site_1e3=4.5, calibration_peak=12.0)
    assert points["bundled threshold, peak 2 × (the default)"] == (5.0, 10.0)
    assert points["site threshold, no peak filter"] == (8.0, 8.0)
    assert points["site threshold, peak at 2 × the bundled threshold"] == (8.0, 10.0)
    assert points["site threshold at --fpr 0.001, peak 2 ×"] == (4.5, 9.0)
    assert len(points) == 8
