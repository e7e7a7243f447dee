"""Scripts/DetectVolume.py end to end under plain Python with slicer-core: a subprocess, as users run it, where a test
is about how the run ends; its main() in this process where a test is about what it reads and writes."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, make_head, oblique_direction

pytest.importorskip("slicer")

SCRIPT = REPO / "CeVAEAnomaly" / "Scripts" / "DetectVolume.py"
OUTPUTS = ("head_score.nrrd", "head_labelmap.nrrd", "head_segmentation.seg.nrrd",
           "head_components.csv", "head_slices.csv", "head_record.json")


def run_batch(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def run_here(script, capfd, caplog):
    """Runs the script's ``main`` in this process, for the tests of what it reads and writes rather than of how
    its process ends (each run skips a fresh interpreter's imports of torch and VTK, most of a run's time):
    ``run(*args)`` gives its exit status and what it logged and wrote to stderr, in that order."""

    def run(*args) -> Tuple[int, str]:
        caplog.clear()
        capfd.readouterr()
        with caplog.at_level(logging.INFO):
            status = script.main([str(a) for a in args])
        return status, caplog.text + capfd.readouterr().err

    return run


@pytest.fixture(scope="module")
def oblique_head(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_in")
    image, mask = make_head(direction=oblique_direction(), spacing=(1.1, 0.9, 1.6), seed=11)
    sitk.WriteImage(image, str(d / "head.nrrd"))
    sitk.WriteImage(mask, str(d / "head_mask.nii.gz"))
    return d / "head.nrrd", d / "head_mask.nii.gz"


def test_batch_writes_all_results_on_the_input_grid(oblique_head, tiny_bundle, tmp_path):
    image_path, mask_path = oblique_head
    out = tmp_path / "results"
    proc = run_batch("--input", image_path, "--mask", mask_path, "--model", tiny_bundle, "--output-dir", out,
                     "--device", "cpu", "--threshold", "0.3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary files left

    image = sitk.ReadImage(str(image_path))
    score = sitk.ReadImage(str(out / OUTPUTS[0]))
    labelmap = sitk.ReadImage(str(out / OUTPUTS[1]))
    for result in (score, labelmap):
        assert result.GetSize() == image.GetSize()
        np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
    scores = sitk.GetArrayFromImage(score)
    labels = sitk.GetArrayFromImage(labelmap)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
    assert np.isfinite(scores).all() and not scores[~brain].any()
    assert np.array_equal(labels > 0, scores > 0.3) and labels.any()

    segment = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUTS[2])))
    assert int((segment > 0).sum()) == int((labels > 0).sum())

    with open(out / OUTPUTS[3], newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_components = sitk.ConnectedComponentImageFilter()
    n_components.SetFullyConnected(True)
    n_components.Execute(labelmap)
    assert len(rows) == n_components.GetObjectCount() > 0
    assert sum(int(r["voxels"]) for r in rows) == int((labels > 0).sum())
    with open(out / OUTPUTS[4], newline="") as fh:
        assert len(list(csv.DictReader(fh))) > 0
    assert "100% Done" in proc.stderr  # the progress ends
    assert "Warning" not in proc.stderr  # e.g. VTK's about a color table a scene outside Slicer lacked
    record = json.loads((out / OUTPUTS[5]).read_text())  # how they were made, with the files read
    digest = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    assert record["inputs"] == {"image": {"path": str(image_path), "sha256": digest(image_path)},
                                "mask": {"path": str(mask_path), "sha256": digest(mask_path)}}
    assert (record["model"]["path"], record["model"]["sha256"]) == (str(tiny_bundle), digest(tiny_bundle))
    assert (record["threshold"], record["threshold_source"], record["device"]) == (0.3, "absolute", "cpu")

    from CeVAEAnomalyLib.cli.main import main  # `cevae-anomaly batch` names and writes the same component table

    (tmp_path / "list.csv").write_text(f"image,mask\n{image_path},{mask_path}\n")
    assert main(["batch", str(tmp_path / "list.csv"), "--out-dir", str(tmp_path / "cohort"), "--model",
                 str(tiny_bundle), "--device", "cpu", "--threshold", "0.3"]) == 0
    assert (tmp_path / "cohort" / OUTPUTS[3]).read_text() == (out / OUTPUTS[3]).read_text()


def test_batch_reports_a_missing_input_in_one_line(tmp_path):
    """A refused input exits 2, as ``cevae-anomaly detect`` does (it exited 1, the status of an unexpected
    failure)."""
    from CeVAEAnomalyLib.cli.main import main

    proc = run_batch("--input", tmp_path / "nope.nii.gz", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 == main(["detect", str(tmp_path / "nope.nii.gz"), "--score", str(tmp_path / "s.nrrd")])
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("DetectVolume: error: The input volume") and "does not exist" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_a_dicom_series_folder_is_read_as_detect_reads_it(run_here, tiny_bundle, tmp_path):
    """``detect`` takes a DICOM series folder; the script said "does not exist or is not a file" of the folder. Its
    results are detect's, on the series' grid, named after the folder."""
    from test_dicom_series import write_series

    from CeVAEAnomalyLib.cli.main import main

    image, mask = make_head(size=(32, 36, 12), spacing=(2.0, 2.0, 3.0), seed=5)
    series = write_series(image, tmp_path / "subj1" / "T1")
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    common = ["--model", tiny_bundle, "--device", "cpu", "--threshold", "0.3"]
    status, said = run_here("--input", series, "--mask", tmp_path / "mask.nii.gz", "--output-dir", tmp_path / "out",
                            *common)
    assert status == 0, said
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(name.replace("head", "T1") for name in OUTPUTS)
    assert main(["detect", str(series), "--mask", str(tmp_path / "mask.nii.gz"), "--score",
                 str(tmp_path / "detect.nrrd"), *map(str, common)]) == 0
    ours, detects = (sitk.ReadImage(str(p)) for p in (out / "T1_score.nrrd", tmp_path / "detect.nrrd"))
    assert ours.GetSize() == detects.GetSize() and ours.GetDirection() == detects.GetDirection()
    np.testing.assert_allclose(ours.GetOrigin(), detects.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(detects), atol=1e-5)
    assert json.loads((out / "T1_record.json").read_text())["inputs"]["image"]["path"] == str(series)


def test_warnings_are_said_as_the_command_line_says_them(tiny_bundle, tmp_path):
    """Run outside Slicer, the script printed the library's warnings as bare lines, where cevae-anomaly prints
    "WARNING: ..." (its INFO lines "INFO: ..."): a warning did not stand out among the progress lines. Once each."""
    from test_dicom_series import write_series

    image, mask = make_head(size=(32, 36, 12), spacing=(2.0, 2.0, 3.0), seed=5)
    series = write_series(image, tmp_path / "T1", {"0020|1002": "14"})  # 12 slices of 14 acquired: warned of
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    proc = run_batch("--input", series, "--mask", tmp_path / "mask.nii.gz", "--model", tiny_bundle, "--output-dir",
                     tmp_path / "out", "--device", "cpu", "--threshold", "0.3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    said = [line for line in lines if "may be missing at its ends" in line]
    assert len(said) == 1 and said[0].startswith(f"WARNING: The DICOM series in {series} holds 12 slices"), lines
    assert any(line.startswith("INFO: 100% Done") for line in lines), lines


def test_batch_refuses_to_overwrite_without_the_flag(oblique_head, tmp_path):
    image_path, _ = oblique_head
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUTS[3]).write_text("keep me")
    proc = run_batch("--input", image_path, "--output-dir", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr.strip().splitlines()[-1]
    assert (out / OUTPUTS[3]).read_text() == "keep me"


def test_batch_rejects_bad_arguments_in_one_line(tmp_path):
    for args, problem in [(("--output-dir", tmp_path, "--score-type", "best"), "--score-type"),
                          (("--input", tmp_path / "x.nii.gz"), "--output-dir"),
                          (("--input", tmp_path / "x.nii.gz", "--output-dir", tmp_path, "--fpr", "2"), "--fpr")]:
        proc = run_batch(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("DetectVolume: error: ") and problem in lines[0]
        assert lines[0].endswith("(see DetectVolume.py --usage)")


# --- inside a headless Slicer: every ending quits the application --------------------------------

HEADLESS_SLICER = '''
"""Stand-in for `Slicer --no-main-window --python-script SCRIPT ARGS`: the script runs as __main__
with sys.argv == [SCRIPT, *ARGS]; an exception is only logged, and the application (no window to
close) ends only when slicer.util.exit() is called."""
import runpy, sys, types
import slicer

class App:
    status = None
    def commandOptions(self):
        return types.SimpleNamespace(runPythonAndExit=True)
    def exit(self, status):
        App.status = status

{setup}
slicer.app = App()
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except BaseException as exc:
    print("SCRIPT RAISED", type(exc).__name__, file=sys.stderr)
print("APPLICATION EXIT STATUS", App.status)
'''


def run_in_headless_slicer(tmp_path, *args, setup="", cwd=None):
    runner = tmp_path / "headless_slicer.py"
    runner.write_text(HEADLESS_SLICER.format(setup=setup))
    return subprocess.run([sys.executable, str(runner), str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_relative_paths_are_read_from_where_the_command_ran_not_from_slicers_scene_folder(
        oblique_head, tiny_bundle, tmp_path):
    """Slicer's scene reads a relative file name from its root folder (Documents by default): there the input
    would be missing (a misleading "could not be read") or another file of that name."""
    image_path, mask_path = oblique_head
    work = tmp_path / "work"
    work.mkdir()
    for path in (image_path, mask_path):
        (work / path.name).write_bytes(path.read_bytes())
    elsewhere = tmp_path / "Documents"
    elsewhere.mkdir()
    setup = (f"scene = slicer.vtkMRMLScene()\nscene.SetRootDirectory({str(elsewhere)!r})\n"
             "slicer.mrmlScene = scene")
    proc = run_in_headless_slicer(tmp_path, "--input", image_path.name, "--mask", mask_path.name, "--model",
                                  tiny_bundle, "--output-dir", "results", "--device", "cpu", setup=setup, cwd=work)
    assert proc.stdout.strip().splitlines()[-1] == "APPLICATION EXIT STATUS 0", proc.stderr
    assert sorted(p.name for p in (work / "results").iterdir()) == sorted(OUTPUTS)


def test_an_interrupted_run_quits_headless_slicer(tmp_path):
    setup = ("slicer.mrmlScene = slicer.vtkMRMLScene()\nimport CeVAEAnomalyLib.slicer.logic as logic\n"
             "def interrupted(*args, **kwargs):\n    raise KeyboardInterrupt\n"
             "logic.CeVAEAnomalyLogic.process = interrupted")
    image, _ = make_head(seed=3)
    sitk.WriteImage(image, str(tmp_path / "head.nrrd"))
    proc = run_in_headless_slicer(tmp_path, "--input", tmp_path / "head.nrrd", "--output-dir", tmp_path / "out",
                                  setup=setup)
    assert proc.stdout.strip().splitlines()[-1] == "APPLICATION EXIT STATUS 130", proc.stderr
    assert "DetectVolume: interrupted; nothing was written." in proc.stderr


STOPPED_RENAMES = """\
import os, runpy, signal, sys
sys.path.insert(0, {lib!r})
import CeVAEAnomalyLib.io.atomic as atomic
real, calls = atomic.publish, []
def publish(tmp, target, durable=False):
    calls.append(target)
    if {how!r} == "signal" and len(calls) == 1:  # Ctrl-C as the renames start: held until the last one is done
        os.kill(os.getpid(), signal.SIGINT)
    if {how!r} == "raised" and len(calls) == 3:  # a stop that could not be held (e.g. Slicer's own handler)
        raise KeyboardInterrupt
    real(tmp, target, durable)
