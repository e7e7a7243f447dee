"""The "Adapt to this scanner" section's decisions before a run (CeVAEAnomalyLib.slicer.adapt_panel), without Qt."""
from __future__ import annotations

import os

from CeVAEAnomalyLib.slicer.adapt_panel import adapt_choice, calibrate_problem, output_problem
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions, describe_estimate


def test_it_needs_two_volumes_and_an_output_file(tmp_path):
    out = str(tmp_path / "scanner.cevae")
    one = adapt_choice(1, out, None, "cpu")
    assert not one.ready and "at least 2" in one.message
    assert not adapt_choice(3, "", None, "cpu").ready
    folder = adapt_choice(3, str(tmp_path), None, "cpu")
    assert not folder.ready and "file name" in folder.message


def test_ready_it_shows_the_estimate_for_the_scans_and_device(tmp_path):
    choice = adapt_choice(4, str(tmp_path / "scanner.cevae"), None, "cpu")
    assert choice.ready and choice.existing == []
    assert choice.message == describe_estimate(4, "cpu") and "5 fine-tuning runs" in choice.message
    assert "expect much less" in adapt_choice(4, str(tmp_path / "s.cevae"), None, "cuda").message


def test_the_estimate_counts_the_thorough_modes_the_model_is_calibrated_for(tmp_path):
    """Calibrating an adaptation scores each scan again in every thorough mode of its parent (the bundled model has
    one): that took most of an adaptation's time, which the estimate left out."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.calibration import calibrated_test_time_steps
    from CeVAEAnomalyLib.engine.header import read_header
    from CeVAEAnomalyLib.training.adapt_plan import THOROUGH_SECONDS_PER_SCAN_CPU, estimate_seconds

    model = default_model_path()
    modes = len([s for s in calibrated_test_time_steps(read_header(model).calibration) if s > 0])  # 0: plain
    assert modes == 1  # the bundled model's thorough mode
    choice = adapt_choice(4, str(tmp_path / "scanner.cevae"), model, "cpu")
    assert choice.message == f"Starting from {model.name}: " + describe_estimate(4, "cpu", thorough_modes=modes)
    assert "thorough mode" in choice.message
    assert estimate_seconds(4, thorough_modes=modes) == estimate_seconds(4) + 4 * modes * THOROUGH_SECONDS_PER_SCAN_CPU


def test_it_refuses_to_write_over_the_model_it_starts_from_even_through_a_link(tmp_path):
    model = tmp_path / "model.cevae"
    model.write_bytes(b"weights")
    os.link(model, tmp_path / "alias.cevae")
    for target in (model, tmp_path / "alias.cevae"):
        choice = adapt_choice(3, str(target), model, "cpu")
        assert not choice.ready and "new name" in choice.message


def test_it_lists_the_files_of_an_earlier_run_that_would_be_replaced(tmp_path):
    out = tmp_path / "scanner.cevae"
    (tmp_path / "scanner.cevae.ckpt").write_bytes(b"")
    (tmp_path / "scanner.cevae.fold2.log.csv").write_text("step\n")
    (tmp_path / "other.cevae.ckpt").write_bytes(b"")
    choice = adapt_choice(3, str(out), None, "cpu", AdaptOptions())
    assert choice.ready
    assert sorted(p.name for p in choice.existing) == ["scanner.cevae.ckpt", "scanner.cevae.fold2.log.csv"]


def test_the_calibration_output_is_checked_the_same_way(tmp_path):
    """Calibrate is ready only for a path its worker will accept: not empty, no folder, not the model it calibrates."""
    model = tmp_path / "model.cevae"
    model.write_bytes(b"weights")
    assert output_problem("", model, "calibrated") == "Choose where to save the calibrated model."
    assert "file name, not a folder" in output_problem(str(tmp_path), model, "calibrated")
    assert "needs a .cevae file name" in output_problem(str(tmp_path / "site.nii.gz"), model, "calibrated")
    assert "cannot replace the model it starts from" in output_problem(str(model), model, "calibrated")
    assert output_problem(str(tmp_path / "site.cevae"), model, "calibrated") is None
    # what the Calibrate button's tooltip says when it is disabled (after a first calibration, the new model is the
    # one in use and the default output name is its own)
    assert calibrate_problem(0, str(tmp_path / "site.cevae"), model) == \
        "Check at least one healthy volume to calibrate on."
    assert "cannot replace the model it starts from" in calibrate_problem(2, str(model), model)
    assert calibrate_problem(1, str(tmp_path / "site.cevae"), model) is None


def test_an_interrupted_adaptation_can_be_resumed_a_finished_one_only_replaced(tmp_path):
    """The panel offered only "Replace" after a Cancel: an interrupted run (checkpoints, no finished model) is
    resumable; a finished one (its model written, fold checkpoints gone) is not."""
    out = tmp_path / "scanner.cevae"
    (tmp_path / "scanner.cevae.fold1.ckpt").write_bytes(b"")
    (tmp_path / "scanner.cevae.fold1.log.csv").write_text("step\n")
    assert adapt_choice(3, str(out), None, "cpu").resumable
    (tmp_path / "scanner.cevae.fold1.ckpt").unlink()
    (tmp_path / "scanner.cevae.ckpt").write_bytes(b"")
    out.write_bytes(b"a finished model")
    assert not adapt_choice(3, str(out), None, "cpu").resumable
    assert not adapt_choice(3, str(tmp_path / "new.cevae"), None, "cpu").resumable


def test_scans_of_one_person_are_not_ready_to_adapt(tmp_path):
    """Volumes named by BIDS say who was scanned: two sessions of one person cannot calibrate each other (the job
    failed after copying the scans), and persons, not volumes, make the folds of the estimate."""
    out = str(tmp_path / "scanner.cevae")
    one = adapt_choice(2, out, None, "cpu", names=["sub-07_ses-1_T1w", "sub-07_ses-2_T1w"])
    assert not one.ready and "scans of 1 person" in one.message
    two = adapt_choice(3, out, None, "cpu", names=["sub-07_ses-1_T1w", "sub-07_ses-2_T1w", "site b"])
    assert two.ready and "3 fine-tuning runs" in two.message and "3 scan(s) of 2 persons" in two.message
    assert adapt_choice(2, out, None, "cpu", names=["site a", "site b"]).ready  # names that say nothing


def test_a_lone_loss_log_is_no_earlier_run_to_replace_or_resume(tmp_path):
    """A run cancelled before its first checkpoint leaves only its loss log: a new adaptation replaces it as
    ``adapt`` and ``train`` do, and there is nothing to resume (the console was told to resume, which then failed)."""
    out = tmp_path / "scanner.cevae"
    (tmp_path / "scanner.cevae.fold1.log.csv").write_text("step,loss,kl\n")
    choice = adapt_choice(3, str(out), None, "cpu")
    assert choice.ready and choice.existing == [] and not choice.resumable
    (tmp_path / "scanner.cevae.fold1.log.csv").write_text("my notes\n")  # not a loss log: never replaced unasked
    assert [p.name for p in adapt_choice(3, str(out), None, "cpu").existing] == ["scanner.cevae.fold1.log.csv"]


def test_a_model_output_path_is_a_full_cevae_path_and_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """The save-as fields took a relative path (written relative to Slicer's working folder, wherever that is), a
    '~' path (a folder named '~' there) and a name without .cevae (which the model chooser does not list)."""
    from pathlib import Path

    from CeVAEAnomalyLib.slicer.gui_binding import typed_path

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    assert typed_path("~/site.cevae") == tmp_path / "site.cevae"
    assert output_problem("~/site.cevae", None, "calibrated") is None
    assert calibrate_problem(1, "~/site.cevae", None) is None
    for relative in ("site.cevae", "models/site.cevae", Path("..", "site.cevae").as_posix()):
        assert output_problem(relative, None, "calibrated") == \
            f"Give the calibrated model's full path (with its folder), not only '{relative}'."
        assert not adapt_choice(2, relative, None, "cpu").ready
    for name in ("site", "site.model", ".cevae", "site.nii.gz"):
        assert "needs a .cevae file name" in output_problem(str(tmp_path / name), None, "adapted")
    assert output_problem(str(tmp_path / "Site.CEVAE"), None, "adapted") is None
    (tmp_path / "site.cevae.fold1.ckpt").write_bytes(b"")
    choice = adapt_choice(2, "~/site.cevae", None, "cpu")  # the files of an earlier run, where the run writes
    assert choice.ready and choice.existing == [tmp_path / "site.cevae.fold1.ckpt"] and choice.resumable


def test_the_panel_starts_a_run_on_the_output_path_it_checked():
    """The widget hands the logic the path the checks above were made on (``~`` expanded), not the typed text."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text()
    assert "outputPath = typed_path(p.calibratedModelPath)" in text
    assert "startAdaptation(volumes, masks, typed_path(p.adaptedModelPath)," in text
    assert "Path(p.calibratedModelPath)" not in text and "Path(p.adaptedModelPath)" not in text


def test_the_scan_being_examined_checked_as_healthy_is_warned_about_before_a_run(tmp_path):
    """Nothing said that the input volume (the patient's scan) was among the checked healthy volumes: a calibration
    raised its threshold above the scan's own anomalies, an adaptation taught the model them as healthy. Now the
    Adapt section and the Calibrate button say so, and the widget asks before it starts either run."""
    import pytest

    slicer = pytest.importorskip("slicer")
    from conftest import add_volume, make_head

    from CeVAEAnomalyLib.slicer.adapt_panel import examined_as_healthy

    scene = slicer.vtkMRMLScene()
    patient = add_volume(scene, make_head()[0], "patient")
    healthy = [add_volume(scene, make_head(seed=s)[0], f"healthy {s}") for s in (1, 2)]
    for task in ("calibrate", "adapt"):
        assert examined_as_healthy(patient, healthy, task) == ""
        assert examined_as_healthy(None, healthy, task) == ""
    calibrating = examined_as_healthy(patient, [healthy[0], patient], "calibrate")
    assert calibrating.startswith("'patient' is the input volume (the scan being examined) and is checked as a "
                                  "healthy volume: if it has anomalies,") and "raise the threshold" in calibrating
    adapting = examined_as_healthy(patient, [healthy[0], patient], "adapt")
    assert "would learn its anomalies as healthy" in adapting and adapting.endswith("unless it is a healthy scan.")
    out = str(tmp_path / "scanner.cevae")
    choice = adapt_choice(2, out, None, "cpu", warning=adapting)
    assert choice.ready and choice.message == f"{adapting} {describe_estimate(2, 'cpu')}"
    assert adapt_choice(1, out, None, "cpu", warning=adapting).message.startswith(adapting + " Choose at least 2")
    assert adapt_choice(2, out, None, "cpu", warning="").message == describe_estimate(2, "cpu")


def test_the_widget_asks_before_using_the_examined_scan_as_a_healthy_one():
    """Read from the source (Qt runs only inside Slicer): before dependencies are installed, a calibration or an
    adaptation with the input volume checked as healthy asks (testing mode: refuses); a decline starts nothing."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    start = methods["_start"]
    assert start.index("if task != DETECT and (not self._inputAcceptedAsHealthy(task)):") < \
        start.index("self._ensureDependencies(task)")
    asked = methods["_inputAcceptedAsHealthy"]
    assert "examined_as_healthy(p.inputVolume, volumes, task)" in asked
    assert "raise CeVAEError(warning)" in asked and "self._confirm(" in asked
    assert "warning=examined_as_healthy(p.inputVolume, volumes, ADAPT)" in methods["_adaptChoice"]
    assert "calibrateWarning = calibrate_warning(p.inputVolume, healthy)" in methods["_refresh"]  # (examined too)


def test_the_logic_counts_an_earlier_runs_files_by_persons_as_the_panel_and_the_run_do(tmp_path, monkeypatch):
    """The panel (adapt_choice) and the run count the folds, hence the files an adaptation writes, by persons; the
    logic counted them by volumes: with 4 scans of 2 persons it took the leftover fold3 checkpoint of another run for
    one this run would replace, and refused (in the API's words, overwrite=True) a start the panel had let through
    without asking. Scans of one person are refused by the logic too now, before any copy (the worker failed)."""
    import subprocess
    import sys
    import tempfile

    import pytest

    slicer = pytest.importorskip("slicer")
    from conftest import add_volume, make_head

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scene = slicer.vtkMRMLScene()
    names = ["sub-01_ses-1_T1w", "sub-01_ses-2_T1w", "sub-02_ses-1_T1w", "sub-02_ses-2_T1w"]
    volumes = [add_volume(scene, make_head(seed=i + 1)[0], name) for i, name in enumerate(names)]
    out = tmp_path / "scanner.cevae"
    (tmp_path / "scanner.cevae.fold3.ckpt").write_bytes(b"left by a run on scans of more persons")
    choice = adapt_choice(4, str(out), None, "cpu", names=names)
    assert choice.ready and choice.existing == []  # 2 persons: fold1, fold2 and the final run

    def quiet(args):  # a worker that does nothing: only the start is tested
        return subprocess.Popen([sys.executable, "-c", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    logic = CeVAEAnomalyLogic()
    job = logic.startAdaptation(volumes, [None] * 4, out, device="cpu", launch=quiet)
    job.wait(60)
    assert [s["person"] for s in job.request["subjects"]] == ["01", "01", "02", "02"]
    one = adapt_choice(2, str(out), None, "cpu", names=names[:2])
    assert not one.ready and "scans of 1 person" in one.message
    with pytest.raises(CeVAEError, match=r"scans of 1 person .*at least 2 persons"):
        logic.startAdaptation(volumes[:2], [None, None], out, device="cpu", launch=quiet)
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left: the job's copies went as it ended


def test_a_stopped_adaptation_says_its_checkpoints_are_kept_and_adapt_resumes(tmp_path, monkeypatch):
    """Cancel said only "Cancelled; the scene is unchanged.": nothing told the user that the adaptation's
    checkpoints stay and that Adapt goes on from them. The status line now adds which are kept (or that none was
    written yet), from the run's own request, as the panel counts its files, and that an earlier model at the file
    (an Adapt that replaces it keeps it until the new one is written) is kept."""
    import ast
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import pytest

    slicer = pytest.importorskip("slicer")
    from conftest import add_volume, make_head

    from CeVAEAnomalyLib.slicer.adapt_panel import adaptation_stopped
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=s)[0], f"site {s}") for s in (1, 2, 3)]
    out = tmp_path / "scanner.cevae"

    def quiet(args):  # a worker that does nothing: only the request is used
        return subprocess.Popen([sys.executable, "-c", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    job = CeVAEAnomalyLogic().startAdaptation(volumes, [None] * 3, out, device="cpu", launch=quiet)
    job.wait(60)
    assert adaptation_stopped(job.request) == "The adaptation had written no checkpoint yet: Adapt starts it anew."
    (tmp_path / "scanner.cevae.fold1.log.csv").write_text("step,loss,kl\n")
    (tmp_path / "scanner.cevae.fold1.ckpt").write_bytes(b"a checkpoint")
    (tmp_path / "scanner.cevae.fold2.ckpt").write_bytes(b"a checkpoint")
    assert adaptation_stopped(job.request) == (
        "The adaptation's checkpoints are kept (scanner.cevae.fold1.ckpt, scanner.cevae.fold2.ckpt): press Adapt "
        "again with the same volumes and file name to resume from them (it asks first).")
    assert adapt_choice(3, str(out), None, "cpu", names=[v.GetName() for v in volumes]).resumable  # so it asks
    out.write_bytes(b"the earlier model, which an Adapt with Replace keeps until it writes the new one")
    assert adaptation_stopped(job.request).endswith(
        "(it asks first). The earlier model scanner.cevae is kept as it was until the new one is written.")
    assert adapt_choice(3, str(out), None, "cpu", names=[v.GetName() for v in volumes]).resumable
    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    stop = ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "_stopJob"))
    assert "elif job.request.get('task') == ADAPT:" in stop
    assert "message = ' '.join((message, adaptation_stopped(job.request)))" in stop


def test_the_estimate_names_the_device_as_the_panels_selector_does(tmp_path):
    """The Adapt section said "on cuda expect much less", the command line's option value; it names the Device
    selector's choice now, and the command line keeps its words."""
    from pathlib import Path

    out = str(tmp_path / "scanner.cevae")
    panel = adapt_choice(4, out, None, "cuda", device_name="NVIDIA GPU (CUDA)").message
    assert "; on the NVIDIA GPU (CUDA) chosen as Device expect much less." in panel and "on cuda" not in panel
    assert "; on cuda expect much less." in describe_estimate(4, "cuda")
    assert adapt_choice(4, out, None, "cpu", device_name="CPU").message == describe_estimate(4, "cpu")
    text = (Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text()
    assert "device_name=deviceNames().get(p.device, '')" in text.replace('"', "'")


def test_the_panel_counts_the_persons_of_its_volumes_as_the_adaptation_does():
    """persons_scanned (over node names: the panel's and the logic's checks) and training.data.person_groups (over
    the worker's copies, each with the person its node's name says) group by one rule, io.manifest.scan_group."""
    from pathlib import Path

    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyLib.slicer.adapt_panel import node_person, persons_scanned
    from CeVAEAnomalyLib.training.data import person_groups

    names = ["sub-01_ses-1_T1w", "head", "sub-01_ses-2_T1w", "sub-02_T1w", "head", "T1w", "sub-_T1w", "sub-02_x"]
    for count in range(len(names) + 1):
        chosen = names[:count]
        copies = [Subject(Path(f"/job/{n + 1:02d}_{name}.nrrd"), person=node_person(name))
                  for n, name in enumerate(chosen)]
        assert persons_scanned([node_person(name) for name in chosen]) == len(person_groups(copies)), chosen
    assert persons_scanned([node_person(name) for name in names]) == 6


def test_volumes_of_different_acquisitions_are_warned_of_before_adapt_is_pressed(tmp_path):
    """The Adapt section said nothing of chosen volumes of different acquisitions: the run warned only after it had
    started (in Slicer, after it had ended). It now says so beside the estimate, by the adaptation's own rule and factor
    (engine.calibration.ACQUISITION_FACTOR on the largest voxel side), ready all the same: a warning, not a refusal."""
    import ast
    from pathlib import Path

    import pytest

    slicer = pytest.importorskip("slicer")
    from conftest import add_volume, make_head

    from CeVAEAnomalyLib.engine.calibration import ACQUISITION_FACTOR
    from CeVAEAnomalyLib.training.adapt_plan import mixed_acquisitions

    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=s)[0], f"sub-0{s}_T1w") for s in (1, 2, 3)]
    for volume in volumes[:2]:
        volume.SetSpacing(1.0, 1.0, 1.0)
    volumes[2].SetSpacing(1.0, 1.0, 1.0 * ACQUISITION_FACTOR)  # at the factor: alike
    out = str(tmp_path / "scanner.cevae")

    def choice(nodes):
        return adapt_choice(len(nodes), out, None, "cpu", names=[v.GetName() for v in nodes],
                            spacings=[v.GetSpacing() for v in nodes])

    assert choice(volumes).message == describe_estimate(3, "cpu")
    volumes[2].SetSpacing(1.0, 1.0, 1.6)
    mixed = choice(volumes)
    assert mixed.ready and mixed.message.endswith(describe_estimate(3, "cpu"))
    said = mixed_acquisitions({"'sub-01_T1w'": 1.0, "'sub-03_T1w'": 1.6})
    assert said.startswith("The site scans are of different acquisitions: 'sub-03_T1w' has voxels up to 1.6 mm, "
                           "'sub-01_T1w' 1 mm (more than 1.5 times apart).")
    assert mixed.message.startswith(said + " With healthy scans of 2 persons in each acquisition, check only one "
                                           "acquisition's volumes and adapt one model per acquisition. ")
    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "spacings=[volume.GetSpacing() for volume in volumes]" in methods["_adaptChoice"]


