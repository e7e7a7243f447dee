"""Detection and calibration in a worker process (CeVAEAnomalyLib.slicer.worker/jobs): a real
subprocess, a real MRML scene (slicer-core), progress lines, cancel, errors."""
from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import add_volume, make_head, oblique_direction, site_scene

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")  # slicer-core's

from CeVAEAnomalyLib.io.checksum import image_voxel_sha256  # noqa: E402
from CeVAEAnomalyLib.engine.header import read_header  # noqa: E402
from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer import mrml, nodes  # noqa: E402
from CeVAEAnomalyLib.slicer.jobs import JobState, WorkerJob  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402
from CeVAEAnomalyLib.slicer.settings import ModelSettings  # noqa: E402


@pytest.fixture
def head_scene():
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7)
    return scene, add_volume(scene, image, "head"), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")


def run_to_end(job: WorkerJob, timeout: float = 120.0):
    """Poll like the module's timer does; every (fraction, message) pair the worker sent.

    A poll takes all lines that arrived since the last one, so each is recorded as it is taken
    (sampling the job's state after each poll would miss messages on a busy machine).
    """
    seen = []
    take = job._take

    def recording(line: str) -> None:
        take(line)
        if not seen or seen[-1] != (job.fraction, job.message):
            seen.append((job.fraction, job.message))

    job._take = recording
    deadline = time.monotonic() + timeout
    while not job.poll():
        assert time.monotonic() < deadline, "the worker did not finish"
        time.sleep(0.02)
    return seen


def test_detection_in_a_worker_matches_the_in_process_detection(head_scene, tiny_bundle):
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    before = mrml.node_ids(scene)
    seen = run_to_end(job)
    assert job.state is JobState.DONE, job.error
    assert mrml.node_ids(scene) == before  # nothing touches the scene while the job runs
    fractions = [f for f, _ in seen]
    assert len(set(fractions)) >= 3 and fractions == sorted(fractions)
    result = logic.finishDetection(job)
    assert not job.folder.exists()  # temporary inputs and results removed

    direct = CeVAEAnomalyLogic(slicer.vtkMRMLScene())
    other_scene = direct.scene
    image, mask_image = make_head(seed=7)
    reference = direct.process(add_volume(other_scene, image, "head"),
                               add_volume(other_scene, mask_image, "mask", "vtkMRMLLabelMapVolumeNode"),
                               modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    for name in ("score", "labelmap"):
        node = getattr(result.nodes, name)
        assert np.array_equal(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume))
        np.testing.assert_allclose(sitk.GetArrayFromImage(mrml.image_from_volume(node)),
                                   sitk.GetArrayFromImage(mrml.image_from_volume(getattr(reference.nodes, name))),
                                   rtol=1e-5, atol=1e-6)
    assert result.detection.threshold == reference.detection.threshold == 0.3
    assert [c.voxels for c in result.detection.components] == [c.voxels for c in reference.detection.components]
    assert result.topSliceRas == pytest.approx(reference.topSliceRas)
    assert result.nodes.components.GetNumberOfRows() == len(reference.detection.components)
    # the record crosses the worker's hand-over: its output nodes say how they were made, as the in-process run's
    marks = [{name: node.GetAttribute(name) for name in nodes.PROVENANCE_ATTRIBUTES}
             for node in (result.nodes.score, result.nodes.labelmap, reference.nodes.segmentation)]
    assert marks[0][nodes.MODEL_SHA256_ATTRIBUTE] == hashlib.sha256(Path(tiny_bundle).read_bytes()).hexdigest()
    assert marks[0][nodes.THRESHOLD_ATTRIBUTE] == "0.3" and marks == [marks[0]] * 3
    assert marks[0][nodes.IMAGE_SHA256_ATTRIBUTE] == image_voxel_sha256(mrml.image_from_volume(volume))


def test_a_workers_results_lie_exactly_on_an_oblique_inputs_grid(tiny_bundle):
    """The worker's hand-over (NRRD files) rounds an oblique direction in its last bit; the outputs still carry the
    input's spacing, origin and direction exactly, as process() gives them."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7, direction=oblique_direction(), spacing=(0.9, 1.3, 2.0), origin=(12.5, -40.0, 7.25))
    volume = add_volume(scene, image, "head")
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode"),
                               modelPath=tiny_bundle, device="cpu", createLabelmap=True)
    run_to_end(job)
    result = logic.finishDetection(job)
    for node in (result.nodes.score, result.nodes.labelmap):
        assert node.GetSpacing() == volume.GetSpacing() and node.GetOrigin() == volume.GetOrigin()
        assert np.array_equal(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume)), node.GetName()


def test_cancel_stops_the_worker_within_a_second(head_scene, tiny_bundle):
    scene, volume, _ = head_scene
    before = mrml.node_ids(scene)
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, None, modelPath=tiny_bundle, device="cpu")  # automatic brain mask
    deadline = time.monotonic() + 60
    while job.fraction == 0.0 and not job.poll():  # wait until it really works (torch imported)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    logic.discardJob(job)
    assert time.monotonic() - start < 1.0
    assert job.process.poll() is not None and job.state is JobState.CANCELLED
    assert job.poll() and job.state is JobState.CANCELLED  # a late poll changes nothing
    assert not job.folder.exists() and mrml.node_ids(scene) == before


def test_a_worker_error_arrives_as_one_clear_line(head_scene, tmp_path):
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    before = mrml.node_ids(scene)
    damaged = tmp_path / "damaged.cevae"
    damaged.write_bytes(b"not a model")
    job = logic.startDetection(volume, mask, modelPath=damaged, device="cpu")
    run_to_end(job)
    assert job.state is JobState.FAILED and job.process.returncode == 2
    assert "damaged.cevae is not a CeVAEAnomaly model bundle" in job.error and "\n" not in job.error
    with pytest.raises(CeVAEError, match="is not a CeVAEAnomaly model bundle"):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before and not job.folder.exists()


def test_the_model_path_is_checked_before_a_worker_starts(head_scene, tmp_path, monkeypatch):
    """startDetection, startCalibration and startAdaptation copied the scans and started a worker that then failed on
    a missing model file (modelPath=123 was reported as "The model bundle 123 does not exist"); process() raised
    TypeError (expected str, bytes or os.PathLike object, not int)."""
    scene, volume, mask = head_scene
    other = add_volume(scene, make_head(seed=8)[0], "sub-02_head")
    logic = CeVAEAnomalyLogic()
    starts = [lambda path: logic.startDetection(volume, mask, modelPath=path, device="cpu"),
              lambda path: logic.startCalibration([volume], [mask], tmp_path / "c.cevae", modelPath=path, device="cpu"),
              lambda path: logic.startAdaptation([volume, other], [mask, None], tmp_path / "a.cevae", modelPath=path,
                                                 device="cpu"),
              lambda path: logic.process(volume, mask, modelPath=path, device="cpu")]
    (tmp_path / "jobs").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "jobs"))  # where job folders are made
    for start in starts:
        with pytest.raises(CeVAEError, match="absent.cevae does not exist"):
            start(tmp_path / "absent.cevae")
        with pytest.raises(CeVAEError, match=r"modelPath must be the path of a .cevae file .*, got int"):
            start(123)
    assert not any((tmp_path / "jobs").iterdir())  # no job folder was made


@pytest.mark.parametrize("kind", ["a NUL byte", "a link loop", "a name too long"])
def test_a_model_path_the_system_cannot_look_up_is_said_as_such(head_scene, tmp_path, monkeypatch, kind):
    """A model path holding a NUL byte (pasted text) or ending in a loop of symbolic links was refused as "The model
    bundle ... does not exist" (the NUL byte printed as it is), and one with a name too long raised OSError, from
    every start and from loadModel: Path.is_file answers False for the first two and raises for the third."""
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    (tmp_path / "loop").symlink_to(tmp_path / "loop.cevae")
    (tmp_path / "loop.cevae").symlink_to(tmp_path / "loop")
    path, said = {
        "a NUL byte": (f"{tmp_path}/site\0.cevae",
                       r"path .*/site\\0\.cevae holds a NUL byte \(\\0\), which no file name can hold\.$"),
        "a link loop": (str(tmp_path / "loop.cevae"),
                        r".*/loop\.cevae cannot be opened: too many levels of symbolic links\.$"),
        "a name too long": (str(tmp_path / ("m" * 300 + ".cevae")),
                            r".*m\.\.\. cannot be opened: file name too long\.$"),
    }[kind]
    starts = [lambda: logic.startDetection(volume, mask, modelPath=path, device="cpu"),
              lambda: logic.startCalibration([volume], [mask], tmp_path / "c.cevae", modelPath=path, device="cpu"),
              lambda: logic.process(volume, mask, modelPath=path, device="cpu"),
              lambda: logic.loadModel(path, device="cpu")]
    (tmp_path / "jobs").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "jobs"))  # where job folders are made
    for start in starts:
        with pytest.raises(CeVAEError, match="^The model bundle " + said):
            start()
    assert not any((tmp_path / "jobs").iterdir())


def test_the_worker_command_line_reports_bad_requests(tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"task": "train"}))
    out = subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.slicer.worker", str(request)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"error": "Unknown worker task 'train'."}


DAMAGED_REQUESTS = {
    "cut short": ('{"task": "detect", "image": "/tmp/in', r"is not JSON \(Unterminated string"),
    "not an object": ('["detect"]', r"holds a list, not a request"),
    "a field missing": ('{"task": "detect", "request": {}}', r"'image' is missing"),
    "a path of another type": ('{"task": "detect", "image": 5, "request": {}, "out_dir": "/tmp"}',
                               r"'image' is 5, not text"),
    "a subject without its image": ('{"task": "calibrate", "subjects": [{"mask": null}], "request": {}, '
                                    '"out": "/tmp/x.cevae", "overwrite": false}', r"subject 1: 'image' is missing"),
    "an owner that is no process id": ('{"task": "detect", "image": "/tmp/in.nrrd", "request": {}, "out_dir": "/tmp",'
                                       ' "owner_pid": "abc"}', r"'owner_pid' is 'abc', not a process id"),
}


@pytest.mark.parametrize("case", DAMAGED_REQUESTS)
def test_a_damaged_request_file_is_refused_in_one_clear_line(tmp_path, case):
    """A request file cut short, edited or of another shape: one line naming the file and what is wrong (it was an
    'Unexpected error' with a traceback: a JSONDecodeError, AttributeError, KeyError or TypeError)."""
    content, message = DAMAGED_REQUESTS[case]
    request = tmp_path / "request.json"
    request.write_text(content, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.slicer.worker", str(request)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == "", out.stderr
    error = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert error.startswith(f"The worker's request file {request} is damaged: ") and "\n" not in error, error
    assert re.search(message, error), error


def test_calibration_in_a_worker_writes_a_calibrated_model(tiny_bundle, tmp_path):
    scene = slicer.vtkMRMLScene()
    volumes, masks = [], []
    for seed in (11, 12):
        image, mask = make_head(seed=seed)
        volumes.append(add_volume(scene, image, f"healthy {seed}"))
        masks.append(add_volume(scene, mask, f"mask {seed}", "vtkMRMLLabelMapVolumeNode"))
    out = tmp_path / "site.cevae"
    post = dict(rim_mm=1.0, median_radius=0, min_volume_mm3=10.0)
    again = add_volume(scene, make_head(seed=11)[0], "healthy 11 again")  # the same scan loaded twice: scored once
    job = CeVAEAnomalyLogic().startCalibration([*volumes, again], [*masks, None], out, modelPath=tiny_bundle,
                                               device="cpu", postprocess=post)
    seen = run_to_end(job, timeout=300)
    assert job.state is JobState.DONE, job.error
    assert job.done["model"] == str(out) and job.done["subjects"] == 2
    assert any("Healthy volume 2/2" in message for _, message in seen)
    # the warning names the nodes, not the worker's temporary copies of them
    assert "'healthy 11 again' repeats the image 'healthy 11' (same content); it is used once." in job.warnings
    assert not any(".nrrd" in w for w in job.warnings), job.warnings
    header = read_header(out)
    assert header.extra["calibration_subjects"] == ["healthy 11", "healthy 12"]  # the nodes', not the copies'
    settings = ModelSettings(out, header)
    assert {k: settings.postprocess[k] for k in post} == post  # the model's other fields stay
    assert all(settings.calibrated(t) for t in ("combi", "rec", "grad"))
    assert not job.folder.exists()  # the copies of the scans go as the job ends (the documented console flow)

    with pytest.raises(CeVAEError, match=r"site\.cevae exist\(s\); choose another file, or pass overwrite=True"):
        CeVAEAnomalyLogic().startCalibration(volumes[:1], [None], out, modelPath=tiny_bundle, device="cpu")

    # a file made after the start (another job, the user): the worker refuses it too, before loading anything
    from CeVAEAnomalyLib.slicer.worker import run_calibrate

    task = {"request": {}, "subjects": [{"image": str(out)}], "out": str(out), "model": str(tiny_bundle)}
    with pytest.raises(CeVAEError, match=r"site\.cevae exists already"):
        run_calibrate(task, None)


def test_a_volume_with_a_very_long_name_is_calibrated_on(tiny_bundle, tmp_path):
    """Its copy for the worker was named after the whole node name: 311 bytes, refused as "The output name
    01_T1_xxx... is 311 bytes long" (and on Windows any name past about 150 characters passed 260 in all)."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=11)
    volume = add_volume(scene, image, "T1 " + "x" * 300)
    brain = add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    out = tmp_path / "site.cevae"
    job = CeVAEAnomalyLogic().startCalibration([volume], [brain], out, modelPath=tiny_bundle, device="cpu")
    assert sorted(len(p.name) for p in job.folder.iterdir() if p.suffix == ".nrrd") == [56, 61]  # 01_T1_x...nrrd
    run_to_end(job, timeout=300)
    assert job.state is JobState.DONE, job.error
    assert read_header(out).extra["calibration_subjects"] == ["T1 " + "x" * 300]  # the node's name, whole


