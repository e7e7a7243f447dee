"""The per-brain normalisation's spread (``--spread mad|tail``): its arithmetic, fallbacks, the detector's
map with it, and bundles written before the option existed."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibration import calibration_key, find_calibration, threshold_for_fpr
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.postprocess import normalised, robust_normalise
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import (RECOMMENDED_POSTPROCESS, DetectionRequest, PostprocessOptions, ScoreOptions,
                                     ThresholdPolicy)
from test_untrusted_bundles import rewrite


def test_tail_spread_of_an_evenly_spread_map_by_hand() -> None:
    score = np.arange(101, dtype=np.float32)  # median 50, 95th percentile 95
    brain = np.ones(101, bool)
    brain[100] = False  # outside the brain: 0, and not counted (median 49.5, 95th percentile 94.05)
    spread = (94.05 - 49.5) / 1.645
    want = np.where(brain, (score - 49.5) / spread, 0)
    assert robust_normalise(score, brain, "tail") == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert normalised(score, brain, "tail") == pytest.approx(np.maximum(want, 0), rel=1e-6, abs=1e-6)


def test_tail_spread_is_the_upper_tail_s_width_and_differs_from_the_mad_on_a_heavy_tail() -> None:
    rng = np.random.default_rng(0)
    bulk = rng.normal(10.0, 2.0, (40, 50, 50))
    brain = np.ones(bulk.shape, bool)
    brain[:, :5] = False
    normal = robust_normalise(bulk.astype(np.float32), brain, "tail")
    mad = robust_normalise(bulk.astype(np.float32), brain, "mad")
    med, p95 = np.percentile(bulk[brain].astype(np.float32), [50, 95])
    assert normal[brain] == pytest.approx((bulk[brain] - med) / ((p95 - med) / 1.645), rel=1e-4, abs=1e-5)
    # a normal map: both spreads are its standard deviation (2)
    assert np.std(normal[brain]) == pytest.approx(1.0, rel=0.02) and np.std(mad[brain]) == pytest.approx(1.0, rel=0.02)
    # one brain voxel in ten much higher (false components): the MAD hardly notices, the tail widens
    heavy = np.where(rng.random(bulk.shape) < 0.1, bulk + rng.exponential(20.0, bulk.shape), bulk).astype(np.float32)
    tail, mad = robust_normalise(heavy, brain, "tail"), robust_normalise(heavy, brain, "mad")
    assert np.percentile(tail[brain], 95) == pytest.approx(1.645, rel=1e-4)
    assert np.percentile(mad[brain], 95) > 1.5 * 1.645  # in MAD units the same tail reaches much higher
    assert (tail[~brain] == 0).all() and np.median(tail[brain]) == pytest.approx(0, abs=1e-5)


def test_tail_spread_falls_back_to_the_mad_then_the_mean_deviation() -> None:
    brain = np.ones(100, bool)
    # 48 % below, 48 % at the median 0, 4 % above: 95th percentile = median, MAD = 1 (half the deviations are 1)
    score = np.concatenate([np.full(48, -1.0), np.zeros(48), np.full(4, 7.0)])
    assert robust_normalise(score, brain, "tail") == pytest.approx(score / 1.4826, rel=1e-6)
    # a sparse map (97 % zero): no tail width and no MAD: 1.2533 x mean absolute deviation, as with mad
    sparse = np.concatenate([np.zeros(97), [3.0, 6.0, 9.0]])
    want = sparse / (1.2533 * 0.18)
    assert robust_normalise(sparse, brain, "tail") == pytest.approx(want, rel=1e-6)
    assert robust_normalise(sparse, brain, "mad") == pytest.approx(want, rel=1e-6)
    assert (robust_normalise(np.full(7, 2.5), np.ones(7, bool), "tail") == 0).all()  # constant: spread 1
    assert (robust_normalise(np.ones(3), np.zeros(3, bool), "tail") == 0).all()  # no brain
    with pytest.raises(CeVAEError, match=r"Unknown spread 'iqr'; choose one of mad, tail"):
        robust_normalise(score, brain, "iqr")


def test_spread_is_a_declared_option_with_mad_as_the_field_default_and_tail_recommended() -> None:
    assert PostprocessOptions().spread == "mad" and RECOMMENDED_POSTPROCESS.spread == "tail"
    with pytest.raises(CeVAEError, match=r"Unknown spread 'iqr'; choose one of mad, tail\."):
        PostprocessOptions(spread="iqr")
    with pytest.raises(CeVAEError, match=r"Unknown spread 'IQR'"):
        DetectionRequest.of(spread="IQR")
    from CeVAEAnomalyLib.cli.main import build_parser

    args = build_parser().parse_args(["detect", "in.nii.gz", "--score", "s.nii.gz", "--spread", "tail"])
    assert DetectionRequest.from_args(args).post == {"spread": "tail"}
    # a calibration keyed before the option existed is the mad one
    old_post = {k: v for k, v in RECOMMENDED_POSTPROCESS.to_dict().items() if k != "spread"}
    old_key = json.dumps({"score": ScoreOptions().to_dict(), "post": old_post}, sort_keys=True)
    table = {old_key: {"fpr": [0.001, 0.01], "threshold": [2.0, 1.0]}}
    assert find_calibration(table, ScoreOptions(), RECOMMENDED_POSTPROCESS.replace(spread="mad")) is table[old_key]
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(table, ScoreOptions(), RECOMMENDED_POSTPROCESS)


def test_detector_with_tail_spread_puts_the_brain_s_95th_percentile_at_1_645(tiny_bundle, head) -> None:
    """A new bundle recommends the tail spread: its map's in-brain 95th percentile is 1.645 and its median
    at or below 0 (negatives clipped); the mad spread gives another map of the same scores."""
    bundle = load_bundle(tiny_bundle)
    assert bundle.header.postprocess == RECOMMENDED_POSTPROCESS
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    no_label = ThresholdPolicy(threshold=math.inf)
    maps = {}
    for spread in ("tail", "mad"):
        res = Detector(bundle, post=bundle.header.postprocess.replace(spread=spread), policy=no_label)(image, mask)
        brain = sitk.GetArrayFromImage(res.brain_mask) > 0
        maps[spread] = sitk.GetArrayFromImage(res.score)[brain]
    assert np.percentile(maps["tail"], 95) == pytest.approx(1.645, rel=1e-4)
    assert np.mean(maps["tail"] == 0) >= 0.5 and (maps["tail"] >= 0).all()
    assert abs(np.percentile(maps["mad"], 95) - 1.645) > 0.05
    # the same ranking: one map is a positive multiple of the other where both are above the median
    above = maps["tail"] > 0
    ratio = maps["mad"][above] / maps["tail"][above]
    assert ratio == pytest.approx(np.full(ratio.shape, ratio[0]), rel=1e-3)
    default = Detector(bundle, policy=no_label)(image, mask)
    assert np.array_equal(sitk.GetArrayFromImage(default.score)[brain], maps["tail"])


def test_a_bundle_written_before_the_spread_option_loads_as_mad_and_finds_its_calibration(tiny_bundle, head,
                                                                                          tmp_path) -> None:
    old = Path(shutil.copy(tiny_bundle, tmp_path / "old.cevae"))

    def without_spread(h, t):
        h["postprocess"].pop("spread")
        keys = {}
        for key, entry in h["calibration"].items():
            data = json.loads(key)
            data["post"].pop("spread")
            keys[json.dumps(data, sort_keys=True)] = entry
        h["calibration"] = keys

    rewrite(old, without_spread)
    seen = []
    rewrite(old, lambda h, t: seen.append(h))
    assert "spread" not in seen[0]["postprocess"] and all("spread" not in k for k in seen[0]["calibration"])
    bundle = load_bundle(old)
    header = bundle.header
    assert header.postprocess == RECOMMENDED_POSTPROCESS.replace(spread="mad")
    detector = Detector(bundle)  # the calibration is found: no absolute threshold needed
    new = load_bundle(tiny_bundle).header  # the same table under the key with the field
    entry = new.calibration[calibration_key(new.score_options, new.postprocess)]
    assert detector.threshold == pytest.approx(threshold_for_fpr(entry, header.default_fpr))
    with pytest.raises(CeVAEError, match="no calibration"):
        Detector(bundle, post=header.postprocess.replace(spread="tail"))
    # its map is the mad-normalised one of the same weights
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    no_label = ThresholdPolicy(threshold=math.inf)
    res = Detector(bundle, policy=no_label)(image, mask)
    mad = Detector(load_bundle(tiny_bundle), post=RECOMMENDED_POSTPROCESS.replace(spread="mad"), policy=no_label)(
        image, mask)
    assert np.array_equal(sitk.GetArrayFromImage(res.score), sitk.GetArrayFromImage(mad.score))


def test_the_model_card_says_how_the_map_is_normalised(tiny_bundle) -> None:
    from CeVAEAnomalyResearch.modelcard import render_model_card

    card = render_model_card(load_bundle(tiny_bundle))
    assert "with spread `tail`: (95th percentile - median) / 1.645" in card
