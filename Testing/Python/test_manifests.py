"""Lists of files (manifests, batch lists, evaluation cases): every row checked before any work, its line
named; DICOM series folders accepted; a CSV saved by Excel (with a byte-order mark) read like any other."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.batch import read_list
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.io.manifest import read_manifest
from conftest import make_head
from test_bad_inputs import write_dicom_series
from test_reliability import one_error_line

SMALL = ["--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--device", "cpu", "--max-steps", "2",
         "--val-fraction", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cohort(tmp_path) -> Path:
    """A folder with two small heads (h1, h2), their masks, and an empty folder."""
    for seed in (1, 2):
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        sitk.WriteImage(image, str(tmp_path / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(tmp_path / f"h{seed}_mask.nii.gz"))
    return tmp_path


def manifest(folder: Path, *rows: str, bom: bool = False) -> Path:
    path = folder / "train.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(["image,mask", *rows, ""]).encode())
    return path


@pytest.mark.parametrize("bad,message", [
    ("missing.nii.gz,", r"line 4: the image .*missing\.nii\.gz does not exist"),
    ("h1.nii.gz,gone_mask.nii.gz", r"line 4: the brain mask .*gone_mask\.nii\.gz does not exist"),
    ("empty,", r"line 4: the image .*empty is a folder without files"),
    ("blank.nii.gz,", r"line 4: the image .*blank\.nii\.gz is empty"),
    ("pipe.nii.gz,", r"line 4: the image .*pipe\.nii\.gz is a named pipe \(FIFO\), not a file"),
    ("x" * 300 + ".nii.gz,", r"line 4: the image .*x\.\.\. cannot be opened: file name too long"),
])
@pytest.mark.parametrize("command", ["train", "prepare", "calibrate"])
def test_every_manifest_row_is_checked_before_any_work(cohort, tmp_path, capsys, bad, message, command, tiny_bundle):
    (cohort / "empty").mkdir()
    (cohort / "blank.nii.gz").write_bytes(b"")
    os.mkfifo(cohort / "pipe.nii.gz")
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", "h2.nii.gz,", bad)
    out = tmp_path / "out"
    argv = {"train": ["train", "--manifest", str(csv), "--out", str(out / "m.cevae"), *SMALL],
            "prepare": ["prepare", "--manifest", str(csv), "--cache-dir", str(out)],
            "calibrate": ["calibrate", "--manifest", str(csv), "--model", str(tiny_bundle), "--out",
                          str(out / "c.cevae"), "--device", "cpu"]}[command]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, r"train\.csv, " + message)
    assert not out.exists()  # nothing was done


def test_an_image_argument_is_checked_like_a_manifest_row(cohort, tmp_path, capsys):
    assert main(["train", str(cohort / "h1.nii.gz"), str(cohort / "nope.nii.gz"), "--out",
                 str(tmp_path / "m.cevae"), *SMALL]) == 2
    one_error_line(capsys.readouterr().err, r"The image .*nope\.nii\.gz does not exist")


def test_train_reads_a_dicom_series_folder_in_a_manifest(cohort, tmp_path):
    image, _ = make_head(size=(32, 36, 28), seed=3)
    write_dicom_series(image, cohort / "series")
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", "series,")
    out = tmp_path / "m.cevae"
    assert main(["train", "--manifest", str(csv), "--out", str(out), *SMALL]) == 0
    assert out.is_file()


def test_a_byte_order_mark_is_read_like_any_csv(cohort, tiny_bundle, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; the one reader serves every list."""
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", bom=True)
    assert [s.image.name for s in read_manifest(csv)] == ["h1.nii.gz"]
    assert [i.name for i in read_list(csv)] == ["h1"]
    cases = tmp_path / "cases.csv"
    cases.write_bytes(b"\xef\xbb\xbfscore,gt,mask\n" + f"{cohort / 'h1.nii.gz'},,{cohort / 'h1_mask.nii.gz'}\n".encode())
    assert main(["evaluate", "--cases", str(cases)]) == 0