atomic.publish = publish
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("how", ["signal", "raised"])
def test_a_stop_during_the_renames_says_which_results_were_written(oblique_head, tiny_bundle, tmp_path, how):
    """A Ctrl-C during the renames was held until they were all done, then the script said "interrupted; nothing
    was written" beside five new result files."""
    image_path, mask_path = oblique_head
    out = tmp_path / "results"
    runner = tmp_path / "stopped_renames.py"
    runner.write_text(STOPPED_RENAMES.format(lib=str(REPO / "CeVAEAnomaly"), how=how))
    proc = subprocess.run([sys.executable, str(runner), str(SCRIPT), "--input", str(image_path), "--mask",
                           str(mask_path), "--model", str(tiny_bundle), "--output-dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 130, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    written = sorted(p.name for p in out.iterdir())  # and no temporary file
    assert "nothing was written" not in message and all(str(out / name) in message for name in written)
    if how == "signal":
        assert sorted(written) == sorted(OUTPUTS) and "interrupted after every result was written" in message
    else:
        assert len(written) == 2 and message.endswith(" were written, not the other 4 results."), message


TERMINATED_WRITES = """\
import os, runpy, signal, sys
sys.path.insert(0, {lib!r})
import CeVAEAnomalyLib.io.atomic as atomic
real, written = atomic.check_complete, []
def check_complete(tmp, target, expected_bytes=None):
    real(tmp, target, expected_bytes)
    written.append(tmp)
    if len(written) == 2:  # a scheduler's kill (SIGTERM) once two temporary results are written
        os.kill(os.getpid(), signal.SIGTERM)
atomic.check_complete = check_complete
{setup}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SLICER_APP = """\
import slicer, types
class App:  # a headless Slicer's application, which quits with the status given
    def commandOptions(self):
        return types.SimpleNamespace(runPythonAndExit=True)
    def exit(self, status):
        print("APPLICATION EXIT STATUS", status)
        sys.exit(status)
slicer.app = App()
slicer.mrmlScene = slicer.vtkMRMLScene()
"""


@pytest.mark.parametrize("slicer_app", [False, True])
def test_a_terminated_run_removes_its_temporary_files_and_says_so(oblique_head, tiny_bundle, tmp_path, slicer_app):
    """SIGTERM (kill, a job scheduler's time limit) while the results were written: Python's default action ended
    the process (status -15) without a word, its two temporary results left in the output folder; it stops as
    detect stops, with "terminated" and status 143 (that of a headless Slicer too), and no temporary file."""
    image_path, mask_path = oblique_head
    out = tmp_path / "results"
    runner = tmp_path / "terminated_writes.py"
    runner.write_text(TERMINATED_WRITES.format(lib=str(REPO / "CeVAEAnomaly"), setup=SLICER_APP if slicer_app else ""))
    proc = subprocess.run([sys.executable, str(runner), str(SCRIPT), "--input", str(image_path), "--mask",
                           str(mask_path), "--model", str(tiny_bundle), "--output-dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "DetectVolume: terminated; nothing was written.", proc.stderr
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())  # no result, no temporary file
    if slicer_app:
        assert proc.stdout.strip().splitlines()[-1] == "APPLICATION EXIT STATUS 143"


def test_a_library_that_fails_to_import_quits_headless_slicer_with_an_error(tmp_path):
    proc = run_in_headless_slicer(tmp_path, "--input", "x.nii.gz", "--output-dir", tmp_path,
                                  setup='sys.modules["CeVAEAnomalyLib"] = None  # a missing or broken library')
    assert proc.stdout.strip() == "APPLICATION EXIT STATUS 1", proc.stderr  # today: the script raises, Slicer hangs
    assert proc.stderr.strip().splitlines()[-1].startswith("DetectVolume: error: the CeVAEAnomaly library could not")


def test_plain_python_without_slicer_core_says_so_in_one_line(tmp_path):
    """README's `python CeVAEAnomaly/Scripts/DetectVolume.py ...` in a Python without slicer-core ended in a
    traceback (ModuleNotFoundError: No module named 'slicer'); it says in one line what to install, status 1."""
    code = ("import runpy, sys; sys.modules['slicer'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT), "--input", "x.nii.gz", "--output-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("DetectVolume: error: ") and "pip install slicer-core" in line, line


def test_usage_inside_slicer_which_takes_help_for_itself(tmp_path):
    proc = run_in_headless_slicer(tmp_path, "--usage")
    assert proc.stdout.strip().splitlines()[-1] == "APPLICATION EXIT STATUS 0", proc.stderr
    assert proc.stdout.startswith("usage: DetectVolume") and "--output-dir" in proc.stdout


def run_on_nifti(run, image, mask, bundle, folder: Path):
    """The script (``run``: :func:`run_here`'s) on ``image`` and ``mask`` written as NIfTI files into ``folder``:
    (its output folder, its exit status, its log and stderr)."""
    sitk.WriteImage(image, str(folder / "head.nii.gz"))
    sitk.WriteImage(mask, str(folder / "head_mask.nii.gz"))
    out = folder / "results"
    return (out, *run("--input", folder / "head.nii.gz", "--mask", folder / "head_mask.nii.gz", "--model", bundle,
                      "--output-dir", out, "--device", "cpu", "--threshold", "0.3"))


def test_a_left_handed_input_gets_outputs_on_its_own_grid(tiny_bundle, tmp_path, run_here):
    """FSL stores NIfTI as LAS (a left-handed index order). Slicer keeps such a volume with its slice axis
    reversed; the script still writes the score and labelmap on the input file's grid, as detect does."""
    image, mask = make_head(direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1), seed=12)
    out, status, stderr = run_on_nifti(run_here, image, mask, tiny_bundle, tmp_path)
    assert status == 0, stderr
    brain = sitk.GetArrayFromImage(mask) > 0
    for name in OUTPUTS[:2]:
        result = sitk.ReadImage(str(out / name))
        assert result.GetSize() == image.GetSize()
        np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-5)
        values = sitk.GetArrayFromImage(result)
        assert values[brain].any() and not values[~brain].any()  # the voxels sit where the brain is
    scores = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUTS[0])))  # [k, j, i]
    with open(out / OUTPUTS[4], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["axis"] == "2" for r in rows)  # the superior-inferior axis
    for r in rows:  # the table counts slices on the file's grid: its highest score is the written map's there
        k = int(r["index"])
        highest = float(scores[k][brain[k]].max()) if brain[k].any() else 0.0
        assert float(r["map_max"]) == pytest.approx(highest, rel=1e-4, abs=1e-4)
    from CeVAEAnomalyLib.cli.main import main

    assert main(["evaluate", "--score", str(out / OUTPUTS[0]), "--mask", str(tmp_path / "head_mask.nii.gz")]) == 0