def test_a_volume_named_only_sub_label_is_that_persons_scan():
    """The panel's messages ask for volumes named by their "sub-<label>"; a node named just "sub-01" (no "_..." after
    it, as a user renames one) counted as a person unknown, so two such volumes of one person were two persons."""
    from CeVAEAnomalyLib.slicer.adapt_panel import node_person, persons_scanned

    assert [node_person(name) for name in ("sub-01", "sub-01_1", "Sub-02", "sub-", "sub-01 copy", "xsub-03")] == [
        "01", "01", None, None, None, None]
    assert persons_scanned([node_person("sub-01"), node_person("sub-01_ses-2_T1w")]) == 1


def test_the_estimate_beside_an_interrupted_adaptation_says_a_resume_takes_less(tmp_path):
    """The panel's estimate counted every fine-tuning step also where the file's interrupted adaptation had
    checkpoints that Adapt offers to resume from: a resume skips the steps they hold, which the estimate now says."""
    out = tmp_path / "scanner.cevae"
    (tmp_path / "scanner.cevae.fold1.ckpt").write_bytes(b"")
    choice = adapt_choice(3, str(out), None, "cpu")
    assert choice.resumable and choice.message == (
        f"{describe_estimate(3, 'cpu')} Resuming the interrupted adaptation to this file (Adapt asks) skips the "
        "fine-tuning steps its checkpoints hold (scanner.cevae.fold1.ckpt), so it takes less.")
    (tmp_path / "scanner.cevae.fold1.ckpt").unlink()
    assert adapt_choice(3, str(out), None, "cpu").message == describe_estimate(3, "cpu")  # nothing to resume


