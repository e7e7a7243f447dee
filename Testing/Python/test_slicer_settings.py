"""What the module panel offers for a model and what it asks the logic to do (settings.py),
with real MRML nodes from slicer-core and real model bundles."""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

from conftest import make_head

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.data import default_model_path  # noqa: E402
from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.options import DetectionRequest, ThresholdPolicy  # noqa: E402
from CeVAEAnomalyLib.slicer import mrml, settings  # noqa: E402
from CeVAEAnomalyLib.slicer.settings import ModelSettings  # noqa: E402
from test_slicer_module import module_classes  # noqa: E402


def test_model_settings_are_read_without_torch():
    code = ("import sys; from CeVAEAnomalyLib.slicer.settings import ModelSettings; s = ModelSettings.read(); "
            "print(s.default_fpr, s.calibrated('combi'), 'torch' in sys.modules, 'safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    fpr, calibrated, torch, safetensors = out.stdout.split()
    assert float(fpr) > 0 and calibrated == "True" and torch == safetensors == "False"


def test_override_fields_start_from_the_models_post_processing():
    model = ModelSettings.read(default_model_path())
    post = model.postprocess
    assert any(post.values())  # the bundled model filters: 0/0/0 would silently drop that
    assert settings.postprocess_fields(model) == dict(
        rimMm=post["rim_mm"], medianRadius=post["median_radius"], minVolumeMm3=post["min_volume_mm3"],
        minPeak=post["min_peak"])
    assert model.default_fpr == model.header.default_fpr


def test_only_calibrated_sensitivity_modes_are_offered():
    model = ModelSettings.read()
    same = dict(model.postprocess)
    assert model.sensitivities("grad", same) == settings.SENSITIVITIES
    other = dict(same, rim_mm=same["rim_mm"] + 1.0)
    assert model.sensitivities("combi", other) == (settings.SENSITIVITY_THRESHOLD,)
    # the minimum volume and peak act on the labelmap only: other values keep the calibrated modes
    larger = dict(same, min_volume_mm3=same["min_volume_mm3"] + 150.0, min_peak=same["min_peak"] + 1.0)
    assert model.sensitivities("combi", larger) == settings.SENSITIVITIES
    uncalibrated = ModelSettings(model.path, replace(model.header, calibration={}))
    assert uncalibrated.sensitivities("combi") == (settings.SENSITIVITY_THRESHOLD,)


def parameters(scene, **changes):
    image, mask = make_head()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "head")
    mrml.update_volume_from_image(volume, image)
    values = dict(inputVolume=volume, brainMask=None, brainMaskSegmentId="", useBundledModel=True, modelPath="",
                  scoreType="combi", sensitivity=settings.SENSITIVITY_MODEL, falsePositiveRate=0.01, threshold=0.7,
                  overridePostprocess=False, rimMm=0.0, medianRadius=0, minVolumeMm3=0.0, minPeak=1.0, device="cpu",
                  batchSize=8,
                  thorough=False)
    values.update(changes)
    return SimpleNamespace(**values)


def test_request_uses_the_stored_brain_mask_segment():
    scene = slicer.vtkMRMLScene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    p = parameters(scene, brainMask=segmentation, brainMaskSegmentId="Segment_2")
    request = settings.detection_request(p, ModelSettings.read())
    assert request["maskNode"] is segmentation and request["maskSegmentId"] == "Segment_2"
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    p = parameters(scene, brainMask=labelmap, brainMaskSegmentId="Segment_2")  # a stale id is not used
    assert settings.detection_request(p, ModelSettings.read())["maskSegmentId"] is None


def test_request_sensitivity_and_post_processing():
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    request = settings.detection_request(parameters(scene), model)
    assert request["request"] == DetectionRequest.of(score_type="combi", device="cpu", batch_size=8)
    request = settings.detection_request(parameters(scene, sensitivity=settings.SENSITIVITY_FPR), model)
    assert request["request"].policy == ThresholdPolicy(fpr=0.01)
    p = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, overridePostprocess=True,
                   **settings.postprocess_fields(model))
    request = settings.detection_request(p, model)
    # the panel overrides its four fields; the model's other post-processing (asymmetry, normalisation) stays
    panel = {k: model.postprocess[k] for k in ("rim_mm", "median_radius", "min_volume_mm3", "min_peak")}
    assert request["request"].policy == ThresholdPolicy(threshold=0.7) and request["request"].post == panel