def test_a_model_made_in_slicer_records_the_scans_by_their_node_names(tiny_bundle, tmp_path, capsys):
    """The worker's copies are named 01_<name>, 02_<name>, and the calibrated copy recorded those file stems
    ("01_healthy", its calibration_subjects and recalibration scans), which info and the panel's details showed. It
    records the nodes' names now, told apart where two nodes share one, and its warnings call the scans the same."""
    from CeVAEAnomalyLib.cli.main import main

    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=seed)[0], "healthy") for seed in (11, 12)]
    again = add_volume(scene, make_head(seed=11)[0], "healthy 11")  # the first scan loaded again: scored once
    # the brain mask of every head of make_head's grid: no mask to compute (the repeat's is never used)
    brain = add_volume(scene, make_head(seed=11)[1], "mask", "vtkMRMLLabelMapVolumeNode")
    out = tmp_path / "site.cevae"
    job = CeVAEAnomalyLogic().startCalibration([*volumes, again], [brain, brain, None], out, modelPath=tiny_bundle,
                                               device="cpu")
    run_to_end(job, timeout=300)
    assert job.state is JobState.DONE, job.error
    assert "'healthy 11' repeats the image 'healthy (1)' (same content); it is used once." in job.warnings
    header = read_header(out)
    assert header.extra["calibration_subjects"] == ["healthy (1)", "healthy (2)"]
    assert [s["name"] for s in header.extra["recalibration"]["scans"]] == ["healthy (1)", "healthy (2)"]
    assert main(["info", str(out)]) == 0
    said = capsys.readouterr().out
    assert "on 2 healthy scans (healthy (1), healthy (2); their sha256" in said, said
    assert ModelSettings.read(out).details[1] == said.rstrip("\n")  # the panel's details say the same

    from CeVAEAnomalyLib.slicer.nodes import distinct_node_names

    taken = add_volume(scene, make_head(seed=13)[0], "healthy (1)")  # a numbered name is never one taken already
    assert distinct_node_names([volumes[0], taken, volumes[1], volumes[0]]) == [
        "healthy (2)", "healthy (1)", "healthy (3)", "healthy (2)"]  # a node given twice: one


def test_calibration_with_thorough_ticked_calibrates_both_modes(tiny_bundle, tmp_path):
    """The panel's Calibrate with Thorough ticked: the site model offers calibrated sensitivities in both
    modes, and its default mode stays the plain one."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(size=(40, 44, 12), seed=11)  # 8 model slices: the thorough mode's steps are cheaper
    volume, brain = add_volume(scene, image, "healthy"), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    out = tmp_path / "site.cevae"
    job = CeVAEAnomalyLogic().startCalibration([volume], [brain], out, modelPath=tiny_bundle, device="cpu",
                                               thorough=True)
    run_to_end(job, timeout=300)
    assert job.state is JobState.DONE, job.error
    header = read_header(out)
    settings = ModelSettings(out, header)
    assert settings.calibrated("combi") and settings.calibrated("combi", thorough=True)
    assert header.score_options.test_time_steps == 0
    job.cleanup()


def test_calibration_with_a_median_radius_no_model_may_recommend_is_refused_before_any_copy(tiny_bundle, tmp_path,
                                                                                            monkeypatch):
    """The panel's median radius goes to 10 (a detection may ask for it), a model recommends at most 3: Calibrate
    with 4 used to write a model no one could load."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=11)[0], "healthy")
    out = tmp_path / "site.cevae"
    refusal = (r"^Cannot calibrate a model with these options, which it would hold: median_radius "
               r"\(--median-radius\) must be a whole number in \[0, 3\] in a model file \(a detection may ask for up "
               r"to 10 with --median-radius\), got 4\.$")
    with pytest.raises(CeVAEError, match=refusal):
        CeVAEAnomalyLogic().startCalibration([volume], [None], out, modelPath=tiny_bundle, device="cpu",
                                             postprocess={"median_radius": 4})
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []  # nothing copied


def test_calibration_refuses_to_replace_its_model_even_through_a_hard_link(tiny_bundle, tmp_path):
    """The calibrated model may not land on the model it starts from, by path, link or inode."""
    import os

    from CeVAEAnomalyLib.options import DetectionRequest
    from CeVAEAnomalyLib.slicer.worker import run_calibrate

    image, mask = make_head(seed=21)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "h_mask.nii.gz"))
    model = tmp_path / "model.cevae"
    model.write_bytes(tiny_bundle.read_bytes())
    os.link(model, tmp_path / "alias.cevae")
    before = model.read_bytes()
    for out in (model, tmp_path / "alias.cevae"):
        request = dict(subjects=[{"image": str(tmp_path / "h.nii.gz"), "mask": str(tmp_path / "h_mask.nii.gz")}],
                       model=str(model), request=DetectionRequest.of(device="cpu").to_dict(), out=str(out),
                       overwrite=True)
        with pytest.raises(CeVAEError, match="under a new name"):
            run_calibrate(request, lambda fraction, message: None)
    assert model.read_bytes() == before


QUICK_ADAPT = dict(steps=4, batch_size=8, checkpoint_every=2)


def test_adaptation_in_a_worker_writes_an_adapted_model(tiny_bundle, tmp_path):
    scene, volumes, masks = site_scene()
    out = tmp_path / "scanner.cevae"
    before = mrml.node_ids(scene)
    job = CeVAEAnomalyLogic().startAdaptation(volumes, masks, out, modelPath=tiny_bundle, device="cpu",
                                              options=QUICK_ADAPT)
    seen = run_to_end(job, timeout=300)
    assert job.state is JobState.DONE, job.error
    assert job.done == {"model": str(out), "subjects": 2}
    assert mrml.node_ids(scene) == before
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)
    assert any(m.startswith("Fine-tuning 3/3 (final model") for _, m in seen)
    header = read_header(out)
    adaptation = header.extra["adaptation"]
    names = [s["name"] for s in adaptation["site_scans"]]  # in the order of their contents, not as listed
    assert sorted(names) == ["site a", "site b"]  # the nodes', not the copies'
    assert [f["held_out"] for f in adaptation["folds"]] == [[names[0]], [names[1]]]
    assert any(m.startswith(f"Fine-tuning 1/3 (without {names[0]})") for _, m in seen)
    assert ModelSettings(out, header).calibrated("combi")
    assert not job.folder.exists()  # the copies of the scans go as the job ends, without job.cleanup()


def test_adaptation_options_the_checks_accept_reach_the_worker(tiny_bundle, tmp_path):
    """NumPy numbers and a cache folder given as a Path pass the options' checks; the request file carried them as
    given, and json.dumps raised TypeError ("Object of type int64 is not JSON serializable") after every scan
    was copied. The worker now gets the checked options."""
    scene, volumes, masks = site_scene()
    out, cache = tmp_path / "scanner.cevae", tmp_path / "slice cache é"
    options = dict(steps=np.int64(4), batch_size=np.int32(8), checkpoint_every=np.int64(2), lr=np.float32(1e-4),
                   cache_dir=cache)
    job = CeVAEAnomalyLogic().startAdaptation(volumes, masks, out, modelPath=tiny_bundle, device="cpu",
                                              options=options)
    run_to_end(job, timeout=300)
    assert job.state is JobState.DONE, job.error
    assert read_header(out).extra["adaptation"]["steps_per_run"] == 4
    assert any(cache.iterdir())  # the slice cache went where it was asked to