def test_nan_voxels_are_left_out_as_on_the_command_line(tiny_bundle, tmp_path, run_here):
    """Slicer's reader turns a float NIfTI's NaN voxels into 0 (dark tissue, scored as a lesion); the script puts
    them back, so they are left out of the brain with a warning, as `cevae-anomaly detect` does, also where the
    volume is kept with an axis reversed (left-handed)."""
    image, mask = make_head(direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1), seed=12)
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    brain = sitk.GetArrayFromImage(mask) > 0
    centre = [int(np.mean(axis)) for axis in np.nonzero(brain)]
    hole = tuple(slice(c - 3, c + 3) for c in centre)
    voxels[hole] = np.nan
    with_nan = sitk.GetImageFromArray(voxels)
    with_nan.CopyInformation(image)
    out, status, stderr = run_on_nifti(run_here, with_nan, mask, tiny_bundle, tmp_path)
    assert status == 0, stderr
    assert "NaN" in stderr  # the warning the command line gives
    scores = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUTS[0])))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUTS[1])))
    assert not scores[hole].any() and not labels[hole].any()  # left out, not a lesion
    assert scores[brain].any()


def test_a_volume_slicer_cannot_load_is_refused_naming_what_it_is(tmp_path, run_here):
    """A colour volume or a 4D series was refused as "corrupt or unsupported format", which detect names."""
    image, _ = make_head(size=(20, 22, 18))
    colour = sitk.Compose([sitk.Cast(image, sitk.sitkUInt8)] * 3)
    sitk.WriteImage(colour, str(tmp_path / "colour.nrrd"))
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(tmp_path / "series.nii.gz"))
    for name, problem in (("colour.nrrd", "has 3 components per voxel"), ("series.nii.gz", "is 4D")):
        status, stderr = run_here("--input", tmp_path / name, "--output-dir", tmp_path / "out")
        last = stderr.strip().splitlines()[-1]
        assert status == 2 and last.startswith("DetectVolume: error: ") and problem in last, stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_nifti_image_or_mask_is_refused_as_detect_refuses_it(tmp_path, run_here):
    """Slicer's reader fills the missing part of a truncated NIfTI with zeros: an int16 scan or a brain mask cut
    short was scored as if whole (a float scan was refused, by the NaN check that reads it again)."""
    import gzip

    image, mask = make_head(size=(24, 26, 22), dtype=np.int16)
    for name, volume in (("scan.nii.gz", image), ("mask.nii.gz", mask)):
        sitk.WriteImage(volume, str(tmp_path / name))
        whole = gzip.decompress((tmp_path / name).read_bytes())
        (tmp_path / name.replace(".nii.gz", "_cut.nii")).write_bytes(whole[: len(whole) * 3 // 4])
    for args, what in ((("--input", tmp_path / "scan_cut.nii", "--mask", tmp_path / "mask.nii.gz"), "image"),
                       (("--input", tmp_path / "scan.nii.gz", "--mask", tmp_path / "mask_cut.nii"), "brain mask")):
        status, stderr = run_here(*args, "--output-dir", tmp_path / "out")
        last = stderr.strip().splitlines()[-1]
        assert status == 2 and f"The {what} file" in last and "is truncated or corrupt" in last, stderr
    assert not (tmp_path / "out").exists()


def test_nan_voxels_of_an_analyze_pair_are_left_out_as_on_the_command_line(tiny_bundle, tmp_path, run_here):
    """The NaN voxels of a float .hdr/.img pair, which Slicer's reader also turns into 0, were scored as dark
    tissue: only a .nii or .nii.gz file had them put back."""
    image, mask = make_head(seed=12)
    voxels = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayFromImage(mask) > 0
    hole = tuple(slice(int(np.mean(axis)) - 3, int(np.mean(axis)) + 3) for axis in np.nonzero(brain))
    voxels[hole] = np.nan
    with_nan = sitk.GetImageFromArray(voxels)
    with_nan.CopyInformation(image)
    sitk.WriteImage(with_nan, str(tmp_path / "head.hdr"))
    sitk.WriteImage(mask, str(tmp_path / "head_mask.nii.gz"))
    out = tmp_path / "results"
    status, stderr = run_here("--input", tmp_path / "head.hdr", "--mask", tmp_path / "head_mask.nii.gz", "--model",
                              tiny_bundle, "--output-dir", out, "--device", "cpu", "--threshold", "0.3")
    assert status == 0, stderr
    assert "NaN" in stderr
    scores = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUTS[0])))
    assert not scores[hole].any() and scores[brain].any()


