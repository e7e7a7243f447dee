"""Progress callbacks of the library's entry points: a value that is not one is refused up front in one line, and
the progress reaches 1.0 only when the work, its write included, is done."""
from __future__ import annotations

from pathlib import Path

import pytest

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import calibrate_model, recalibrate
from CeVAEAnomalyLib.engine.detector import Detector, detect
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.training.adapt import adapt
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.trainer import Trainer
from conftest import make_head, write_heads

pytestmark = pytest.mark.usefixtures("one_thread")
NOT_CALLABLE = ["a string", 3]
REFUSED = r"^progress must be a function taking \(fraction, message\), or None; got (str 'a string'|int 3)\.$"


@pytest.mark.parametrize("progress", NOT_CALLABLE)
def test_detection_refuses_a_progress_that_is_not_callable_in_one_line(tiny_bundle, progress):
    """detect(..., progress="x") failed with "TypeError: 'str' object is not callable" from inside the pipeline."""
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    calls = [lambda: detect(image, bundle, mask, progress=progress, threshold=1.0),
             lambda: detect(image, tiny_bundle, mask, progress=progress, device="cpu"),
             lambda: Detector(bundle)(image, mask, progress),
             lambda: Detector(bundle).brain_scores(image, mask, ["combi"], progress=progress)]
    for call in calls:
        with pytest.raises(CeVAEError, match=REFUSED):
            call()


@pytest.mark.parametrize("progress", NOT_CALLABLE)
def test_calibration_adaptation_and_training_refuse_it_before_any_scan_is_read(tiny_bundle, tmp_path, progress):
    """Up front: the scans named here do not exist, so reading one would fail with another message."""
    bundle = load_bundle(tiny_bundle)
    missing = [Subject(tmp_path / "a.nii.gz"), Subject(tmp_path / "b.nii.gz")]
    score, post = bundle.header.score_options, bundle.header.postprocess
    calls = [lambda: calibrate_model(bundle, missing, "test", score, post, progress),
             lambda: recalibrate(bundle, missing, tmp_path / "c.cevae", score, post, progress=progress),
             lambda: adapt(tiny_bundle, missing, tmp_path / "a.cevae", AdaptOptions(device="cpu"), progress),
             lambda: Trainer(TrainConfig(out=tmp_path / "t.cevae", device="cpu"), missing, progress=progress)]
    for call in calls:
        with pytest.raises(CeVAEError, match=REFUSED):
            call()
    assert list(tmp_path.iterdir()) == []


def test_the_slicer_logic_refuses_it_with_the_scene_unchanged(tiny_bundle):
    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer import mrml
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic
    from conftest import add_volume

    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7)
    volume, mask_node = add_volume(scene, image), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=REFUSED):
        CeVAEAnomalyLogic().process(volume, mask_node, modelPath=tiny_bundle, device="cpu", progress="a string")
    assert mrml.node_ids(scene) == before


def _written_when_done(out: Path) -> tuple:
    """A progress callback that notes, for each report, its fraction and whether ``out`` exists; and that list."""
    heard = []
    return heard, lambda fraction, message: heard.append((fraction, out.exists(), message))


def test_recalibrate_reports_done_only_once_the_bundle_is_written(tiny_bundle, tmp_path):
    """recalibrate reported 1.0 ("Scored every healthy volume") before it wrote the calibrated bundle."""
    bundle = load_bundle(tiny_bundle)
    out = tmp_path / "c.cevae"
    heard, progress = _written_when_done(out)
    recalibrate(bundle, write_heads(tmp_path, (11, 12)), out, bundle.header.score_options, bundle.header.postprocess,
                progress=progress)
    fractions = [f for f, _, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [(exists, message) for f, exists, message in heard if f >= 1.0] == [(True, "Calibrated model written")]


def test_adapt_reports_done_only_once_the_adapted_bundle_is_written(tiny_bundle, tmp_path):
    """adapt's calibration, scaled to end at 1.0, reported 1.0 before the adapted bundle was written."""
    out = tmp_path / "site.cevae"
    heard, progress = _written_when_done(out)
    options = AdaptOptions(steps=2, batch_size=8, checkpoint_every=2, device="cpu")
    adapt(tiny_bundle, write_heads(tmp_path, (11, 12, 13)), out, options, progress)
    assert heard[-1][0] == 1.0
    assert [(exists, message) for f, exists, message in heard if f >= 1.0] == [(True, "Adapted model written")]
