"""Scoring a volume in several slice orientations: the detector averages the maps of the orientations a model
was trained on, refuses the others, and a calibration holds for the averaged map."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import SLICE_MAP_WEIGHT, SLICE_MAP_WEIGHT_FUSED, Detector
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.engine.preprocess import finite_brain, invert_region, mask_array, prepare
from CeVAEAnomalyLib.engine.scoring import pixel_map
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions, ThresholdPolicy
from conftest import make_head


@pytest.fixture(scope="module")
def two_orientation_bundle(tmp_path_factory):
    """A tiny ceVAE trained on axial and coronal slices of two synthetic heads."""
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.training.data import Subject
    from CeVAEAnomalyLib.training.trainer import TrainConfig, Trainer

    d = tmp_path_factory.mktemp("two_orientations")
    subjects = []
    for seed in (1, 2):
        image, mask = make_head(seed=seed)
        sitk.WriteImage(image, str(d / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"h{seed}_mask.nii.gz"))
        subjects.append(Subject(d / f"h{seed}.nii.gz", d / f"h{seed}_mask.nii.gz"))
    cfg = TrainConfig(out=d / "two.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16), batch_size=16,
                      max_steps=4, checkpoint_every=4, device="cpu", val_fraction=0.0,
                      orientations=("axial", "coronal"))
    return Trainer(cfg, subjects).run()


def test_options_name_each_orientation_once_axial_first():
    assert ScoreOptions(orientations=" axial, coronal ").orientations == "axial,coronal"  # one spelling
    assert ScoreOptions(orientations="axial,sagittal").orientation_list == ("axial", "sagittal")
    for bad in ("coronal,axial", "axial,axial", "axial,oblique", ""):
        with pytest.raises(CeVAEError):
            ScoreOptions(orientations=bad)
    assert ScoreOptions(orientations="axial,coronal", test_time_steps=10).test_time_steps == 10  # thorough too


def test_the_map_is_the_mean_of_the_orientations_maps(two_orientation_bundle):
    """No post-processing: the detector's map is the axial map and the coronal map, each mapped back onto the
    input grid, averaged; the slice scores stay the axial ones."""
    bundle = load_bundle(two_orientation_bundle)
    image, mask = make_head(seed=9)
    plain = PostprocessOptions()
    axial = Detector(bundle, bundle.header.score_options.replace(orientations="axial"), plain,
                     ThresholdPolicy(threshold=math.inf))
    fused = Detector(bundle, bundle.header.score_options.replace(orientations="axial,coronal"), plain,
                     ThresholdPolicy(threshold=math.inf))
    a, f = axial(image, mask), fused(image, mask)
    brain = finite_brain(sitk.GetArrayViewFromImage(image), mask_array(mask, image))
    stack = prepare(image, brain, bundle.preprocess, "coronal")
    coronal = invert_region(stack.record, pixel_map(axial._network(bundle.model, stack, [axial.score], None),
                                                    axial.score), tuple(slice(0, n) for n in brain.shape))
    want = (sitk.GetArrayViewFromImage(a.score) + coronal) / 2
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(f.score), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(coronal, sitk.GetArrayViewFromImage(a.score))  # the coronal pass is another map
    assert [(r.index, r.neg_elbo) for r in f.slices] == [(r.index, r.neg_elbo) for r in a.slices]


def test_the_slice_score_weighs_a_fused_map_more(two_orientation_bundle):
    """The most anomalous slice of a map averaged over orientations gives the map's rank the fused weight, a
    single orientation's map the plain one; both rank over the same axial slices."""
    bundle = load_bundle(two_orientation_bundle)
    image, mask = make_head(seed=9)
    axial = Detector(bundle, bundle.header.score_options.replace(orientations="axial"),
                     policy=ThresholdPolicy(threshold=math.inf))
    fused = Detector(bundle, bundle.header.score_options.replace(orientations="axial,coronal"),
                     policy=ThresholdPolicy(threshold=math.inf))
    assert SLICE_MAP_WEIGHT_FUSED > SLICE_MAP_WEIGHT
    for detector, weight in ((axial, SLICE_MAP_WEIGHT), (fused, SLICE_MAP_WEIGHT_FUSED)):
        rows = detector(image, mask).slices
        want = fused_slice_rank(np.array([r.map_max for r in rows]), np.array([r.neg_elbo for r in rows]), weight)
        assert [r.anomaly for r in rows] == pytest.approx(want.tolist())
        other = SLICE_MAP_WEIGHT + SLICE_MAP_WEIGHT_FUSED - weight
        assert [r.anomaly for r in rows] != pytest.approx(
            fused_slice_rank(np.array([r.map_max for r in rows]), np.array([r.neg_elbo for r in rows]), other).tolist())


def test_the_thorough_mode_adapts_once_on_every_orientations_slices(two_orientation_bundle, monkeypatch):
    """Test-time adaptation with two orientations: one adapted copy, fitted on the axial and coronal slices
    together, scores both."""
    from CeVAEAnomalyLib.engine import detector as detector_module

    bundle = load_bundle(two_orientation_bundle)
    image, mask = make_head(seed=9)
    calls = []
    real = detector_module.adapted_copy

    def recording(model, slices, *args, **kwargs):
        calls.append(len(slices))
        return real(model, slices, *args, **kwargs)

    monkeypatch.setattr(detector_module, "adapted_copy", recording)
    score = bundle.header.score_options.replace(orientations="axial,coronal", test_time_steps=2)
    thorough = Detector(bundle, score, PostprocessOptions(), ThresholdPolicy(threshold=math.inf))
    res = thorough(image, mask)
    brain = finite_brain(sitk.GetArrayViewFromImage(image), mask_array(mask, image))
    n = [len(prepare(image, brain, bundle.preprocess, o).slices) for o in ("axial", "coronal")]
    assert calls == [sum(n)]
    plain = Detector(bundle, score.replace(test_time_steps=0), PostprocessOptions(), ThresholdPolicy(threshold=math.inf))
    assert not np.allclose(sitk.GetArrayViewFromImage(res.score), sitk.GetArrayFromImage(plain(image, mask).score))


