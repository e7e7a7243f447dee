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
