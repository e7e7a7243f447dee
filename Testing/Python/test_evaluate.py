"""Tests of the detection metrics in CeVAEAnomalyResearch.evaluate."""
from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.evaluate import (
    CaseMetrics,
    auprc,
    auroc,
    best_dice,
    dice,
    evaluate_case,
    evaluate_files,
    pooled_metrics,
    slice_auroc,
    write_metrics_csv,
)


def brute_force(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """AUROC, AP, best Dice and its (highest) threshold by direct enumeration."""
    positive, negative = scores[labels], scores[~labels]
    wins = (positive[:, None] > negative[None]).sum() + 0.5 * (positive[:, None] == negative[None]).sum()
    area = wins / (positive.size * negative.size)
    precision_sum, recall_before, best, best_t = 0.0, 0.0, -1.0, math.nan
    for t in np.unique(scores)[::-1]:
        flagged = scores >= t
        tp = (flagged & labels).sum()
        recall = tp / positive.size
        precision_sum += (recall - recall_before) * tp / flagged.sum()
        recall_before = recall
        value = 2 * tp / (flagged.sum() + positive.size)
        if value > best:
            best, best_t = value, t
    return area, precision_sum, best, best_t


def test_worked_example() -> None:
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert auroc(scores, labels) == pytest.approx(0.75)
    assert auprc(scores, labels) == pytest.approx(0.5 * 2 / 3 + 0.5 * 1.0)
    assert best_dice(scores, labels) == pytest.approx((0.8, 0.35))


def test_ties_are_grouped_whatever_the_order() -> None:
    scores, labels = np.array([1.0, 1.0, 1.0, 0.0]), np.array([1, 0, 1, 0])
    for order in ([0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0]):
        assert auroc(scores[order], labels[order]) == pytest.approx(0.75)
        assert auprc(scores[order], labels[order]) == pytest.approx(2 / 3)
        assert best_dice(scores[order], labels[order]) == pytest.approx((0.8, 1.0))


def test_all_equal_scores() -> None:
    scores, labels = np.full(8, 0.3), np.array([1, 0, 0, 0, 1, 0, 0, 0])
    assert auroc(scores, labels) == pytest.approx(0.5)
    assert auprc(scores, labels) == pytest.approx(0.25)  # the prevalence


def test_perfect_and_inverted_separation() -> None:
    scores, labels = np.array([0.1, 0.2, 0.7, 0.9]), np.array([False, False, True, True])
    assert auroc(scores, labels) == 1.0
    assert auprc(scores, labels) == 1.0
    assert best_dice(scores, labels) == (1.0, 0.7)
    assert auroc(-scores, labels) == 0.0


def test_best_dice_threshold() -> None:
    scores, labels = np.array([0.9, 0.8, 0.7, 0.1, 0.2]), np.array([1, 1, 0, 1, 0])
    # thresholds 0.9: 2*1/(1+3); 0.8: 2*2/(2+3); 0.1: 2*3/(5+3)
    assert best_dice(scores, labels) == pytest.approx((0.8, 0.8))


def test_one_class_is_nan() -> None:
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(auprc([0.1, 0.2], [0, 0]))
    assert all(math.isnan(v) for v in best_dice([0.1, 0.2], [0, 0]))
    assert auprc([0.1, 0.2], [1, 1]) == 1.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(CeVAEError, match="NaN"):
        auroc([0.1, math.nan], [0, 1])
    with pytest.raises(CeVAEError, match="size"):
        auroc([0.1, 0.2, 0.3], [0, 1])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_matches_brute_force(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([s / 5 for s, _ in pairs], dtype=np.float32)
    labels = np.array([y for _, y in pairs])
    if labels.all() or not labels.any():
        return
    expected = brute_force(scores, labels)
    assert auroc(scores, labels) == pytest.approx(expected[0])
    assert auprc(scores, labels) == pytest.approx(expected[1])
    assert best_dice(scores, labels) == pytest.approx(expected[2:])


def test_dice() -> None:
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert dice([0, 0], [0, 0]) == 1.0
    assert dice([1, 0], [0, 0]) == 0.0
    assert dice(np.ones((2, 3)), np.ones((2, 3))) == 1.0
    with pytest.raises(CeVAEError, match="shapes"):
        dice(np.ones(3), np.ones(4))


def test_slice_auroc() -> None:
    assert slice_auroc([0.2, 0.9, 0.8, 0.1], [False, True, True, False]) == 1.0


def test_pooled_equals_concatenation() -> None:
    rng = np.random.default_rng(1)
    cases = [(rng.random(50).astype(np.float32), rng.random(50) < 0.2) for _ in range(2)]
    cases.append((rng.random(40).astype(np.float32), np.zeros(40, bool)))  # healthy: negatives only
    scores = np.concatenate([s for s, _ in cases])
    labels = np.concatenate([y for _, y in cases])
    pooled = pooled_metrics(cases)
    assert pooled["auroc"] == pytest.approx(auroc(scores, labels))
    assert pooled["auprc"] == pytest.approx(auprc(scores, labels))
    assert (pooled["best_dice"], pooled["best_threshold"]) == pytest.approx(best_dice(scores, labels))
    assert (pooled["n_voxels"], pooled["n_positive"], pooled["n_cases"]) == (140, labels.sum(), 3)
    with pytest.raises(CeVAEError):
        pooled_metrics([])


SHAPE = (8, 8, 8)  # (z, y, x); files must be at least 8 voxels wide to be read


def image(array: np.ndarray, spacing=(2.0, 1.0, 1.5), origin=(1.0, 2.0, 3.0)) -> sitk.Image:
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    return result


@pytest.fixture
def small_case() -> dict:
    """An 8x8x8 case: lesion in slice 1, a bright distractor outside the mask."""
    score = np.zeros(SHAPE, np.float32)
    gt = np.zeros(SHAPE, np.uint8)
    mask = np.zeros(SHAPE, np.uint8)
    mask[:3, 1:4, 1:5] = 1
    gt[1, 2, 2:4] = 1
    score[1, 2, 1:4] = [0.6, 0.9, 0.8]  # one false positive at 0.6 inside the mask
    score[3, 0, 0] = 5.0  # outside the mask: ignored
    labelmap = (score >= 0.6).astype(np.uint8)
    return {key: image(value) for key, value in
            (("score", score), ("gt", gt), ("mask", mask), ("labelmap", labelmap))}


def test_evaluate_case(small_case: dict) -> None:
    metrics = evaluate_case(**small_case, name="case")
    assert metrics.name == "case"
    assert metrics.auroc == 1.0
    assert metrics.auprc == 1.0
    assert (metrics.best_dice, metrics.best_threshold) == pytest.approx((1.0, 0.8))
    assert metrics.dice_at_threshold == pytest.approx(2 * 2 / (3 + 2))
    assert metrics.slice_auroc == 1.0  # slices 0 and 2 are all zero; slices 3-7 have no mask voxels
    assert metrics.flagged_ml == pytest.approx(4 * 3.0 / 1000)
    assert (metrics.n_voxels, metrics.n_positive) == (36, 2)


def test_a_map_evaluated_without_its_mask_warns_that_its_zero_background_lifts_the_auroc(
        small_case: dict, caplog: pytest.LogCaptureFixture) -> None:
    """Without --mask every voxel is evaluated, and a detect map's zero background ranks below every scored voxel:
    the AUROC rose (0.67 over the brain read 0.92 over the volume) with nothing said."""
    score = sitk.GetArrayFromImage(small_case["score"])
    score[sitk.GetArrayFromImage(small_case["mask"]) > 0] += 0.1  # the brain scored everywhere, a distractor ...
    score[0, 1, 1] = 1.5  # ... above the lesion
    noisy = image(score)
    over_brain = evaluate_case(noisy, small_case["gt"], small_case["mask"])
    with caplog.at_level(logging.WARNING):
        over_volume = evaluate_case(noisy, small_case["gt"], name="nomask")
    assert over_volume.auroc > over_brain.auroc
    assert "nomask: evaluated without a mask, so the 93 % of the voxels where the score map is 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate_case(noisy, small_case["gt"], small_case["mask"], name="masked")
    assert "without a mask" not in caplog.text


@pytest.mark.parametrize("axis", ["Axial", "coronal", 3, -4])
def test_a_slice_axis_that_names_no_axis_is_refused(small_case: dict, axis) -> None:
    """slice_axis="coronal" crashed in a modulo ('not all arguments converted during string formatting'), and 3 on a
    3D map was taken for axis 0 (3 % 3): a slice AUROC over other slices than asked, with nothing said."""
    with pytest.raises(CeVAEError, match=f"slice_axis {axis!r}"):
        evaluate_case(**small_case, slice_axis=axis)
    first = evaluate_case(**small_case, slice_axis=0).slice_auroc
    assert evaluate_case(**small_case, slice_axis=-3).slice_auroc == first


def test_a_numpy_integer_slice_axis_is_an_axis_and_a_bool_is_not(small_case: dict) -> None:
    """The check that refuses an axis beyond the map took only Python ints: np.int64(0) (an axis from np.argmax, or
    read from an array), which every numpy function takes and evaluate_case took before, was refused as naming 'no
    axis of the 3D score map', and True was taken for axis 1."""
    first = evaluate_case(**small_case, slice_axis=0).slice_auroc
    assert evaluate_case(**small_case, slice_axis=np.int64(0)).slice_auroc == first
    assert evaluate_case(**small_case, slice_axis=np.intp(-3)).slice_auroc == first
    with pytest.raises(CeVAEError, match="slice_axis True"):
        evaluate_case(**small_case, slice_axis=True)


def test_evaluate_healthy_case(small_case: dict) -> None:
    metrics = evaluate_case(small_case["score"], mask=small_case["mask"], labelmap=small_case["labelmap"])
    assert math.isnan(metrics.auroc) and math.isnan(metrics.best_dice)
    assert metrics.slice_auroc is None and metrics.dice_at_threshold is None
    assert metrics.flagged_ml == pytest.approx(4 * 3.0 / 1000)
    assert (metrics.n_voxels, metrics.n_positive) == (36, 0)


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda im: im.SetSpacing((2.0, 1.0, 1.6)), "spacing"),
        (lambda im: im.SetOrigin((1.0, 2.0, 3.01)), "origin"),
        (lambda im: im.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
    ],
)
def test_grid_mismatch_raises(small_case: dict, change, what: str) -> None:
    change(small_case["gt"])
    with pytest.raises(CeVAEError, match=f"ground truth.*{what}"):
        evaluate_case(small_case["score"], small_case["gt"])


