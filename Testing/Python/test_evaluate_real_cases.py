"""``evaluate`` on real heads (the shared healthy scans): files cut short, pooled memory, figures by hand."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest

from conftest import SHARED_DATA

HEADS = ("colin27", "mni152", "robex")


def real(name: str, kind: str) -> Path:
    path = SHARED_DATA / f"{name}_{kind}.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared data {path} missing")
    return path


def test_a_compressed_file_cut_short_is_refused_before_any_case_is_scored(
        tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A .nii.gz cut short (its header whole, its voxels missing) was found only when its case was scored, after
    every case listed before it (here six real heads, 2 s; minutes on a cohort): the pre-check read headers only. Its
    gzip size trailer now says so before the first case is read."""
    from CeVAEAnomalyLib.cli.main import main

    whole = real("robex", "t1").read_bytes()
    cut = tmp_path / "cut_t1.nii.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    rows = [f"{n},{real(n, 't1')},{real(n, 'brainmask')}" for n in HEADS]
    (tmp_path / "cases.csv").write_text("\n".join(["name,score,mask", *rows, f"cut,{cut},{real('robex', 'brainmask')}"])
                                        + "\n")
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", "--cases", str(tmp_path / "cases.csv")]) == 2
    err = capsys.readouterr().err
    assert f"line 5: case cut (score map {cut}, mask " in err and f"The score map file {cut} is truncated" in err
    assert "Evaluated" not in caplog.text


def test_a_whole_file_of_several_gzip_members_passes_the_pre_check(tmp_path: Path) -> None:
    """A whole file written as several gzip members (bgzip's blocks) has a last size trailer of its last member
    alone: it is decompressed to be told from one cut short, and taken."""
    from CeVAEAnomalyResearch.evaluate import evaluate_files

    raw = gzip.decompress(real("colin27", "brainmask").read_bytes())
    members = tmp_path / "members_mask.nii.gz"
    members.write_bytes(b"".join(gzip.compress(raw[i : i + (1 << 20)]) for i in range(0, len(raw), 1 << 20)))
    assert members.read_bytes()[-4:] != len(raw).to_bytes(4, "little")  # (the last member's size)
    cases, _ = evaluate_files([{"score": str(real("colin27", "t1")), "mask": str(members)}])
    assert cases[0].n_voxels > 0


def lesion_cases(tmp_path: Path, count: int) -> list:
    """``count`` lesion cases of the real heads' T1 (float32, / 1000) as score map within their brain mask, each with
    its own box of ground truth (so that none repeats another)."""
    import numpy as np
    import SimpleITK as sitk

    rows = []
    for i in range(count):
        head = HEADS[i % len(HEADS)]
        mask = sitk.ReadImage(str(real(head, "brainmask")))
        brain = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
        z, y, x = (brain.min(0) + (brain.max(0) - brain.min(0)) * (0.3 + 0.04 * i)).astype(int)
        truth = np.zeros(mask.GetSize()[::-1], np.uint8)
        truth[z : z + 12, y : y + 15, x : x + 10] = 1
        gt = sitk.GetImageFromArray(truth)
        gt.CopyInformation(mask)
        sitk.WriteImage(gt, str(tmp_path / f"gt{i}.nii.gz"))
        score = tmp_path / f"{head}_score.nii.gz"  # float32, as detect writes its maps
        if not score.exists():
            sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(real(head, "t1"))), sitk.sitkFloat32) / 1000.0, str(score))
        rows.append({"score": str(score), "mask": str(real(head, "brainmask")),
                     "gt": str(tmp_path / f"gt{i}.nii.gz"), "name": f"case{i}"})
    return rows


def test_pooled_figures_keep_each_cases_scores_once_and_no_labels(tmp_path: Path) -> None:
    """Pooling kept every case's evaluated scores and a label per voxel (5 bytes a voxel of a float32 map), then
    copied them all into one array: 13 bytes a brain voxel at the peak, 100 masked 1 mm cases of 256^3 (1.5 million
    brain voxels each) near 2 GB, 20 GB unmasked. Each case's scores are now kept once, sorted, with no labels; the
    figures are the same to the last digit as those of all voxels put together."""
    import tracemalloc

    import numpy as np
    import SimpleITK as sitk

    from CeVAEAnomalyResearch.evaluate import auprc, auroc, best_dice, evaluate_files

    def peak_and_pooled(rows: list) -> tuple:
        tracemalloc.start()
        try:
            pooled = evaluate_files(rows)[1]
            return tracemalloc.get_traced_memory()[1], pooled
        finally:
            tracemalloc.stop()

    rows = lesion_cases(tmp_path, 6)
    (half, some), (peak, pooled) = peak_and_pooled(rows[:3]), peak_and_pooled(rows)  # one case read at a time
    assert peak - half < 10 * (pooled["n_voxels"] - some["n_voxels"])  # what three more cases add (was 18.5 a voxel)

    scores, labels = [], []
    for row in rows:
        inside = sitk.GetArrayFromImage(sitk.ReadImage(row["mask"])) > 0
        scores.append(sitk.GetArrayFromImage(sitk.ReadImage(row["score"]))[inside])
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(row["gt"]))[inside] > 0)
    every, truth = np.concatenate(scores), np.concatenate(labels)
    assert (pooled["auroc"], pooled["auprc"], (pooled["best_dice"], pooled["best_threshold"])) == (
        auroc(every, truth), auprc(every, truth), best_dice(every, truth))
    assert (pooled["n_voxels"], pooled["n_positive"]) == (every.size, int(truth.sum()))


