"""Batch: a scan listed twice under two names is scored once, with one warning naming both."""
import csv
import logging
from pathlib import Path

import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.io.naming import output_paths


def test_a_scan_listed_twice_under_two_names_is_scored_once(tiny_bundle, tmp_path: Path, caplog) -> None:
    for seed, name in ((3, "a"), (4, "b")):
        image, mask = make_head(size=(30, 34, 28), seed=seed)
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(tmp_path / f"{name}_mask.nii.gz"))
    (tmp_path / "a_copy.nii.gz").write_bytes((tmp_path / "a.nii.gz").read_bytes())  # the same scan, another file
    (tmp_path / "list.csv").write_text("name,image,mask\ns1,a.nii.gz,a_mask.nii.gz\ns1_again,a_copy.nii.gz,"
                                       "a_mask.nii.gz\nother,b.nii.gz,b_mask.nii.gz\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["batch", str(tmp_path / "list.csv"), "--out-dir", str(out), "--model", str(tiny_bundle),
                     "--device", "cpu"]) == 0
    repeats = [r.getMessage() for r in caplog.records if "repeats the scan" in r.getMessage()]
    assert len(repeats) == 1 and "'s1_again'" in repeats[0] and "'s1'" in repeats[0], repeats
    with (out / "summary.csv").open(newline="") as fh:
        assert sorted(row["name"] for row in csv.DictReader(fh)) == ["other", "s1"]
    assert all(p.exists() for p in output_paths(out, "s1").values())
    assert not any(p.exists() for p in output_paths(out, "s1_again").values())


def test_the_same_image_with_another_brain_mask_is_scored_with_each(tiny_bundle, tmp_path: Path, caplog) -> None:
    image, mask = make_head(size=(30, 34, 28), seed=3)
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "a_mask.nii.gz"))
    (tmp_path / "list.csv").write_text("name,image,mask\nmasked,a.nii.gz,a_mask.nii.gz\nunmasked,a.nii.gz,\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["batch", str(tmp_path / "list.csv"), "--out-dir", str(out), "--model", str(tiny_bundle),
                     "--device", "cpu"]) == 0
    assert not [r for r in caplog.records if "repeats the scan" in r.getMessage()]
    assert all(p.exists() for name in ("masked", "unmasked") for p in output_paths(out, name).values())


def test_run_batch_from_python_scores_a_scan_listed_twice_once(tiny_bundle, tmp_path: Path, caplog) -> None:
    """The repeat check was the command's only: run_batch called from Python scored one scan twice, into two sets of
    outputs; the library drops the repeat itself, with the command's warning."""
    from CeVAEAnomalyLib.cli.batch import BatchItem, DetectSettings, run_batch
    from CeVAEAnomalyLib.options import DetectionRequest

    image, mask = make_head(size=(30, 34, 28), seed=3)
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "a_mask.nii.gz"))
    (tmp_path / "a_copy.nii.gz").write_bytes((tmp_path / "a.nii.gz").read_bytes())
    items = [BatchItem("s1", tmp_path / "a.nii.gz", tmp_path / "a_mask.nii.gz"),
             BatchItem("s1_again", tmp_path / "a_copy.nii.gz", tmp_path / "a_mask.nii.gz")]
    out = tmp_path / "out"
    settings = DetectSettings(model=tiny_bundle, request=DetectionRequest.of(device="cpu"), out_dir=out)
    with caplog.at_level(logging.WARNING):
        summary = run_batch(items, settings, out / "summary.csv")
    repeats = [r.getMessage() for r in caplog.records if "repeats the scan" in r.getMessage()]
    assert len(repeats) == 1 and "'s1_again'" in repeats[0], repeats
    assert list(summary.rows) == ["s1"]
    assert not any(p.exists() for p in output_paths(out, "s1_again").values())
