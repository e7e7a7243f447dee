"""Two runs at once on the same outputs, as on a shared cluster or in a department: real processes, one of them held
in the middle of its renames (a job suspended by the scheduler, a process descheduled) while the other runs."""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import REPO, make_head

pytestmark = pytest.mark.skipif(os.name != "posix", reason="outputs are locked with flock on POSIX only")

# runs the CLI's main in this process; the rename onto the output named HOLD waits there until the file GO exists
RUNNER = """\
import os, sys, time
sys.path.insert(0, {lib!r})
import CeVAEAnomalyLib.io.atomic as atomic
real = atomic.publish
def publish(tmp, target, durable=False):
    if target.name == {hold!r}:
        print("renaming", flush=True)
        while not os.path.exists({go!r}):
            time.sleep(0.05)
    real(tmp, target, durable)
atomic.publish = publish
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "CeVAEAnomaly"))


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scan")
    image, mask = make_head(seed=4)
    sitk.WriteImage(image, str(d / "h.nii.gz"))
    sitk.WriteImage(mask, str(d / "h_mask.nii.gz"))
    return d


def _held_at(tmp_path: Path, hold: str, argv: list) -> tuple:
    """Start the CLI with ``argv``, held at its rename onto ``hold``: (the process, the file that lets it go on)."""
    go = tmp_path / "go"
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(lib=str(REPO / "CeVAEAnomaly"), hold=hold, go=str(go)))
    proc = subprocess.Popen([sys.executable, str(runner), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    line = proc.stdout.readline()
    if line != "renaming\n":
        proc.kill()
        pytest.fail(proc.communicate()[1][-3000:])
    return proc, go


def _finish(proc: subprocess.Popen, go: Path) -> str:
    go.write_text("")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return err


def _cli(argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=ENV)


def _detect(scan: Path, out: Path, bundle: Path, *more: str) -> list:
    return ["detect", str(scan / "h.nii.gz"), "--mask", str(scan / "h_mask.nii.gz"), "--model", str(bundle),
            "--device", "cpu", "--score", str(out / "h_score.nii.gz"), "--labelmap", str(out / "h_labelmap.nii.gz"),
            "--slice-scores", str(out / "h_slices.csv"), *more]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flagged(path: Path) -> bool:
    return bool(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).any())


def test_a_second_detect_on_the_same_outputs_is_refused_not_mixed_with_the_first(scan, tiny_bundle, tmp_path):
    """Two detects writing the same files both wrote them: the first, held between its renames, ended with the
    second's labelmap (threshold 0: the whole brain) beside its own slice table (threshold 1e9: nothing)."""
    out = tmp_path / "out"
    first, go = _held_at(tmp_path, "h_slices.csv", _detect(scan, out, tiny_bundle, "--threshold", "1e9"))
    try:
        second = _cli(_detect(scan, out, tiny_bundle, "--threshold", "0", "--overwrite"))
    finally:
        _finish(first, go)
    assert second.returncode == 2, second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: A detect (process {first.pid}) is writing ") and "Traceback" not in second.stderr
    assert not _flagged(out / "h_labelmap.nii.gz")  # the first run's labelmap, beside its map and table
    assert not any(p.name.endswith(".lock") for p in out.iterdir())


def test_a_batch_records_its_own_outputs_not_a_set_another_run_wrote_into(scan, tiny_bundle, tmp_path):
    """A batch held between the renames of a volume's outputs while a detect wrote the same files: the batch
    renamed its slice table over the detect's and recorded the detect's labelmap as its own ("ok", 0 ml flagged,
    with the checksum of a labelmap that flags the whole brain)."""
    out = tmp_path / "out"
    batch = ["batch", str(scan), "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu",
             "--threshold", "1e9"]
    first, go = _held_at(tmp_path, "h_slices.csv", batch)
    try:
        second = _cli(_detect(scan, out, tiny_bundle, "--threshold", "0", "--overwrite"))
    finally:
        _finish(first, go)
    assert second.returncode == 2 and f"A batch (process {first.pid}) is writing" in second.stderr, second.stderr
    assert not _flagged(out / "h_labelmap.nii.gz")
    with (out / "summary.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["status"] == "ok" and float(row["flagged_ml"]) == 0
    assert row["labelmap_sha256"] == _sha(out / "h_labelmap.nii.gz")