def test_an_adaptation_is_refused_before_any_copy_in_the_consoles_words(tiny_bundle, tmp_path, monkeypatch):
    """A typo in the options, a folder or an earlier run's files as the output, a device name: refused at the
    start (no job, no copy of a scan), naming the API's arguments, not the command line's flags."""
    scene, volumes, masks = site_scene()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "scanner.cevae"
    logic = CeVAEAnomalyLogic()
    start = functools.partial(logic.startAdaptation, volumes, masks, modelPath=tiny_bundle, device="cpu")
    cases = [(dict(outputPath=out, options={"stepz": 5}), r"Unknown adaptation option\(s\) 'stepz'; known: .*steps"),
             (dict(outputPath=out, options={"steps": 0}), "steps must be at least 1"),
             (dict(outputPath=tmp_path), "is a folder"),
             (dict(outputPath=out, device="gpu"), "device"),
             (dict(outputPath=tmp_path / "old.cevae"),
              r"old\.cevae\.log\.csv exist\(s\); .*overwrite=True to replace them\.$"),
             (dict(outputPath=tmp_path / "old.cevae", options={"resume": True}), "no interrupted adaptation to"),
             (dict(outputPath=tmp_path / "cut.cevae"),
              r"cut\.cevae\.fold1\.ckpt exist\(s\); .*overwrite=True .*options=\{'resume': True\}"),
             (dict(outputPath=tmp_path / "lone.cevae", options={"resume": True}),
              r"no interrupted adaptation to .*lone\.cevae to resume")]
    for name in ("old.cevae", "old.cevae.ckpt", "old.cevae.log.csv"):  # a finished run: nothing to resume
        (tmp_path / name).write_bytes(b"an earlier run's file")
    (tmp_path / "cut.cevae.fold1.ckpt").write_bytes(b"a checkpoint")  # interrupted: resumable
    (tmp_path / "lone.cevae.fold1.log.csv").write_text("step,loss\n")  # stopped before its first checkpoint
    for arguments, message in cases:
        with pytest.raises(CeVAEError, match=message) as err:
            start(**arguments)
        assert "--" not in str(err.value), err.value
    assert list((tmp_path / "tmp").iterdir()) == []


def test_calibration_and_adaptation_refuse_what_is_not_a_healthy_scan_at_once(tmp_path, monkeypatch):
    """As process() does for its input: a node given by name, one node instead of a list, a segmentation or a
    labelmap (a mask) as a healthy scan, a volume as its own mask: each named at once, before any copy or worker
    (they raised AttributeError or TypeError, or the worker failed later saying the brain was nearly constant)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=11)
    a, b = add_volume(scene, image, "a"), add_volume(scene, make_head(seed=12)[0], "b")
    label = add_volume(scene, mask, "mask a", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    cases = [(["a", "b"], [None, None], r"healthy volume must be a scalar volume node .*, not a str\.$"),
             (a, [None, None], "volumes must be a list of nodes .*, not vtkMRMLScalarVolumeNode 'a'"),
             ([a, b], label, "masks must be a list of nodes .*, not vtkMRMLLabelMapVolumeNode 'mask a'"),
             ([segmentation, b], [None, None],
              r"healthy volume must be a scalar volume node .*, not vtkMRMLSegmentationNode 'brain'"),
             ([label, b], [None, None], r"'mask a' is a labelmap volume \(labels, not intensities\)"),
             ([a, b], [a, None], "The brain mask 'a' is the healthy volume itself"),
             ([a, b], ["mask a", None], "brain mask must be a labelmap volume or segmentation node, not a str")]
    logic = CeVAEAnomalyLogic()
    for start in (logic.startCalibration, logic.startAdaptation):
        for volumes, masks, message in cases:
            with pytest.raises(CeVAEError, match=message):
                start(volumes, masks, tmp_path / "site.cevae", device="cpu")
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing copied


def test_a_healthy_volume_without_usable_voxels_is_named_as_a_healthy_volume(tmp_path, monkeypatch):
    """A healthy volume holding no voxels, or colour voxels, was refused as "The input volume 'X'": in the panel the
    input volume is another field (the scan examined), so the message pointed at the wrong one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scene = slicer.vtkMRMLScene()
    a = add_volume(scene, make_head(seed=11)[0], "a")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    voxels = vtk.vtkImageData()
    voxels.SetDimensions(20, 20, 20)
    voxels.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(voxels)
    logic = CeVAEAnomalyLogic()
    for start in (logic.startCalibration, logic.startAdaptation):
        for volume, message in ((empty, "The healthy volume 'empty' holds no image data"),
                                (rgb, "The healthy volume 'photo' has 3 components per voxel")):
            with pytest.raises(CeVAEError, match=message):
                start([a, volume], [None, None], tmp_path / "site.cevae", device="cpu")
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left


def test_cancel_stops_an_adaptation_and_writes_no_model(tiny_bundle, tmp_path, monkeypatch):
    scene, volumes, masks = site_scene()
    out = tmp_path / "scanner.cevae"
    worker_tmp = tmp_path / "tmp"  # the worker's own temporary folder: no other test's caches in it
    worker_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(worker_tmp))
    job = CeVAEAnomalyLogic().startAdaptation(volumes, masks, out, modelPath=tiny_bundle, device="cpu",
                                              options=dict(QUICK_ADAPT, steps=100_000))
    deadline = time.monotonic() + 120
    while not job.message.startswith("Fine-tuning"):
        assert not job.poll() and time.monotonic() < deadline, job.error or "no fine-tuning step in 120 s"
        time.sleep(0.02)
    assert len(list(worker_tmp.glob("cevae-adapt-*"))) == 1  # the run's slice cache, while it fine-tunes
    start = time.monotonic()
    job.cancel()
    assert time.monotonic() - start < 1.0
    assert job.state is JobState.CANCELLED and not out.exists()
    assert list(worker_tmp.glob("cevae-adapt-*")) == []  # its slice cache removed on SIGTERM
    assert not job.folder.exists()  # and the copies of the scans, without job.cleanup()


# --- Cancel ends the whole process tree (PythonSlicer is a launcher that forwards no signal) ----

LAUNCHER = '''#!{python}
"""Stand-in for Slicer's PythonSlicer (a CTK AppLauncher): runs the real interpreter as a CHILD
and forwards no signal to it. {sigterm}"""
import signal, subprocess, sys
{ignore}
child = subprocess.Popen([{python!r}] + sys.argv[1:])
with open({pidfile!r}, "w") as f:
    f.write(str(child.pid))
sys.exit(child.wait())
'''


def stand_in_launcher(tmp_path, ignore_sigterm: bool):
    """(path of a launcher-like interpreter, file where it writes the real worker's pid)."""
    import os

    pidfile = tmp_path / "worker.pid"
    script = tmp_path / ("launcher-ignoring" if ignore_sigterm else "launcher")
    script.write_text(LAUNCHER.format(
        python=sys.executable, pidfile=str(pidfile),
        sigterm="It ignores SIGTERM." if ignore_sigterm else "SIGTERM ends it alone.",
        ignore="signal.signal(signal.SIGTERM, signal.SIG_IGN)" if ignore_sigterm else ""))
    script.chmod(0o755)
    if os.name != "posix":
        pytest.skip("the stand-in launcher is a POSIX script")
    return script, pidfile


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie that nobody reaped, as in a container without init, does not)."""
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def working(job: WorkerJob, pidfile, timeout: float = 120.0) -> int:
    """Wait until the real worker reports progress; its pid."""
    assert wait_until(lambda: job.poll() or job.fraction > 0.0, timeout), "the worker did not start"
    assert not job.finished, job.error
    return int(pidfile.read_text())


@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["launcher dies", "launcher ignores SIGTERM"])
def test_cancel_ends_the_worker_behind_a_launcher(head_scene, tiny_bundle, tmp_path, ignore_sigterm):
    scene, volume, _ = head_scene
    launcher, pidfile = stand_in_launcher(tmp_path, ignore_sigterm)
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, None, modelPath=tiny_bundle, device="cpu", python=str(launcher))
    worker = working(job, pidfile)
    folder = job.folder
    start = time.monotonic()
    logic.discardJob(job)
    assert time.monotonic() - start < 2.0
    assert wait_until(lambda: not alive(worker), 2.0), "the real worker outlived Cancel"
    assert job.process.poll() is not None and job.state is JobState.CANCELLED
    time.sleep(1.0)
    assert not folder.exists()  # nothing re-created the temporary folder


def test_the_worker_stops_by_itself_when_its_folder_is_removed(head_scene, tiny_bundle, tmp_path):
    """Slicer gone or unable to kill (the launcher lives on): removing the job's folder stops the worker."""
    scene, volume, _ = head_scene
    launcher, pidfile = stand_in_launcher(tmp_path, ignore_sigterm=True)
    job = CeVAEAnomalyLogic().startDetection(volume, None, modelPath=tiny_bundle, device="cpu",
                                             python=str(launcher))
    worker = working(job, pidfile)
    job.cleanup()  # no cancel: only the folder goes
    # (a 0.25 s poll and at most 5 s of grace)
    assert wait_until(lambda: not alive(worker), 8.0), "the worker went on without its request"
    assert wait_until(job.poll, 5.0) and job.process.returncode == 3
    assert not job.folder.exists()


def test_a_job_whose_folder_was_removed_says_so_not_that_its_worker_stopped_unexpectedly(head_scene, tiny_bundle):
    """A clean-up of temporary files removes a running detection's folder: its worker stops by itself, and the panel
    said "The worker process stopped unexpectedly (exit status 3)." It now names the folder and says what happened;
    nothing is loaded."""
    import shutil

    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
    while job.fraction == 0.0:  # the worker has read its request and the scan
        assert not job.poll(), job.error
        time.sleep(0.05)
    shutil.rmtree(job.folder)
    assert job.wait(60) is JobState.FAILED
    said = (f"The run's temporary folder {job.folder} was removed while it ran (by a clean-up of temporary files?), "
            "so its worker stopped; nothing was written. Run it again.")
    assert job.error == said
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError) as failed:
        logic.finishDetection(job)
    assert str(failed.value) == said and mrml.node_ids(scene) == before


def test_the_worker_behind_a_launcher_stops_and_cleans_up_when_slicer_dies(head_scene, tiny_bundle, tmp_path,
                                                                          monkeypatch):
    """Slicer killed: the launcher lives on as the worker's parent, so the worker watches Slicer's pid (given
    in the request) and removes the job's folder, which holds a copy of the scan, as nobody else will."""
    import os

    scene, volume, _ = head_scene
    launcher, pidfile = stand_in_launcher(tmp_path, ignore_sigterm=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the "Slicer" of this job
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: gone.pid)
        job = CeVAEAnomalyLogic().startDetection(volume, None, modelPath=tiny_bundle, device="cpu",
                                                 python=str(launcher))
    assert json.loads((job.folder / "request.json").read_text())["owner_pid"] == gone.pid
    assert wait_until(job.poll, 60.0), "the worker went on after its owner ended"
    assert job.process.returncode == 3 and job.done is None
    assert not job.folder.exists()  # removed by the worker itself: no job.cleanup() here
    worker = int(pidfile.read_text())
    assert not alive(worker)


def test_a_cancelled_calibration_never_writes_its_model(tiny_bundle, tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=11)[0], "healthy")  # one: read before the cancel
    launcher, pidfile = stand_in_launcher(tmp_path, ignore_sigterm=False)
    out = tmp_path / "models" / "site.cevae"
    out.parent.mkdir()
    logic = CeVAEAnomalyLogic()
    job = logic.startCalibration([volume], [None], out, modelPath=tiny_bundle, device="cpu", python=str(launcher))
    worker = working(job, pidfile)
    logic.discardJob(job)
    assert wait_until(lambda: not alive(worker), 300.0)  # today's bug: it finishes and writes the model
    assert list(out.parent.iterdir()) == []  # no model, no temporary file


# --- the pipe: any byte is read, the end always arrives --------------------------------------

BAD_BYTES_WORKER = '''#!{python}
import sys
sys.stdout.buffer.write(b"warning from a library: caf\\xe9 \\x81\\xff\\n")
sys.stdout.buffer.write(b'{{"progress": 0.5, "message": "half"}}\\n')
sys.stdout.buffer.write(b'{{"done": {{"answer": 42}}}}\\n')
'''