def test_an_uncalibrated_choice_is_refused_in_words_for_the_panel():
    scene = slicer.vtkMRMLScene()
    p = parameters(scene, overridePostprocess=True, rimMm=9.0)
    with pytest.raises(CeVAEError, match="Absolute threshold") as error:
        settings.detection_request(p, ModelSettings.read())
    assert "--" not in str(error.value)  # no command-line flags in the GUI
    with pytest.raises(CeVAEError, match="Choose a model file"):
        settings.detection_request(parameters(scene, useBundledModel=False), ModelSettings.read())


def test_an_override_with_the_models_own_values_keeps_the_calibration():
    """The panel shows three post-processing fields; the others stay the model's, so overriding with the
    model's values still matches its calibration (no switch to an absolute threshold)."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    p = parameters(scene, overridePostprocess=True, **settings.postprocess_fields(model))
    assert model.sensitivities("combi", settings.override_postprocess(p)) == settings.SENSITIVITIES
    assert settings.sensitivity_change(p, model) is None
    request = settings.detection_request(p, model)["request"]
    assert request.policy == ThresholdPolicy()  # the model's own calibrated rate
    assert request.options(model.header.score_options, model.header.postprocess)[1] == model.header.postprocess


@pytest.mark.parametrize("mode", [settings.SENSITIVITY_MODEL, settings.SENSITIVITY_FPR])
def test_leaving_the_calibration_prefills_the_calibrated_threshold_and_says_so(mode):
    from CeVAEAnomalyLib.engine.calibration import find_calibration, threshold_for_fpr

    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    fields = dict(settings.postprocess_fields(model), rimMm=model.postprocess["rim_mm"] + 1.0)
    p = parameters(scene, overridePostprocess=True, sensitivity=mode, falsePositiveRate=0.01, **fields)
    change = settings.sensitivity_change(p, model)
    fpr = 0.01 if mode == settings.SENSITIVITY_FPR else model.default_fpr
    entry = find_calibration(model.header.calibration, model.header.score_options.replace(score_type="combi"),
                             model.header.postprocess)
    assert change.sensitivity == settings.SENSITIVITY_THRESHOLD
    assert change.threshold == pytest.approx(threshold_for_fpr(entry, fpr)) and change.threshold > 1.0  # not 0.5
    assert f"{change.threshold:.4g}" in change.message and "calibrated threshold" in change.message
    assert "--" not in change.message


@pytest.mark.parametrize("previous", [settings.SENSITIVITY_MODEL, settings.SENSITIVITY_FPR])
def test_switching_to_an_absolute_threshold_starts_at_the_rate_in_use(previous):
    """Choosing Absolute threshold by hand starts the field at the calibrated threshold of the rate that was in use
    (the field's default, 0.5, flags a quarter of a healthy brain); a threshold loaded with a scene stays."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    p = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, falsePositiveRate=0.01, threshold=0.5)
    values = settings.model_values(p, model, previous)
    rate = 0.01 if previous == settings.SENSITIVITY_FPR else None
    assert values["threshold"] == pytest.approx(model.calibrated_threshold("combi", rate)) and values["threshold"] > 1
    assert settings.postprocess_fields(model).items() <= values.items()
    assert "threshold" not in settings.model_values(p, model, None)  # not a switch: the stored value is kept
    assert "threshold" not in settings.model_values(p, model, settings.SENSITIVITY_THRESHOLD)
    model_rate = settings.model_values(parameters(scene), model, settings.SENSITIVITY_THRESHOLD)
    assert model_rate["falsePositiveRate"] == model.default_fpr
    assert model_rate["threshold"] == pytest.approx(model.calibrated_threshold("combi"))  # the one in use


def test_the_thorough_mode_asks_for_test_time_adaptation_at_its_own_calibration():
    from CeVAEAnomalyLib.options import THOROUGH_STEPS

    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    p = parameters(scene, thorough=True)
    request = settings.detection_request(p, model)["request"]
    assert request.score == dict(score_type="combi", test_time_steps=THOROUGH_STEPS)
    score, post = request.options(model.header.score_options, model.header.postprocess)
    assert model.header.is_calibrated(score, post)  # the bundled model is calibrated for it
    assert model.sensitivities("combi", None, thorough=True) == settings.SENSITIVITIES
    assert model.calibrated_threshold("combi", thorough=True) != model.calibrated_threshold("combi")
    # a model calibrated without it: an absolute threshold, prefilled from the plain calibration, and said so
    plain = {k: v for k, v in model.header.calibration.items() if '"test_time_steps": 0' in k}
    older = ModelSettings(model.path, replace(model.header, calibration=plain))
    assert older.sensitivities("combi", None, thorough=True) == (settings.SENSITIVITY_THRESHOLD,)
    change = settings.sensitivity_change(p, older)
    assert change.sensitivity == settings.SENSITIVITY_THRESHOLD and "thorough mode" in change.message
    assert change.threshold == pytest.approx(model.calibrated_threshold("combi"))
    with pytest.raises(CeVAEError, match="Absolute threshold"):
        settings.detection_request(p, older)


def test_a_new_calibrated_model_takes_over_from_the_absolute_threshold_that_stood_in_for_it():
    """After Calibrate or Adapt the panel kept an absolute threshold (4.878) that had stood in for the missing
    calibration, and detected with it although the new model was calibrated (5.439)."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    own = settings.postprocess_fields(model)
    uncalibrated = ModelSettings(model.path, replace(model.header, calibration={}))
    p = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, overridePostprocess=True, **own)
    sensitivity, said = settings.after_new_model(p, model, uncalibrated)  # the threshold stood in: the rate now
    assert sensitivity == settings.SENSITIVITY_MODEL and "calibrated false-positive rate is used now" in said
    sensitivity, said = settings.after_new_model(p, model, model)  # chosen by hand: it stays, and the line says so
    assert sensitivity is None and "absolute threshold stays in use, not the new model's calibrated rates" in said
    other = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, overridePostprocess=True,
                       **dict(own, rimMm=own["rimMm"] + 1.0))
    sensitivity, said = settings.after_new_model(other, model, model)  # not calibrated for them: said, not switched
    assert sensitivity is None and "not calibrated for the panel's post-processing" in said
    moved = parameters(scene, overridePostprocess=True, **dict(own, rimMm=own["rimMm"] + 1.0))
    sensitivity, said = settings.after_new_model(moved, model, model)  # the model's rate, uncalibrated: its words
    assert sensitivity is None and said == settings.sensitivity_change(moved, model).message
    assert settings.after_new_model(parameters(scene), model, None) == (None, "")


def test_the_prefilled_absolute_threshold_is_that_of_the_panels_post_processing():
    """A model calibrated for the panel's override (after Calibrate in Slicer) detects at that calibration's threshold
    in the model's-rate mode; switching to Absolute threshold starts there, not at its own post-processing's."""
    from CeVAEAnomalyLib.engine.calibration import calibration_key

    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    own = settings.postprocess_fields(model)
    header = model.header
    score = header.score_options.replace(score_type="combi")
    entry = header.calibration[calibration_key(score, header.postprocess)]
    wider = header.postprocess.replace(rim_mm=header.postprocess.rim_mm + 1.0)
    halved = dict(entry, threshold=[t / 2 for t in entry["threshold"]])
    site = ModelSettings(model.path, replace(header, calibration=dict(header.calibration,
                                                                       **{calibration_key(score, wider): halved})))
    p = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, overridePostprocess=True,
                   **dict(own, rimMm=own["rimMm"] + 1.0))
    values = settings.model_values(p, site, settings.SENSITIVITY_MODEL)
    assert values["threshold"] == pytest.approx(model.calibrated_threshold("combi") / 2)



@pytest.mark.parametrize("damage", ["missing", "not a model", "pickle"])
def test_apply_with_a_model_that_cannot_be_used_names_the_file_and_its_problem(tmp_path, damage):
    """A saved scene's model that was moved, or a file that is no model: Apply said only "The model file cannot be
    read; choose a .cevae model file" (the reason went to the log); now the model's own problem is the message."""
    site = tmp_path / "site.cevae"
    if damage == "not a model":
        site.write_text("hello")
    elif damage == "pickle":
        site.write_bytes(b"\x80\x04" + bytes(64))
    p = parameters(slicer.vtkMRMLScene(), useBundledModel=False, modelPath=str(site))
    with pytest.raises(CeVAEError) as error:
        settings.chosen_model(p)
    said = {"missing": "does not exist", "not a model": "too short to be a model", "pickle": "refused unread"}[damage]
    assert str(site) in str(error.value) and said in str(error.value)
    assert settings.chosen_model(parameters(slicer.vtkMRMLScene())).path == default_model_path()
    start = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                             if isinstance(n, ast.FunctionDef) and n.name == "_startDetection"))
    assert "detection_request(p, chosen_model(p))" in start and "cannot be read" not in start


