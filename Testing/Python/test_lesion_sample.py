"""The bundled lesioned sample scan and its truth: made by their script from the 2 mm template, and the bundled model
finds the lesions."""
from __future__ import annotations

import csv
import importlib.util
import logging

import numpy as np
import SimpleITK as sitk

from conftest import REPO
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.detector import detect


def make_lesion_sample_script():
    spec = importlib.util.spec_from_file_location("make_lesion_sample", REPO / "scripts" / "make_lesion_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_lesioned_scan_is_what_its_script_makes_on_the_templates_grid():
    script = make_lesion_sample_script()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")))
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    shipped = sitk.ReadImage(str(data_path(script.LESION_SAMPLE)))
    made, truth, lesions = script.make_lesion_sample(t1, mask)
    assert shipped.GetPixelID() == t1.GetPixelID() == sitk.sitkUInt8
    for image in (shipped, made):
        assert (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == (
            t1.GetSize(), t1.GetSpacing(), t1.GetOrigin(), t1.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(shipped), sitk.GetArrayViewFromImage(made))
    shipped_truth = sitk.ReadImage(str(data_path(script.LESION_TRUTH)))
    assert shipped_truth.GetPixelID() == truth.GetPixelID() == sitk.sitkUInt8
    assert (shipped_truth.GetSize(), shipped_truth.GetSpacing(), shipped_truth.GetOrigin(),
            shipped_truth.GetDirection()) == (t1.GetSize(), t1.GetSpacing(), t1.GetOrigin(), t1.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(shipped_truth), sitk.GetArrayViewFromImage(truth))
    assert sorted(lesion.kind for lesion in lesions) == ["hyper", "hypo"]
    changed = sitk.GetArrayViewFromImage(shipped) != sitk.GetArrayViewFromImage(t1)
    lesion = sitk.GetArrayViewFromImage(truth) > 0
    assert lesion.sum() > 400 and not (changed & ~sitk.GetArrayViewFromImage(mask).astype(bool)).any()


def test_the_bundled_model_flags_each_lesion_of_the_sample_and_nothing_on_the_healthy_scan():
    script = make_lesion_sample_script()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")))
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    _, truth, _ = script.make_lesion_sample(t1, mask)
    result = detect(sitk.ReadImage(str(data_path(script.LESION_SAMPLE))), default_model_path(), device="cpu")
    flagged = sitk.GetArrayViewFromImage(result.labelmap) > 0
    lesions = sitk.GetArrayFromImage(sitk.ConnectedComponent(truth))
    assert lesions.max() == 2 and all(flagged[lesions == n].any() for n in (1, 2))
    assert len(result.components) == 2
    dice = 2 * (flagged & (lesions > 0)).sum() / (flagged.sum() + (lesions > 0).sum())
    assert dice > 0.7
    healthy = detect(t1, default_model_path(), device="cpu")
    assert not (sitk.GetArrayViewFromImage(healthy.labelmap) > 0).any()


def test_the_script_writes_the_scan_and_its_truth_as_shipped(tmp_path):
    assert make_lesion_sample_script().main(["--out-dir", str(tmp_path)]) == 0
    for name in ("colin27_lesions_t1_2mm.nii.gz", "colin27_lesions_truth_2mm.nii.gz"):
        made, shipped = (sitk.ReadImage(str(path)) for path in (tmp_path / name, data_path(name)))
        assert np.array_equal(sitk.GetArrayViewFromImage(made), sitk.GetArrayViewFromImage(shipped))


def test_evaluate_with_the_shipped_truth_counts_both_lesions_of_a_detection_of_the_sample_found(tmp_path, capsys,
                                                                                                 caplog):
    """What a user does to compare the finding with the true lesions (data/README.md): detect on the sample, evaluate
    its score map and labelmap against the shipped truth, over the shipped brain mask (without it the AUROCs count
    the background and evaluate warns)."""
    sample, truth, mask = (str(data_path(name)) for name in ("colin27_lesions_t1_2mm.nii.gz",
                                                             "colin27_lesions_truth_2mm.nii.gz",
                                                             "colin27_brainmask_2mm.nii.gz"))
    score, labelmap, metrics = (tmp_path / name for name in ("score.nii.gz", "labelmap.nii.gz", "metrics.csv"))
    assert main(["detect", sample, "--score", str(score), "--labelmap", str(labelmap), "--device", "cpu"]) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--score", str(score), "--gt", truth, "--mask", mask, "--labelmap", str(labelmap),
                     "--out", str(metrics)]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    case, pooled = list(csv.DictReader(metrics.open()))
    for row in (case, pooled):
        assert [row[k] for k in ("n_lesions", "lesions_detected", "lesion_sensitivity", "false_components",
                                 "first_is_lesion")] == ["2", "2", "1", "0", "1"]
    assert "n_lesions 2  lesions_detected 2  lesion_sensitivity 1.0000" in capsys.readouterr().out