def slicer_like_text_launcher(args):
    """As ``slicer.util.launchConsoleProcess`` opens the pipe: text in the locale's encoding (Windows: cp1252)."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                            encoding="cp1252")


@pytest.mark.parametrize("launch", [None, slicer_like_text_launcher], ids=["module's launcher", "text pipe"])
def test_an_undecodable_byte_does_not_hang_the_job(tmp_path, launch):
    worker = tmp_path / "worker"
    worker.write_text(BAD_BYTES_WORKER.format(python=sys.executable))
    worker.chmod(0o755)
    folder = tmp_path / "job"
    folder.mkdir()
    job = WorkerJob({"task": "detect"}, folder, launch=launch, python=str(worker))
    assert wait_until(job.poll, 20.0), "the job never ended"
    assert job.state is JobState.DONE and job.done == {"answer": 42} and job.fraction == 0.5
    assert job.output[0].startswith("warning from a library: caf") and "\ufffd" in job.output[0]


def test_an_output_node_deleted_during_a_run_is_made_again(head_scene, tiny_bundle):
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    first = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    outputs = mrml.OutputNodes(score=first.nodes.score, segmentation=first.nodes.segmentation,
                               components=first.nodes.components)
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3, outputs=outputs)
    scene.RemoveNode(first.nodes.score)  # the user deletes the score volume and the table meanwhile
    scene.RemoveNode(first.nodes.components)
    run_to_end(job)
    result = logic.finishDetection(job)  # the result is kept
    for name in ("score", "components"):
        node = getattr(result.nodes, name)
        assert node is not getattr(first.nodes, name) and node.GetScene() is scene
        assert nodes.source_volume(node) is volume
    assert result.nodes.segmentation is first.nodes.segmentation  # the one still there is updated
    np.testing.assert_allclose(sitk.GetArrayFromImage(mrml.image_from_volume(result.nodes.score)),
                               sitk.GetArrayFromImage(result.detection.score))


def test_a_score_volume_deleted_during_a_rerun_does_not_send_the_run_into_an_earlier_runs_nodes(head_scene,
                                                                                               tiny_bundle):
    """Run 1, run 2 sent to a new score volume (run 1 kept to compare), then a rerun into run 2's nodes (as the panel
    shows them) whose score volume is deleted meanwhile: the rerun wrote into run 1's score volume, segmentation and
    tables, which the user had kept, and left run 2's stale. It now updates run 2's and makes its score volume anew."""
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    kept = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    kept_scores, kept_rows = mrml.image_from_volume(kept.nodes.score), kept.nodes.components.GetNumberOfRows()
    second = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.5, outputs=mrml.OutputNodes(
        score=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "second score")))
    shown = nodes.outputs_for_input(scene, volume, dict.fromkeys(nodes.PANEL_OUTPUTS))
    assert shown["scoreVolume"] is second.nodes.score and shown["componentTable"] is second.nodes.components
    panel = mrml.OutputNodes(score=shown["scoreVolume"], segmentation=shown["anomalySegmentation"],
                             components=shown["componentTable"])
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=1e6, outputs=panel)
    scene.RemoveNode(second.nodes.score)
    run_to_end(job)
    rerun = logic.finishDetection(job)
    assert rerun.nodes.score is not kept.nodes.score and rerun.nodes.score.GetScene() is scene
    for name in ("segmentation", "components", "slice_table", "slice_chart"):
        assert getattr(rerun.nodes, name) is getattr(second.nodes, name), name
    assert rerun.nodes.components.GetNumberOfRows() == 0  # nothing above the threshold of the rerun
    assert kept.nodes.components.GetNumberOfRows() == kept_rows > 0
    assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(kept.nodes.score)),
                          sitk.GetArrayFromImage(kept_scores))
    assert kept.nodes.score.GetVolumeDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    assert nodes.stored_result(kept.nodes.score).components is kept.nodes.components


# --- outputs belong to their input: a second scan never lands on the first scan's nodes -----------


def two_heads():
    scene = slicer.vtkMRMLScene()
    heads = []
    for name, seed in (("patient A", 7), ("patient B", 8)):
        image, mask = make_head(seed=seed)
        heads.append((add_volume(scene, image, name), add_volume(scene, mask, f"{name} mask",
                                                                  "vtkMRMLLabelMapVolumeNode")))
    return scene, heads


def test_a_second_scan_never_replaces_the_first_scans_results(tiny_bundle):
    scene, ((a, a_mask), (b, b_mask)) = two_heads()
    logic = CeVAEAnomalyLogic()
    first = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    kept = {name: mrml.image_from_volume(getattr(first.nodes, name)) for name in ("score", "labelmap")}
    rows = first.nodes.components.GetNumberOfRows()
    # what the panel used to do: run B with the output nodes it showed for A
    job = logic.startDetection(b, b_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3, outputs=first.nodes)
    run_to_end(job)
    second = logic.finishDetection(job)
    for name in ("score", "labelmap", "segmentation", "components", "slice_table", "slice_chart"):
        mine, theirs = getattr(second.nodes, name), getattr(first.nodes, name)
        assert mine is not theirs, name
        assert nodes.source_volume(mine) is b and nodes.source_volume(theirs) is a, name
    for name, image in kept.items():  # A's results are untouched
        assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(getattr(first.nodes, name))),
                              sitk.GetArrayFromImage(image))
    assert first.nodes.components.GetNumberOfRows() == rows
    assert "patient A" in first.nodes.score.GetName() and "patient B" in second.nodes.score.GetName()

    # a new run on B updates B's own nodes
    again = logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu", threshold=0.2, outputs=second.nodes)
    assert again.nodes.score is second.nodes.score and again.nodes.components is second.nodes.components


def first_scan_processed(tiny_bundle):
    """Two heads, A processed; the output fields the panel then shows for A."""
    scene, ((a, a_mask), (b, b_mask)) = two_heads()
    logic = CeVAEAnomalyLogic()
    first = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    panel = {"scoreVolume": first.nodes.score, "anomalySegmentation": first.nodes.segmentation,
             "anomalyLabelmap": None, "componentTable": first.nodes.components}
    return scene, logic, (a, b, b_mask), first, panel


def test_the_panel_shows_each_inputs_own_outputs(tiny_bundle):
    scene, logic, (a, b, b_mask), first, panel = first_scan_processed(tiny_bundle)
    assert nodes.outputs_for_input(scene, a, panel) == panel
    assert nodes.outputs_for_input(scene, b, panel) == dict.fromkeys(panel)  # B has none yet: made on Apply
    second = logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    assert nodes.outputs_for_input(scene, b, panel) == {
        "scoreVolume": second.nodes.score, "anomalySegmentation": second.nodes.segmentation,
        "anomalyLabelmap": None, "componentTable": second.nodes.components}
    assert nodes.outputs_for_input(scene, a, dict.fromkeys(panel)) == panel  # back to A: its own results
    picked = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")  # linked to no input yet
    assert nodes.outputs_for_input(scene, b, dict(panel, anomalySegmentation=picked))["anomalySegmentation"] is picked


def test_a_jump_into_a_scans_results_shows_them_when_the_views_show_another_scans(tiny_bundle):
    """A processed, then B (the views show B under its heat map), then A selected again: the panel shows A's table and
    jump, and the jump (or a row) moved the views that showed B to A's finding, into B's anatomy under B's heat map. It
    now shows A's run over A first, unless a view shows it already."""
    import ast

    from test_slicer_module import module_classes

    scene, logic, (a, b, b_mask), first, panel = first_scan_processed(tiny_bundle)
    second = logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    for view in views:  # what showResults (slicer.util.setSliceViewerLayers) left after B's run
        view.SetBackgroundVolumeID(b.GetID())
        view.SetForegroundVolumeID(second.nodes.score.GetID())
    shown = nodes.outputs_for_input(scene, a, dict.fromkeys(panel))  # A selected again
    assert shown["componentTable"] is first.nodes.components
    for output in (first.nodes.score, shown["componentTable"]):  # the jump's and a row's run
        assert nodes.run_frame(output) is first.nodes.score and nodes.source_volume(output) is a
        assert not nodes.shows_result(scene, nodes.run_frame(output), a)
    assert nodes.shows_result(scene, second.nodes.score, b)
    views[1].SetBackgroundVolumeID(a.GetID())
    views[1].SetForegroundVolumeID(first.nodes.score.GetID())
    assert nodes.shows_result(scene, first.nodes.score, a)  # one view shows A's run: the views are left as they are
    methods = {n.name: ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
               if isinstance(n, ast.FunctionDef)}
    for handler, output in (("onJumpToTopSlice", "stored.score"), ("onComponentClicked", "table")):
        code = methods[handler]
        assert code.index(f"self._showRunOf({output})") < code.index("self.logic.jumpToSlice("), handler
    show = methods["_showRunOf"]
    assert "not shows_result(slicer.mrmlScene, score, volume)" in show
    assert "self.logic.showResults(score, volume" in show


def test_the_outputs_of_a_deleted_scan_are_not_offered_to_the_next(tiny_bundle):
    """MRML drops an output's reference when its input is deleted; the output still holds that input's results."""
    scene, logic, (a, b, b_mask), first, panel = first_scan_processed(tiny_bundle)
    scene.RemoveNode(a)
    assert nodes.source_volume(first.nodes.score) is None  # the orphan keeps its role, not its source
    assert nodes.outputs_for_input(scene, b, panel) == dict.fromkeys(panel)
    kept = sitk.GetArrayFromImage(mrml.image_from_volume(first.nodes.score))
    second = logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3,
                           outputs=mrml.OutputNodes(score=first.nodes.score, components=first.nodes.components))
    assert second.nodes.score is not first.nodes.score and second.nodes.components is not first.nodes.components
    assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(first.nodes.score)), kept)


def test_a_processed_scan_picked_as_an_output_is_not_overwritten(tiny_bundle):
    scene, ((a, a_mask), (b, b_mask)) = two_heads()
    logic = CeVAEAnomalyLogic()
    logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    scan_b = sitk.GetArrayFromImage(mrml.image_from_volume(b))
    assert nodes.outputs_for_input(scene, a, {"scoreVolume": b})["scoreVolume"] is None
    result = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3,
                           outputs=mrml.OutputNodes(score=b))
    assert result.nodes.score is not b and nodes.source_volume(result.nodes.score) is a
    assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(b)), scan_b)
    assert not b.GetAttribute(nodes.ROLE_ATTRIBUTE)
    # a score volume of A's own is not taken for its labelmap or segmentation role
    assert not nodes.belongs_to(result.nodes.score, a, nodes.LABELMAP_ROLE)