def test_the_scripts_storage_nodes_are_released_after_writing():
    """CreateDefaultStorageNode hands its caller a reference to own (as CreateNodeInstance, released in Undo.keep):
    _node_writer never released it, so every file written through a node left a storage node behind. Nothing outside
    the writer sees that node, so the premise is checked on a real scene and the release in the script's source."""
    import ast

    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"):
        storage = scene.AddNewNodeByClass(cls).CreateDefaultStorageNode()
        assert storage.GetReferenceCount() == 2  # the caller's and this Python reference
        storage.UnRegister(None)
        assert storage.GetReferenceCount() == 1
    writer = next(f for f in ast.walk(ast.parse(SCRIPT.read_text())) if getattr(f, "name", "") == "_node_writer")
    calls = [ast.unparse(c) for c in ast.walk(writer) if isinstance(c, ast.Call)]
    created = [c for c in calls if c.endswith(".CreateDefaultStorageNode()")]
    assert len(created) == 1 and "storage.UnRegister(None)" in calls, calls


def test_progress_says_each_step_once_not_each_registration_iteration(script, caplog):
    """A mask-less run's registration reports each of its hundreds of iterations; the log got a line for each, most
    of them the same percentage and words."""
    progress = script.Progress()
    with caplog.at_level(logging.INFO, logger=script.log.name):
        for i in range(200):
            progress(0.1 + 0.0001 * i, "Registering brain template (initial pose)")
        progress(0.2, "Registering brain template (similarity)")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [" 10% Registering brain template (initial pose)", " 11% Registering brain template (initial pose)",
                     " 12% Registering brain template (initial pose)", " 20% Registering brain template (similarity)"]