def test_a_second_run_onto_the_model_in_use_says_what_to_choose(tmp_path, monkeypatch):
    """Once an adaptation finishes, its output is the model in use, and the output field still names it: a second
    Adapt was refused with "cannot replace the model it starts from" alone. It now says what to do: choose the model
    it came from first (the bundled one: 'Use bundled model'), or another output file. The logic refuses it so too,
    before any copy (the worker refused it after copying the volumes)."""
    import subprocess
    import sys
    import tempfile

    import pytest

    slicer = pytest.importorskip("slicer")
    from conftest import add_volume, make_head

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    site = tmp_path / "site.cevae"
    site.write_bytes(b"an adapted model, now in use")
    for kind, verb in (("adapted", "adapt"), ("calibrated", "calibrate")):
        said = output_problem(str(site), site, kind)
        assert said.startswith(f"Save the {kind} model under a new name; it cannot replace the model it starts from")
        assert f"To {verb} the model it came from again, choose that model first ('Use bundled model'" in said
        assert "choose another output file" in said
    assert adapt_choice(3, str(site), site, "cpu").message == output_problem(str(site), site, "adapted")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=i + 1)[0], f"sub-0{i + 1}_T1w") for i in range(2)]

    def quiet(args):  # a worker that does nothing: it must not be started
        return subprocess.Popen([sys.executable, "-c", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    logic = CeVAEAnomalyLogic()
    with pytest.raises(CeVAEError) as adapting:
        logic.startAdaptation(volumes, [None, None], site, modelPath=site, device="cpu", launch=quiet)
    assert str(adapting.value) == output_problem(str(site), site, "adapted")
    with pytest.raises(CeVAEError) as calibrating:
        logic.startCalibration(volumes, [None, None], site, modelPath=str(site), launch=quiet)
    assert str(calibrating.value) == output_problem(str(site), site, "calibrated")
    assert list((tmp_path / "tmp").iterdir()) == []