def test_a_run_sent_to_new_nodes_is_the_one_the_panel_and_the_jump_use(tiny_bundle):
    """A later run into new output nodes ("Create new ..."): the earlier nodes keep their link to the scan, but the
    jump, the stored tables and the outputs offered for the scan are the later run's."""
    scene, ((a, a_mask), _) = two_heads()
    logic = CeVAEAnomalyLogic()
    first = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    fresh = mrml.OutputNodes(score=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "new score"),
                             components=scene.AddNewNodeByClass("vtkMRMLTableNode", "new table"))
    second = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.5, outputs=fresh)
    assert second.nodes.score is fresh.score and second.nodes.components is fresh.components
    assert nodes.source_volume(first.nodes.components) is a  # the earlier run's table is still A's
    stored = nodes.stored_result(second.nodes.score)
    assert stored.components is fresh.components and stored.slice_table is second.nodes.slice_table
    for name in ("slice_table", "slice_chart", "segmentation"):  # the earlier run's nodes are left as they were
        assert getattr(second.nodes, name) is not getattr(first.nodes, name), name
    earlier = nodes.stored_result(first.nodes.score)  # each score volume with its own run's tables and chart
    assert (earlier.components, earlier.slice_table, earlier.slice_chart) == (
        first.nodes.components, first.nodes.slice_table, first.nodes.slice_chart)
    shown = nodes.outputs_for_input(scene, a, dict.fromkeys(nodes.PANEL_OUTPUTS))
    assert shown["scoreVolume"] is fresh.score and shown["componentTable"] is fresh.components


def test_a_run_into_a_users_volume_that_holds_voxels_keeps_it_and_gets_nodes_of_its_own(tiny_bundle):
    """A volume of the user's (with voxels) picked as the score output keeps its voxels; the run goes to a new score
    volume with tables, segmentation and chart of its own, and the earlier run's are left as they were."""
    scene, ((a, a_mask), _) = two_heads()
    logic = CeVAEAnomalyLogic()
    first = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    rows = first.nodes.components.GetNumberOfRows()
    assert rows > 0
    scratch = add_volume(scene, make_head(seed=3)[0], "scratch")
    voxels = sitk.GetArrayFromImage(mrml.image_from_volume(scratch))
    second = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=1e6,
                           outputs=mrml.OutputNodes(score=scratch))
    assert second.nodes.score is not scratch and second.nodes.score is not first.nodes.score
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(scratch)), voxels)
    for name in ("components", "slice_table", "slice_chart", "segmentation"):
        assert getattr(second.nodes, name) is not getattr(first.nodes, name), name
    assert first.nodes.components.GetNumberOfRows() == rows and second.nodes.components.GetNumberOfRows() == 0
    assert nodes.stored_result(first.nodes.score).components is first.nodes.components


@pytest.mark.parametrize("name, class_name", [("score", "vtkMRMLLabelMapVolumeNode"),
                                              ("score", "vtkMRMLVectorVolumeNode"),
                                              ("labelmap", "vtkMRMLScalarVolumeNode"),
                                              ("segmentation", "vtkMRMLTableNode"),
                                              ("components", "vtkMRMLPlotChartNode")])
def test_an_output_of_the_wrong_kind_is_refused_before_anything_is_written(tiny_bundle, name, class_name):
    scene, ((a, a_mask), _) = two_heads()
    wrong = scene.AddNewNodeByClass(class_name, "picked")
    if wrong.IsA("vtkMRMLVolumeNode"):
        mrml.update_volume_from_image(wrong, make_head(seed=3)[1])
    kept = sitk.GetArrayFromImage(mrml.image_from_volume(wrong)) if wrong.IsA("vtkMRMLVolumeNode") else None
    before = mrml.node_ids(scene)
    for start in (CeVAEAnomalyLogic().process, CeVAEAnomalyLogic().startDetection):
        with pytest.raises(CeVAEError, match=f"'picked' .*cannot be the {name} output"):
            start(a, a_mask, modelPath=tiny_bundle, device="cpu", outputs=mrml.OutputNodes(**{name: wrong}))
    assert mrml.node_ids(scene) == before and not wrong.GetAttribute(nodes.ROLE_ATTRIBUTE)
    if kept is not None:
        assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(wrong)), kept)


def test_a_volume_of_another_scene_or_of_none_is_refused_at_once(tiny_bundle):
    scene_a, ((a, a_mask), _) = two_heads()
    scene_b, _ = two_heads()  # its nodes have the same IDs as scene A's
    with pytest.raises(CeVAEError, match="'patient A' is in another scene"):
        CeVAEAnomalyLogic(scene_b).process(a, a_mask, modelPath=tiny_bundle, device="cpu")
    loose = slicer.vtkMRMLScalarVolumeNode()
    loose.SetName("loose")
    mrml.update_volume_from_image(loose, make_head()[0])
    with pytest.raises(CeVAEError, match="'loose' is not in an MRML scene; add it to the scene first"):
        CeVAEAnomalyLogic(scene_a).process(loose, modelPath=tiny_bundle, device="cpu")
    with pytest.raises(CeVAEError, match="mask 'patient A mask' is not in the input volume's scene"):
        CeVAEAnomalyLogic().process(scene_b.GetFirstNodeByName("patient A"), a_mask, modelPath=tiny_bundle)
    assert not any(scene_b.GetNthNode(i).GetAttribute(nodes.ROLE_ATTRIBUTE) for i in range(scene_b.GetNumberOfNodes()))


def test_results_are_not_loaded_onto_a_volume_moved_while_the_job_ran(head_scene, tiny_bundle):
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    before = mrml.node_ids(scene)
    volume.SetSpacing(2.0, 2.0, 2.0)  # e.g. a transform hardened or the volume resampled meanwhile
    run_to_end(job)
    assert job.state is JobState.DONE, job.error
    with pytest.raises(CeVAEError, match="'head' was moved while the detection ran: its origin, spacing or"):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before and not job.folder.exists()
    with pytest.raises(CeVAEError, match="loaded or discarded already"):
        logic.finishDetection(job)

    # a transform set on the input meanwhile (not hardened) leaves its grid: the outputs follow the transform
    volume.SetSpacing(*make_head(seed=7)[0].GetSpacing())
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    volume.SetAndObserveTransformNodeID(moved.GetID())
    run_to_end(job)
    result = logic.finishDetection(job)
    assert result.nodes.score.GetTransformNodeID() == moved.GetID()


def test_results_are_not_loaded_onto_voxels_that_changed_while_the_detection_ran(head_scene, tiny_bundle):
    """Another frame of a sequence shown, or an edit, on the same grid: the results belong to the voxels read,
    in the worker and in process (where a progress callback that runs the GUI lets the user change the scene)."""
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    before = mrml.node_ids(scene)
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    voxels = slicer.util.arrayFromVolume(volume)
    voxels[voxels.shape[0] // 2] += 10.0  # e.g. the sequence browser steps to the next frame
    slicer.util.arrayFromVolumeModified(volume)
    run_to_end(job)
    with pytest.raises(CeVAEError, match="The voxels of the input volume 'head' changed while the detection ran"):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before and not job.folder.exists()

    def edit_voxels() -> None:
        slicer.util.arrayFromVolume(volume)[0] += 1.0
        slicer.util.arrayFromVolumeModified(volume)

    for edit, message in ((edit_voxels, "voxels of the input volume 'head' changed"),
                          (lambda: volume.SetSpacing(3.0, 3.0, 3.0), "'head' was moved while the detection ran")):
        done: list = []

        def halfway(fraction: float, text: str) -> None:
            if 0.5 < fraction < 0.9 and not done:
                done.append(edit())

        with pytest.raises(CeVAEError, match=message):
            logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3, progress=halfway)
        assert done and mrml.node_ids(scene) == before

    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    scene.RemoveNode(volume)  # deleted while the job runs: refused in words, not with an AttributeError
    run_to_end(job)
    with pytest.raises(CeVAEError, match="'head' was removed during the run; its results were discarded"):
        logic.finishDetection(job)


def cropped_in_place(volume) -> None:
    """What Crop Volume does with interpolation off and the input as its output: a part of the voxels, its origin
    moved to the part's first voxel."""
    extract = vtk.vtkExtractVOI()
    extract.SetInputData(volume.GetImageData())
    extract.SetVOI(2, 21, 3, 22, 4, 15)
    extract.Update()
    cropped = vtk.vtkImageData()
    cropped.DeepCopy(extract.GetOutput())
    cropped.SetExtent(0, 19, 0, 19, 0, 11)
    volume.SetOrigin(*(o + 3.0 for o in volume.GetOrigin()))
    volume.SetAndObserveImageData(cropped)


INPUT_CHANGES = {  # how the input changed while its worker ran, and what finishDetection says of it
    "its image data cleared": (lambda volume: volume.SetAndObserveImageData(None),
                               r"^The voxels of the input volume 'head' were cleared \(its image data removed\) while "
                               r"the detection ran; its results have no scan to lie on\. Run the detection again\.$"),
    "cropped in place": (cropped_in_place,
                         r"^The input volume 'head' changed size while the detection ran, from 40x44x36 to 20x20x12 "
                         r"voxels \(cropped or resampled\); its results would not lie on it\. Run the detection "
                         r"again\.$"),
}


@pytest.mark.parametrize("change", INPUT_CHANGES, ids=list(INPUT_CHANGES))
def test_an_input_changed_while_the_job_ran_is_refused_saying_what_changed(head_scene, tiny_bundle, change):
    """An input whose image data was cleared, or cropped in place (Crop Volume into the same node), while its worker
    ran was said to have been "resampled or moved (a transform hardened)". finishDetection now says what changed, from
    what it compares (the voxels, the grid's size, its geometry); nothing is loaded."""
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    before = mrml.node_ids(scene)
    INPUT_CHANGES[change][0](volume)
    run_to_end(job)
    assert job.state is JobState.DONE, job.error
    with pytest.raises(CeVAEError, match=INPUT_CHANGES[change][1]):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before and not job.folder.exists()


def test_a_job_whose_folder_was_removed_after_it_finished_says_so_in_one_line(head_scene, tiny_bundle):
    """A clean-up of temporary files between the job's end and finishDetection: the panel said "could not be read
    ([Errno 2] No such file or directory: '.../detection.json')". It now says the run's temporary folder was removed;
    nothing is loaded."""
    import shutil

    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    run_to_end(job)
    assert job.state is JobState.DONE, job.error
    shutil.rmtree(job.folder)
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError) as failed:
        logic.finishDetection(job)
    assert str(failed.value) == (f"The run's temporary folder {job.folder} was removed after the detection finished "
                                 "(by a clean-up of temporary files?), before its results were loaded; nothing was "
                                 "loaded. Run it again.")
    assert mrml.node_ids(scene) == before


def test_a_result_image_cut_short_is_said_in_one_line_naming_it(head_scene, tiny_bundle):
    """A hand-over image written only in part (a full disk, the worker killed in its write) gave a CeVAEError holding
    ITK's message of seven lines, with C++ source paths and object addresses; it now names the file and what is
    missing, on one line."""
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    run_to_end(job)
    assert job.state is JobState.DONE, job.error
    score = job.folder / "score.nrrd"
    size = score.stat().st_size
    with open(score, "r+b") as cut:
        cut.truncate(size // 2)
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError) as failed:
        logic.finishDetection(job)
    said = str(failed.value)
    assert "\n" not in said and ".cxx" not in said and "0x" not in said, said
    assert said == (f"The detection results in {job.folder} could not be read (score.nrrd is cut short or damaged: "
                    f"{size // 2} of the {size} bytes its header announces).")
    assert mrml.node_ids(scene) == before


