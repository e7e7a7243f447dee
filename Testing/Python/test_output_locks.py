"""The output locks of io/lock.py as a command holds them: outputs whose long names share one lock file."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, other_user_cannot_import
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


_HOLD_AS = """
import os, sys
from pathlib import Path
from CeVAEAnomalyLib.io.lock import OutputHeld, hold_output
try:
    with hold_output(Path(sys.argv[1]), "train"):
        print("held", os.getpid(), flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), 9)  # SIGKILL: the lock file stays
        sys.stdin.read()  # held until the test closes its input
except OutputHeld as exc:
    print("refused", exc)
"""


def _as_user(uid: int, target: Path, how: str) -> subprocess.Popen:
    """A process of user ``uid`` (group 60000, umask 022) that holds ``target``'s lock (``how``: "hold" until its input
    is closed, "kill" itself then) or is refused."""
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--groups=60000", sys.executable, "-c", _HOLD_AS,
               str(target), how]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                            preexec_fn=lambda: os.umask(0o022))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run as two users")
def test_a_folder_shared_by_a_group_is_locked_for_its_users_alike():
    """A folder two users share through their group (setgid, group-writable): the lock file one user made (0644, from
    its umask) could not be opened for writing by the other, who was told it could not write into the folder, both
    while the first user's run wrote the output and for good once that run was killed (its lock file left)."""
    if other_user_cannot_import():
        pytest.skip(other_user_cannot_import())
    root = Path(tempfile.mkdtemp(prefix="cevae-shared-group-"))  # (pytest's own folder is private to this user)
    try:
        os.chmod(root, 0o755)
        shared = root / "project"
        shared.mkdir()
        os.chown(shared, 0, 60000)
        os.chmod(shared, 0o2775)
        target = shared / "model.pt"
        first = _as_user(60001, target, "hold")
        try:
            assert first.stdout.readline().split()[0] == "held"
            refused = _as_user(60002, target, "hold").communicate(timeout=120)[0]
            assert refused.startswith(f"refused A train (process {first.pid}) is writing {target}"), refused
        finally:
            first.stdin.close()
            first.wait(timeout=60)
        assert _as_user(60001, target, "kill").wait(timeout=120) == -9 and lock_path(target).exists()
        second = _as_user(60002, target, "hold")
        said = second.communicate("", timeout=120)[0]
        assert said.startswith("held"), said
        assert not lock_path(target).exists()
    finally:
        shutil.rmtree(root)


# Windows' msvcrt.locking (a byte range of an open file, refused at once when another process holds it, let go when
# the holder ends), stood in for on POSIX by record locks (fcntl.lockf), which behave so; and no fcntl, as on Windows
_AS_ON_WINDOWS = """
import errno, fcntl, os, sys, types
LK_UNLCK, LK_NBLCK = 0, 2

def locking(fd, mode, nbytes):
    how = fcntl.LOCK_UN if mode == LK_UNLCK else fcntl.LOCK_EX + fcntl.LOCK_NB
    try:
        fcntl.lockf(fd, how, nbytes, 0, os.SEEK_CUR)
    except BlockingIOError:
        raise OSError(errno.EACCES, "Permission denied") from None

sys.modules["msvcrt"] = types.SimpleNamespace(LK_UNLCK=LK_UNLCK, LK_NBLCK=LK_NBLCK, locking=locking)
sys.modules["fcntl"] = None
"""


def _windows_like(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _AS_ON_WINDOWS + script, *args], cwd=REPO / "CeVAEAnomaly",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_output_is_locked_where_there_is_no_flock_as_on_windows(tmp_path):
    """Without fcntl (Windows) nothing was locked: two runs with one --out both wrote it. A second run is now
    refused while the first holds the output, naming it, and may write it once the first has ended."""
    target = tmp_path / "m.cevae"
    first = _windows_like(_HOLD_AS, str(target), "hold")
    assert first.stdout.readline().split() == ["held", str(first.pid)], first.stderr.read()
    second = _windows_like(_HOLD_AS, str(target), "kill")
    out, err = second.communicate(timeout=60)
    assert out.startswith(f"refused A train (process {first.pid}) is writing {target}"), err
    first.communicate("", timeout=60)
    assert first.returncode == 0 and not os.path.lexists(lock_path(target))
    third = _windows_like(_HOLD_AS, str(target), "hold")
    out, err = third.communicate("", timeout=60)
    assert out.split() == ["held", str(third.pid)], err