def test_a_missing_bundled_model_is_said_with_the_scripts_model_option(run_here, oblique_head, tmp_path, monkeypatch):
    """DetectVolume without --model where the bundled model is missing names its --model option, as detect does (the
    library's own words are the Slicer panel's)."""
    import CeVAEAnomalyLib.data as data

    monkeypatch.setattr(data, "DEFAULT_MODEL_NAME", "absent.cevae")
    image_path, mask_path = oblique_head
    status, said = run_here("--input", image_path, "--mask", mask_path, "--output-dir", tmp_path / "out")
    assert status == 2
    assert said.strip().splitlines()[-1] == (f"DetectVolume: error: The bundled default model "
                                             f"{data.data_path('absent.cevae')} is missing (the installation is "
                                             "incomplete): pass --model BUNDLE, or install CeVAEAnomaly again."), said


def test_a_result_the_storage_node_cannot_write_is_said_as_every_failed_output(script, tmp_path):
    """A segmentation or volume that Slicer's storage node failed to write was said as "Could not write
    head_segmentation to /out/.head_segmentation.seg.nrrd.1a2b3c4d-...-123.seg.nrrd.": the hidden temporary's name,
    not the output's, and neither that nothing was replaced nor what to do, unlike every other failed output."""
    import slicer
    from CeVAEAnomalyLib.errors import WriteFailed
    from CeVAEAnomalyLib.io.atomic import write_all

    scene = slicer.vtkMRMLScene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "head_segmentation")  # no segment: refused
    out = tmp_path / "results"
    out.mkdir()
    (out / "head_segmentation.seg.nrrd").write_text("the earlier run's\n")
    target = out / "head_segmentation.seg.nrrd"
    with pytest.raises(WriteFailed) as raised:
        write_all({out / "head_components.csv": "x\n", target: script._node_writer(segmentation)}, overwrite=True)
    assert str(raised.value) == (
        f"Could not write {target}: Segmentation source representation Binary labelmap cannot be written to file. "
        f"Nothing was replaced. Free some space on the disk holding {out}, then run again.")
    assert [p.name for p in out.iterdir()] == [target.name] and target.read_text() == "the earlier run's\n"


