"""Tests of the score normalisation, hysteresis and slice scores against hand-computed or brute-force values."""
from __future__ import annotations

from collections import deque
from itertools import product

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.postprocess import hysteresis, robust_normalise, threshold_labelmap
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank, slice_excess, slice_flags, slice_quantile
from CeVAEAnomalyLib.result import DetectionResult, SliceScoreRow


def test_robust_normalise_hand_computed() -> None:
    score = np.array([1.0, 2.0, 3.0, 4.0, 100.0, 7.0])
    brain = np.array([True, True, True, True, True, False])
    # median 3, |deviations| 2, 1, 0, 1, 97 -> MAD 1
    assert robust_normalise(score, brain) == pytest.approx([-2 / 1.4826, -1 / 1.4826, 0, 1 / 1.4826, 97 / 1.4826, 0],
                                                           rel=1e-5)


def test_robust_normalise_sparse_and_constant_maps() -> None:
    brain = np.ones(5, bool)
    # median 0 and MAD 0: the spread is 1.2533 x mean absolute deviation (5 / 5 = 1)
    assert robust_normalise(np.array([0.0, 0, 0, 0, 5]), brain) == pytest.approx([0, 0, 0, 0, 5 / 1.2533], rel=1e-5)
    assert (robust_normalise(np.full(5, 3.0), brain) == 0).all()
    assert (robust_normalise(np.ones(3), np.zeros(3, bool)) == 0).all()


