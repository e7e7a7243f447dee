"""Detection results saved beside the scans they were made from are results, not scans of the cohort."""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.batch import collect_inputs
from CeVAEAnomalyLib.cli.commands import _healthy_subjects
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> Path:
    """The sample head and its brain mask, with the results of `detect` (and a Slicer-style score map and
    segmentation, as DetectVolume.py names them) saved beside them, as a user does after scoring one scan."""
    d = tmp_path_factory.mktemp("site")
    shutil.copy(data_path("colin27_t1_2mm.nii.gz"), d / "colin27_t1.nii.gz")
    shutil.copy(data_path("colin27_brainmask_2mm.nii.gz"), d / "colin27_brainmask.nii.gz")
    assert main(["detect", str(d / "colin27_t1.nii.gz"), "--mask", str(d / "colin27_brainmask.nii.gz"),
                 "--score", str(d / "colin27_t1_score.nii.gz"), "--labelmap", str(d / "colin27_t1_labelmap.nii.gz"),
                 "--device", "cpu"]) == 0
    score = sitk.ReadImage(str(d / "colin27_t1_score.nii.gz"))
    sitk.WriteImage(score, str(d / "colin27_t1_score.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(d / "colin27_t1_labelmap.nii.gz")), str(d / "colin27_t1_segmentation.seg.nrrd"))
    sitk.WriteImage(score, str(d / "other_score.nii.gz"))  # a volume of its own: no 'other' beside it
    return d


def test_batch_leaves_out_the_results_beside_their_scan(scanned, caplog):
    """batch over such a folder scored the anomaly map as a head (an 'ok' row for a person who does not exist) and
    failed on the labelmap and the segmentation, ending with exit status 2."""
    with caplog.at_level(logging.WARNING):
        items = collect_inputs(scanned)
    assert [(it.name, it.mask.name if it.mask else None) for it in items] == [
        ("colin27_t1", "colin27_brainmask.nii.gz"), ("other_score", None)]
    for name in ("colin27_t1_score.nii.gz", "colin27_t1_labelmap.nii.gz", "colin27_t1_score.nrrd",
                 "colin27_t1_segmentation.seg.nrrd"):
        assert f"{name} in {scanned} is taken for a detection result of colin27_t1.nii.gz" in caplog.text
    assert "list the inputs in a CSV (batch's list, or --manifest)." in caplog.text  # (train's CSV is --manifest)


def test_training_and_calibration_leave_them_out_too(scanned):
    """`calibrate site/*.nii.gz` would calibrate on the anomaly map and labelmap as healthy scans."""
    given = sorted(str(p) for p in scanned.glob("*.nii.gz"))
    subjects = _healthy_subjects(argparse.Namespace(manifest=None, images=given))
    assert sorted((s.image.name, s.mask.name if s.mask else None) for s in subjects) == [
        ("colin27_t1.nii.gz", "colin27_brainmask.nii.gz"), ("other_score.nii.gz", None)]
    folder = _healthy_subjects(argparse.Namespace(manifest=None, images=[str(scanned)]))
    assert sorted(s.image.name for s in folder) == ["colin27_t1.nii.gz", "other_score.nii.gz"]


def test_results_saved_from_the_slicer_panel_are_left_out_too(scanned, tmp_path, caplog):
    """The panel names its outputs after the scan ('colin27_t1 anomaly score', '... (frame 2)' for a sequence frame,
    '_1' where the name is taken), and Slicer's Save writes them beside the scan under those names: `calibrate site/`
    calibrated on the saved anomaly map as a healthy scan (its threshold rose from 5.4 to 6.9 with three 3 mm heads)
    and stopped on the labelmap ("this image is constant")."""
    for name in ("colin27_t1.nii.gz", "colin27_brainmask.nii.gz"):
        shutil.copy(scanned / name, tmp_path / name)
    score = sitk.ReadImage(str(scanned / "colin27_t1_score.nii.gz"))
    labelmap = sitk.ReadImage(str(scanned / "colin27_t1_labelmap.nii.gz"))
    saved = {"colin27_t1 anomaly score.nrrd": score, "colin27_t1 anomaly labelmap.nrrd": labelmap,
             "colin27_t1 anomaly segmentation.seg.nrrd": labelmap, "colin27_t1 anomaly score (frame 2)_1.nrrd": score}
    for name, image in saved.items():
        sitk.WriteImage(image, str(tmp_path / name))
    sitk.WriteImage(score, str(tmp_path / "colin27 anomaly score.nrrd"))  # no scan 'colin27' beside it: a volume
    with caplog.at_level(logging.WARNING):
        subjects = _healthy_subjects(argparse.Namespace(manifest=None, images=[str(tmp_path)]))
    assert sorted(s.image.name for s in subjects) == ["colin27 anomaly score.nrrd", "colin27_t1.nii.gz"]
    for name in saved:
        assert f"{name} in {tmp_path} is taken for a detection result of colin27_t1.nii.gz" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and given as files
        subjects = _healthy_subjects(argparse.Namespace(manifest=None, images=[str(p) for p in tmp_path.iterdir()]))
    assert sorted(s.image.name for s in subjects) == ["colin27 anomaly score.nrrd", "colin27_t1.nii.gz"]
