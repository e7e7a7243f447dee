"""Names and folders a real cohort holds: names that are not UTF-8, links to files not fetched, a planted
link as a lock file, a summary saved back by Excel, an output folder that cannot be written."""
from __future__ import annotations

import csv
import errno
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.lock import hold_output

LATIN1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name from an old archive, on a UTF-8 system


def one_error_line(err: str, pattern: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def cohort(tmp_path, head):
    """A folder with one scan and its mask."""
    d = tmp_path / "in"
    d.mkdir()
    image, mask = head
    shutil.copy(image, d / "a.nii.gz")
    shutil.copy(mask, d / "a_mask.nii.gz")
    return d


def non_utf8(path: Path) -> Path:
    if sys.platform == "darwin" or os.name == "nt":
        pytest.skip("this file system stores names as Unicode")
    return path


def batch(folder: Path, out: Path, model: Path) -> int:
    return main(["batch", str(folder), "--out-dir", str(out), "--model", str(model), "--device", "cpu"])


def test_a_scan_named_in_latin1_is_refused_in_words_and_a_batch_goes_on(cohort, tiny_bundle, tmp_path, capsys):
    odd = non_utf8(cohort / f"{LATIN1}.nii.gz")
    shutil.copy(cohort / "a.nii.gz", odd)
    rc = main(["detect", str(odd), "--model", str(tiny_bundle), "--score", str(tmp_path / "s.nii.gz")])
    assert rc == 2  # the image library aborted the whole process on it (SIGABRT)
    one_error_line(capsys.readouterr().err, r"caf\\xe9\.nii\.gz is not valid UTF-8 text.*Rename the file")

    out = tmp_path / "out"
    assert batch(cohort, out, tiny_bundle) == 2
    rows = {r["name"]: r for r in csv.DictReader((out / "summary.csv").read_text(encoding="utf-8").splitlines())}
    assert rows["a"]["status"] == "ok"
    assert rows["caf\\xe9"]["status"] == "error" and "not valid UTF-8" in rows["caf\\xe9"]["error"]


def test_an_output_folder_named_in_latin1_is_refused_before_the_work(cohort, tiny_bundle, tmp_path, capsys):
    folder = non_utf8(tmp_path / LATIN1)
    folder.mkdir()
    rc = main(["detect", str(cohort / "a.nii.gz"), "--model", str(tiny_bundle), "--score", str(folder / "s.nii.gz")])
    assert rc == 2
    one_error_line(capsys.readouterr().err, r"output path .*caf\\xe9/s\.nii\.gz is not valid UTF-8 text")
    assert list(folder.iterdir()) == []  # no temporary file left behind


def test_a_link_to_a_file_not_fetched_is_an_error_row_not_left_out(cohort, tiny_bundle, tmp_path, caplog):
    (cohort / "b.nii.gz").symlink_to(tmp_path / "annex" / "objects" / "b.nii.gz")
    out = tmp_path / "out"
    assert batch(cohort, out, tiny_bundle) == 2  # it ended "1 ok, 0 error(s)", exit 0, with no row for b
    rows = {r["name"]: r for r in csv.DictReader((out / "summary.csv").read_text(encoding="utf-8").splitlines())}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "error"
    assert re.search(r"b\.nii\.gz is a symbolic link to .*annex/objects/b\.nii\.gz, which does not exist",
                     rows["b"]["error"])


@pytest.mark.skipif(os.name != "posix", reason="outputs are locked with flock on POSIX only")
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("precious notes\n")
    out = tmp_path / "out" / "summary.csv"
    out.parent.mkdir()
    (out.parent / ".summary.csv.lock").symlink_to(precious)
    with pytest.raises(CeVAEError, match=r"lock file .*\.summary\.csv\.lock of .*summary\.csv is a symbolic link"):
        with hold_output(out, "batch"):
            pass
    assert precious.read_text() == "precious notes\n"  # it was truncated and rewritten to "batch <pid>"


def test_a_summary_saved_back_by_excel_resumes(cohort, tiny_bundle, tmp_path, caplog):
    out = tmp_path / "out"
    assert batch(cohort, out, tiny_bundle) == 0
    summary = out / "summary.csv"
    summary.write_bytes(b"\xef\xbb\xbf" + summary.read_bytes())  # "CSV UTF-8" adds a byte-order mark
    caplog.set_level("INFO")
    assert batch(cohort, out, tiny_bundle) == 0  # it was "not a batch summary" unless --overwrite
    assert "0 volume(s) to score, 1 already done" in caplog.text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which no one can write into")
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(cohort, tiny_bundle, capsys):
    rc = main(["detect", str(cohort / "a.nii.gz"), "--model", str(tiny_bundle), "--score", "/proc/s.nii.gz"])
    assert rc == 2  # it failed only after the whole detection, naming a hidden temporary file
    one_error_line(capsys.readouterr().err, r"^error: Cannot write into /proc \(.*\)\. .*, or choose another folder\.$")


def _refused_in(folder: str) -> int:
    """The errno with which ``folder`` refuses a new file (0: it takes one)."""
    try:
        with open(os.path.join(folder, ".cevae-probe"), "xb"):
            pass
    except OSError as exc:
        return exc.errno
    os.unlink(os.path.join(folder, ".cevae-probe"))
    return 0


@pytest.mark.skipif(not os.path.isdir("/sys/fs") or _refused_in("/sys/fs") != errno.EACCES,
                    reason="needs Linux's /sys/fs, which refuses new files for their permissions (even to root)")
def test_an_output_folder_refused_for_its_permissions_says_so(cohort, tiny_bundle, capsys):
    """It said "Cannot write into /sys/fs (Permission denied); choose a folder you can write to", the same words for a
    read-only disk or a full one: now what to do about the cause."""
    rc = main(["detect", str(cohort / "a.nii.gz"), "--model", str(tiny_bundle), "--score", "/sys/fs/s.nii.gz"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "^" + re.escape(
        "error: Cannot write into /sys/fs (Permission denied). Make sure you may write in /sys/fs (its permissions), "
        "or choose another folder.") + "$")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which no one can write into")
def test_an_output_that_is_a_link_into_an_unwritable_folder_is_replaced_where_it_is(tmp_path):
    """A DataLad or git-annex dataset's outputs are links into read-only object folders: the write check looked
    there, where nothing is written (the link itself is replaced), and refused a rerun with --overwrite."""
    from CeVAEAnomalyLib.io.atomic import atomic_write_text

    link = tmp_path / "report.txt"
    link.symlink_to("/proc/version")
    atomic_write_text(link, "hello\n", overwrite=True)
    assert not link.is_symlink() and link.read_text() == "hello\n"