def test_the_adapt_section_says_before_the_run_that_an_override_stays_uncalibrated(tmp_path):
    """Adapting calibrates the model's own post-processing: with another rim in Advanced the panel learned it only
    from the status line after the run (up to an hour on a CPU); the estimate now says it before."""
    from CeVAEAnomalyLib.slicer.adapt_panel import adapt_choice

    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    own = settings.postprocess_fields(model)
    moved = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, overridePostprocess=True,
                       **dict(own, rimMm=own["rimMm"] + 1.0))
    note = settings.adapt_override_note(moved, model)
    assert "not the override in Advanced" in note and "--" not in note
    choice = adapt_choice(2, str(tmp_path / "adapted.cevae"), model.path, "cpu", note=note)
    assert choice.ready and choice.message.endswith(note)
    larger = parameters(scene, overridePostprocess=True, **dict(own, minVolumeMm3=own["minVolumeMm3"] + 50.0))
    for calibrated in (parameters(scene), larger):  # no override, or one that keeps the calibration
        assert settings.adapt_override_note(calibrated, model) == ""
    assert settings.adapt_override_note(moved, None) == ""  # an unreadable model: its own problem is said
    assert not adapt_choice(1, str(tmp_path / "adapted.cevae"), model.path, "cpu", note=note).message.endswith(note)
    method = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                              if isinstance(n, ast.FunctionDef) and n.name == "_adaptChoice"))
    assert "note=adapt_override_note(p, self._modelSettings())" in method