def test_a_cohort_without_a_lesion_voxel_says_why_every_figure_is_na(
        tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """Every case healthy (no ground truth, or a truth column left empty or all zero) printed 'pooled: AUROC n/a
    AUPRC n/a best Dice n/a' and wrote nan, with no word of why: one line now says that no case holds a lesion
    voxel."""
    from CeVAEAnomalyLib.cli.main import main

    rows = [f"{n},{real(n, 't1')},{real(n, 'brainmask')}" for n in HEADS[:2]]
    (tmp_path / "cases.csv").write_text("\n".join(["name,score,mask", *rows]) + "\n")
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--cases", str(tmp_path / "cases.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    assert "pooled: auroc n/a  auprc n/a  best_dice n/a" in capsys.readouterr().out
    assert ("None of the 2 cases has a lesion voxel (a ground truth marking one inside the mask): every case counts "
            "as healthy, so AUROC, AUPRC and best Dice are undefined (n/a, nan in the table).") in caplog.text
    header, *_, last = (tmp_path / "m.csv").read_text().splitlines()
    pooled = last.split(",")
    assert pooled[:8] == ["pooled", "nan", "nan", "nan", "nan", "", "", ""]
    assert dict(zip(header.split(","), pooled))["n_positive"] == "0"


def test_slice_auroc_of_a_real_head_makes_no_full_volume_copy() -> None:
    """The slice maxima were taken from a float64 copy of the whole score map (np.where(inside, scores, -inf)): 134
    MB for a 256^3 one, per case. They are taken in place now, with exactly the same figures."""
    import tracemalloc

    import numpy as np
    import SimpleITK as sitk

    from CeVAEAnomalyResearch.evaluate import _slice_arrays, axial_axis, evaluate_case, slice_auroc

    head = Path("/tmp/heads/cortex_s1_t1.nii.gz")
    if not head.is_file():
        pytest.skip(f"{head} missing")
    score = sitk.ReadImage(str(head))  # 256^3 uint8, taken as a score map
    mask = sitk.ReadImage(str(head.with_name("cortex_s1_brainmask.nii.gz")))
    scores, inside = sitk.GetArrayViewFromImage(score), sitk.GetArrayViewFromImage(mask) > 0
    truth = np.zeros(scores.shape, bool)
    truth[100:130, 90:140, 100:150] = True  # a lesion in a band of slices
    axis = axial_axis(score)
    others = tuple(a for a in range(3) if a != axis)
    keep = inside.any(axis=others)
    was = slice_auroc(np.where(inside, scores, -np.inf).max(axis=others)[keep], (truth & inside).any(axis=others)[keep])
    tracemalloc.start()
    arrays = _slice_arrays(scores, truth, inside, axis)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < scores.size // 4, peak  # no copy of the volume (a float64 one was 8 bytes a voxel)
    assert slice_auroc(*arrays) == was and 0.0 < was < 1.0
    truth_image = sitk.GetImageFromArray(truth.astype(np.uint8))
    truth_image.CopyInformation(score)
    assert evaluate_case(score, truth_image, mask).slice_auroc == was


def test_a_scan_given_as_the_score_map_is_warned_of_a_score_map_is_not(
        tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """``evaluate --score T1.nii.gz`` ranked the voxels by intensity and printed its figures without a word. A scan's
    voxels are whole numbers (an integer type, or a float file of whole values: robex's), a score map's fractional
    ones: detect's (float32, written here), and another method's float map, are taken without a warning."""
    import numpy as np
    import SimpleITK as sitk
    from CeVAEAnomalyLib.cli.main import main
    from CeVAEAnomalyLib.data import data_path

    for head in (real("mni152", "t1"), real("robex", "t1"), Path("/tmp/heads/cortex_s1_t1.nii.gz")):
        if not head.is_file():
            continue
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["evaluate", "--score", str(head), "--mask", str(head.with_name(
                head.name.replace("_t1", "_brainmask")))]) == 0
        assert f"The score map {head} looks like a scan, not a score map: its values are whole numbers" \
               in caplog.text, caplog.text
    t1, mask = data_path("colin27_t1_2mm.nii.gz"), data_path("colin27_brainmask_2mm.nii.gz")
    score = tmp_path / "colin_score.nii.gz"
    assert main(["detect", str(t1), "--mask", str(mask), "--score", str(score), "--device", "cpu"]) == 0
    image = sitk.ReadImage(str(real("robex", "t1")), sitk.sitkFloat32)
    other = sitk.GetImageFromArray(np.sqrt(sitk.GetArrayFromImage(image)) / 7)  # another method's float map
    other.CopyInformation(image)
    sitk.WriteImage(other, str(tmp_path / "other_method.nii.gz"))
    for given, of in ((score, mask), (tmp_path / "other_method.nii.gz", real("robex", "brainmask"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["evaluate", "--score", str(given), "--mask", str(of)]) == 0
        assert "looks like a scan" not in caplog.text
    capsys.readouterr()
