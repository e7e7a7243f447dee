"""The Detector object: built once, threshold resolved up front, one network pass per volume."""
import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import calibrate_model, healthy_scores
from CeVAEAnomalyLib.engine.detector import Detector, detect
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import SCORE_TYPES, DetectionRequest, ThresholdPolicy
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


def test_the_library_api_refuses_a_bad_batch_size_as_every_entry_point_does(tiny_bundle, head):
    bundle = load_bundle(tiny_bundle)
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    message = r"batch_size \(--batch-size\) must be a whole number in \[1, 4096\], got 0\."
    with pytest.raises(CeVAEError, match=message):
        Detector(bundle, batch_size=0)
    with pytest.raises(CeVAEError, match=message):
        detect(image, bundle, mask, batch_size=0)


def test_detector_is_reusable_and_matches_a_fresh_one(tiny_bundle, head):
    bundle = load_bundle(tiny_bundle)
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    detector = Detector(bundle)
    first, second = detector(image, mask), detector(image, mask)
    fresh = Detector(load_bundle(tiny_bundle))(image, mask)
    for r in (second, fresh):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(first.score), sitk.GetArrayFromImage(r.score))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(first.labelmap), sitk.GetArrayFromImage(r.labelmap))


def test_calibrate_runs_the_network_in_batches_of_its_batch_size(tiny_bundle, head, tmp_path, monkeypatch):
    """`calibrate --batch-size` (part of its detection request) reaches the network; it was ignored."""
    from CeVAEAnomalyLib.cli.main import main
    from CeVAEAnomalyLib.engine.model import CeVAE

    calls = []
    original = CeVAE.encode

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(CeVAE, "encode", counting)
    manifest = tmp_path / "healthy.csv"
    manifest.write_text(f"image,mask\n{head[0]},{head[1]}\n")
    assert main(["calibrate", "--manifest", str(manifest), "--model", str(tiny_bundle), "--out",
                 str(tmp_path / "calibrated.cevae"), "--device", "cpu", "--batch-size", "5"]) == 0
    assert calls and max(calls) == 5


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


def test_detect_takes_the_request_and_the_options_of_every_entry_point(tiny_bundle, head):
    """detect(image, bundle, mask, request, **options) is the Detector the request asks for; keyword options
    win over the request's, and a misspelt option is refused by name."""
    bundle = load_bundle(tiny_bundle)
    image, mask = (sitk.ReadImage(str(p)) for p in head)
    request = DetectionRequest.of(score_type="rec", min_volume_mm3=5.0, threshold=0.5)
    asked = detect(image, bundle, mask, request)
    h = bundle.header
    direct = Detector(bundle, h.score_options.replace(score_type="rec"), h.postprocess.replace(min_volume_mm3=5.0),
                      ThresholdPolicy(threshold=0.5))(image, mask)
    assert asked.threshold == direct.threshold == 0.5
    for name in ("score", "labelmap"):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(getattr(asked, name)),
                                      sitk.GetArrayViewFromImage(getattr(direct, name)))
    lower = detect(image, bundle, mask, request, threshold=0.25)
    assert lower.threshold == 0.25
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(lower.score), sitk.GetArrayViewFromImage(asked.score))
    assert lower.flagged_ml >= asked.flagged_ml
    with pytest.raises(CeVAEError, match="Unknown detection option.*'scoretype'"):
        detect(image, bundle, mask, scoretype="rec")