@pytest.mark.skipif(not os.path.isdir("/sys/fs"), reason="needs Linux's /sys/fs, which refuses new files")
def test_a_storage_node_refused_by_the_system_gives_the_system_error(script):
    """Where the file cannot be opened for writing, the writer raises the system's error (a storage node says no
    errno), so that write_all says what to do about its cause (here permissions), not "Failed to create directory
    '/sys/fs/TempWritehead_score'" as Slicer's volume storage node says."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "head_score")
    voxels = vtk.vtkImageData()
    voxels.SetDimensions(4, 4, 4)
    voxels.AllocateScalars(vtk.VTK_FLOAT, 1)
    volume.SetAndObserveImageData(voxels)
    with pytest.raises(OSError) as raised:
        script._node_writer(volume)("/sys/fs/head_score.nrrd")
    assert raised.value.errno in (errno.EACCES, errno.EPERM) and not os.path.exists("/sys/fs/head_score.nrrd")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_gpu_is_said_once_before_the_volume_is_read(tiny_bundle, tmp_path, run_here, caplog):
    """``--device cuda`` without CUDA was said only after the volume was read and the model loaded (as ``detect``
    says it before the scan is read): a volume that could not be read was refused without a word about the
    device."""
    fallback = "CUDA was requested but is not available; using the CPU."
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    status, said = run_here("--input", tmp_path / "bad.nii.gz", "--output-dir", tmp_path / "out", "--device", "cuda")
    assert status == 2 and said.count(fallback) == 1, said

    image, mask = make_head(seed=4)
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "head_mask.nii.gz"))
    out = tmp_path / "results"
    status, said = run_here("--input", tmp_path / "head.nii.gz", "--mask", tmp_path / "head_mask.nii.gz", "--model",
                            tiny_bundle, "--output-dir", out, "--device", "cuda", "--threshold", "0.3")
    messages = [r.getMessage() for r in caplog.records]
    assert status == 0 and messages.count(fallback) == 1, said
    assert messages.index(fallback) < messages.index("  0% Reading the volume")
    assert json.loads((out / "head_record.json").read_text())["device"] == "cpu"