def test_progress_lines_without_a_usable_fraction_are_ignored(tmp_path):
    """A line that is not the worker's own (NaN, a string, out of range) neither breaks the poll nor the panel's
    percentage; a fraction beyond [0, 1] is clamped, also a whole number too large for a float (OverflowError)."""
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    lines = ['{"progress": 0.25, "message": "a"}', '{"progress": NaN}', '{"progress": 1e999}',
             '{"progress": "half"}', '{"progress": null}', '{"progress": true}', '{"progress": 0.5, "message": "b"}',
             '{"progress": 7}', '{"progress": 1%s}' % ("0" * 400), '{"done": {}}']  # (10**400: no float)
    script = tmp_path / "worker"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    script.chmod(0o755)
    job = WorkerJob({"task": "detect"}, tmp_path, python=str(script))
    seen = run_to_end(job, timeout=30)
    assert job.state is JobState.DONE
    assert seen == [(0.25, "a"), (0.5, "b"), (1.0, "")]


def test_the_workers_warnings_and_error_name_the_nodes_not_their_temporary_copies(tmp_path):
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    copy, mask = tmp_path / "input.nrrd", tmp_path / "input_mask.nrrd"
    script = tmp_path / "worker"
    script.write_text(f"#!/bin/sh\necho 'WARNING: {mask.name}: the mask covers 2 ml'\n"
                      f"echo '{{\"error\": \"{copy} is not a 3D image; {mask} neither\"}}'\nexit 1\n")
    script.chmod(0o755)
    job = WorkerJob({"task": "detect"}, tmp_path, python=str(script),
                    names={str(copy): "'MRHead'", str(mask): "'brain'"})
    run_to_end(job, timeout=30)
    assert job.warnings == ["'brain': the mask covers 2 ml"]
    with pytest.raises(CeVAEError, match="^'MRHead' is not a 3D image; 'brain' neither$"):
        job.raise_for_failure()


@pytest.mark.parametrize("ending", ["kill -9 $$", "exit 137"])
def test_a_worker_killed_without_a_word_is_said_to_have_most_likely_run_out_of_memory(tmp_path, ending):
    """The out-of-memory killer ends a worker with SIGKILL (a launcher reports it as status 137): the error says what
    that most often means and what to try; another silent end does not blame memory."""
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    script = tmp_path / "worker"
    script.write_text(f"#!/bin/sh\necho 'scoring'\n{ending}\n")
    script.chmod(0o755)
    job = WorkerJob({"task": "detect"}, tmp_path, python=str(script))
    run_to_end(job, timeout=30)
    with pytest.raises(CeVAEError, match=r"(?s)stopped unexpectedly \(exit status (-9|137)\): it was killed, most "
                                         r"often by the system when memory runs out.*smaller batch size.*scoring"):
        job.raise_for_failure()
    script.write_text("#!/bin/sh\nexit 3\n")
    job = WorkerJob({"task": "detect"}, tmp_path, python=str(script))
    run_to_end(job, timeout=30)
    with pytest.raises(CeVAEError, match=r"^The worker process stopped unexpectedly \(exit status 3\)\.$"):
        job.raise_for_failure()


def test_a_job_ends_when_its_worker_does_even_if_a_process_it_started_holds_its_output(tmp_path):
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    script = tmp_path / "worker"
    script.write_text("#!/bin/sh\nsleep 20 &\necho '{\"done\": {\"n\": 1}}'\n")  # the sleep keeps stdout open
    script.chmod(0o755)
    job = WorkerJob({"task": "detect"}, tmp_path, python=str(script))
    run_to_end(job, timeout=10)  # fails if the job waits for the sleep
    assert job.state is JobState.DONE and job.done == {"n": 1}
    job = WorkerJob({"task": "detect"}, tmp_path, python=str(script))
    start = time.monotonic()
    assert job.wait(timeout=10) is JobState.DONE and job.done == {"n": 1}
    assert time.monotonic() - start < 10


def test_a_job_knows_whether_its_output_was_written_before_a_cancel(tmp_path):
    """A cancel just after a calibration or adaptation wrote its model: the panel says the model is there."""
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    out = tmp_path / "site.cevae"
    out.write_bytes(b"an earlier run's model")
    script = tmp_path / "worker"
    script.write_text(f"#!/bin/sh\nprintf 'a new model' > {out}.part && mv {out}.part {out}\nsleep 20\n")
    script.chmod(0o755)
    job = WorkerJob({"task": "adapt", "out": str(out)}, tmp_path, python=str(script))
    deadline = time.monotonic() + 10
    while out.read_bytes() != b"a new model" and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job.state is JobState.CANCELLED and job.wrote_output
    script.write_text("#!/bin/sh\nsleep 20\n")
    job = WorkerJob({"task": "adapt", "out": str(out)}, tmp_path, python=str(script))
    job.cancel()
    assert not job.wrote_output
    detection = WorkerJob({"task": "detect"}, tmp_path, python=str(script))
    detection.cancel()
    assert not detection.wrote_output


def test_the_mask_field_never_carries_another_scans_mask_to_a_new_input(tiny_bundle):
    """nodes.mask_for_input, which the panel asks when the input changes: A's mask, used in A's run, is not offered
    for B (even on the same grid), nor a mask or segmentation of another grid; B's own run's mask comes back."""
    scene, ((a, a_mask), (b, b_mask)) = two_heads()
    assert nodes.mask_for_input(b, a_mask) is a_mask  # never used yet, and on B's grid: it may be B's
    logic = CeVAEAnomalyLogic()
    logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu")
    assert nodes.mask_for_input(b, a_mask) is None  # A's run used it
    assert nodes.mask_for_input(a, None) is a_mask  # back to A: its run's mask
    elsewhere = add_volume(scene, make_head(size=(30, 30, 30), seed=2)[1], "other grid", "vtkMRMLLabelMapVolumeNode")
    assert nodes.mask_for_input(b, elsewhere) is None
    scalar = add_volume(scene, mrml.image_from_volume(a_mask), "a mask as a scalar volume")
    logic.process(a, scalar, modelPath=tiny_bundle, device="cpu")  # the console takes it; the panel's field cannot
    assert nodes.mask_for_input(a, None) is None and nodes.mask_for_input(a, a_mask) is a_mask
    logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu")
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on the other grid")
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(elsewhere)
    assert nodes.mask_for_input(b, drawn) is None
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(b)
    assert nodes.mask_for_input(b, drawn) is drawn
    job = logic.startDetection(b, b_mask, modelPath=tiny_bundle, device="cpu")
    run_to_end(job)
    logic.finishDetection(job)
    assert nodes.mask_for_input(b, None) is b_mask and nodes.mask_for_input(a, b_mask) is a_mask


def test_the_runs_warnings_reach_the_result_in_the_worker_and_in_process(tiny_bundle, monkeypatch):
    """A warning of the detection (here: CUDA asked for where none is visible, so the CPU runs it) is in the
    result the panel shows (``message``), from the worker as from an in-process run."""
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the worker sees no GPU, also on a machine with one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scene, ((a, a_mask), _) = two_heads()
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(a, a_mask, modelPath=tiny_bundle, device="cuda")
    run_to_end(job)
    from_worker = logic.finishDetection(job)
    in_process = logic.process(a, a_mask, modelPath=tiny_bundle, device="cuda")
    for result in (from_worker, in_process):
        assert any("CUDA was requested but is not available" in w for w in result.warnings), result.warnings
        assert result.message.startswith(result.summary) and "Warning: CUDA was requested" in result.message
    quiet = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu")
    assert quiet.warnings == () and quiet.message == quiet.summary


def test_the_jump_and_the_component_rows_go_where_the_overlay_lies_after_a_transform_changes(tiny_bundle):
    """The component table holds the input's own RAS at the run (as the command line's CSV); the jump and a row's
    position map it to the world as the run's score volume lies now: moved with the transform the run was under,
    and still on the lesion after that transform is hardened into the input (which changes the input's own RAS)."""
    scene, ((a, a_mask), _) = two_heads()
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    a.SetAndObserveTransformNodeID(moved.GetID())
    a_mask.SetAndObserveTransformNodeID(moved.GetID())
    result = CeVAEAnomalyLogic().process(a, a_mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    table = result.nodes.components
    assert table.GetNumberOfRows() > 0
    local = tuple(nodes.table_column(table, axis)[0] for axis in nodes.PEAK_COLUMNS)
    assert nodes.component_position(table, 0) == pytest.approx(local)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 50.0)
    moved.SetMatrixTransformToParent(shift)  # e.g. a registration updated: input and overlay move together
    expected = (local[0] + 50.0, local[1], local[2])
    assert [nodes.table_column(table, c)[0] for c in nodes.PEAK_COLUMNS] == pytest.approx(local)
    assert nodes.component_position(table, 0) == pytest.approx(expected)
    assert nodes.stored_result(result.nodes.score).jump_ras == pytest.approx(expected)
    assert result.topSliceRas == pytest.approx(expected)
    top_slice = nodes.stored_result(result.nodes.score).top_slice_ras
    slicer.vtkSlicerTransformLogic.hardenTransform(a)  # the lesion stays where it is in the world
    assert a.GetParentTransformNode() is None and nodes.ijk_to_ras(a)[0, 3] != pytest.approx(local[0])
    assert nodes.component_position(table, 0) == pytest.approx(expected)
    assert nodes.stored_result(result.nodes.score).jump_ras == pytest.approx(expected)
    assert nodes.stored_result(result.nodes.score).top_slice_ras == pytest.approx(top_slice)
    assert result.topSliceRas == pytest.approx(expected)


def test_finishing_a_detection_too_early_or_with_another_logic_says_so_and_keeps_the_job(tiny_bundle, tmp_path,
                                                                                         head_scene):
    import os

    if os.name != "posix":
        pytest.skip("the slow launcher is a POSIX script")
    slow = tmp_path / "slow-python"  # the worker, started 2 s late
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", python=str(slow))
    with pytest.raises(CeVAEError, match=r"still running; call job.poll\(\) until it returns True"):
        logic.finishDetection(job)
    with pytest.raises(CeVAEError, match="not started by this CeVAEAnomalyLogic"):
        CeVAEAnomalyLogic().finishDetection(job)
    assert job.folder.exists()
    run_to_end(job)
    assert logic.finishDetection(job).nodes.score is not None
    with pytest.raises(CeVAEError, match="loaded or discarded already"):
        logic.finishDetection(job)


def test_finishing_a_calibration_as_a_detection_says_how_a_calibration_ends(tmp_path):
    """logic.finishDetection(job) on the job startCalibration returned said it was "not started by this
    CeVAEAnomalyLogic" (it was) and to finish it with the logic whose startDetection returned it (none did). It says
    that a calibration loads nothing into the scene and where its model is read; the job goes on."""
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    script = tmp_path / "worker"
    script.write_text("#!/bin/sh\nsleep 20\n")
    script.chmod(0o755)
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=11)[0], "healthy")
    logic = CeVAEAnomalyLogic()
    job = logic.startCalibration([volume], [None], tmp_path / "site.cevae", python=str(script))
    try:
        with pytest.raises(CeVAEError, match=r"^This job is a calibration \(startCalibration\), not a detection: it "
                                             r"loads nothing into the scene\. .*job\.done\['model'\]"):
            logic.finishDetection(job)
        assert job.state is JobState.RUNNING
    finally:
        logic.discardJob(job)


