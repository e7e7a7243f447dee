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


def test_a_case_whose_write_is_killed_leaves_no_file_under_its_name(monkeypatch, tmp_path, head, tiny_bundle):
    """The map cache skips a case whose file exists, so a run killed while writing one (here: the disk fills half
    way) must leave none: a truncated case was skipped by every rerun and failed the benchmark."""
    import SimpleITK as sitk
    import pytest
    from CeVAEAnomalyLib.engine.bundle import load_bundle

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    maps = importlib.import_module("benchmark_quality_maps")
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    gt = np.zeros(image.GetSize()[::-1], bool)

    def half_written(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(maps.np, "savez", half_written)
    target = tmp_path / "case.npz"
    with pytest.raises(OSError):
        maps.cache_volume(target, image, mask, gt, load_bundle(tiny_bundle, "cpu"))
    assert list(tmp_path.iterdir()) == []
