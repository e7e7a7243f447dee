"""The Detector object: built once, threshold resolved up front, one network pass per volume."""
import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.bundle import load_bundle, read_header
from CeVAEAnomalyLib.engine.calibrate import calibrate_model, healthy_scores
from CeVAEAnomalyLib.engine.detector import Detector, detect
from CeVAEAnomalyLib.engine.symmetry import estimate_midplane
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import SCORE_TYPES, DetectionRequest, ThresholdPolicy
from CeVAEAnomalyLib.training.data import Subject
from conftest import make_head, write_heads


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
        np.testing.assert_array_equal(sitk.GetArrayFromImage(getattr(asked, name)),
                                      sitk.GetArrayFromImage(getattr(direct, name)))
    lower = detect(image, bundle, mask, request, threshold=0.25)
    assert lower.threshold == 0.25
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(lower.score), sitk.GetArrayViewFromImage(asked.score))
    assert lower.flagged_ml >= asked.flagged_ml
    with pytest.raises(CeVAEError, match="Unknown detection option.*'scoretype'"):
        detect(image, bundle, mask, scoretype="rec")


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_a_threshold_at_or_below_zero_labels_the_brain_only_and_leaves_the_map_alone(tiny_bundle, threshold):
    """threshold <= 0 labelled the whole image, air included, and post-processed (so scored) a larger box."""
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    low, usual = detect(image, bundle, mask, threshold=threshold), detect(image, bundle, mask, threshold=1.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(low.score), sitk.GetArrayViewFromImage(usual.score))
    labelled = sitk.GetArrayViewFromImage(low.labelmap) > 0
    brain = sitk.GetArrayViewFromImage(low.brain_mask) > 0
    assert labelled.any() and not (labelled & ~brain).any()


def _flipped(image, axes, perm=(0, 1, 2)):
    """The same physical image stored in another voxel order."""
    return sitk.Flip(sitk.PermuteAxes(image, list(perm)), list(axes))


@pytest.mark.parametrize("axes, perm", [((True, False, False), (0, 1, 2)), ((False, True, True), (0, 1, 2)),
                                        ((False, False, False), (2, 0, 1))])
def test_the_midplane_does_not_depend_on_the_voxel_order(axes, perm):
    """The ~4 mm bins of the plane search started at index 0: a flipped copy moved the plane by millimetres."""
    image, mask = make_head(spacing=(1.5, 1.5, 1.5))
    plane = estimate_midplane(image, mask)
    other = estimate_midplane(_flipped(image, axes, perm), _flipped(mask, axes, perm))
    np.testing.assert_allclose(other.normal, plane.normal, atol=1e-6)
    assert other.offset == pytest.approx(plane.offset, abs=1e-4)