def test_a_model_refuses_orientations_it_was_not_trained_on(tiny_bundle):
    """The refusal named only the command line's --orientations, where a script gives detect() orientations=."""
    bundle = load_bundle(tiny_bundle)  # trained on axial slices only
    with pytest.raises(CeVAEError, match="trained on axial slices only.*coronal") as refused:
        Detector(bundle, bundle.header.score_options.replace(orientations="axial,coronal"),
                 policy=ThresholdPolicy(threshold=1.0))
    assert str(refused.value).endswith("; score the slices it was trained on (--orientations axial; orientations= in "
                                       "Python), or train a model with --orientations axial,coronal."), refused.value


def test_a_model_whose_own_options_name_orientations_it_was_not_trained_on_is_said_to_be_edited(tiny_bundle,
                                                                                                tmp_path):
    """A model file edited to score coronal slices it was not trained on, detected from the Slicer panel (its worker),
    which has no orientation control and detects with the model's own: it was told to "train a model with
    --orientations axial,coronal", as if it had asked for them."""
    from dataclasses import replace

    from CeVAEAnomalyLib.engine.bundle import save_bundle
    from CeVAEAnomalyLib.options import DetectionRequest
    from CeVAEAnomalyLib.slicer.worker import run_detect

    bundle = load_bundle(tiny_bundle, "cpu")
    edited = save_bundle(tmp_path / "edited.cevae", bundle.model, replace(
        bundle.header, score_options=bundle.header.score_options.replace(orientations="axial,coronal")))
    image, mask = make_head(seed=3)
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    task = {"image": str(tmp_path / "head.nii.gz"), "model": str(edited), "out_dir": str(tmp_path / "results"),
            "request": DetectionRequest.of(threshold=1.0, device="cpu").to_dict()}
    with pytest.raises(CeVAEError) as refused:
        run_detect(task, lambda fraction, message: None)
    assert str(refused.value) == (
        "The model was trained on axial slices only, so it cannot score coronal slices, which its own options name: "
        "the model file was edited or is damaged. Use another model (in Slicer: another Model bundle), or score the "
        "slices it was trained on (--orientations axial; orientations= in Python)."), refused.value


def test_a_model_trained_on_two_orientations_scores_and_is_calibrated_with_both_by_default(two_orientation_bundle):
    """It scored axial slices alone unless asked, and had no calibration for the average it was trained for."""
    header = read_header(two_orientation_bundle)
    assert header.score_options.orientations == "axial,coronal"
    assert header.is_calibrated(header.score_options, header.postprocess)


def test_calibrate_and_detect_with_two_orientations(tmp_path, two_orientation_bundle):
    """As a user runs it: calibrate the averaged map on a healthy scan, then detect with that default."""
    image, mask = make_head(seed=11)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "h_mask.nii.gz"))
    (tmp_path / "healthy.csv").write_text("image,mask\nh.nii.gz,h_mask.nii.gz\n")
    out = tmp_path / "fused.cevae"
    assert main(["calibrate", "--model", str(two_orientation_bundle), "--manifest", str(tmp_path / "healthy.csv"),
                 "--out", str(out), "--orientations", "axial,coronal", "--device", "cpu"]) == 0
    header = read_header(out)
    assert header.score_options.orientations == "axial,coronal"
    assert header.is_calibrated(header.score_options, header.postprocess)
    assert not header.is_calibrated(header.score_options.replace(orientations="axial"), header.postprocess)
    assert main(["detect", str(tmp_path / "h.nii.gz"), "--mask", str(tmp_path / "h_mask.nii.gz"), "--model", str(out),
                 "--score", str(tmp_path / "s.nii.gz"), "--device", "cpu"]) == 0
    assert sitk.ReadImage(str(tmp_path / "s.nii.gz")).GetSize() == image.GetSize()


def test_the_model_card_names_the_axial_calibration_of_a_several_orientation_model(tmp_path, two_orientation_bundle):
    from dataclasses import replace

    from CeVAEAnomalyLib.engine.calibrate import calibrate_model
    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyResearch.modelcard import render_model_card

    image, mask = make_head(seed=11)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "h_mask.nii.gz"))
    bundle = load_bundle(two_orientation_bundle)
    score, post = bundle.header.score_options.replace(orientations="axial,coronal"), bundle.header.postprocess
    healthy = [Subject(tmp_path / "h.nii.gz", tmp_path / "h_mask.nii.gz")]
    fused = replace(bundle, header=replace(bundle.header, score_options=score,
                                           calibration=calibrate_model(bundle, healthy, "test", score, post)))
    assert "axial map alone" not in render_model_card(fused)  # not calibrated for it
    axial = calibrate_model(bundle, healthy, "test", score.replace(orientations="axial"), post)
    both = replace(fused, header=replace(fused.header, calibration={**fused.header.calibration, **axial}))
    assert "`--orientations axial` (the axial map alone: one network pass)" in render_model_card(both)
