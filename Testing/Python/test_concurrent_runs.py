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

from conftest import REPO, as_hounsfield, make_head

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
if __name__ == "__main__":  # (not in a batch's spawned workers, which import this file again)
    from CeVAEAnomalyLib.cli.main import main
    sys.exit(main(sys.argv[1:]))
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "CeVAEAnomaly"))


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
    first, go = _held_at(tmp_path, "h_components.csv", batch)  # (its last output; the component table is held too)
    try:
        second = _cli(_detect(scan, out, tiny_bundle, "--threshold", "0", "--overwrite", "--components",
                              str(out / "h_components.csv")))
    finally:
        _finish(first, go)
    assert second.returncode == 2 and f"A batch (process {first.pid}) is writing" in second.stderr, second.stderr
    assert not _flagged(out / "h_labelmap.nii.gz")
    assert len((out / "h_components.csv").read_text().splitlines()) == 1  # the batch's table: no component
    with (out / "summary.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["status"] == "ok" and float(row["flagged_ml"]) == 0
    assert row["labelmap_sha256"] == _sha(out / "h_labelmap.nii.gz")
    assert row["components_sha256"] == _sha(out / "h_components.csv")


@pytest.fixture(scope="module")
def recalibrated(scan, tiny_bundle, tmp_path_factory) -> Path:
    """The tiny model calibrated again at a far higher false-positive rate: the same weights, a lower threshold."""
    from CeVAEAnomalyLib.cli.main import main

    out = tmp_path_factory.mktemp("recalibrated") / "site.cevae"
    image, mask = make_head(seed=5)
    sitk.WriteImage(image, str(out.parent / "g.nii.gz"))
    sitk.WriteImage(mask, str(out.parent / "g_mask.nii.gz"))
    assert main(["calibrate", "--model", str(tiny_bundle), str(scan / "h.nii.gz"), str(scan / "h_mask.nii.gz"),
                 str(out.parent / "g.nii.gz"), str(out.parent / "g_mask.nii.gz"), "--default-fpr", "0.3",
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


def _replace_model(model: Path, other: Path) -> None:
    """As another run's calibrate --overwrite does: the new file renamed over the model."""
    tmp = model.with_name(".new-" + model.name)
    tmp.write_bytes(other.read_bytes())
    os.replace(tmp, model)


def test_a_model_replaced_as_a_batch_starts_is_not_taken_for_the_one_it_records(scan, tiny_bundle, recalibrated,
                                                                                  tmp_path):
    """A batch records its model's checksum and threshold when it starts and loaded the model again later: a model
    replaced meanwhile scored every volume, under the record of the model it replaced (a rerun with that model
    then skipped them all as done)."""
    model, out = tmp_path / "model.cevae", tmp_path / "out"
    model.write_bytes(tiny_bundle.read_bytes())
    batch = ["batch", str(scan), "--out-dir", str(out), "--model", str(model), "--device", "cpu"]
    first, go = _held_at(tmp_path, "batch_settings.json", batch)
    _replace_model(model, recalibrated)
    _finish(first, go)
    assert (out / "batch_settings.json").read_text().count(_sha(tiny_bundle)) == 1
    from CeVAEAnomalyLib.cli.main import main

    assert main(_detect(scan, tmp_path / "alone", tiny_bundle)) == 0  # what the recorded model makes of it
    made = [sitk.GetArrayFromImage(sitk.ReadImage(str(d / "h_labelmap.nii.gz"))) for d in (out, tmp_path / "alone")]
    assert (made[0] == made[1]).all()


def test_workers_that_load_a_replaced_model_stop_the_batch_in_one_line(scan, tiny_bundle, recalibrated, tmp_path):
    """Workers load the model after the batch recorded it: one replaced meanwhile is refused, and the record of a
    batch that scored nothing goes with it."""
    model, out = tmp_path / "model.cevae", tmp_path / "out"
    model.write_bytes(tiny_bundle.read_bytes())
    (scan.parent / "two").mkdir(exist_ok=True)
    for name in ("h", "k"):
        for suffix in ("", "_mask"):
            (scan.parent / "two" / f"{name}{suffix}.nii.gz").write_bytes((scan / f"h{suffix}.nii.gz").read_bytes())
    other = sitk.ReadImage(str(scan / "h.nii.gz"))
    other[0, 0, 0] = other[0, 0, 0] + 1  # another scan (one listed twice is scored once: one worker would do)
    sitk.WriteImage(other, str(scan.parent / "two" / "k.nii.gz"))
    batch = ["batch", str(scan.parent / "two"), "--out-dir", str(out), "--model", str(model), "--device", "cpu",
             "--workers", "2"]
    first, go = _held_at(tmp_path, "batch_settings.json", batch)
    _replace_model(model, recalibrated)
    go.write_text("")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"error: The model {model} was replaced after this batch started")
    assert "Traceback" not in err and not (out / "batch_settings.json").exists()
    assert not list(out.glob("*_labelmap.nii.gz"))


@pytest.fixture(scope="module")
def ct_scan(tmp_path_factory) -> Path:
    """A folder holding one CT-like head, c.nii.gz (warned of), and its brain mask."""
    d = tmp_path_factory.mktemp("ct_scan")
    image, mask = make_head(seed=4)
    sitk.WriteImage(as_hounsfield(image), str(d / "c.nii.gz"))
    sitk.WriteImage(mask, str(d / "c_mask.nii.gz"))
    return d


def _batch(folder: Path, out: Path, bundle: Path, *more: str) -> list:
    return ["batch", str(folder), "--out-dir", str(out), "--model", str(bundle), "--device", "cpu", *more]


def _summary_row(path: Path) -> dict:
    with path.open(newline="") as fh:
        return next(csv.DictReader(fh))


def test_a_volume_another_run_finished_carries_that_run_s_warnings(ct_scan, tiny_bundle, tmp_path):
    """A batch that found its volume finished by another batch meanwhile (a shard of the same folder) gave it an
    empty warnings cell, though that run's summary there recorded them (here a CT-like range)."""
    from CeVAEAnomalyLib.cli.main import main

    out = tmp_path / "out"
    first, go = _held_at(tmp_path, "batch_settings.json", _batch(ct_scan, out, tiny_bundle))  # c: to score
    try:
        assert main(_batch(ct_scan, out, tiny_bundle, "--shard", "1/1")) == 0
    finally:
        err = _finish(first, go)
    assert "c was finished by another run meanwhile; its outputs are kept." in err
    theirs, ours = (_summary_row(out / name) for name in ("summary_shard-1-of-1.csv", "summary.csv"))
    assert theirs["status"] == "ok" and theirs["warnings"].startswith("The intensities look like a CT")
    assert ours["status"] == "skipped" and ours["warnings"] == theirs["warnings"]


def test_a_volume_another_run_wrote_but_no_summary_records_is_not_taken_until_one_does(scan, ct_scan, tiny_bundle,
                                                                                       tmp_path):
    """The other batch is held after writing the volume's outputs, before its summary records them: they were taken
    for this run's, as made from its image, though nothing said what they were made from (another list's volume of
    the same name, a killed run's). They are kept and the volume is an error row; once the other run has recorded
    them as made from this image, a rerun skips the volume with that run's warnings."""
    from CeVAEAnomalyLib.cli.main import main

    out, ours_at, theirs_at = tmp_path / "out", tmp_path / "ours", tmp_path / "theirs"
    ours_at.mkdir()
    theirs_at.mkdir()
    assert main(_batch(scan, out, tiny_bundle, "--shard", "1/1")) == 0  # its settings record: no first summary
    ours, go_ours = _held_at(ours_at, "batch_settings.json", _batch(ct_scan, out, tiny_bundle))  # c: to score
    try:
        theirs, go_theirs = _held_at(theirs_at, "summary_shard-1-of-1.csv",
                                     _batch(ct_scan, out, tiny_bundle, "--shard", "1/1"))  # c's outputs written
        try:
            go_ours.write_text("")
            _, err = ours.communicate(timeout=120)
        finally:
            _finish(theirs, go_theirs)
    finally:
        if ours.poll() is None:
            _finish(ours, go_ours)
    assert ours.returncode == 2, err[-3000:]
    row = _summary_row(out / "summary.csv")
    assert row["status"] == "error" and "no batch summary there records what they were made from" in row["error"]
    scored = _summary_row(out / "summary_shard-1-of-1.csv")
    assert scored["score_sha256"] == _sha(out / "c_score.nii.gz")  # kept
    assert main(_batch(ct_scan, out, tiny_bundle)) == 0
    row = _summary_row(out / "summary.csv")
    assert row["status"] == "skipped" and row["warnings"] == scored["warnings"] != ""
    assert row["score_sha256"] == scored["score_sha256"]


def test_a_volume_another_run_scored_from_another_image_is_not_taken_for_this_runs(ct_scan, tiny_bundle, tmp_path):
    """Two cohorts, each with a volume c, batched into one --out-dir (one of them as a shard): the run that found
    c's outputs written meanwhile took the other cohort's c for its own, recorded them as made from its own image
    and a rerun skipped c for good; its c was never scored."""
    from CeVAEAnomalyLib.cli.main import main

    mine, out = tmp_path / "mine", tmp_path / "out"
    mine.mkdir()
    image, mask = make_head(seed=6)
    sitk.WriteImage(image, str(mine / "c.nii.gz"))
    sitk.WriteImage(mask, str(mine / "c_mask.nii.gz"))
    ours, go = _held_at(tmp_path, "batch_settings.json", _batch(mine, out, tiny_bundle))  # c: to score
    try:
        assert main(_batch(ct_scan, out, tiny_bundle, "--shard", "1/1")) == 0  # the other cohort's c
    finally:
        go.write_text("")
        _, err = ours.communicate(timeout=120)
    theirs = _summary_row(out / "summary_shard-1-of-1.csv")
    assert theirs["image_sha256"] == _sha(ct_scan / "c.nii.gz") and theirs["status"] == "ok"
    assert ours.returncode == 2, err[-3000:]
    row = _summary_row(out / "summary.csv")
    assert row["status"] == "error" and "from another image" in row["error"], row
    assert _sha(out / "c_score.nii.gz") == theirs["score_sha256"]  # kept: the other run's
    # a rerun does not replace the other cohort's c unasked (d589fb2): refused before any work, saying what to do
    assert main(_batch(mine, out, tiny_bundle)) == 2
    assert _sha(out / "c_score.nii.gz") == theirs["score_sha256"]
    assert main(_batch(mine, out, tiny_bundle, "--overwrite")) == 0  # asked: this run's c is scored
    row = _summary_row(out / "summary.csv")
    assert row["status"] == "ok" and row["image_sha256"] == _sha(mine / "c.nii.gz")
    assert row["score_sha256"] == _sha(out / "c_score.nii.gz") != theirs["score_sha256"]
