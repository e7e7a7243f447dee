"""A healthy false-positive rate whose calibrated threshold is 0 is refused on every entry point.

Normalised maps set the brain below its median to 0, so the bundled model's calibration gives the grid's top rate,
0.5, a threshold of 0: the labelmap then flagged the whole brain (measured rate 1.0). Rates up to 0.2 (and between
0.2 and 0.5, whose interpolated threshold is above 0) keep their thresholds.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.calibration import find_calibration
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import DetectionRequest
from conftest import add_volume, make_head

REFUSAL = (r"A healthy false-positive rate of 0\.5 gets a threshold of 0 from the model's calibration for this "
           r"scoring: at least 50% of the healthy brain voxels it was measured on score 0, .* so the labelmap would "
           r"flag the whole brain\. Give a rate below 0\.5 \(the highest calibrated rate with a threshold above 0 "
           r"is 0\.2\)\.")


def test_the_bundled_models_rates_up_to_its_floor_keep_their_thresholds_and_0_5_is_refused() -> None:
    header = read_header(default_model_path())
    entry = find_calibration(header.calibration, header.score_options, header.postprocess)
    assert entry["threshold"][-1] == 0.0  # the grid's 0.5: the premise of the refusal
    assert header.threshold_of(DetectionRequest.of(fpr=0.2))[0] == entry["threshold"][-2] > 0
    assert 0 < header.threshold_of(DetectionRequest.of(fpr=0.3))[0] < entry["threshold"][-2]
    assert header.threshold_of(DetectionRequest.of())[0] == header.default_threshold() > 0
    with pytest.raises(CeVAEError, match=REFUSAL):
        header.threshold_of(DetectionRequest.of(fpr=0.5))
    with pytest.raises(CeVAEError, match="rate of 0.5 gets a threshold of 0"):  # the same for the rec score
        header.threshold_of(DetectionRequest.of(fpr=0.5, score_type="rec"))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_detect_and_batch_refuse_the_rate_before_reading_a_volume(head, tmp_path: Path, capsys) -> None:
    image, mask = head
    assert main(["detect", str(image), "--mask", str(mask), "--score", str(tmp_path / "s.nii.gz"),
                 "--device", "cpu", "--fpr", "0.5"]) != 0
    assert re.search(REFUSAL, _one_error_line(capsys.readouterr().err))
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(image)), str(cohort / "a.nii.gz"))
    assert main(["batch", str(cohort), "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--fpr", "0.5"]) != 0
    assert re.search(REFUSAL, _one_error_line(capsys.readouterr().err))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]  # no output of either


def test_the_python_api_and_the_slicer_logic_refuse_the_rate(one_thread) -> None:
    from CeVAEAnomalyLib.engine.detector import detect

    image, mask = make_head(seed=7)
    with pytest.raises(CeVAEError, match=REFUSAL):
        detect(image, default_model_path(), mask, fpr=0.5, device="cpu")
    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    scene = slicer.vtkMRMLScene()
    volume, labelmap = add_volume(scene, image), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    before = scene.GetNumberOfNodes()
    with pytest.raises(CeVAEError, match=REFUSAL):
        CeVAEAnomalyLogic().process(volume, labelmap, fpr=0.5, device="cpu")
    assert scene.GetNumberOfNodes() == before



def test_calibrate_writes_no_model_whose_default_rate_gets_no_threshold(tmp_path: Path, capsys) -> None:
    """--default-fpr 0.5 passed the range check, and the model written could not detect with its defaults: every
    detect, batch or Slicer run without a rate of its own was refused (the summary said its threshold was 'none').
    A 20 mm rim sets most of the 2 mm Colin27 brain to 0, so its calibration gives 0.5 a threshold of 0."""
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "c.nii.gz").write_bytes(data_path("colin27_t1_2mm.nii.gz").read_bytes())
    (healthy / "c_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    out = tmp_path / "site.cevae"
    common = [str(healthy), "--out", str(out), "--rim-mm", "20", "--device", "cpu"]
    assert main(["calibrate", *common, "--default-fpr", "0.5"]) != 0
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: The calibrated model was not written: its default rate gets no threshold. A "
                           "healthy false-positive rate of 0.5 gets a threshold of 0"), line
    assert "Give a rate below 0.5" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["healthy"]
    assert main(["calibrate", *common, "--default-fpr", "0.01"]) == 0
    assert read_header(out).default_threshold() > 0


def test_calibrates_summary_gives_the_source_models_threshold_0_as_such(tmp_path: Path, caplog) -> None:
    """The bundled model is calibrated for its default scoring, and its threshold at 0.5 is 0: the summary of a
    calibration at 0.5 said it was 'not calibrated for this scoring'."""
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "c.nii.gz").write_bytes(data_path("colin27_t1_2mm.nii.gz").read_bytes())
    (healthy / "c_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", str(healthy), "--out", str(tmp_path / "site.cevae"), "--default-fpr", "0.5",
                     "--device", "cpu"]) == 0  # (this one scan's threshold at 0.5 is just above 0)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibrated bundle written")]
    assert len(summary) == 1 and "(cevae_t1_default.cevae at that rate: 0, which flags the whole brain)." in \
        summary[0], summary