def test_finishing_a_cancelled_detection_says_it_was_cancelled(tmp_path, head_scene):
    """job.cancel() at the console, then finishDetection: it says the run was cancelled (it said "did not finish")."""
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    script = tmp_path / "worker"
    script.write_text("#!/bin/sh\nsleep 20\n")
    script.chmod(0o755)
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, python=str(script))
    job.cancel()
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=r"^The detection was cancelled \(job.cancel\(\)\); nothing was loaded\.$"):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before and not job.folder.exists()


def test_a_run_given_another_inputs_score_volume_updates_its_own_latest_nodes(tiny_bundle):
    """B's score volume picked for A (from the console) is never written into; A's run updates A's latest results,
    as any rerun does (only a volume of the user's that holds data gets a new set of nodes)."""
    scene, ((a, a_mask), (b, b_mask)) = two_heads()
    logic = CeVAEAnomalyLogic()
    first = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu")
    other = logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu")
    before = mrml.node_ids(scene)
    again = logic.process(a, a_mask, modelPath=tiny_bundle, device="cpu",
                          outputs=mrml.OutputNodes(score=other.nodes.score))
    assert again.nodes.score is first.nodes.score and again.nodes.segmentation is first.nodes.segmentation
    assert mrml.node_ids(scene) == before


def test_a_job_finishing_after_a_later_run_leaves_that_run_s_nodes_alone(head_scene, tiny_bundle):
    """A console job loads into the results that were the input's latest when it started, not into nodes another
    run filled or made meanwhile; with none at its start, it gets nodes of its own."""
    scene, volume, mask = head_scene
    logic = CeVAEAnomalyLogic()

    def lower_threshold(score) -> float:
        return score.GetVolumeDisplayNode().GetLowerThreshold()

    first = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.4)
    comparison = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "comparison score")
    later = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.5,
                          outputs=mrml.OutputNodes(score=comparison))
    run_to_end(job)
    loaded = logic.finishDetection(job)
    assert loaded.nodes.score is first.nodes.score and loaded.nodes.components is first.nodes.components
    assert lower_threshold(comparison) == pytest.approx(0.5)
    assert lower_threshold(first.nodes.score) == pytest.approx(0.4)
    assert later.nodes.components is not first.nodes.components

    image, brain = make_head(seed=8)  # an input without results yet
    other, other_mask = add_volume(scene, image, "fresh"), add_volume(scene, brain, "fresh mask",
                                                                      "vtkMRMLLabelMapVolumeNode")
    job = logic.startDetection(other, other_mask, modelPath=tiny_bundle, device="cpu", threshold=0.4)
    meanwhile = logic.process(other, other_mask, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    run_to_end(job)
    loaded = logic.finishDetection(job)
    assert loaded.nodes.score is not meanwhile.nodes.score
    assert loaded.nodes.segmentation is not meanwhile.nodes.segmentation
    assert lower_threshold(meanwhile.nodes.score) == pytest.approx(0.5)
    assert lower_threshold(loaded.nodes.score) == pytest.approx(0.4)


def test_a_detection_job_dropped_unloaded_stops_its_worker_and_removes_its_copy_of_the_scan(head_scene, tiny_bundle):
    import gc

    scene, volume, mask = head_scene
    job = CeVAEAnomalyLogic().startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
    folder, process = job.folder, job.process
    assert (folder / "input.nrrd").is_file()
    del job
    gc.collect()
    assert process.poll() is not None and not folder.exists()


CRASHING_SLICER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import slicer
from conftest import add_volume, make_head
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

scene = slicer.vtkMRMLScene()
image, mask = make_head(seed=7)
job = CeVAEAnomalyLogic().startDetection(add_volume(scene, image, "head"),
                                         add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode"),
                                         modelPath={model!r}, device="cpu")
print(job.wait(120).value, job.folder, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # Slicer crashes before it loads the results
"""


def test_a_job_folder_a_crashed_slicer_left_is_removed_by_the_next_run(head_scene, tiny_bundle, tmp_path,
                                                                        monkeypatch):
    """Slicer killed after its detection's worker ended but before it loaded the results (or a script that never
    loaded them, then crashed): nobody removed the job's folder with the copy of the scan in it. The next run of
    this machine removes it, and keeps a folder whose Slicer still runs and one another machine made."""
    import os
    from pathlib import Path

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    script = CRASHING_SLICER.format(tests=str(Path(__file__).parent), model=str(tiny_bundle))
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, TMPDIR=str(temp)))
    assert crashed.returncode == -9, crashed.stderr
    state, left = crashed.stdout.split()
    assert state == "done" and (Path(left) / "input.nrrd").is_file()  # the copy of the scan, left behind
    request = json.loads((Path(left) / "request.json").read_text())
    kept = {}
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other_slicer:
        for name, changes in (("running", dict(owner_pid=other_slicer.pid)), ("elsewhere", dict(owner_machine="0"))):
            kept[name] = temp / f"CeVAEAnomaly-{name}"
            kept[name].mkdir()
            (kept[name] / "request.json").write_text(json.dumps(dict(request, **changes)))
        scene, volume, mask = head_scene
        logic = CeVAEAnomalyLogic()
        job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
        logic.discardJob(job)
        other_slicer.kill()
    assert not Path(left).exists()
    assert all(folder.is_dir() for folder in kept.values())


def test_a_calibration_nobody_polls_still_removes_its_copies_of_the_scans(tiny_bundle, tmp_path):
    """Started from the console and never polled: the worker itself removes its folder as it ends, and still says
    it is done; a failing one says why."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=11)
    volumes = [add_volume(scene, image, "healthy 11"), add_volume(scene, make_head(seed=12)[0], "healthy 12")]
    masks = [add_volume(scene, mask, "mask 11", "vtkMRMLLabelMapVolumeNode")] * 2  # both heads': none to compute
    job = CeVAEAnomalyLogic().startCalibration(volumes, masks, tmp_path / "site.cevae", modelPath=tiny_bundle,
                                               device="cpu")
    job.process.wait(300)
    assert not job.folder.exists()
    assert job.wait(10) is JobState.DONE and (tmp_path / "site.cevae").is_file()
    (tmp_path / "damaged.cevae").write_bytes(b"not a model")  # (a missing one is refused before the copies)
    broken = CeVAEAnomalyLogic().startCalibration(volumes, masks, tmp_path / "other.cevae",
                                                  modelPath=tmp_path / "damaged.cevae", device="cpu")
    assert broken.wait(300) is JobState.FAILED and "damaged.cevae" in (broken.error or "")
    assert not broken.folder.exists()


def test_an_adaptation_from_the_panel_knows_who_was_scanned_from_bids_node_names(tiny_bundle, tmp_path):
    """The panel's copies are named 01_..., 02_...: a BIDS node name's sub-<label> is passed on, so that two
    sessions of one person share a fold, as on the command line (two sessions of one person alone are refused
    before any copy: test_adapt_panel)."""
    scene, volumes, masks = site_scene()
    for volume, name in zip(volumes, ("sub-07_ses-1_T1w", "sub-08_ses-2_T1w")):
        volume.SetName(name)
    logic = CeVAEAnomalyLogic()
    job = logic.startAdaptation(volumes, masks, tmp_path / "scanner.cevae", modelPath=tiny_bundle, device="cpu",
                                options=QUICK_ADAPT)
    try:
        assert [s["person"] for s in job.request["subjects"]] == ["07", "08"]
    finally:
        logic.discardJob(job)
    from CeVAEAnomalyLib.slicer.worker import _subjects

    assert [s.group for s in _subjects(job.request)] == [("person", "07"), ("person", "08")]


def test_an_adaptation_on_a_missing_gpu_offers_the_device_selector_not_the_command_lines_flag(tmp_path):
    """The panel's Device selector set to CUDA on a machine without it: the worker's error told the panel user to
    pass '--device cpu', a flag of the command line, which keeps its own words."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from CeVAEAnomalyLib.engine.devices import DeviceUnavailable, resolve_device

    with pytest.raises(DeviceUnavailable) as cli:
        resolve_device("cuda", strict=True)
    assert str(cli.value).endswith("To train on the CPU, choose the device cpu or auto (--device cpu).")
    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=s)[0], f"site {s}") for s in (1, 2)]
    job = CeVAEAnomalyLogic().startAdaptation(volumes, [None, None], tmp_path / "scanner.cevae", device="cuda")
    assert job.wait(120) is JobState.FAILED
    assert job.error.startswith("CUDA was asked for (device cuda) but is not available") and "--" not in job.error
    assert job.error.endswith("To train on the CPU, choose CPU or Automatic in the Device selector.")
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_runs_out_of_memory_says_so_not_as_a_bug(tmp_path, monkeypatch, capsys):
    """PyTorch's CPU allocator fails with a RuntimeError, which the panel showed as "Unexpected error: RuntimeError(...)
    (details in the log)"."""
    import json

    from CeVAEAnomalyLib.slicer import worker

    def allocator_fails(task, progress):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes.")

    monkeypatch.setitem(worker.TASKS, "detect", allocator_fails)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"task": "detect", "image": str(tmp_path / "input.nrrd"), "request": {},
                                   "out_dir": str(tmp_path / "out")}), encoding="utf-8")
    assert worker.main([str(request)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"error": "Out of memory: close other programs or use a machine with more memory."}], lines


def test_a_job_folder_naming_a_process_id_no_process_can_have_does_not_stop_the_next_run(tmp_path):
    """A request damaged (or planted in the shared temporary folder) with an owner_pid past the C long range: the
    next run's tidying said OverflowError, so every detection, calibration and adaptation of Slicer failed."""
    from CeVAEAnomalyLib.io.atomic import machine_tag
    from CeVAEAnomalyLib.slicer.jobs import remove_abandoned_job_folders

    for n, pid in enumerate((2**31, 2**63, 10**30)):
        folder = tmp_path / f"CeVAEAnomaly-{n}"
        folder.mkdir()
        (folder / "request.json").write_text(json.dumps(dict(task="detect", owner_pid=pid,
                                                             owner_machine=machine_tag())))
    assert remove_abandoned_job_folders(tmp_path) == 3  # no process has such an id: nobody will remove them
    assert list(tmp_path.iterdir()) == []


