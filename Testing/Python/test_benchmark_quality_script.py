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


def test_slices_above_the_threshold_are_counted_only_for_scores_on_the_maps_scale(monkeypatch):
    """A slice's summed excess over t (or t/2) is map units times voxels: compared with t it says nothing of the
    slice's scores being above the operating threshold, so those rows report none (NaN), as the ELBO rows."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bq = importlib.import_module("benchmark_quality")
    rng = np.random.default_rng(0)
    cases, maps = {}, {}
    for subject in bq.SUBJECTS:
        for kind in ("healthy", "lesion"):
            gt = np.zeros((6, 8, 8), bool)
            z = rng.random((6, 8, 8)).astype(np.float32)  # below the threshold 1 everywhere
            z[1, :3, :3] = 0.9  # a slice whose summed excess over t/2 exceeds t, every voxel below t
            if kind == "lesion":
                gt[3, 2:4, 2:4] = True
                z[3, 2:4, 2:4] = 1.5
            key = f"{subject}-{kind}"
            cases[key] = {"kind": kind, "subject": subject, "brain": np.ones(gt.shape, bool), "gt": gt,
                          "slice_axis": np.array(2), "slice_index": np.arange(6), "box_start": np.zeros(3, int),
                          "slice_neg_elbo": rng.random(6), "slice_kl": rng.random(6), "voxel_ml": 0.001}
            maps[key] = z
    results = bq.slice_study(cases, maps, {s: 1.0 for s in bq.SUBJECTS})
    assert results["max of the map (previous default)"]["healthy_slices_above_threshold"] == 0.0
    assert results["max of the map (previous default)"]["lesion_slices_above_threshold"] == 1.0
    for name in ("excess of the map over the threshold", "excess of the map over half the threshold"):
        assert np.isnan(results[name]["healthy_slices_above_threshold"])
        assert np.isnan(results[name]["lesion_slices_above_threshold"])
