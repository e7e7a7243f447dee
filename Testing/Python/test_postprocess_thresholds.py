"""Thresholds beyond a float32 score map's range: the right labelmap, without NumPy's overflow warning."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap

BIGGEST = float(np.finfo(np.float32).max)


@pytest.fixture
def score() -> np.ndarray:
    values = np.linspace(-3.0, 3.0, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    values[0, 0, 0] = np.nan  # outside the brain
    values[3, 4, 5] = BIGGEST
    return values


@pytest.mark.parametrize("threshold, flagged", [(1e308, "none"), (-1e308, "all"), (BIGGEST * (1 + 1e-9), "top")])
@pytest.mark.parametrize("hysteresis, min_peak", [(0.0, 1.0), (0.5, 1.0), (0.0, 2.0)])
def test_a_threshold_beyond_float32_flags_nothing_or_everything_silently(score, threshold, flagged, hysteresis,
                                                                         min_peak):
    """--threshold 1e308 printed "RuntimeWarning: overflow encountered in cast" (the labelmap was right)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label = threshold_labelmap(score, (1.0, 1.0, 1.0), threshold, 0.0, hysteresis, min_peak).astype(bool)
    if flagged == "none":
        assert not label.any()
    elif flagged == "all":
        assert np.array_equal(label, ~np.isnan(score))
    elif min_peak > 1:  # 2 x it is beyond float32 too
        assert not label.any()
    else:  # just above float32's largest value, which it rounds to, as ITK compares in float32 (hysteresis keeps
        # what the plain threshold labels)
        assert np.array_equal(np.argwhere(label), [[3, 4, 5]])


def test_detect_with_a_threshold_of_1e308_writes_an_empty_labelmap_without_a_warning(tiny_bundle, tmp_path: Path):
    image, mask = make_head(size=(36, 40, 30), seed=21)
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "head_mask.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["detect", str(tmp_path / "head.nii.gz"), "--mask", str(tmp_path / "head_mask.nii.gz"),
                     "--model", str(tiny_bundle), "--device", "cpu", "--threshold", "1e308",
                     "--score", str(tmp_path / "s.nii.gz"), "--labelmap", str(tmp_path / "l.nii.gz")]) == 0
    labelmap = sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    assert not sitk.GetArrayViewFromImage(labelmap).any()


def _smooth_noise(shape, seed: int) -> np.ndarray:
    """A float32 map of blobs of many sizes (a few hundred 26-connected components above 1)."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    smooth = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(values), 1.5)
    return sitk.GetArrayFromImage(smooth) * np.float32(8.0)


def _reference_labelmap(score: np.ndarray, threshold: float, min_voxels: int, low: float, min_peak: float):
    """What threshold_labelmap labels, written out with ITK's connected components and relabelling."""
    seeds = score >= np.float32(threshold)
    grown = score > np.float32(low) if low > 0 else seeds
    cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(grown.astype(np.uint8)), True))
    out = np.zeros(score.shape, bool)
    for lab in np.unique(cc[seeds]):
        part = cc == lab
        if part.sum() >= min_voxels and (score[part] >= np.float32(min_peak * threshold)).any():
            out |= part
    return out


@pytest.mark.parametrize("hysteresis, min_peak", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.5, 2.0)])
def test_components_are_sized_and_grown_without_a_copy_of_the_box_in_64_or_32_bits(hysteresis, min_peak):
    """The labelmap of each component rule is right, and no NumPy array of 4 bytes a voxel or more is made: sizing
    the components (--min-volume) counted them with np.bincount over the whole box, which copied its 32-bit labels to
    64 bits (8 bytes a voxel: 287 MB on the brain's box of a 0.5 mm head, the largest array of the detection), and
    --hysteresis copied ITK's 32-bit labels (4 bytes a voxel) and its mask once more."""
    import tracemalloc

    score = _smooth_noise((40, 50, 60), 3)
    threshold, min_voxels = 1.0, 20
    expected = _reference_labelmap(score, threshold, min_voxels, hysteresis * threshold, min_peak)
    assert 0 < expected.sum() < _reference_labelmap(score, threshold, 1, hysteresis * threshold, 1.0).sum()  # some
    # components were dropped
    tracemalloc.start()
    try:
        label = threshold_labelmap(score, (1.0, 1.0, 1.0), threshold, float(min_voxels), hysteresis, min_peak)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(label.astype(bool), expected)
    assert peak < 4 * score.size, f"{peak / score.size:.1f} bytes a voxel"