def test_grid_size_mismatch_and_tolerance(small_case: dict) -> None:
    with pytest.raises(CeVAEError, match="size"):
        evaluate_case(small_case["score"], mask=image(np.ones((8, 8, 9), np.uint8)))
    small_case["mask"].SetOrigin((1.0, 2.0, 3.00005))  # within tolerance
    assert evaluate_case(small_case["score"], mask=small_case["mask"]).n_voxels == 36


def test_empty_mask_raises(small_case: dict) -> None:
    with pytest.raises(CeVAEError, match="empty"):
        evaluate_case(small_case["score"], mask=image(np.zeros(SHAPE, np.uint8)))


def test_evaluate_files_and_csv(small_case: dict, tmp_path: Path) -> None:
    paths = {}
    for key, value in small_case.items():
        paths[key] = tmp_path / f"{key}.nii.gz"
        sitk.WriteImage(value, str(paths[key]))
    rows = [
        {"score": paths["score"], "gt": paths["gt"], "mask": paths["mask"], "name": "lesion"},
        {"score": str(paths["score"]), "gt": "", "mask": paths["mask"], "labelmap": paths["labelmap"]},
    ]
    cases, pooled = evaluate_files(rows)
    assert [c.name for c in cases] == ["lesion", "score.nii.gz"]
    assert cases[0].auroc == 1.0 and math.isnan(cases[1].auroc)
    # The healthy copy adds negatives scoring 0.8 and 0.9: they tie with or beat the positives.
    assert pooled["n_voxels"] == 72 and pooled["n_positive"] == 2 and pooled["n_cases"] == 2
    case_scores = np.r_[[0.6, 0.9, 0.8], np.zeros(33)]
    expected = auroc(np.r_[case_scores, case_scores], np.r_[[0, 1, 1], np.zeros(69)])
    assert pooled["auroc"] == pytest.approx(expected) and expected < 1

    out = tmp_path / "results" / "metrics.csv"
    write_metrics_csv(out, cases, pooled)
    with open(out, newline="") as stream:
        table = list(csv.DictReader(stream))
    assert list(table[0]) == list(CaseMetrics.__dataclass_fields__)
    assert [row["name"] for row in table] == ["lesion", "score.nii.gz", "pooled"]
    assert table[1]["auroc"] == "nan" and table[1]["flagged_ml"] == "0.012" and table[1]["slice_auroc"] == ""
    assert float(table[2]["auroc"]) == pytest.approx(pooled["auroc"])
    assert [p.name for p in out.parent.iterdir()] == ["metrics.csv"]  # no temporary file left
    tsv = out.with_name("metrics.TSV")  # as detect's tables: tab-separated under a .tsv name
    write_metrics_csv(tsv, cases, pooled)
    with open(tsv, newline="") as stream:
        assert list(csv.DictReader(stream, delimiter="\t")) == table