def test_the_greyed_threshold_field_shows_the_threshold_the_calibrated_mode_uses():
    """In the model's-rate and chosen-rate modes the disabled threshold field kept its last value (0.5 in a new
    scene: a quarter of a healthy brain) while detection used the calibrated one (4.88): the field now shows that,
    and follows the chosen rate, score type and thorough mode (the rate field's own rounding of the model's rate
    starts no update)."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    p = parameters(scene, threshold=0.5)
    assert settings.model_values(p, model, None)["threshold"] == pytest.approx(model.calibrated_threshold("combi"))
    chosen = parameters(scene, sensitivity=settings.SENSITIVITY_FPR, falsePositiveRate=0.01, scoreType="rec")
    assert settings.model_values(chosen, model, None)["threshold"] == pytest.approx(
        model.calibrated_threshold("rec", 0.01))
    absolute = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD)
    assert "threshold" not in settings.model_values(absolute, model, None)  # the user's own value stays
    key = settings.model_values_key
    assert key(p) == key(parameters(scene, falsePositiveRate=0.000218))  # the model's rate, rounded by the field
    assert key(chosen) != key(parameters(scene, sensitivity=settings.SENSITIVITY_FPR, falsePositiveRate=0.02,
                                         scoreType="rec"))
    assert key(p)[1] == p.sensitivity  # the widget's "previous" mode is read from this place
    method = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                              if isinstance(n, ast.FunctionDef) and n.name == "_showModelValues"))
    assert "shownFor = (self._modelSettingsCache.key, *model_values_key(p))" in method
    assert "previous = shownBefore[2]" in method


def test_a_refused_rate_is_said_at_once_and_the_threshold_field_shows_no_stale_threshold():
    """The rate field goes to 0.5, where the bundled model's normalised maps get a calibrated threshold of 0 (they
    are 0 over half of a healthy brain): every entry point refuses that rate, yet the greyed threshold field kept the
    previous rate's threshold and only Apply said so. The panel now says the logic's refusal at once and the field
    shows the 0 that rate gets; rates the logic accepts (up to just below 0.5) are shown as before."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    refused = parameters(scene, sensitivity=settings.SENSITIVITY_FPR, falsePositiveRate=0.5, threshold=0.7)
    with pytest.raises(CeVAEError) as logic:
        model.header.threshold_of(DetectionRequest.of(fpr=0.5))
    assert settings.rate_refusal(refused, model) == str(logic.value)
    assert "rate of 0.5 gets a threshold of 0" in str(logic.value) and "Give a rate below 0.5" in str(logic.value)
    assert settings.model_values(refused, model, None)["threshold"] == 0.0
    for rate in (0.2, 0.4995):  # accepted by the logic: a threshold above 0, shown, and nothing said
        accepted = parameters(scene, sensitivity=settings.SENSITIVITY_FPR, falsePositiveRate=rate)
        assert settings.rate_refusal(accepted, model) is None
        assert 0 < settings.model_values(accepted, model, None)["threshold"] == pytest.approx(
            model.calibrated_threshold("combi", rate))
    assert settings.rate_refusal(parameters(scene), model) is None  # the model's own rate
    absolute = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, falsePositiveRate=0.5)
    assert settings.rate_refusal(absolute, model) is None  # the rate is not used
    other = parameters(scene, sensitivity=settings.SENSITIVITY_FPR, falsePositiveRate=0.5, overridePostprocess=True,
                       rimMm=9.0)
    assert settings.rate_refusal(other, model) is None  # not calibrated for it: sensitivity_change says that