def test_the_score_map_does_not_depend_on_the_voxel_order(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(spacing=(1.5, 1.5, 1.5), seed=5)
    assert bundle.header.postprocess.asymmetry_mm > 0  # the mid-plane is used
    base = sitk.GetArrayFromImage(detect(image, bundle, mask, threshold=1.0).score)
    for axes in ((True, False, False), (False, True, False), (False, False, True)):
        flipped = detect(_flipped(image, axes), bundle, _flipped(mask, axes), threshold=1.0).score
        back = sitk.Resample(flipped, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
        np.testing.assert_allclose(sitk.GetArrayFromImage(back), base, atol=1e-4)


@pytest.mark.parametrize("spacing", [(1.2, 1.0, 0.5), (0.02, 0.02, 0.02)])
def test_thin_slabs_and_tiny_voxels_are_scored(tiny_bundle, spacing):
    """A ~4 mm bin of the plane search larger than the volume raised a raw ITK BinShrink error."""
    image, mask = make_head(size=(40, 44, 6) if spacing[2] == 0.5 else (40, 44, 36), spacing=spacing)
    result = detect(image, load_bundle(tiny_bundle), mask, threshold=1.0)
    assert np.isfinite(sitk.GetArrayViewFromImage(result.score)).all()


@pytest.mark.parametrize("rate", [0.9, 1e-9, float("nan")])
def test_recalibrate_refuses_a_default_rate_no_loader_takes_before_any_scan_is_scored(tiny_bundle, tmp_path, rate):
    """The library's recalibrate wrote a bundle with default_fpr 0.9 that every load_bundle then refused as damaged
    (the command line refused --default-fpr 0.9, the function it calls did not)."""
    from CeVAEAnomalyLib.engine.calibrate import recalibrate

    bundle = load_bundle(tiny_bundle)
    missing = Subject(tmp_path / "not_read.nii.gz")  # scoring it would fail with another message
    with pytest.raises(CeVAEError, match=r"default_fpr must be a rate the calibration covers, from 1e-06 to 0\.5"):
        recalibrate(bundle, [missing], tmp_path / "c.cevae", bundle.header.score_options, bundle.header.postprocess,
                    default_fpr=rate)
    assert not (tmp_path / "c.cevae").exists()


def test_recalibrate_refuses_wrong_argument_types_in_one_line(tiny_bundle, tmp_path):
    """recalibrate(path, ...) or recalibrate(bundle, ..., {"score_type": "rec"}, ...) raised AttributeError."""
    from CeVAEAnomalyLib.engine.calibrate import recalibrate

    bundle = load_bundle(tiny_bundle)
    subjects = [Subject(tmp_path / "not_read.nii.gz")]
    score, post = bundle.header.score_options, bundle.header.postprocess
    cases = [((tiny_bundle, subjects, tmp_path / "c.cevae", score, post), r"bundle must be a Bundle.*got PosixPath"),
             ((bundle, subjects, tmp_path / "c.cevae", {"score_type": "rec"}, post),
              r"scoring options must be a ScoreOptions.*got dict"),
             ((bundle, subjects, tmp_path / "c.cevae", score, None), r"post-processing options must be a "
                                                                   r"PostprocessOptions.*got NoneType")]
    for args, message in cases:
        with pytest.raises(CeVAEError, match=message):
            recalibrate(*args)


def _replacing(path, content):
    """A progress callback that replaces the file ``path`` by the image ``content`` once, when the second scan is about
    to be read (the first one read already), as a user or a sync tool could while calibrate runs."""
    done = []

    def progress(fraction, message):
        if "Healthy volume 2/2" in message and message.endswith("Reading") and not done:
            sitk.WriteImage(content, str(path))
            done.append(path)
    return progress


def test_a_calibrated_copy_records_the_content_it_scored_or_is_not_written(tiny_bundle, tmp_path):
    """The calibrated copy's record took each image's sha256 from the command's checksums, taken before scoring, and
    each mask's after it: a scan replaced before it was read, or a mask replaced after, was recorded by content that
    was not scored. A run whose files changed is now refused in one line, and nothing is written; an undisturbed run
    records the content it scored."""
    from CeVAEAnomalyLib.engine.calibrate import recalibrate
    from CeVAEAnomalyLib.io.checksum import sha256_of

    bundle = load_bundle(tiny_bundle)
    score, post = bundle.header.score_options, bundle.header.postprocess
    subjects = write_heads(tmp_path, (1, 2))
    before = {s.image: sha256_of(s.image) for s in subjects}  # as calibrate hashes the images before scoring
    path = recalibrate(bundle, subjects, tmp_path / "ok.cevae", score, post, checksums=before)
    assert [(r["sha256"], r["mask_sha256"]) for r in read_header(path).extra["recalibration"]["scans"]] == \
        [(sha256_of(s.image), sha256_of(s.mask)) for s in subjects]
    other_head = make_head(seed=7)[0]
    smaller_mask = sitk.BinaryErode(sitk.ReadImage(str(subjects[0].mask)), [2, 2, 2])
    for changed, content in ((subjects[1].image, other_head), (subjects[0].mask, smaller_mask)):
        out = tmp_path / f"{changed.name}.cevae"
        with pytest.raises(CeVAEError, match=rf"^{changed} changed while it was being read \(replaced or still being "
                                             r"written\); run again once it is complete\.$"):
            recalibrate(bundle, subjects, out, score, post, checksums=before, progress=_replacing(changed, content))
        assert not out.exists()
        subjects = write_heads(tmp_path, (1, 2))  # the files as they were


def test_a_detection_records_how_it_was_made(tiny_bundle, caplog):
    """The result's record names the model file and its sha256, what the threshold was calibrated on, the threshold
    and its source, the options, the device and the warnings this detection logged, in order and as logged: those of
    a brain mask of several values and of slices thicker than the calibration's. A warning another thread logs
    meanwhile is not this detection's, and a second run starts with none."""
    import datetime
    import hashlib
    import json
    import logging
    import os
    import threading

    from CeVAEAnomalyLib import __version__
    from CeVAEAnomalyLib.io import strict_json

    bundle = load_bundle(tiny_bundle, "cpu")
    detector = Detector(bundle)
    thick, thick_mask = make_head(seed=12, size=(40, 44, 9), spacing=(1.2, 1.0, 6.0))
    thick_mask[20, 22, 4] = 2  # a brain voxel of another value

    def elsewhere(fraction, message):
        if fraction == 0.0:  # while the detection runs
            other = threading.Thread(target=lambda: logging.getLogger("CeVAEAnomalyLib.engine").warning("not ours"))
            other.start()
            other.join()

    with caplog.at_level(logging.WARNING):
        result = detector(thick, thick_mask, progress=elsewhere)
    logged = [r.getMessage() for r in caplog.records if r.getMessage() != "not ours"]
    record = result.record
    assert len(logged) == 2 and "holds several values" in logged[0] and "is not known" in logged[1]
    assert record.warnings == tuple(logged)
    header = read_header(tiny_bundle)
    assert record.model.sha256 == hashlib.sha256(tiny_bundle.read_bytes()).hexdigest()
    assert (record.model.path, record.model.name, record.model.modality) == (os.path.abspath(tiny_bundle),
                                                                              header.name, header.modality)
    entry = next(iter(header.calibration.values()))
    assert record.model.calibrated_on == entry["source"] and record.threshold_source.startswith("calibrated on ")
    assert (record.threshold, record.threshold_source) == (result.threshold, result.threshold_source)
    assert record.score_options == detector.score.to_dict() and record.postprocess == detector.post.to_dict()
    assert (record.tool, record.version, record.device, record.amp, record.inputs) == (
        "cevae-anomaly", __version__, "cpu", False, {})
    made = datetime.datetime.strptime(record.created_utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(made - datetime.datetime.now(datetime.timezone.utc)).total_seconds() < 600
    assert json.loads(strict_json.dumps(record.to_dict()))["warnings"] == logged

    image, mask = make_head(seed=12)
    assert detector(image, mask).record.warnings == ()
    absolute = Detector(bundle, policy=ThresholdPolicy(threshold=0.5))(image, mask).record
    assert absolute.model.calibrated_on is None and absolute.threshold_source == "absolute"


def test_a_detection_records_the_batch_size_that_sampled_scores_depend_on(tiny_bundle):
    """Sampled scores (--mc-samples) draw their latent samples batch by batch, so the slices per network pass
    change the map: a record that left the batch size out said the same for two different maps."""
    bundle = load_bundle(tiny_bundle, "cpu")
    sampled = bundle.header.score_options.replace(mc_samples=2)
    image, mask = make_head(seed=12)
    results = [Detector(bundle, sampled, policy=ThresholdPolicy(threshold=0.5), batch_size=size)(image, mask)
               for size in (64, 3)]
    maps = [sitk.GetArrayFromImage(r.score) for r in results]
    assert not np.array_equal(*maps)
    assert [r.record.batch_size for r in results] == [64, 3]
    assert results[0].record.to_dict()["batch_size"] == 64


def test_a_detection_records_whether_its_brain_mask_was_given_or_computed(tiny_bundle):
    """A mask given and one computed from the image make other maps, yet a detection from the Python API (no
    input files) recorded neither: the record says "given" or "automatic"."""
    bundle = load_bundle(tiny_bundle, "cpu")
    detector = Detector(bundle, policy=ThresholdPolicy(threshold=0.5))
    image, mask = make_head(seed=12)
    assert detector(image, mask).record.mask == "given"
    assert detector(image).record.to_dict()["mask"] == "automatic"


def test_a_detection_records_the_versions_of_the_libraries_that_computed_it(tiny_bundle):
    """Another torch or SimpleITK (convolutions, resampling) can move a map; the record named only the package's
    version, and now names Python's, torch's, SimpleITK's and NumPy's too."""
    import platform

    import torch

    bundle = load_bundle(tiny_bundle, "cpu")
    image, mask = make_head(seed=12)
    record = Detector(bundle, policy=ThresholdPolicy(threshold=0.5))(image, mask).record
    assert record.to_dict()["software"] == {"python": platform.python_version(), "torch": torch.__version__,
                                            "SimpleITK": sitk.Version_VersionString(), "numpy": np.__version__}