def brute_hysteresis(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """Flood fill over 26-neighbours from every voxel at or above ``high`` through voxels above ``low``."""
    out = np.zeros(score.shape, bool)
    queue = deque(tuple(v) for v in np.argwhere(score >= high))
    for v in queue:
        out[v] = True
    while queue:
        v = queue.popleft()
        for d in product((-1, 0, 1), repeat=3):
            w = tuple(a + b for a, b in zip(v, d))
            if all(0 <= a < n for a, n in zip(w, score.shape)) and not out[w] and score[w] > low:
                out[w] = True
                queue.append(w)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_hysteresis_matches_flood_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    score = rng.random((7, 8, 9))
    got = hysteresis(score, 0.6, 0.95)
    assert np.array_equal(got, brute_hysteresis(score, 0.6, 0.95))
    assert got[score > 0.95].all() and not got[score <= 0.6].any()


def test_hysteresis_holds_every_voxel_the_plain_threshold_labels() -> None:
    """It compared ``> threshold`` where the labelmap labels ``>= threshold``: a lesion whose peak is the threshold
    was dropped, and a threshold of 0 with hysteresis labelled half of what it labels without."""
    score = np.zeros((1, 1, 9))
    score[0, 0] = [0, 0.5, 0.8, 0.5, 0, 0.5, 0.5, 0, 0.0]
    assert hysteresis(score, 0.4, 0.8)[0, 0].tolist() == [False, True, True, True, False, False, False, False, False]
    for threshold in (0.0, 0.5, 0.8):
        plain = threshold_labelmap(score, (1, 1, 1), threshold).astype(bool)
        grown = threshold_labelmap(score, (1, 1, 1), threshold, hysteresis_fraction=0.5).astype(bool)
        assert (grown >= plain).all()


def test_hysteresis_hand_example() -> None:
    score = np.zeros((1, 1, 9))
    score[0, 0] = [0, 0.5, 0.9, 0.5, 0, 0.5, 0.5, 0, 0.95]
    got = hysteresis(score, 0.4, 0.8)[0, 0]
    assert got.tolist() == [False, True, True, True, False, False, False, False, True]
    assert not hysteresis(score, 0.4, 1.0).any()


def test_slice_quantile_and_excess_brute_force() -> None:
    rng = np.random.default_rng(3)
    score = rng.random((4, 5, 6))
    brain = rng.random((4, 5, 6)) > 0.4
    brain[:, :, 2] = False  # one slice along axis 2 without brain
    for axis in range(3):
        q = slice_quantile(score, brain, axis, 0.9)
        e = slice_excess(score, brain, axis, 0.7)
        for i in range(score.shape[axis]):
            s = np.take(score, i, axis)[np.take(brain, i, axis)]
            assert q[i] == pytest.approx(np.quantile(s, 0.9) if s.size else 0.0)
            assert e[i] == pytest.approx(sum(max(v - 0.7, 0) for v in s))
    assert slice_quantile(score, brain, 2, 0.9)[2] == 0 and slice_excess(score, brain, 2, 0.1)[2] == 0


def test_fused_slice_rank_hand_computed() -> None:
    map_max = np.array([1.0, 3.0, 2.0, 2.0])  # ranks 0, 1, 0.5, 0.5 (the tie shares its mean rank)
    neg_elbo = np.array([4.0, 1.0, 3.0, 2.0])  # ranks 1, 0, 2/3, 1/3
    assert fused_slice_rank(map_max, neg_elbo, 0.7) == pytest.approx([0.3, 0.7, 0.55, 0.45])
    assert fused_slice_rank(map_max, neg_elbo, 1.0) == pytest.approx([0.0, 1.0, 0.5, 0.5])
    assert fused_slice_rank(np.array([5.0]), np.array([2.0]), 0.7) == pytest.approx([0.0])


def test_fused_slice_rank_ties_are_exact_so_the_map_breaks_them() -> None:
    """Two slices equally anomalous by the fusion (0.7 x 8/8 + 0.3 x 1/8 = 0.7 x 5/8 + 0.3 x 8/8) get one value, so the
    slice table's documented tie-break (the higher map score first) decides, not the rounding of 0.7 x 5/8 + 0.3."""
    map_max = np.arange(9.0)
    neg_elbo = np.array([4.0, 5.0, 6.0, 7.0, 3.0, 8.0, 2.0, 0.0, 1.0])
    fused = fused_slice_rank(map_max, neg_elbo, 0.7)
    assert fused[8] == fused[5] == fused.max()
    rows = [SliceScoreRow(2, i, 0.0, 0.0, float(e), anomaly=float(f), map_max=float(m))
            for i, (m, e, f) in enumerate(zip(map_max, neg_elbo, fused))]
    image = sitk.Image([4, 4, 4], sitk.sitkUInt8)
    assert DetectionResult(image, image, image, 1.0, "absolute", rows, []).top_slice.index == 8


def test_slice_flags_hand_computed() -> None:
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[1, 2, 3] = 1
    assert slice_flags(lab, 0).tolist() == [False, True, False]
    assert slice_flags(lab, 1).tolist() == [False, False, True, False]
    assert slice_flags(lab, 2).tolist() == [False, False, False, True, False]


def test_calibration_stored_before_the_levers_still_matches() -> None:
    """A calibration keyed without the new post-processing fields matches options with those fields off."""
    import json

    from CeVAEAnomalyLib.engine.calibration import find_calibration
    from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions

    old_key = json.dumps({"score": ScoreOptions().to_dict(), "post": {"rim_mm": 3.0, "median_radius": 1,
                                                                    "min_volume_mm3": 50.0}}, sort_keys=True)
    header = {"calibration": {old_key: {"fpr": [0.001, 0.01], "threshold": [2.0, 1.0]}}}
    post = PostprocessOptions(rim_mm=3.0, median_radius=1, min_volume_mm3=50.0)
    assert find_calibration(header["calibration"], ScoreOptions(), post)["threshold"] == [2.0, 1.0]
    with pytest.raises(Exception):
        find_calibration(header["calibration"], ScoreOptions(), post.replace(normalise=True))


def test_a_calibration_serves_every_labelmap_only_option() -> None:
    """The minimum component volume and peak and the hysteresis act on the labelmap after the threshold, not on the
    map the threshold was calibrated on: changing them keeps the calibration (it used to be lost, and with it
    the calibrated threshold); changing the map (the rim) does not."""
    from CeVAEAnomalyLib.engine.calibration import calibration_key, find_calibration
    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions

    post = PostprocessOptions(rim_mm=3.0, min_volume_mm3=50.0)
    calibration = {calibration_key(ScoreOptions(), post): {"fpr": [0.001, 0.01], "threshold": [2.0, 1.0]}}
    for labelmap_only in ({"min_volume_mm3": 0.0}, {"min_volume_mm3": 200.0}, {"hysteresis": 0.7},
                          {"min_volume_mm3": 10.0, "hysteresis": 0.5}, {"min_peak": 1.5}):
        assert find_calibration(calibration, ScoreOptions(), post.replace(**labelmap_only))["threshold"] == [2.0, 1.0]
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(calibration, ScoreOptions(), post.replace(rim_mm=5.0))


def test_postprocess_options_refuse_bad_levers() -> None:
    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.options import PostprocessOptions

    for bad in ({"asymmetry_mm": -1.0}, {"score_power": 0.0}, {"hysteresis": 1.0}, {"normalise": "yes"},
                {"asymmetry_side": 1}, {"min_peak": 0.5}):
        with pytest.raises(CeVAEError):
            PostprocessOptions(**bad)


def test_threshold_labelmap_with_hysteresis() -> None:
    from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap

    rng = np.random.default_rng(1)
    arr = rng.random((6, 7, 8)).astype(np.float32)
    got = threshold_labelmap(arr, (1.0, 1.0, 1.0), 0.95, hysteresis_fraction=0.6) > 0
    assert np.array_equal(got, brute_hysteresis(arr, 0.57, 0.95))


@pytest.mark.parametrize("min_volume", [0.0, 10.0])
def test_threshold_labelmap_keeps_only_components_that_reach_the_peak(min_volume: float) -> None:
    """min_peak 1.3 at threshold 0.6: the components above 0.6 that hold a voxel above 0.78 (a flood fill
    from those voxels), then those of at least ``min_volume`` voxels; with hysteresis the components grow
    first and must still peak above 1.3 × the threshold."""
    from scipy import ndimage

    from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap

    rng = np.random.default_rng(2)
    arr = ndimage.gaussian_filter(rng.random((10, 11, 12)), 1.0)  # blobs of a few to a few hundred voxels
    arr = ((arr - arr.min()) / (arr.max() - arr.min())).astype(np.float32)
    want = brute_hysteresis(arr, 0.6, 0.78)
    labels, n = ndimage.label(want, structure=np.ones((3, 3, 3)))
    want &= np.bincount(labels.ravel(), minlength=n + 1)[labels] >= min_volume
    got = threshold_labelmap(arr, (1.0, 1.0, 1.0), 0.6, min_volume, min_peak=1.3) > 0
    plain = threshold_labelmap(arr, (1.0, 1.0, 1.0), 0.6, min_volume) > 0
    assert want.any() and ndimage.label(plain, np.ones((3, 3, 3)))[1] > ndimage.label(got, np.ones((3, 3, 3)))[1]
    assert np.array_equal(got, want)
    assert np.array_equal(plain, threshold_labelmap(arr, (1.0, 1.0, 1.0), 0.6, min_volume, min_peak=1.0) > 0)
    grown = threshold_labelmap(arr, (1.0, 1.0, 1.0), 0.6, hysteresis_fraction=0.9, min_peak=1.3) > 0
    assert np.array_equal(grown, brute_hysteresis(arr, 0.54, 0.78))


def test_detect_with_levers(tiny_bundle) -> None:
    """Normalised maps are 0 at or below the brain's median; each slice's map_max is the SLICE_QUANTILE
    of the output map over that slice's brain, flagged says whether the labelmap touches it, its anomaly
    is the rank fusion of map_max and the negative ELBO; the top slice has the highest anomaly."""
    import SimpleITK as sitk

    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import SLICE_MAP_WEIGHT, SLICE_QUANTILE, Detector, slice_map_weight
    from CeVAEAnomalyLib.options import PostprocessOptions, ThresholdPolicy
    from conftest import make_head

    image, mask = make_head(seed=5)
    post = PostprocessOptions(asymmetry_mm=2.0, score_power=0.5, normalise=True, min_volume_mm3=5.0)
    res = Detector(load_bundle(tiny_bundle), post=post, policy=ThresholdPolicy(threshold=2.0))(image, mask)
    score = sitk.GetArrayFromImage(res.score)
    brain = sitk.GetArrayFromImage(res.brain_mask) > 0
    labels = sitk.GetArrayFromImage(res.labelmap) > 0
    assert (score >= 0).all() and (score[~brain] == 0).all()
    assert np.mean(score[brain] == 0) >= 0.5
    axis = 2 - res.slices[0].axis
    for r in res.slices:
        s = np.take(score, r.index, axis)[np.take(brain, r.index, axis)]
        assert r.map_max == pytest.approx(np.quantile(s, SLICE_QUANTILE) if s.size else 0.0, rel=1e-5, abs=1e-6)
        assert r.flagged == bool(np.take(labels, r.index, axis).any())
    assert slice_map_weight(1) == SLICE_MAP_WEIGHT  # one orientation
    fused = fused_slice_rank(np.array([r.map_max for r in res.slices]), np.array([r.neg_elbo for r in res.slices]),
                             SLICE_MAP_WEIGHT)
    assert [r.anomaly for r in res.slices] == pytest.approx(fused.tolist())
    assert any(r.flagged for r in res.slices) and not all(r.flagged for r in res.slices)
    assert res.top_slice.anomaly == max(r.anomaly for r in res.slices)


def test_detect_with_a_peak_filter_drops_the_components_that_stay_low(tiny_bundle) -> None:
    """The detector's labelmap with min_peak: the same threshold, only the components whose maximum reaches
    the peak, and nothing else changed."""
    import SimpleITK as sitk

    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyLib.options import PostprocessOptions
    from conftest import make_head

    image, mask = make_head(seed=5)
    bundle = load_bundle(tiny_bundle)
    post = PostprocessOptions(asymmetry_mm=2.0, score_power=0.5, normalise=True).to_dict()  # every option given
    plain = detect(image, bundle, mask, threshold=0.5, **post)
    peaks = sorted({c.max_score for c in plain.components})
    assert len(peaks) >= 2
    factor = (peaks[0] + peaks[1]) / 2 / 0.5  # between the two lowest peaks: one component at least goes
    peaked = detect(image, bundle, mask, threshold=0.5, **dict(post, min_peak=factor))
    assert peaked.threshold == plain.threshold
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(peaked.score), sitk.GetArrayViewFromImage(plain.score))
    high = [c for c in plain.components if c.max_score >= factor * 0.5]
    assert 0 < len(high) < len(plain.components)
    assert sorted(c.voxels for c in peaked.components) == sorted(c.voxels for c in high)


