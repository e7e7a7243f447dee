"""Lesion-wise figures of evaluate (CeVAEAnomalyResearch.lesionwise): lesions found, false components, the first
component of the lesion table, per case and pooled, in the metrics table and on the console."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.postprocess import COMPONENT_ORDER, components
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.evaluate import evaluate_case, evaluate_files, write_metrics_csv
from CeVAEAnomalyResearch.lesionwise import LesionCounts, lesion_hits, pooled_lesion_figures

SHAPE = (10, 12, 12)  # (z, y, x)
LESION_COLUMNS = ["n_lesions", "lesions_detected", "lesion_sensitivity", "false_components",
                  "healthy_false_components", "first_is_lesion"]


def image(array: np.ndarray) -> sitk.Image:
    result = sitk.GetImageFromArray(array)
    result.SetSpacing((1.0, 1.0, 2.0))
    result.SetOrigin((-5.0, 3.0, 1.0))
    return result


def two_lesions(false_score: float = 0.7) -> dict:
    """Lesion A (hit by a labelmap component), lesion B (missed), and a false component scoring ``false_score``
    over 8 voxels; the hit component: 2 voxels at 0.9 (summed 1.8)."""
    score = np.full(SHAPE, 0.1, np.float32)
    gt = np.zeros(SHAPE, np.uint8)
    gt[2, 2:4, 2:4] = 1  # lesion A
    gt[7, 8:10, 8:10] = 1  # lesion B, missed
    score[2, 2, 2:4] = 0.9  # the labelmap's component on A (2 voxels)
    score[5, 2:4, 8:12] = false_score  # a false component of 8 voxels
    labelmap = (score >= 0.5).astype(np.uint8)
    mask = np.ones(SHAPE, np.uint8)
    return {"score": image(score), "gt": image(gt), "mask": image(mask), "labelmap": image(labelmap)}


def counts(metrics) -> dict:
    return {column: getattr(metrics, column) for column in LESION_COLUMNS}


def test_two_lesions_one_found_one_missed_and_a_false_component() -> None:
    case = two_lesions(false_score=0.7)  # the false component's summed score 5.6 beats the hit's 1.8
    assert counts(evaluate_case(**case)) == {
        "n_lesions": 2, "lesions_detected": 1, "lesion_sensitivity": 0.5, "false_components": 1,
        "healthy_false_components": None, "first_is_lesion": 0}
    table = components(case["labelmap"], case["score"], COMPONENT_ORDER)
    assert [c.voxels for c in table] == [8, 2]  # detect's lesion table lists the false component first


def test_the_first_component_is_the_lesion_tables_first_not_the_largest() -> None:
    case = two_lesions(false_score=0.2)  # the labelmap is read as given: 8 voxels at 0.2 (summed 1.6) rank second
    score = sitk.GetArrayFromImage(case["score"])
    labelmap = (score >= 0.5) | (score == np.float32(0.2))
    case["labelmap"] = image(labelmap.astype(np.uint8))
    table = components(case["labelmap"], case["score"], COMPONENT_ORDER)
    assert [c.voxels for c in table] == [2, 8]  # the largest is the false one; the summed score ranks the hit first
    assert evaluate_case(**case).first_is_lesion == 1


def test_voxels_touching_at_a_corner_are_one_lesion_and_one_component_as_the_detectors() -> None:
    score = np.full(SHAPE, 0.1, np.float32)
    gt = np.zeros(SHAPE, np.uint8)
    gt[3, 3, 3] = gt[4, 4, 4] = 1  # one lesion of two voxels touching at a corner
    labelmap = np.zeros(SHAPE, np.uint8)
    labelmap[6, 6, 6] = labelmap[7, 7, 7] = 1  # one false component, corner to corner
    labelmap[3, 3, 3] = 1  # hits the lesion at one of its voxels
    score[labelmap > 0] = 0.9
    score[3, 3, 3] = 5.0  # the hit ranks first (summed 5.0 to 1.8)
    case = {"score": image(score), "gt": image(gt), "labelmap": image(labelmap)}
    assert len(components(case["labelmap"], case["score"])) == 2  # the detector's table: 26-connected
    assert counts(evaluate_case(**case, slice_axis=None)) == {
        "n_lesions": 1, "lesions_detected": 1, "lesion_sensitivity": 1.0, "false_components": 1,
        "healthy_false_components": None, "first_is_lesion": 1}


def test_a_healthy_case_counts_its_components_as_false_ones() -> None:
    case = two_lesions()
    del case["gt"]
    assert counts(evaluate_case(**case)) == {
        "n_lesions": 0, "lesions_detected": 0, "lesion_sensitivity": None, "false_components": 2,
        "healthy_false_components": 2, "first_is_lesion": None}


def test_ground_truth_outside_the_mask_is_no_lesion() -> None:
    case = two_lesions()
    mask = np.ones(SHAPE, np.uint8)
    mask[7:] = 0  # lesion B lies outside the evaluated voxels
    case["mask"] = image(mask)
    metrics = evaluate_case(**case)
    assert (metrics.n_lesions, metrics.lesions_detected, metrics.lesion_sensitivity) == (1, 1, 1.0)


def test_a_lesion_case_without_any_component_has_found_nothing_and_its_first_is_no_lesion() -> None:
    case = two_lesions()
    case["labelmap"] = image(np.zeros(SHAPE, np.uint8))
    assert counts(evaluate_case(**case)) == {
        "n_lesions": 2, "lesions_detected": 0, "lesion_sensitivity": 0.0, "false_components": 0,
        "healthy_false_components": None, "first_is_lesion": 0}


def test_without_a_labelmap_the_lesion_columns_are_empty(tmp_path: Path) -> None:
    case = two_lesions()
    del case["labelmap"]
    metrics = evaluate_case(**case, name="lesion")
    assert set(counts(metrics).values()) == {None}
    pooled = {"auroc": 1.0}  # (pooled without any labelmap: no lesion-wise figure)
    assert pooled_lesion_figures([None]) == {}
    out = tmp_path / "metrics.csv"
    write_metrics_csv(out, [metrics], pooled)
    with open(out, newline="") as stream:
        rows = list(csv.DictReader(stream))
    empty = dict.fromkeys(LESION_COLUMNS, "")
    assert [{column: row[column] for column in LESION_COLUMNS} for row in rows] == [empty, empty]


def test_a_non_finite_score_under_the_labelmap_outside_the_mask_is_refused() -> None:
    case = two_lesions()
    score, mask = sitk.GetArrayFromImage(case["score"]), np.ones(SHAPE, np.uint8)
    score[5, 2, 8] = np.nan  # a voxel of the false component
    mask[5, 2, 8] = 0
    case["score"], case["mask"] = image(score), image(mask)
    with pytest.raises(CeVAEError, match="NaN or infinite at voxels of the labelmap"):
        evaluate_case(**case, name="nan")


def test_pooled_figures() -> None:
    cases = [LesionCounts(2, 1, 1, False), LesionCounts(3, 3, 0, True), LesionCounts(1, 0, 0, False),
             LesionCounts(0, 0, 4, None), LesionCounts(0, 0, 1, None), None]
    assert pooled_lesion_figures(cases) == {
        "n_lesions": 6, "lesions_detected": 4, "lesion_sensitivity": 4 / 6, "false_components": 6 / 5,
        "healthy_false_components": 2.5, "first_is_lesion": 1 / 3}
    healthy = pooled_lesion_figures([LesionCounts(0, 0, 3, None)])
    assert healthy["lesion_sensitivity"] is None and healthy["first_is_lesion"] is None  # (empty in the table)
    assert healthy["false_components"] == healthy["healthy_false_components"] == 3


def test_the_table_and_the_console_give_the_lesion_wise_figures(tmp_path: Path, capsys) -> None:
    files = {}
    for case, values in (("lesion", two_lesions()), ("healthy", {k: v for k, v in two_lesions().items() if k != "gt"})):
        for role, value in values.items():
            files[case, role] = tmp_path / f"{case}_{role}.nii.gz"
            sitk.WriteImage(value, str(files[case, role]))
    cases_csv = tmp_path / "cases.csv"
    with open(cases_csv, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["score", "gt", "mask", "labelmap", "name"])
        for case in ("lesion", "healthy"):
            writer.writerow([files.get((case, role), "") for role in ("score", "gt", "mask", "labelmap")] + [case])
    out = tmp_path / "metrics.csv"
    assert main(["evaluate", "--cases", str(cases_csv), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    with open(out, newline="") as stream:
        table = list(csv.DictReader(stream))
    assert list(table[0])[:10] == ["name", "auroc", "auprc", "best_dice", "best_threshold", "dice_at_threshold",
                                   "slice_auroc", "flagged_ml", "n_voxels", "n_positive"]  # the new ones at the end
    assert list(table[0])[10:] == LESION_COLUMNS
    assert [[row[column] for column in LESION_COLUMNS] for row in table] == [
        ["2", "1", "0.5", "1", "", "0"], ["0", "0", "", "2", "2", ""], ["2", "1", "0.5", "1.5", "2", "0"]]
    assert lines[0].endswith("n_lesions 2  lesions_detected 1  lesion_sensitivity 0.5000  false_components 1  "
                             "first_is_lesion 0")
    assert lines[1].endswith("n_lesions 0  lesions_detected 0  false_components 2  healthy_false_components 2")
    assert lines[2].endswith("n_lesions 2  lesions_detected 1  lesion_sensitivity 0.5000  false_components 1.5000  "
                             "healthy_false_components 2.0000  first_is_lesion 0.0000")
    _, pooled = evaluate_files([{"score": files["lesion", "score"], "gt": files["lesion", "gt"]}])
    assert "n_lesions" not in pooled  # no labelmap: no lesion-wise figure


def test_pooled_lesion_figures_over_some_cases_say_which_are_left_out(tmp_path: Path, caplog) -> None:
    """Where some cases lack a labelmap, the pooled row's pixel figures are of every case and its lesion-wise ones of
    those with a labelmap alone (2 lesions pooled where the cases hold 4), with nothing saying so: a warning now names
    how many cases the lesion-wise figures are of and the cases left out."""
    rows = []
    for case in ("with", "without"):
        files = {}
        for role, value in two_lesions().items():
            files[role] = tmp_path / f"{case}_{role}.nii.gz"
            sitk.WriteImage(value, str(files[role]))
        if case == "without":
            del files["labelmap"]
        rows.append({**files, "name": case})
    with caplog.at_level("WARNING"):
        cases, pooled = evaluate_files(rows)
    assert pooled["n_lesions"] == 2 and sum(case.n_positive > 0 for case in cases) == 2
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "lesion-wise" in r.getMessage()]
    assert len(said) == 1, said
    assert "of the 1 of 2 cases with a labelmap" in said[0] and "without" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate_files(rows[:1])  # every case with a labelmap: nothing to say
    assert not [r for r in caplog.records if "lesion-wise" in r.getMessage()]


def test_the_cases_left_out_of_the_pooled_lesion_figures_are_told_apart_where_names_hold_commas(tmp_path: Path,
                                                                                                caplog) -> None:
    """Names joined by ", " ran together where a name held a comma (a CSV cell such as "Smith, J"): "a, b, c, without
    one, are not counted" named three cases or two. Each name is quoted now."""
    rows = []
    for case, false_score in (("with", 0.7), ("Smith, J", 0.8), ("Doe, A", 0.9)):  # three score maps
        files = {}
        for role, value in two_lesions(false_score).items():
            files[role] = tmp_path / f"{case[:3]}_{role}.nii.gz"
            sitk.WriteImage(value, str(files[role]))
        if case != "with":
            del files["labelmap"]
        rows.append({**files, "name": case})
    with caplog.at_level("WARNING"):
        evaluate_files(rows)
    said = [r.getMessage() for r in caplog.records if "lesion-wise" in r.getMessage()]
    assert len(said) == 1 and "of the 1 of 3 cases with a labelmap" in said[0]
    assert "'Smith, J', 'Doe, A'" in said[0], said[0]


def test_each_lesion_is_listed_with_its_size_and_whether_it_was_found() -> None:
    """lesion_hits (the acquisition benchmark's lesions by size): lesion A (4 voxels) found, lesion B (4) missed, a
    lesion of one voxel touching A at a corner is A's (26-connected, as the counts)."""
    case = two_lesions()
    truth = sitk.GetArrayFromImage(case["gt"]).astype(bool)
    truth[3, 4, 4] = True  # diagonal to A's corner voxel (2, 3, 3)
    flagged = sitk.GetArrayFromImage(case["labelmap"]).astype(bool)
    assert sorted(lesion_hits(truth, flagged, case["score"])) == [(4, False), (5, True)]
    assert lesion_hits(np.zeros(SHAPE, bool), flagged, case["score"]) == []
