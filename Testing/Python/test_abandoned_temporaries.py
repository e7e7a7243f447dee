"""Temporaries that a SIGKILLed detect, batch or DetectVolume left beside its outputs are removed by the next run of
the command, and nothing that is not certainly abandoned by one of its own writes is touched."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from CeVAEAnomalyLib.io.atomic import machine_tag, remove_abandoned_temporaries
from conftest import REPO

SCRIPT = REPO / "CeVAEAnomaly" / "Scripts" / "DetectVolume.py"
# runs a command (the CLI's main, or a script) in this process; a rename onto the output named BLOCK waits there,
# with every temporary of its set written, for the SIGKILL
RUNNER = """\
import runpy, sys, time
sys.path.insert(0, {lib!r})
import CeVAEAnomalyLib.io.atomic as atomic
real = atomic.publish
def publish(tmp, target, durable=False):
    if target.name == {block!r}:
        print("renaming", flush=True)
        time.sleep(600)
    real(tmp, target, durable)
atomic.publish = publish
if sys.argv[1] == "cli":
    from CeVAEAnomalyLib.cli.main import main
    sys.exit(main(sys.argv[2:]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _runner(tmp_path: Path, block: str) -> list:
    path = tmp_path / f"runner_{secrets.token_hex(2)}.py"
    path.write_text(RUNNER.format(lib=str(REPO / "CeVAEAnomaly"), block=block))
    return [sys.executable, str(path)]


def _killed_while_renaming(command: list) -> int:
    """Run ``command`` until its first rename onto the blocked output, SIGKILL it there; its process id."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    timer = threading.Timer(300, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
        assert line == "renaming\n", proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
        proc.stderr.close()
    return proc.pid


def _decoys(out: Path, target: str, ext: str, dead: int) -> list:
    """Files beside the outputs that are not certainly a killed write's of this command: each must stay."""
    tag = machine_tag()
    other_tag = "0" * 8 if tag != "0" * 8 else "1" * 8
    newer = out / f".{target}.{secrets.token_hex(4)}-{tag}-{dead}{ext}"
    files = [out / f".{target}.{secrets.token_hex(4)}-{tag}-{os.getpid()}{ext}",  # a live process's write
             out / f".{target}.{secrets.token_hex(4)}-{other_tag}-{dead}{ext}",  # another machine's
             out / f".{target}.0123abcd{ext}",  # an older version's, naming no owner
             out / f".notes.txt.{secrets.token_hex(4)}-{tag}-{dead}.txt",  # of a file the command does not write
             out / f".{target}.{secrets.token_hex(4)}-{tag}-{dead}{ext}.bak",  # only looks alike
             newer]  # changed after the run started
    for path in files:
        path.write_text("someone's")
    os.utime(newer, (time.time() + 3600, time.time() + 3600))
    return files


def _hidden(out: Path) -> set:
    return {p for p in out.iterdir() if p.name.startswith(".")}


def _batch(scan: Path, out: Path, bundle: Path) -> list:
    return ["cli", "batch", str(scan), "--out-dir", str(out), "--model", str(bundle), "--device", "cpu"]


def _detect(scan: Path, out: Path, bundle: Path) -> list:
    return ["cli", "detect", str(scan / "h.nii.gz"), "--mask", str(scan / "h_mask.nii.gz"), "--model", str(bundle),
            "--device", "cpu", "--score", str(out / "h_score.nii.gz"), "--labelmap", str(out / "h_labelmap.nii.gz"),
            "--slice-scores", str(out / "h_slices.csv")]


def _detect_volume(scan: Path, out: Path, bundle: Path) -> list:
    pytest.importorskip("slicer")
    return [str(SCRIPT), "--input", str(scan / "h.nii.gz"), "--mask", str(scan / "h_mask.nii.gz"), "--model",
            str(bundle), "--output-dir", str(out), "--device", "cpu", "--format", "nii.gz"]


@pytest.mark.parametrize("arguments", [_batch, _detect, _detect_volume], ids=["batch", "detect", "DetectVolume"])
def test_the_next_run_removes_what_a_sigkilled_run_left_and_nothing_else(scan, tiny_bundle, tmp_path, arguments):
    """A run SIGKILLed while it wrote its outputs left their hidden temporaries beside them for good."""
    out = tmp_path / "out"
    out.mkdir()
    command = arguments(scan, out, tiny_bundle)
    dead = _killed_while_renaming(_runner(tmp_path, "h_score.nii.gz") + command)
    left = {p for p in _hidden(out) if not p.name.endswith(".lock")}  # (a batch's lock goes when the rerun ends)
    assert len(left) >= 3 and all(f"-{machine_tag()}-{dead}." in p.name for p in left), left
    decoys = _decoys(out, "h_score.nii.gz", ".nii.gz", dead)
    rerun = subprocess.run(_runner(tmp_path, "") + command, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Removed {len(left)} temporary file(s) that killed runs left beside the outputs." in rerun.stderr
    assert _hidden(out) == set(decoys) and all(p.read_text() == "someone's" for p in decoys)
    assert (out / "h_score.nii.gz").is_file()


@pytest.mark.parametrize("command", ["calibrate", "share"])
def test_a_model_write_removes_what_a_sigkilled_write_of_it_left_and_nothing_else(scan, tiny_bundle, tmp_path,
                                                                                   command):
    """calibrate and share SIGKILLed as they wrote the model left its hidden temporary (the whole bundle) beside it;
    the rerun, at once, kept it (only a write of the file an hour later removed it)."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "written.cevae"
    (tmp_path / "healthy.csv").write_text(f"image,mask\n{scan / 'h.nii.gz'},{scan / 'h_mask.nii.gz'}\n")
    argv = {"calibrate": ["cli", "calibrate", "--manifest", str(tmp_path / "healthy.csv"), "--model", str(tiny_bundle),
                          "--out", str(target), "--device", "cpu"],
            "share": ["cli", "share", str(tiny_bundle), "--out", str(target)]}[command]
    dead = _killed_while_renaming(_runner(tmp_path, target.name) + argv)
    left = {p for p in _hidden(out) if not p.name.endswith(".lock")}
    assert len(left) == 1 and all(f"-{machine_tag()}-{dead}." in p.name for p in left), left
    decoys = _decoys(out, target.name, ".cevae", dead)
    rerun = subprocess.run(_runner(tmp_path, "") + argv, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _hidden(out) - {out / ".written.cevae.lock"} == set(decoys)
    assert all(p.read_text() == "someone's" for p in decoys) and target.is_file()


def test_a_temporary_is_only_removed_beside_a_target_of_the_run(tmp_path):
    """In-process: the name must be one of the given targets' temporaries, its process gone, its time earlier."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    mine = tmp_path / f".a_score.nii.gz.{secrets.token_hex(4)}-{machine_tag()}-{dead}.nii.gz"
    mine.write_text("half")
    decoys = _decoys(tmp_path, "a_score.nii.gz", ".nii.gz", dead)
    assert remove_abandoned_temporaries([tmp_path / "b_score.nii.gz"], time.time()) == 0  # another target's
    assert remove_abandoned_temporaries([tmp_path / "a_score.nii.gz"], time.time()) == 1
    assert _hidden(tmp_path) == set(decoys)


def test_a_temporary_naming_a_process_id_past_the_system_range_is_removed_not_an_overflow(tmp_path):
    """Its name's process id (up to 10 digits) past what os.kill takes: every run writing beside it ended in
    'unexpected OverflowError'. No process has that id, so it is a killed run's, and removed."""
    odd = tmp_path / f".a_score.nii.gz.{secrets.token_hex(4)}-{machine_tag()}-9999999999.nii.gz"
    odd.write_text("half")
    os.utime(odd, (time.time() - 5, time.time() - 5))
    assert remove_abandoned_temporaries([tmp_path / "a_score.nii.gz"], time.time()) == 1
    assert not odd.exists()


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").is_file(), reason="Linux only (the boot id)")
def test_another_machine_of_the_same_host_name_and_namespace_keeps_its_temporary(tmp_path, monkeypatch):
    """Two machines of one host name (cloned images: 'localhost.localdomain') sharing the output folder over NFS:
    outside containers both run in the first process namespace, whose number is the same everywhere. A temporary
    the other one is writing names a process that does not exist here, and was removed from under its write."""
    import CeVAEAnomalyLib.io.atomic as atomic

    other_boot = tmp_path / "boot_id"
    other_boot.write_text("00000000-1111-2222-3333-444444444444\n")
    monkeypatch.setattr(atomic, "_BOOT_ID", str(other_boot), raising=False)
    atomic.machine_tag.cache_clear()
    theirs = atomic.machine_tag()  # what the other machine names its temporaries with
    monkeypatch.undo()
    atomic.machine_tag.cache_clear()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    absent = int(proc.stdout)  # no such process here; the other machine's writer may well be one
    writing = tmp_path / f".a_score.nii.gz.{secrets.token_hex(4)}-{theirs}-{absent}.nii.gz"
    writing.write_text("half")
    os.utime(writing, (time.time() - 5, time.time() - 5))
    assert remove_abandoned_temporaries([tmp_path / "a_score.nii.gz"], time.time()) == 0
    assert writing.read_text() == "half"
    ours = tmp_path / f".a_score.nii.gz.{secrets.token_hex(4)}-{machine_tag()}-{absent}.nii.gz"
    ours.write_text("half")
    assert remove_abandoned_temporaries([tmp_path / "a_score.nii.gz"], time.time()) == 1 and not ours.exists()