def test_components_ranked_by_order() -> None:
    import SimpleITK as sitk

    from CeVAEAnomalyLib.engine.postprocess import components

    lab = np.zeros((5, 5, 20), np.uint8)
    score = np.zeros((5, 5, 20), np.float32)
    lab[1:4, 1:4, 0:3] = 1  # 27 voxels of score 1: summed 27
    score[1:4, 1:4, 0:3] = 1.0
    lab[2, 2, 8:10] = 1  # 2 voxels of score 9: summed 18, highest max and mean
    score[2, 2, 8:10] = 9.0
    lab[1:3, 1:3, 14:16] = 1  # 8 voxels of score 3: summed 24
    score[1:3, 1:3, 14:16] = 3.0
    li, si = sitk.GetImageFromArray(lab), sitk.GetImageFromArray(score)
    by = {o: [c.voxels for c in components(li, si, o)] for o in ("volume", "max", "mean", "summed")}
    assert by == {"volume": [27, 8, 2], "max": [2, 8, 27], "mean": [2, 8, 27], "summed": [27, 8, 2]}
    ranked = components(li, si, "summed")
    assert [c.label for c in ranked] == [1, 2, 3]
    assert [c.summed_score for c in ranked] == pytest.approx([27.0, 24.0, 18.0])


def test_fpr_for_threshold_inverts_threshold_for_fpr() -> None:
    from CeVAEAnomalyLib.engine.calibration import calibrate, fpr_for_threshold, threshold_for_fpr

    entry = calibrate([np.random.default_rng(0).standard_normal(200000)], "test")
    for fpr in (1e-4, 3e-4, 0.002, 0.05):
        assert fpr_for_threshold(entry, threshold_for_fpr(entry, fpr)) == pytest.approx(fpr, rel=1e-6)
    hand = {"fpr": [0.001, 0.01, 0.1], "threshold": [3.0, 2.0, 1.0]}
    assert fpr_for_threshold(hand, 2.5) == pytest.approx(10 ** -2.5)  # halfway in log rate
    assert fpr_for_threshold(hand, 9.0) == pytest.approx(0.001)  # clamped to the range
