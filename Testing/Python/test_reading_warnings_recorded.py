"""Warnings given while reading an input (a DICOM series that may lack end slices) are kept where a detection's other
warnings are: detect's record, batch's summary and DetectVolume.py's record, not only said on the console."""
from __future__ import annotations

import csv
import json
import logging

import SimpleITK as sitk

from conftest import make_head
from test_dicom_series import write_series

CUT_SHORT = "may be missing at its ends"  # the series reader's warning of fewer slices than acquired


def _cut_series(tmp_path):
    """A DICOM series of 12 slices whose slices say their acquisition made 14, and a brain mask file on its grid."""
    image, mask = make_head(size=(32, 36, 12), spacing=(2.0, 2.0, 3.0), seed=5)
    series = write_series(image, tmp_path / "subj1" / "T1", {"0020|1002": "14"})
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    return series, tmp_path / "mask.nii.gz"


def test_detect_records_the_warning_of_reading_a_dicom_series(tiny_bundle, tmp_path, caplog):
    from CeVAEAnomalyLib.cli.main import main

    series, mask = _cut_series(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["detect", str(series), "--mask", str(mask), "--score", str(tmp_path / "score.nrrd"),
                     "--record", str(tmp_path / "record.json"),
                     "--model", str(tiny_bundle), "--device", "cpu", "--threshold", "0.3"]) == 0
    assert CUT_SHORT in caplog.text
    warnings = json.loads((tmp_path / "record.json").read_text())["warnings"]
    assert [w for w in warnings if CUT_SHORT in w] == [
        f"The DICOM series in {series} holds 12 slices, but they say their acquisition made 14 images (0020,1002 "
        "Images in Acquisition): 2 slice(s) may be missing at its ends (a copy or export cut short?). Copy or export "
        "the series again if so."]


def test_batch_summary_keeps_the_warning_of_reading_a_dicom_series(tiny_bundle, tmp_path):
    from CeVAEAnomalyLib.cli.main import main

    series, mask = _cut_series(tmp_path)
    listing = tmp_path / "list.csv"
    listing.write_text(f"image,mask\n{series},{mask}\n")
    out = tmp_path / "out"
    assert main(["batch", str(listing), "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu",
                 "--threshold", "0.3"]) == 0
    with open(out / "summary.csv", newline="") as fh:
        [row] = list(csv.DictReader(fh))
    assert row["status"] == "ok" and CUT_SHORT in row["warnings"] and str(series) in row["warnings"]


def test_detect_volume_records_the_warning_of_reading_a_dicom_series(script, tiny_bundle, tmp_path):
    series, mask = _cut_series(tmp_path)
    assert script.main(["--input", str(series), "--mask", str(mask), "--output-dir", str(tmp_path / "out"),
                        "--model", str(tiny_bundle), "--device", "cpu", "--threshold", "0.3"]) == 0
    warnings = json.loads((tmp_path / "out" / "T1_record.json").read_text())["warnings"]
    assert sum(CUT_SHORT in w for w in warnings) == 1
