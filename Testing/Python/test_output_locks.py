"""The output locks of io/lock.py as a command holds them: outputs whose long names share one lock file."""
from __future__ import annotations

import errno
import os

import pytest

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.lock import hold_output, hold_outputs, lock_path

pytestmark = pytest.mark.skipif(os.name != "posix", reason="outputs are locked with flock on POSIX only")


def test_outputs_whose_long_names_share_a_lock_file_are_held_once(tmp_path):
    stem = "a" * 249  # a lock file's name keeps the first 249 bytes of its output's (255 with "." and ".lock")
    score, labelmap = tmp_path / f"{stem}1.nrrd", tmp_path / f"{stem}2.nrrd"
    assert lock_path(score) == lock_path(labelmap)
    with hold_outputs([score, labelmap], "detect"):  # was: "A detect (process <this one>) is writing ..."
        with pytest.raises(CeVAEError, match="is writing"):  # still held against every other holder
            with hold_output(labelmap, "detect"):
                pass
    assert not os.path.lexists(lock_path(score))


def test_a_detect_that_fails_leaves_no_output_folder_behind(tmp_path, capsys):
    from CeVAEAnomalyLib.cli.main import main

    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    rc = main(["detect", str(bad), "--score", str(tmp_path / "new" / "deeper" / "s.nii.gz")])
    assert rc == 2 and "could not be read as an image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nii.gz"]  # was: new/deeper, made for the lock files


def test_a_held_output_keeps_the_folders_made_for_it_once_it_is_written(tmp_path):
    target = tmp_path / "new" / "s.csv"
    with hold_output(target, "detect"):
        target.write_text("written\n")
    assert target.read_text() == "written\n" and not os.path.lexists(lock_path(target))


def test_an_output_named_as_another_outputs_lock_file_is_refused(tmp_path):
    """An output at ``.NAME.lock`` beside an output ``NAME`` is the lock file held while NAME is written: it was
    written, said written, and then removed with the lock (or truncated by the lock of a later write)."""
    from CeVAEAnomalyLib.io.atomic import write_all

    score = tmp_path / "o.csv"
    with pytest.raises(CeVAEError, match=r"/\.o\.csv\.lock is the lock file held while \S*/o\.csv is written"):
        write_all({score: "a\n", lock_path(score): "b\n"}, overwrite=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("number, remedy", [
    (errno.ENOSPC, "Free some space on the disk holding {folder}"),
    (errno.EROFS, "The disk holding {folder} is mounted read-only: make it writable"),
    (errno.EACCES, "Make sure you may write in {folder} (its permissions)"),
    (errno.ENAMETOOLONG, "Give {folder} and its files shorter names"),
])
def test_a_lock_file_the_system_refuses_says_what_to_do_by_its_cause(tmp_path, monkeypatch, number, remedy):
    """A lock file that could not be made (a full disk, a disk remounted read-only, ...) was refused as "Cannot write
    into FOLDER (...); choose a folder you can write to", whatever its cause: no word on freeing space or a read-only
    disk. The folders made for it go again."""
    import CeVAEAnomalyLib.io.lock as lock

    def refused(path):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(lock, "_open_lock", refused)
    folder = tmp_path / "new"
    with pytest.raises(CeVAEError) as raised:
        with hold_output(folder / "c.cevae", "calibration"):
            pass
    assert str(raised.value) == (f"Cannot write into {folder} ({os.strerror(number)}). "
                                 f"{remedy.format(folder=folder)}, or choose another folder.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("under", ["", "sub"])
def test_an_output_under_a_file_names_the_file_in_the_way(tmp_path, under):
    """A Slicer calibration's output under a file (a folder name taken by a file): "Cannot write into FOLDER (File
    exists)" or "(Not a directory); choose a folder you can write to" named neither the file nor what to do."""
    notes = tmp_path / "notes"
    notes.write_text("the user's\n")
    folder = notes / under if under else notes
    number = errno.ENOTDIR if under else errno.EEXIST
    with pytest.raises(CeVAEError) as raised:
        with hold_output(folder / "c.cevae", "calibration"):
            pass
    assert str(raised.value) == (f"Cannot write into {folder} ({os.strerror(number)}). {notes} is a file, not a "
                                 "folder: rename or move it, or choose another folder.")
    assert notes.read_text() == "the user's\n"


# the first lock file taken waits, once made, for the file named by argv[1] (made once the test has signalled)
WAITING_LOCK = """
import os, sys, time
import CeVAEAnomalyLib.io.lock as lock
real = lock._open_lock
def waiting(path):
    fh = real(path)
    print("locking", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    return fh
lock._open_lock = waiting
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM and lock files are POSIX")
def test_a_stop_while_an_output_is_locked_leaves_no_lock_file_nor_folder(tmp_path, head, tiny_bundle):
    """SIGTERM (or Ctrl-C) arriving while detect took an output's lock left the hidden lock file, and the folder
    made for it, behind: the stop came before the lock was one the run lets go of at its end."""
    import signal
    import subprocess
    import sys

    image, mask = head
    out, go = tmp_path / "out", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", WAITING_LOCK, str(go), "detect", str(image), "--mask", str(mask),
                             "--model", str(tiny_bundle), "--score", str(out / "s.nii.gz"), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert proc.stdout.readline() == "locking\n", proc.stderr.read()
        assert (out / ".s.nii.gz.lock").is_file()
        proc.send_signal(signal.SIGTERM)
        go.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert [ln for ln in err.splitlines() if not ln.startswith("INFO")] == ["terminated"]
    assert not out.exists()