def test_evaluate_files_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CeVAEError, match="does not exist"):
        evaluate_files([{"score": tmp_path / "missing.nii.gz"}])


def test_evaluate_files_counts_a_repeated_case_once(small_case: dict, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    paths = {}
    for key, value in small_case.items():
        paths[key] = tmp_path / f"{key}.nii.gz"
        sitk.WriteImage(value, str(paths[key]))
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(paths["score"].read_bytes())
    lesion = {"score": paths["score"], "gt": paths["gt"], "mask": paths["mask"], "name": "first"}
    once, pooled_once = evaluate_files([lesion])
    cases, pooled = evaluate_files([lesion, dict(lesion, score=copy, name="again"),
                                    {"score": copy, "mask": paths["mask"], "name": "healthy"}])
    assert [c.name for c in cases] == ["first", "healthy"]  # the same files with another gt are another case
    assert "again repeats the case of first" in caplog.text
    assert pooled["n_cases"] == 2 and pooled["n_positive"] == pooled_once["n_positive"] == 2


def test_evaluate_names_nan_scores_and_fits_advice_to_the_mask(small_case: dict,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    array = sitk.GetArrayFromImage(small_case["score"])
    array[1, 2, 1] = np.nan
    with pytest.raises(CeVAEError, match="score map of case7 contains NaN"):
        evaluate_case(image(array), small_case["gt"], small_case["mask"], name="case7")
    everywhere = image(np.ones(SHAPE, np.uint8))
    evaluate_case(small_case["score"], everywhere, name="nomask")
    evaluate_case(small_case["score"], everywhere, small_case["mask"], name="masked")
    assert "nomask: the ground truth covers every evaluated voxel" in caplog.text
    assert "masked: the ground truth covers" in caplog.text and "the mask lies inside the lesion" in caplog.text
    assert caplog.text.count("give the brain mask so") == 1


def test_slice_auroc_is_over_axial_slices_whatever_the_voxel_order(tmp_path: Path) -> None:
    """detect's slice table counts axial slices in any voxel order; evaluate's slice AUROC must mean the same."""
    rng = np.random.default_rng(3)
    score = rng.standard_normal((20, 24, 28)).astype(np.float32)  # [k=S, j=P, i=L] on an LPS grid
    gt = np.zeros(score.shape, np.uint8)
    gt[8:12, 5:20, 3:6] = 1  # a lesion on axial slices 8-11
    score[gt > 0] += 0.5  # ranked imperfectly, differently along each axis
    images = {}
    for role, array in (("score", score), ("gt", gt)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 2.0))
        images[role] = image
    rows = []
    for order in ("LPS", "PIL", "ASL"):  # PIL and ASL: stored sagittally, the axial axis is j
        row = {}
        for role, image in images.items():
            path = tmp_path / f"{order}_{role}.nii.gz"
            sitk.WriteImage(sitk.DICOMOrient(image, order), str(path))
            row[role] = str(path)
        rows.append(row)
    aurocs = [evaluate_files([row])[0][0].slice_auroc for row in rows]
    axial = slice_auroc(score.max(axis=(1, 2)), gt.any(axis=(1, 2)))
    assert aurocs == pytest.approx([axial] * 3)
    for row in rows:  # the Python entry point counts the same slices
        case = evaluate_case(sitk.ReadImage(row["score"]), sitk.ReadImage(row["gt"]))
        assert case.slice_auroc == pytest.approx(axial)
    assert axial == pytest.approx(0.78125)
    assert slice_auroc(score.max(axis=(0, 1)), gt.any(axis=(0, 1))) == pytest.approx(0.7733, abs=1e-4)  # sagittal


def test_a_reader_that_stops_early_does_not_cost_the_metrics_file(tmp_path: Path):
    """`evaluate --cases c.csv --out m.csv | head -2`: the console lines came first, so the closed pipe ended the run
    with "unexpected BrokenPipeError ... report it" before m.csv was written."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    rows = ["score,name"]
    for i in range(60):  # more console text than a pipe's buffer holds
        score = sitk.GetImageFromArray(rng.random((12, 12, 12)).astype(np.float32))
        sitk.WriteImage(score, str(tmp_path / f"s{i}.nrrd"))
        rows.append(f"s{i}.nrrd,{'case' * 50}{i}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "CeVAEAnomalyLib.cli", "evaluate", "--cases",
                             str(tmp_path / "cases.csv"), "--out", str(tmp_path / "m.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout.close()  # the reader is gone (`| head -0`; `| head -2` once it has its lines)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "unexpected" not in err and "Exception ignored" not in err, err
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 62  # header, 60 cases, pooled


def test_the_written_best_threshold_reused_as_a_threshold_keeps_the_voxel_at_it(tmp_path: Path) -> None:
    """best_threshold was written with 7 significant digits, which do not always name the float32 score it is:
    0.50000006 was written 0.5000001, which reads back as the next float32 above, and a labelmap at that
    threshold dropped the lesion voxel scoring exactly the best threshold."""
    from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap

    score = np.zeros(SHAPE, np.float32)
    gt = np.zeros(SHAPE, np.uint8)
    score[1, 2, 2:4] = [np.nextafter(np.float32(0.5), np.float32(1)), np.float32(1 + 2 ** -23)]
    gt[1, 2, 2:4] = 1
    metrics = evaluate_case(image(score), image(gt), image(np.ones(SHAPE, np.uint8)), name="case")
    assert metrics.best_threshold == score[1, 2, 2]
    out = tmp_path / "metrics.csv"
    write_metrics_csv(out, [metrics], pooled_metrics([(score, gt)]))
    with open(out, newline="") as stream:
        written = [float(row["best_threshold"]) for row in csv.DictReader(stream)]
    labels = threshold_labelmap(score, (1.5, 1.0, 2.0), written[0])
    assert labels[1, 2, 2:4].tolist() == [1, 1] and labels.sum() == 2
    assert written == [metrics.best_threshold] * 2  # the case and the pooled row


def test_the_metrics_table_is_not_written_over_an_existing_file_unless_asked(small_case: dict, tmp_path: Path) -> None:
    """write_metrics_csv replaced an existing file by default (a script's earlier results.csv lost without a word),
    while the library's other writers (save_result, share_model, the demo) refuse one unless told to overwrite."""
    metrics = evaluate_case(**small_case, name="case")
    pooled = pooled_metrics([(np.array([0.6, 0.9, 0.8]), np.array([0, 1, 1]))])
    out = tmp_path / "results.csv"
    out.write_text("the user's results\n")
    with pytest.raises(CeVAEError, match="already exists"):
        write_metrics_csv(out, [metrics], pooled)
    assert out.read_text() == "the user's results\n"
    write_metrics_csv(out, [metrics], pooled, overwrite=True)
    assert out.read_text().splitlines()[1].startswith("case,1,1,")


def test_an_existing_output_refused_in_python_names_the_python_argument(small_case: dict, tmp_path: Path) -> None:
    """A script calling write_metrics_csv over an existing file was told to "pass --overwrite", an option it has no
    way to give; the library's refusals name both, "--overwrite (overwrite=True in Python)", as its other options."""
    out = tmp_path / "results.csv"
    out.write_text("the user's results\n")
    metrics = evaluate_case(**small_case, name="case")
    with pytest.raises(CeVAEError, match=re.escape(f"The output {out} already exists; pass --overwrite "
                                                   "(overwrite=True in Python) to replace it.")):
        write_metrics_csv(out, [metrics], pooled_metrics([(np.array([0.6, 0.9]), np.array([0, 1]))]))
