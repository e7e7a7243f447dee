"""The Slicer module's report: ``CeVAEAnomalyLogic.saveReport`` writes the HTML page ``detect --report`` writes, of a
result the panel or the console produced, named by its volume node, with the key picture where matplotlib is
installed; refused, with nothing written, for a bad name, an existing file, a result whose nodes were removed, one
without a record, and a volume whose voxels changed since."""
from __future__ import annotations

import base64
import csv
import dataclasses
import io
import subprocess
import sys

import pytest

from conftest import WITHOUT_MATPLOTLIB, add_volume, make_head
from test_report import Page, facts

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.result import components_csv, components_summary, slice_scores_csv  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "Patient <b>&</b> café"  # a node name with markup and non-ASCII


@pytest.fixture
def detected(tiny_bundle):
    """(logic, result) of a detection of a synthetic head in a scene of its own (kept while the test runs), as the
    console makes it."""
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=7)[0], NAME)
    logic = CeVAEAnomalyLogic()
    yield logic, logic.process(volume, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    scene.Clear(1)


def test_the_report_of_a_result_is_detects_page_named_by_the_volume_node(detected, tmp_path):
    logic, result = detected
    written = logic.saveReport(result, str(tmp_path / "report.html"))
    assert written == tmp_path / "report.html"
    text = written.read_text(encoding="utf-8")
    page = Page(text)
    assert page.errors == [] and "<b>" not in text
    said = facts(page)
    record = result.detection.record
    assert said["Input"] == NAME and said["Made (UTC)"] == record.created_utc
    assert said["Threshold"] == f"{record.threshold:.4g}" and said["Model SHA-256"] == record.model.sha256
    assert components_summary(result.detection.components) in page.text
    table = list(csv.DictReader(io.StringIO(components_csv(result.detection))))
    assert page.table_headed("Rank")[1:] == [[r["component"], r["volume_ml"], r["side"], r["max_score"], r["r"],
                                              r["a"], r["s"]] for r in table]
    assert page.table_headed("axis") == list(csv.reader(io.StringIO(slice_scores_csv(result.detection))))[:6]
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    if subprocess.run([sys.executable, "-c", "import matplotlib"]).returncode == 0:
        from CeVAEAnomalyLib.slicer.mrml import image_from_volume
        from CeVAEAnomalyResearch.figures import result_picture_png

        drawn = result_picture_png(image_from_volume(result.volume), result.detection, NAME)
        assert [base64.b64decode(src.split(",", 1)[1]) for src in images] == [drawn]
    else:
        assert images == [] and "needs the research extra" in page.text


def test_a_bad_name_and_an_existing_file_are_refused_and_overwrite_replaces_it(detected, tmp_path):
    logic, result = detected
    with pytest.raises(CeVAEError, match=r"name ending in \.html"):
        logic.saveReport(result, tmp_path / "report.pdf")
    assert not (tmp_path / "report.pdf").exists()
    mine = tmp_path / "report.htm"
    mine.write_text("mine")
    with pytest.raises(CeVAEError, match="already exists"):
        logic.saveReport(result, mine)
    assert mine.read_text() == "mine"
    assert logic.saveReport(result, mine, overwrite=True) == mine
    assert facts(Page(mine.read_text(encoding="utf-8")))["Input"] == NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.htm"]  # no temporary file left


def test_a_result_whose_nodes_were_removed_is_refused(detected, tmp_path):
    logic, result = detected
    scene = result.volume.GetScene()
    scene.RemoveNode(result.nodes.score)
    with pytest.raises(CeVAEError, match="were removed from the scene"):
        logic.saveReport(result, tmp_path / "report.html")
    scene.RemoveNode(result.volume)
    with pytest.raises(CeVAEError, match=f"input volume '{NAME}' of this result was removed"):
        logic.saveReport(result, tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_a_result_without_a_record_is_refused(detected, tmp_path):
    """A run of a version before records loads with ``detection.record`` None (result.load_result)."""
    logic, result = detected
    old = dataclasses.replace(result, detection=dataclasses.replace(result.detection, record=None))
    with pytest.raises(CeVAEError, match="holds no record of how it was made"):
        logic.saveReport(old, tmp_path / "report.html")
    with pytest.raises(CeVAEError, match="got a DetectionResult"):
        logic.saveReport(result.detection, tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_a_volume_changed_since_the_detection_is_refused_where_the_picture_is_drawn(detected, tmp_path):
    pytest.importorskip("matplotlib")
    logic, result = detected
    voxels = slicer.util.arrayFromVolume(result.volume)
    voxels[10, 20, 20] += 100.0
    slicer.util.arrayFromVolumeModified(result.volume)
    with pytest.raises(CeVAEError, match="holds other voxels than this detection scored"):
        logic.saveReport(result, tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


SAVE_WITHOUT_MATPLOTLIB = WITHOUT_MATPLOTLIB + """import slicer
sys.path.insert(0, sys.argv[3])
from conftest import add_volume, make_head
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic
scene = slicer.vtkMRMLScene()
volume = add_volume(scene, make_head(seed=7)[0], "head")
logic = CeVAEAnomalyLogic()
logic.saveReport(logic.process(volume, modelPath=sys.argv[1], device="cpu", threshold=0.5), sys.argv[2])
"""


def test_without_matplotlib_the_report_is_saved_and_says_the_picture_needs_the_extra(tiny_bundle, tmp_path):
    from pathlib import Path

    report = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-c", SAVE_WITHOUT_MATPLOTLIB, str(tiny_bundle), str(report),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    page = Page(report.read_text(encoding="utf-8"))
    assert page.errors == [] and not any(tag == "img" for tag, _ in page.tags)
    assert "needs the research extra" in page.text and facts(page)["Input"] == "head"


def test_detect_volume_writes_the_report_detect_writes(script, tiny_bundle, tmp_path):
    """Slicer's headless script (Scripts/DetectVolume.py) had no --report, which detect has: it writes the same page,
    the scoring's time apart, with its other results."""
    import json

    import SimpleITK as sitk
    from CeVAEAnomalyLib.cli.main import main

    image, mask = make_head(seed=7)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "brain.nii.gz"))
    given = ["--mask", str(tmp_path / "brain.nii.gz"), "--model", str(tiny_bundle), "--device", "cpu", "--threshold",
             "0.5"]
    assert main(["detect", str(tmp_path / "scan.nii.gz"), *given, "--score", str(tmp_path / "score.nii.gz"),
                 "--record", str(tmp_path / "detect.json"), "--report", str(tmp_path / "detect.html")]) == 0
    out = tmp_path / "results"
    assert script.main(["--input", str(tmp_path / "scan.nii.gz"), *given, "--output-dir", str(out), "--report",
                        str(tmp_path / "script.html")]) == 0
    made = json.loads((out / "scan_record.json").read_text())["created_utc"]
    detected = json.loads((tmp_path / "detect.json").read_text())["created_utc"]
    text = (tmp_path / "script.html").read_text(encoding="utf-8")
    assert facts(Page(text))["Input"] == "scan.nii.gz"
    assert text == (tmp_path / "detect.html").read_text(encoding="utf-8").replace(detected, made)
    assert len(list(out.iterdir())) == 6  # and its other results, as without a report


def test_detect_volume_refuses_a_report_misnamed_or_existing_before_scoring(script, tiny_bundle, tmp_path, capsys):
    import SimpleITK as sitk

    sitk.WriteImage(make_head(seed=7)[0], str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "results"
    args = ["--input", str(tmp_path / "scan.nii.gz"), "--model", str(tiny_bundle), "--output-dir", str(out),
            "--device", "cpu", "--report"]
    assert script.main([*args, str(tmp_path / "report.pdf")]) == 2
    assert "name ending in .html" in capsys.readouterr().err
    (tmp_path / "report.html").write_text("mine")
    assert script.main([*args, str(tmp_path / "report.html")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "report.html").read_text() == "mine" and not out.exists()  # nothing scored or written


def test_the_report_of_a_sequence_frame_names_the_frame_scored(tiny_bundle, tmp_path):
    """A detection of one frame of a 4D sequence: the report named the proxy volume alone ('cine'), so the reports of
    two frames' results said the same of different scans and the panel offered the same file name for both. It names
    the frame scored (heading, facts), as the result's nodes and summary do."""
    from test_slicer_worker import sequence_scene

    scene, sequences, browser, proxy = sequence_scene()
    logic = CeVAEAnomalyLogic()
    first = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    browser.SetSelectedItemNumber(2)
    sequences.UpdateProxyNodesFromSequences(browser)
    third = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    assert first.title == "cine (frame 1)" and third.title == "cine (frame 3)"
    said = facts(Page(logic.saveReport(third, tmp_path / "third.html").read_text(encoding="utf-8")))
    assert said["Input"] == "cine (frame 3)"
    assert said["Sequence frame"] == "frame 3 of 3 (time = 4 s) of 'cine browser'"
    browser.SetSelectedItemNumber(0)
    sequences.UpdateProxyNodesFromSequences(browser)
    page = Page(logic.saveReport(first, tmp_path / "first.html").read_text(encoding="utf-8"))
    assert facts(page)["Sequence frame"] == "frame 1 of 3 (time = 0 s) of 'cine browser'"
    assert "Anomaly detection report: cine (frame 1)" in page.text
    scene.Clear(1)


def test_the_report_of_a_frame_draws_that_frame_while_the_browser_shows_another(tiny_bundle, tmp_path):
    """The panel keeps a frame's results (and its Save report... enabled) while the browser shows a frame without
    results of its own; saving them was refused where matplotlib draws the picture ("another sequence frame is
    shown"), though the sequence keeps the frame scored. The picture is drawn from that frame, as detect draws it."""
    pytest.importorskip("matplotlib")
    from CeVAEAnomalyLib.slicer.mrml import image_from_volume
    from CeVAEAnomalyResearch.figures import result_picture_png
    from test_slicer_worker import sequence_scene

    scene, sequences, browser, proxy = sequence_scene()
    logic = CeVAEAnomalyLogic()
    browser.SetSelectedItemNumber(2)
    sequences.UpdateProxyNodesFromSequences(browser)
    third = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    drawn = result_picture_png(image_from_volume(proxy), third.detection, "cine (frame 3)")
    browser.SetSelectedItemNumber(0)
    sequences.UpdateProxyNodesFromSequences(browser)
    page = Page(logic.saveReport(third, tmp_path / "third.html").read_text(encoding="utf-8"))
    assert [base64.b64decode(attrs["src"].split(",", 1)[1]) for tag, attrs in page.tags if tag == "img"] == [drawn]
    scene.Clear(1)
