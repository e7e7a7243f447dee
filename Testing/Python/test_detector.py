"""The Detector object: built once, threshold resolved up front, one network pass per volume."""
import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import calibrate_model, healthy_scores
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import SCORE_TYPES, ThresholdPolicy
from CeVAEAnomalyLib.training.data import Subject


def _count_encodes(model, monkeypatch):
    calls = []
    original = model.encode

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(model, "encode", counting)
    return calls


def test_missing_calibration_is_reported_when_the_detector_is_built(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    uncalibrated = bundle.header.score_options.replace(grad_sigma=1.25)
    with pytest.raises(CeVAEError, match="no calibration"):
        Detector(bundle, uncalibrated)
    assert Detector(bundle, uncalibrated, policy=ThresholdPolicy(threshold=0.5)).threshold == 0.5


def test_detector_is_reusable_and_matches_a_fresh_one(tiny_bundle, head):
    bundle = load_bundle(tiny_bundle)
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    detector = Detector(bundle)
    first, second = detector(image, mask), detector(image, mask)
    fresh = Detector(load_bundle(tiny_bundle))(image, mask)
    for r in (second, fresh):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(first.score), sitk.GetArrayFromImage(r.score))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(first.labelmap), sitk.GetArrayFromImage(r.labelmap))


def test_calibration_runs_the_network_once_per_volume_for_all_score_types(tiny_bundle, head, monkeypatch):
    bundle = load_bundle(tiny_bundle)
    opts, post = bundle.header.score_options, bundle.header.postprocess
    subject = Subject(*head)
    calls = _count_encodes(bundle.model, monkeypatch)
    calibrations = calibrate_model(bundle, [subject], "test", opts, post)
    slices = sum(calls)
    assert len(calibrations) == len(SCORE_TYPES)
    # one pass over the volume's slices, not one per score type
    calls.clear()
    single = healthy_scores(bundle, [subject], opts.replace(score_type="rec"), post)
    assert sum(calls) == slices
    # the shared pass gives exactly what a pass for that score type alone gives
    for t in SCORE_TYPES:
        alone = healthy_scores(bundle, [subject], opts.replace(score_type=t), post)[0]
        entry = next(v for k, v in calibrations.items() if f'"score_type": "{t}"' in k)
        assert entry["n_voxels"] == alone.size
        np.testing.assert_allclose(entry["threshold"], np.quantile(alone, 1.0 - np.asarray(entry["fpr"])),
                                   rtol=1e-6)
    assert single[0].size == alone.size