def test_the_workers_warnings_reach_the_panel_while_it_runs_each_once(tmp_path):
    """The panel showed the worker's warnings only once the job had ended: an adaptation's warning that its scans are
    of different acquisitions (stop now) came after minutes of fine-tuning. The job takes them as they come, each once
    (one said for several scans, or by the worker and again at the end), and the panel's timer shows them at once,
    then in the end summary after its own words."""
    import ast
    import os

    from CeVAEAnomalyLib.slicer.widget_state import with_warnings

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    go_on = tmp_path / "go on"
    script = tmp_path / "worker"
    script.write_text("#!/bin/sh\necho 'WARNING: mixed acquisitions'\necho 'WARNING: mixed acquisitions'\n"
                      "echo 'WARNING: a CPU'\necho '{\"progress\": 0.1, \"message\": \"Fine-tuning 1/3\"}'\n"
                      f"while [ ! -e '{go_on}' ]; do sleep 0.05; done\necho 'WARNING: a CPU'\n"
                      "echo '{\"done\": {}}'\n")
    script.chmod(0o755)
    job = WorkerJob({"task": "adapt"}, tmp_path, python=str(script))
    deadline = time.monotonic() + 30
    while job.message != "Fine-tuning 1/3":
        assert not job.poll() and time.monotonic() < deadline
        time.sleep(0.02)
    assert not job.finished and job.warnings == ["mixed acquisitions", "a CPU"]
    assert with_warnings("", job.warnings) == "Warning: mixed acquisitions Warning: a CPU"
    go_on.touch()
    run_to_end(job, timeout=30)
    assert job.state is JobState.DONE and job.warnings == ["mixed acquisitions", "a CPU"]
    assert with_warnings("Saved.", [*job.warnings, "a CPU"]) == "Saved. Warning: mixed acquisitions Warning: a CPU"
    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    poll = methods["_onPoll"]
    shown = poll.index("self.ui.statusLabel.text = with_warnings('', job.warnings)")
    assert shown < poll.index("if not finished:")  # while it runs, not only at its end
    assert "with_warnings(message, job.warnings)" in methods["_stopJob"]
    assert "job.warnings)" in methods["_useNewModel"] and "with_warnings(" in methods["_useNewModel"]


def test_an_adaptation_of_mixed_acquisitions_warns_before_its_first_step_in_the_panels_words(tiny_bundle, tmp_path):
    """The warning that the site scans are of different acquisitions comes before the first fine-tuning step, while
    the job runs, and names the nodes; in the panel it said "stop now (Ctrl-C)", which does nothing there."""
    scene, volumes, masks = site_scene()

    def thick(node, class_name):
        image = mrml.image_from_volume(node)
        spacing = (2.0, 2.0, 5.0)
        size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
        linear = class_name == "vtkMRMLScalarVolumeNode"
        out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                            image.GetOrigin(), spacing, image.GetDirection(), 0, image.GetPixelID())
        return add_volume(scene, out, f"{node.GetName()} thick", class_name)

    volumes[1], masks[1] = thick(volumes[1], "vtkMRMLScalarVolumeNode"), thick(masks[1], "vtkMRMLLabelMapVolumeNode")
    job = CeVAEAnomalyLogic().startAdaptation(volumes, masks, tmp_path / "scanner.cevae", modelPath=tiny_bundle,
                                              device="cpu", options=QUICK_ADAPT)
    deadline = time.monotonic() + 300
    try:
        while not job.message.startswith("Fine-tuning"):
            assert not job.poll(), job.error
            assert time.monotonic() < deadline, "the adaptation did not start fine-tuning"
            time.sleep(0.02)
    finally:
        job.cancel()
    mixed = [w for w in job.warnings if "different acquisitions" in w]
    assert len(mixed) == 1 and "'site b thick' has voxels up to 5 mm, 'site a' 2 mm" in mixed[0], job.warnings
    assert "stop now (press Cancel) and adapt one model per acquisition" in mixed[0] and "Ctrl-C" not in mixed[0]


def two_grids():
    """Scans A and B on different grids (B shifted by a few voxels) and B's brain mask."""
    scene = slicer.vtkMRMLScene()
    a = add_volume(scene, make_head(seed=7)[0], "A")
    image, mask = make_head(seed=8, origin=(-17.0, 12.0, 8.0))
    return scene, a, add_volume(scene, image, "B"), add_volume(scene, mask, "B mask", "vtkMRMLLabelMapVolumeNode")


def test_a_brain_mask_on_another_grid_is_named_in_the_resampling_warning(tiny_bundle):
    """A mask chosen by hand for A that lies on B's grid: the warning said only "The brain mask is on another grid than
    the image", not which mask, nor that it lies on another scan's grid. It now names both nodes and that scan, in
    the worker as in process."""
    scene, a, b, b_mask = two_grids()
    said = ("The brain mask 'B mask' (it lies on that of 'B') is on another grid than the input volume 'A'; resampling "
            "it (nearest neighbour).")
    logic = CeVAEAnomalyLogic()
    in_process = logic.process(a, b_mask, modelPath=tiny_bundle, device="cpu")
    job = logic.startDetection(a, b_mask, modelPath=tiny_bundle, device="cpu")
    run_to_end(job)
    assert said in job.warnings  # shown as it comes
    from_worker = logic.finishDetection(job)
    for result in (in_process, from_worker):
        assert said in result.warnings and f"Warning: {said}" in result.message, result.warnings
        assert not any("than the image" in w for w in result.warnings)
    scene.RemoveNode(b)  # on no scan's grid: the two nodes are still named
    assert nodes.mask_words(b_mask, a) == {nodes.ENGINE_RESAMPLED_MASK: "The brain mask 'B mask' is on another grid "
                                                                        "than the input volume 'A'"}


def test_a_mask_of_another_grid_used_by_hand_is_still_offered_for_its_own_scan(tiny_bundle):
    """A's run with B's mask (on B's grid, resampled with a warning) recorded it as A's: switching the input to B
    no longer offered B's own mask. A run that resampled a mask no longer makes it that input's; one on its grid
    still does (the mask field never carries another scan's mask)."""
    scene, a, b, b_mask = two_grids()
    logic = CeVAEAnomalyLogic()
    logic.process(a, b_mask, modelPath=tiny_bundle, device="cpu")
    assert nodes.mask_for_input(b, b_mask) is b_mask
    assert nodes.mask_for_input(a, None) is b_mask  # A's run used it: A's field shows what its run used
    twin = add_volume(scene, mrml.image_from_volume(b), "B again")  # on B's grid
    logic.process(b, b_mask, modelPath=tiny_bundle, device="cpu")
    assert nodes.mask_for_input(twin, b_mask) is None and nodes.mask_for_input(b, None) is b_mask


def sequence_scene():
    """A scene whose scan is the proxy of a three-frame sequence (Sequences module), showing frame 1."""
    scene = slicer.vtkMRMLScene()
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    for item in range(3):
        frame = slicer.vtkMRMLScalarVolumeNode()
        image = make_head(seed=20 + item)[0]
        mrml.update_volume_from_image(frame, image)
        sequence.SetDataNodeAtValue(frame, str(item * 2))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    sequences.UpdateProxyNodesFromSequences(browser)
    return scene, sequences, browser, browser.GetProxyNode(sequence)


def test_the_sequence_frame_scored_is_recorded_and_a_view_of_another_frame_is_said(tiny_bundle):
    """A volume a sequence browser drives: nothing said which frame was scored, and after browsing the heat map of
    one frame lay over another. Each output now records the frame (attributes, name, summary); a note says when the
    browser shows another frame, and a jump brings it back. (A run on another frame gets nodes of its own:
    test_slicer_runs.)"""
    scene, sequences, browser, proxy = sequence_scene()
    brain = add_volume(scene, make_head()[1], "mask", "vtkMRMLLabelMapVolumeNode")  # every frame's: none to compute
    logic = CeVAEAnomalyLogic()
    first = logic.process(proxy, brain, modelPath=tiny_bundle, device="cpu")
    assert "Scored frame 1 of 3 (time = 0 s) of 'cine browser'." in first.summary
    for node in (first.nodes.score, first.nodes.segmentation, first.nodes.components, first.nodes.slice_table):
        assert node.GetAttribute(nodes.FRAME_ATTRIBUTE) == "0", node.GetName()
        assert node.GetAttribute(nodes.FRAME_INDEX_ATTRIBUTE) == "time = 0 s"
        assert node.GetName().endswith("(frame 1)") and nodes.frame_note(node) == ""
    browser.SetSelectedItemNumber(2)
    sequences.UpdateProxyNodesFromSequences(browser)
    assert nodes.frame_note(first.nodes.components) == (
        "The views show frame 3 of 'cine browser', but the anomaly results are of frame 1: go back to frame 1 to read "
        "them, or run the detection again on this frame.")
    job = logic.startDetection(proxy, brain, modelPath=tiny_bundle, device="cpu", outputs=first.nodes)
    run_to_end(job)
    third = logic.finishDetection(job)
    assert third.nodes.score is not first.nodes.score and "Scored frame 3 of 3 (time = 4 s)" in third.message
    assert third.nodes.score.GetAttribute(nodes.FRAME_ATTRIBUTE) == "2"
    assert third.nodes.score.GetName() == "cine anomaly score (frame 3)" and nodes.frame_note(third.nodes.score) == ""
    browser.SetSelectedItemNumber(0)
    assert nodes.frame_note(third.nodes.score).startswith("The views show frame 1 of 'cine browser'")
    assert nodes.show_scored_frame(third.nodes.score) and browser.GetSelectedItemNumber() == 2
    assert not nodes.show_scored_frame(third.nodes.score)
    plain = add_volume(scene, make_head(seed=1)[0], "plain")  # a volume of no sequence: nothing recorded or said
    result = logic.process(plain, brain, modelPath=tiny_bundle, device="cpu")
    assert result.frame is None and "frame" not in result.summary and nodes.frame_note(result.nodes.score) == ""
    assert result.nodes.score.GetAttribute(nodes.FRAME_ATTRIBUTE) is None
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "show_scored_frame(output)" in methods["_showRunOf"]  # every jump into a result goes through it
    assert "self._frames.follow(result.nodes.score)" in methods["_showResult"]  # (nodes.FrameWatch: test_slicer_runs)
    assert "frame_note(p.scoreVolume)" in methods["_onFrameChanged"]


def test_a_segmentation_mask_under_another_transform_is_warned_of_in_the_worker_as_in_process(tiny_bundle):
    """The warning that a segmentation mask under another transform than the input is used where it lies in world
    space is logged as the inputs are read, in this process: the worker's result carried only the worker's own
    warnings, so the panel (which runs the worker) never showed it."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head()
    volume = add_volume(scene, image)
    labelmap = add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reg").GetID())
    logic = CeVAEAnomalyLogic()
    in_process = logic.process(volume, segmentation, modelPath=tiny_bundle, device="cpu")
    job = logic.startDetection(volume, segmentation, modelPath=tiny_bundle, device="cpu")
    run_to_end(job)
    from_worker = logic.finishDetection(job)
    for result in (in_process, from_worker):
        assert any(w.startswith("The brain mask 'brain' (under 'reg') and the volume 'head' (under no transform) are "
                                "under different transforms: the segmentation is used where it lies in world space")
                   for w in result.warnings), result.warnings


def test_no_writable_temporary_folder_is_said_in_words_before_a_worker_starts(head_scene, tiny_bundle, tmp_path,
                                                                               monkeypatch):
    """The worker's copy of the scan goes into the system's temporary folder; where none can be made there (a full
    disk or quota, a TMPDIR that is not a folder) Apply ended in Python's bare 'Not a directory' error."""
    scene, volume, mask = head_scene
    blocker = tmp_path / "tmp-is-a-file"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=r"^The worker needs a temporary folder for its copies of the scans, and "
                                         r"none could be made in .*tmp-is-a-file: Not a directory\. Free space there, "
                                         r"or start Slicer with TMPDIR set to a folder on a disk with room\.$"):
        CeVAEAnomalyLogic().startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
    assert mrml.node_ids(scene) == before and blocker.read_text() == ""