def test_an_absolute_threshold_chosen_after_a_refused_rate_starts_at_the_model_s_own_not_at_0():
    """The field showed the refused rate's 0, and switching to the absolute mode kept it: Apply flagged the whole
    brain."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    switched = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, falsePositiveRate=0.5, threshold=0.0)
    start = settings.model_values(switched, model, settings.SENSITIVITY_FPR)["threshold"]
    assert start == pytest.approx(model.calibrated_threshold("combi")) and start > 0


def test_the_model_values_look_a_refused_rate_up_once(monkeypatch):
    """The threshold field's value for a refused rate came from two look-ups of that rate in the model's calibration
    (its threshold, then why it is refused); every panel update makes one."""
    from CeVAEAnomalyLib.engine.header import BundleHeader

    rates, look_up = [], BundleHeader.threshold

    def counted(header, score, post, policy):
        rates.append(policy.fpr)
        return look_up(header, score, post, policy)

    monkeypatch.setattr(BundleHeader, "threshold", counted)
    model, scene = ModelSettings.read(), slicer.vtkMRMLScene()
    for rate, shown in ((0.5, 0.0), (0.2, model.calibrated_threshold("combi", 0.2))):
        rates.clear()
        chosen = parameters(scene, sensitivity=settings.SENSITIVITY_FPR, falsePositiveRate=rate)
        assert settings.model_values(chosen, model, None)["threshold"] == pytest.approx(shown) and rates == [rate]


def test_a_model_recommending_a_median_radius_no_model_may_is_refused_at_apply_in_the_panels_words(tmp_path):
    """A model of an earlier version recommending median radius 4 (calibrated with it) shows as usable; Apply refuses
    it before the volume is sent, saying how the panel asks for it (detection's refusal names --median-radius), and
    the override with that radius asks for it."""
    import json
    import shutil
    from pathlib import Path

    from test_untrusted_bundles import rewrite

    def radius_4(h, t):
        h["postprocess"]["median_radius"] = 4
        h["calibration"] = {json.dumps(dict(json.loads(k), post=dict(json.loads(k)["post"], median_radius=4)),
                                       sort_keys=True): v for k, v in h["calibration"].items()}

    path = Path(shutil.copy(default_model_path(), tmp_path / "radius4.cevae"))
    rewrite(path, radius_4)
    model = ModelSettings.read(path)
    scene = slicer.vtkMRMLScene()
    p = parameters(scene, useBundledModel=False, modelPath=str(path))
    assert model.calibrated("combi") and settings.model_problem(p) is None
    with pytest.raises(CeVAEError, match=r"recommends median_radius 4, more than a model may recommend \(3\).*tick "
                       r"'Override post-processing' \(Advanced\) and set the median filter radius to 4") as refused:
        settings.detection_request(p, model)
    assert "--median-radius" not in str(refused.value)
    override = dict(overridePostprocess=True, **settings.postprocess_fields(model))
    request = settings.detection_request(parameters(scene, useBundledModel=False, modelPath=str(path), **override),
                                         model)["request"]
    assert request.checked_options(model.header.score_options, model.header.postprocess)[1].median_radius == 4


def test_a_missing_bundled_model_says_what_to_do_in_each_callers_words(monkeypatch, head, tmp_path, capsys):
    """The bundled model missing (an incomplete installation) was said as "...; pass --model BUNDLE" on the panel's
    status line, by its worker and by `cevae-anomaly info`, which takes the model as its argument."""
    import CeVAEAnomalyLib.data as data
    from CeVAEAnomalyLib.cli.main import main
    from CeVAEAnomalyLib.slicer.worker import run_detect

    monkeypatch.setattr(data, "DEFAULT_MODEL_NAME", "absent.cevae")
    missing = data.data_path("absent.cevae")
    panel = (f"The bundled default model {missing} is missing (the installation is incomplete): use a model bundle "
             "of your own (in Slicer: untick Use bundled model and choose it as the Model bundle), or install "
             "CeVAEAnomaly again.")
    assert settings.model_problem(parameters(slicer.vtkMRMLScene())) == panel
    image, mask = head
    with pytest.raises(CeVAEError) as refused:
        run_detect({"image": str(image), "mask": str(mask), "model": None, "out_dir": str(tmp_path / "results"),
                    "request": DetectionRequest.of(device="cpu").to_dict()}, lambda fraction, message: None)
    assert str(refused.value) == panel
    said = f"error: The bundled default model {missing} is missing (the installation is incomplete): "
    assert main(["info"]) == 2
    info = capsys.readouterr().err
    assert info == f"{said}give a model bundle: cevae-anomaly info BUNDLE, or install CeVAEAnomaly again.\n", info
    assert main(["detect", str(image), "--mask", str(mask), "--score", str(tmp_path / "score.nii.gz")]) == 2
    assert capsys.readouterr().err == f"{said}pass --model BUNDLE, or install CeVAEAnomaly again.\n"


def test_a_training_checkpoint_chosen_as_the_model_says_how_the_panel_resumes_its_run(head, tmp_path, tiny_bundle):
    """An interrupted adaptation's checkpoint chosen as the Model bundle (site.cevae.ckpt, its model not written yet)
    was told to "run the train (or adapt) command that wrote it again with --resume": the panel resumes it with
    Adapt, which asks. Once its model is written, that is the one to use."""
    import torch
    from CeVAEAnomalyLib.slicer.worker import run_detect

    checkpoint = tmp_path / "site.cevae.ckpt"
    torch.save({"step": 40, "model": {"fc.bias": torch.ones(10)}}, checkpoint)  # as a killed run leaves it
    p = parameters(slicer.vtkMRMLScene(), useBundledModel=False, modelPath=str(checkpoint))
    refused = (f"{checkpoint} is a zip archive (such as a PyTorch checkpoint), not a CeVAEAnomaly bundle. It is "
               "refused unread because loading a checkpoint can execute arbitrary code. ")
    said = settings.model_problem(p)
    assert said == (f"{refused}It looks like the checkpoint of an interrupted training or adaptation: resuming that "
                    "run writes its model bundle. An adaptation started in Slicer is resumed with Adapt: choose the "
                    "model and the healthy volumes it was started with and the file name site.cevae, press Adapt and "
                    "choose to resume (it asks first)."), said
    image, mask = head
    with pytest.raises(CeVAEError) as worker:
        run_detect({"image": str(image), "mask": str(mask), "model": str(checkpoint), "out_dir": str(tmp_path / "out"),
                    "request": DetectionRequest.of(device="cpu").to_dict()}, lambda fraction, message: None)
    assert str(worker.value) == said
    model = tmp_path / "site.cevae"
    model.write_bytes(tiny_bundle.read_bytes())  # the run ended: its model is written
    said = settings.model_problem(p)
    assert said == f"{refused}It is a training checkpoint; its run's model is {model}: use that one.", said


def test_a_model_path_holding_a_nul_byte_is_said_in_one_line_not_raised():
    """A model path with a NUL byte (pasted, or from a damaged scene) made the panel raise ValueError ("embedded null
    byte") from path.stat() in its model settings cache and from model_problem. The cache has no settings for it and
    model_problem says what is wrong; a readable model is read once per file version."""
    scene = slicer.vtkMRMLScene()
    bad = parameters(scene, useBundledModel=False, modelPath="site\0.cevae")
    assert settings.model_problem(bad) == "The model bundle path site\\0.cevae holds a NUL byte (\\0), which no file " \
                                          "name can hold."
    cache = settings.ModelSettingsCache()
    assert settings.model_file_key(bad) is None and cache.of(bad) is None
    bundled = parameters(scene)
    read = cache.of(bundled)
    assert read is not None and read.path == default_model_path() and cache.of(bundled) is read
    assert cache.key == (str(default_model_path()), settings.file_stamp(default_model_path()))


def test_a_model_whose_threshold_is_above_1000_is_shown_and_used_exactly():
    """The threshold field ended at 1000 (settings.THRESHOLD_RANGE, also the .ui's maximum): a model whose maps run
    higher (its calibrated threshold 4878) showed 1000 in the greyed field, and switching to Absolute threshold
    detected at 1000, flagging what the model's rate does not. The field now reaches the largest score a map holds."""
    scene = slicer.vtkMRMLScene()
    model = ModelSettings.read()
    scaled = {key: dict(entry, threshold=[t * 1000.0 for t in entry["threshold"]])
              for key, entry in model.header.calibration.items()}
    large = ModelSettings(model.path, replace(model.header, calibration=scaled))
    calibrated = large.calibrated_threshold("combi")
    assert calibrated > 1000.0
    shown = settings.model_values(parameters(scene, threshold=0.5), large, None)["threshold"]
    assert shown == calibrated
    p = parameters(scene, sensitivity=settings.SENSITIVITY_THRESHOLD, threshold=0.5)
    p.threshold = settings.model_values(p, large, settings.SENSITIVITY_MODEL)["threshold"]
    assert p.threshold == calibrated and settings.THRESHOLD_RANGE[0] <= p.threshold <= settings.THRESHOLD_RANGE[1]
    assert settings.detection_request(p, large)["request"].policy.threshold == calibrated


def parameter_default(name: str):
    """The default of the module's parameter-node field ``name``, evaluated as the module does (its names from the
    libraries it imports them from)."""
    import CeVAEAnomalyLib.options as options

    field = next(n for n in next(c for c in ast.walk(ast.parse(module_file_text())) if isinstance(c, ast.ClassDef)
                                 and c.name == "CeVAEAnomalyParameterNode").body
                 if isinstance(n, ast.AnnAssign) and n.target.id == name)
    return eval(ast.unparse(field.value), {**vars(options), **vars(settings)})  # noqa: S307 (the module's own text)


def module_file_text() -> str:
    from test_slicer_module import MODULE_FILE

    return MODULE_FILE.read_text()


def test_a_panel_left_as_it_starts_scores_as_detect_does_with_the_models_own_score_type(tmp_path):
    """The panel started its score type at ScoreOptions' "combi" and always asked for it, while detect scores with
    the model's own (its header's score_options): with a model whose own is "rec" the panel scored another map than
    `cevae-anomaly detect` with the same model. The panel now starts at the model's own score type (and follows the
    model chosen) until the user picks one."""
    import shutil
    from pathlib import Path

    from test_untrusted_bundles import rewrite

    def own_rec(h, t):
        h["score_options"]["score_type"] = "rec"

    path = Path(shutil.copy(default_model_path(), tmp_path / "rec.cevae"))
    rewrite(path, own_rec)
    model = ModelSettings.read(path)
    assert model.header.score_options.score_type == "rec"  # a model the CLI scores with "rec"
    scene = slicer.vtkMRMLScene()
    for chosen_model, header in ((dict(useBundledModel=False, modelPath=str(path)), model.header),
                                 (dict(), ModelSettings.read().header)):
        p = parameters(scene, scoreType=parameter_default("scoreType"), **chosen_model)
        used = settings.chosen_model(p)
        request = settings.detection_request(p, used)["request"]
        cli = DetectionRequest.of(device="cpu", batch_size=8)  # `detect --device cpu --batch-size 8`
        assert request.options(header.score_options, header.postprocess) == \
            cli.options(header.score_options, header.postprocess)
        # the threshold the panel shows for the model's rate is the one detect uses
        assert used.calibrated_threshold(p.scoreType) == header.threshold_of(cli)[0]
    chosen = parameters(scene, scoreType="combi", useBundledModel=False, modelPath=str(path))  # picked by the user
    request = settings.detection_request(chosen, model)["request"]
    assert request.options(model.header.score_options, model.header.postprocess)[0].score_type == "combi"
