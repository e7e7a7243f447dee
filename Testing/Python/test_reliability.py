"""No silent corruption, no input ever replaced: disk full, SIGTERM, outputs that would land on inputs.

The disk-full cases run the real command in a subprocess with a file-size limit (RLIMIT_FSIZE,
SIGXFSZ ignored): every write past the limit fails the way a full disk fails it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[2:]))
"""

# The writer of every output sleeps after writing its temporary file, so that SIGTERM arrives mid-write.
SLOW_WRITER = """
import sys, time
from CeVAEAnomalyLib.io import atomic
real = atomic._writer_for
def slow(value):
    write = real(value)
    def run(tmp):
        write(tmp)
        print("writing", flush=True)
        time.sleep(120)
    return run
atomic._writer_for = slow
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def python(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def tree(folder: Path) -> Dict[str, str]:
    """Every file under ``folder`` (hidden temporaries included) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str, pattern: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def inputs(tmp_path, head, tiny_bundle):
    d = tmp_path / "in"
    d.mkdir()
    image, mask = head
    return Path(shutil.copy(image, d)), Path(shutil.copy(mask, d)), Path(shutil.copy(tiny_bundle, d))


def detect_argv(image: Path, mask: Path, model: Path, score: Path, *extra: str) -> List[str]:
    return ["detect", str(image), "--mask", str(mask), "--model", str(model), "--score", str(score),
            "--device", "cpu", *extra]


# ---- disk full ------------------------------------------------------------------------------
def test_detect_on_a_full_disk_keeps_the_previous_output(inputs, tmp_path):
    image, mask, model = inputs
    out = tmp_path / "out"
    score = out / "score.nii.gz"
    assert main(detect_argv(image, mask, model, score)) == 0
    before = tree(tmp_path)
    limit = score.stat().st_size // 2  # ITK's NIfTI writer stops here without raising
    proc = python("-c", LIMITED, str(limit), *detect_argv(image, mask, model, score, "--overwrite"))
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, r"Could not write .*score\.nii\.gz completely .*is the disk full\? Nothing was "
                                r"replaced\. Free some space on the disk holding "
                                rf"{re.escape(str(out))}, then run again\.$")
    assert tree(tmp_path) == before  # the old output intact, no temporary file


def test_detect_refuses_a_folder_where_not_even_its_lock_can_be_written(inputs, tmp_path):
    """The first write of a detection is its lock file's line (who holds it): where that failed (a full disk; here any
    write fails past a file-size limit of 0), detect ended in "unexpected OSError" and left the lock file behind."""
    image, mask, model = inputs
    out = tmp_path / "out"
    before = tree(tmp_path)
    proc = python("-c", LIMITED, "0", *detect_argv(image, mask, model, out / "score.nii.gz"))
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, "^" + re.escape(
        f"error: Cannot write into {out} ({os.strerror(errno.EFBIG)}). Make sure {out} can be written (EFBIG), or "
        "choose another folder.") + "$")
    assert tree(tmp_path) == before and not out.exists()  # neither the lock file nor the folder made for it


@pytest.mark.parametrize("number, remedy", [
    (errno.ENOSPC, "Free some space on the disk holding {out}"),
    (errno.EROFS, "The disk holding {out} is mounted read-only: make it writable"),
    (errno.EACCES, "Make sure you may write in {out} (its permissions)"),
    (errno.EIO, "Check the disk holding {out} (move the run to another disk if it fails again)"),
])
def test_detect_says_what_to_do_when_an_output_cannot_be_written(inputs, tmp_path, capsys, monkeypatch, number,
                                                                 remedy):
    """The record's write fails half-way, as the system fails it (a full disk, a disk remounted read-only, ...): the
    one error line names the output and says what to do by the cause; the outputs of the previous run are intact and
    no part of this one's, nor a temporary file, is left."""
    from CeVAEAnomalyLib.io import atomic

    image, mask, model = inputs
    out = tmp_path / "out"
    score, record = out / "score.nii.gz", out / "record.json"
    assert main(detect_argv(image, mask, model, score, "--record", str(record))) == 0
    before = tree(tmp_path)
    real = atomic._writer_for

    def failing_record(value):
        if not isinstance(value, str):
            return real(value)

        def write_half(tmp):
            Path(tmp).write_text(value[: len(value) // 2])
            raise OSError(number, os.strerror(number))
        return write_half

    monkeypatch.setattr(atomic, "_writer_for", failing_record)
    assert main(detect_argv(image, mask, model, score, "--record", str(record), "--overwrite")) == 2
    one_error_line(capsys.readouterr().err, "^" + re.escape(
        f"error: Could not write {record}: {os.strerror(number)}. Nothing was replaced. "
        f"{remedy.format(out=out)}, then run again."
    ) + "$")
    assert tree(tmp_path) == before


def test_overwrite_keeps_a_private_files_permissions(inputs, tmp_path):
    """A patient-derived output the user made private stays private when --overwrite replaces it."""
    image, mask, model = inputs
    score, fresh = tmp_path / "score.nii.gz", tmp_path / "fresh.nii.gz"
    assert main(detect_argv(image, mask, model, score)) == 0
    score.chmod(0o600)
    assert main(detect_argv(image, mask, model, score, "--overwrite")) == 0
    assert score.stat().st_mode & 0o777 == 0o600
    umask = os.umask(0o022)
    try:
        assert main(detect_argv(image, mask, model, fresh)) == 0
    finally:
        os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o644  # a new file: 0666 minus the umask


def test_batch_on_a_full_disk_publishes_no_fragment(inputs, tmp_path):
    image, mask, model = inputs
    (tmp_path / "list.csv").write_text(f"image,mask\n{image},{mask}\n")
    out = tmp_path / "out"
    proc = python("-c", LIMITED, "8000", "batch", str(tmp_path / "list.csv"), "--out-dir", str(out),
                  "--model", str(model), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    summary = (out / "summary.csv").read_text()
    assert "error" in summary and "completely" in summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]


def test_calibrate_on_a_full_disk_is_a_clear_error(inputs, tmp_path):
    image, mask, model = inputs
    out = tmp_path / "calibrated.cevae"
    (tmp_path / "healthy.csv").write_text(f"image,mask\n{image},{mask}\n")
    proc = python("-c", LIMITED, str(model.stat().st_size // 2), "calibrate", "--manifest",
                  str(tmp_path / "healthy.csv"), "--model", str(model), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    said = "\n".join(ln for ln in proc.stderr.splitlines() if "Calibrating on a single healthy scan" not in ln)
    one_error_line(said, r"Could not write the model bundle .*calibrated\.cevae")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".cevae"])
def test_a_short_file_is_never_published(tmp_path, suffix, tiny_bundle):
    """The completeness check itself, on files cut after the writer finished."""
    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.io.atomic import check_complete

    whole = tmp_path / f"whole{suffix}"
    if suffix == ".cevae":
        shutil.copy(tiny_bundle, whole)
    else:
        sitk.WriteImage(sitk.ReadImage(str(tiny_bundle.parent / "h1.nii.gz")), str(whole), suffix != ".nrrd")
    check_complete(str(whole), whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(CeVAEError, match="completely"):
        check_complete(str(cut), cut)



def labelmap_image() -> sitk.Image:
    """A small labelmap of scattered voxels (so that it does not compress to a few bytes)."""
    import numpy as np

    return sitk.GetImageFromArray((np.random.default_rng(0).random((20, 20, 20)) > 0.7).astype(np.uint8))


# every format an output can take: name, writer (None: text, checked against the bytes it should have)
OUTPUT_FORMATS = {".nii.gz": True, ".nii": False, "raw.nrrd": False, "gzip.nrrd": True, ".seg.nrrd": True,
                  "raw.mha": False, "packed.mha": True, ".csv": None, ".json": None}


@pytest.mark.parametrize("cut", [1, 2, 4, 8, 9])
@pytest.mark.parametrize("name", list(OUTPUT_FORMATS))
def test_a_file_a_few_bytes_short_is_never_published(tmp_path, name, cut):
    """Every output format, cut by a few bytes after its writer finished: the end of a gzip stream (its CRC and
    length) is checked, not only the voxels ITK reads. A gzip NRRD (a Slicer .seg.nrrd, detect's .nrrd) 1 to 4 or
    9 bytes short passed as complete."""
    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.io.atomic import check_complete

    whole = tmp_path / f"whole{name}"
    if OUTPUT_FORMATS[name] is None:
        whole.write_text('{"label": "anomaly"}\n' if name == ".json" else "axis,index,score\n0,3,0.25\n")
    else:
        sitk.WriteImage(labelmap_image(), str(whole), OUTPUT_FORMATS[name])
    check_complete(str(whole), whole, whole.stat().st_size if OUTPUT_FORMATS[name] is None else None)
    short = tmp_path / f"short{name}"
    short.write_bytes(whole.read_bytes()[:-cut])
    with pytest.raises(CeVAEError, match="completely"):
        check_complete(str(short), short, whole.stat().st_size if OUTPUT_FORMATS[name] is None else None)


def test_a_gzip_nrrd_holding_fewer_voxels_than_its_header_announces_is_refused(tmp_path):
    """A whole gzip stream that holds less than the header's sizes and type need."""
    import gzip

    from CeVAEAnomalyLib.io.verify import incomplete_reason

    whole = tmp_path / "whole.nrrd"
    sitk.WriteImage(labelmap_image(), str(whole), True)
    header = whole.read_bytes().split(b"\n\n", 1)[0]
    fewer = tmp_path / "fewer.nrrd"
    fewer.write_bytes(header + b"\n\n" + gzip.compress(bytes(20 ** 3 - 1)))
    assert incomplete_reason(whole, whole) is None
    assert incomplete_reason(fewer, fewer) == "7999 of the 8000 voxel bytes its header announces"


WRITE_LIMITED = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
import SimpleITK as sitk
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import write_all
image = sitk.ReadImage(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
try:
    write_all({Path(sys.argv[3]): image}, overwrite=True)
except CeVAEError as exc:
    sys.exit(str(exc))
"""


def test_a_segmentation_written_past_a_file_size_limit_is_not_published(tmp_path):
    """A real write of a gzip .seg.nrrd that the limit stops 2 bytes short: ITK's NRRD writer does not say so and
    reads the file back whole, so it was published without the end of its stream."""
    source = tmp_path / "source.nrrd"
    sitk.WriteImage(labelmap_image(), str(source))
    whole = tmp_path / "whole.seg.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(whole), True)  # as the subprocess writes it
    target = tmp_path / "out" / "s_segmentation.seg.nrrd"
    proc = python("-c", WRITE_LIMITED, str(whole.stat().st_size - 2), str(source), str(target))
    assert proc.returncode == 1 and re.match(r"Could not write .*s_segmentation\.seg\.nrrd completely ", proc.stderr), \
        proc.stderr
    assert not target.parent.exists()  # nothing published, no temporary left (nor the folder made for them)

# ---- SIGTERM --------------------------------------------------------------------------------
def test_sigterm_during_a_write_leaves_no_temporary_file(inputs, tmp_path):
    image, mask, model = inputs
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *detect_argv(image, mask, model, out / "s.nii.gz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p for p in out.iterdir() if p.name.startswith(".")]  # the temporary file is there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert [ln for ln in err.splitlines() if not ln.startswith("INFO")] == ["terminated"]
    assert list(out.iterdir()) == []


# ---- outputs over inputs --------------------------------------------------------------------
def test_calibrate_never_writes_over_a_healthy_image(inputs, tmp_path, capsys):
    image, mask, model = inputs
    before = tree(tmp_path)
    rc = main(["calibrate", str(image), "--model", str(model), "--out", str(image), "--overwrite", "--device", "cpu"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, r"head\.nii\.gz is the same file as an input")
    assert tree(tmp_path) == before


def test_evaluate_never_writes_over_a_score_map(inputs, tmp_path, capsys):
    image, mask, _ = inputs
    before = tree(tmp_path)
    assert main(["evaluate", "--score", str(image), "--mask", str(mask), "--out", str(image), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, r"head\.nii\.gz is the same file as an input")
    assert tree(tmp_path) == before
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("keep me")
    assert main(["evaluate", "--score", str(image), "--mask", str(mask), "--out", str(metrics)]) == 2
    one_error_line(capsys.readouterr().err, r"metrics\.csv already exists; pass --overwrite")
    assert metrics.read_text() == "keep me"
    assert main(["evaluate", "--score", str(image), "--mask", str(mask), "--out", str(metrics), "--overwrite"]) == 0
    assert metrics.read_text().splitlines()[-1].startswith("pooled")


@pytest.mark.parametrize("flag", ["--slice-scores", "--components"])
def test_detect_never_writes_over_the_model(inputs, tmp_path, capsys, flag):
    image, mask, model = inputs
    before = tree(tmp_path)
    assert main(detect_argv(image, mask, model, tmp_path / "s.nii.gz", flag, str(model), "--overwrite")) == 2
    one_error_line(capsys.readouterr().err, r"tiny\.cevae is the same file as an input")
    assert tree(tmp_path) == before


def test_hard_link_to_an_input_is_the_input(inputs, tmp_path, capsys):
    image, mask, model = inputs
    link = tmp_path / "link.nii.gz"
    os.link(image, link)
    before = tree(tmp_path)
    assert main(detect_argv(image, mask, model, link, "--overwrite")) == 2
    one_error_line(capsys.readouterr().err, r"link\.nii\.gz is the same file as an input \(.*head\.nii\.gz\)")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("header, data", [("head.mhd", "head.raw"), ("head.nhdr", "head.raw"), ("head.hdr", "head.img")])
def test_detect_never_writes_over_the_data_file_of_a_detached_header(inputs, tmp_path, capsys, header, data):
    image, mask, model = inputs
    sitk.WriteImage(sitk.ReadImage(str(image)), str(tmp_path / header))
    assert (tmp_path / data).is_file()
    before = tree(tmp_path)
    argv = detect_argv(tmp_path / header, mask, model, tmp_path / "s.nii.gz", "--slice-scores", str(tmp_path / data))
    assert main([*argv, "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, rf"{re.escape(data)} is a file that reading the input .*{re.escape(header)} opens")
    assert tree(tmp_path) == before


def test_detect_never_writes_into_a_dicom_input_folder(inputs, tmp_path, capsys):
    """Any file written into the series' folder would replace a slice or join the series read next time."""
    image, mask, model = inputs
    series = tmp_path / "series"
    series.mkdir()
    reference = sitk.Cast(sitk.ReadImage(str(image)), sitk.sitkInt16)
    for k in range(3):  # the check needs no readable series: it comes before any file is read
        sitk.WriteImage(reference[:, :, k], str(series / f"IM{k:04d}.dcm"))
    before = tree(tmp_path)
    for target in (series / "IM0001.dcm", series / "new.nii.gz"):
        assert main([*detect_argv(series, mask, model, target), "--overwrite"]) == 2
        one_error_line(capsys.readouterr().err, rf"{target.name} is inside the input folder .*series")
    assert tree(tmp_path) == before


def test_batch_outputs_never_replace_other_inputs(inputs, tmp_path, capsys):
    """``a``'s score map would be named like the input ``a_score``: refused before any work."""
    image, mask, model = inputs
    d = image.parent
    shutil.copy(image, d / "a.nii.gz")
    shutil.copy(image, d / "a_score.nii.gz")
    (d / "list.csv").write_text("image,mask\na.nii.gz,head_mask.nii.gz\na_score.nii.gz,head_mask.nii.gz\n")
    before = tree(tmp_path)
    rc = main(["batch", str(d / "list.csv"), "--out-dir", str(d), "--model", str(model), "--device", "cpu",
               "--overwrite"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, r"a_score\.nii\.gz would replace the input")
    assert tree(tmp_path) == before


def test_batch_out_dir_under_a_file_is_refused_before_any_work(inputs, tmp_path, capsys):
    image, mask, model = inputs
    (tmp_path / "report.txt").write_text("a file")
    rc = main(["batch", str(image.parent), "--out-dir", str(tmp_path / "report.txt" / "out"), "--model", str(model),
               "--device", "cpu"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, r"report\.txt/out is under .*report\.txt, which is a file")


# ---- error lines ----------------------------------------------------------------------------
def test_itk_errors_lose_their_cpp_locations():
    from CeVAEAnomalyLib.errors import one_line

    image = sitk.Image(4, 4, 4, sitk.sitkFloat32)
    with pytest.raises(RuntimeError) as caught:
        image.SetSpacing((-1.0, 1.0, 1.0))
    raw = str(caught.value)
    assert ".hxx:" in raw and "0x" in raw  # what ITK gives
    line = one_line(caught.value)
    assert "\n" not in line and ".hxx" not in line and "0x" not in line and "Exception thrown" not in line
    assert line.startswith("Negative spacing is not supported")


def test_unexpected_itk_error_is_one_clean_line(inputs, tmp_path, capsys, monkeypatch):
    from CeVAEAnomalyLib.engine.detector import Detector

    def broken(*args, **kwargs):
        sitk.Image(4, 4, 4, sitk.sitkFloat32).SetSpacing((-1.0, 1.0, 1.0))

    monkeypatch.setattr(Detector, "__call__", broken)
    image, mask, model = inputs
    assert main(detect_argv(image, mask, model, tmp_path / "s.nii.gz")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unexpected RuntimeError: Negative spacing is not supported")
    assert ".hxx" not in err and "0x" not in err and "\n" not in err


def test_detect_resolves_the_threshold_before_reading_the_volume(inputs, tmp_path, capsys, monkeypatch):
    """--fpr for a scoring the model holds no calibration for: refused without reading the image."""
    from CeVAEAnomalyLib.io import images

    monkeypatch.setattr(images, "read_image", lambda *a, **k: pytest.fail("the image was read"))
    image, mask, model = inputs
    assert main(detect_argv(image, mask, model, tmp_path / "s.nii.gz", "--grad-sigma", "1.25", "--fpr", "0.01")) == 2
    one_error_line(capsys.readouterr().err, r"no calibration")
    assert not (tmp_path / "s.nii.gz").exists()


@pytest.mark.skipif(os.name != "posix", reason="named pipes are POSIX")
def test_a_named_pipe_as_an_input_is_refused_not_waited_on(inputs, tmp_path):
    """Hashing an input (batch's and evaluate's records of what they scored) must never open a FIFO: it waits
    for a writer forever."""
    image, mask, model = inputs
    pipe = tmp_path / "in" / "pipe.nii.gz"
    os.mkfifo(pipe)
    listed = tmp_path / "list.csv"
    listed.write_text(f"image,mask\n{image},{mask}\n{pipe},\n")
    proc = python("-m", "CeVAEAnomalyLib.cli", "batch", str(listed), "--out-dir", str(tmp_path / "out"),
                  "--model", str(model), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "named pipe" in (tmp_path / "out" / "summary.csv").read_text()
    proc = python("-m", "CeVAEAnomalyLib.cli", "evaluate", "--score", str(pipe))
    assert proc.returncode == 2 and "named pipe" in proc.stderr, proc.stderr


POOL_MAIN = """
import concurrent.futures, multiprocessing, os, sys, time
from CeVAEAnomalyLib.interrupts import pool_worker_signals

def work(_):
    print(os.getpid(), flush=True)
    time.sleep(60)

if __name__ == "__main__":
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=pool_worker_signals) as pool:
        pool.submit(work, 0).result()
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and reparenting are POSIX")
def test_a_pool_worker_whose_main_process_is_killed_stops_too(tmp_path):
    """batch --workers and prepare --workers: after a SIGKILL of the main process its workers wrote on for
    seconds, then waited forever (reparented to init, holding memory)."""
    import signal
    import subprocess
    import time

    script = tmp_path / "pool_main.py"
    script.write_text(POOL_MAIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(main.stdout.readline())
        os.kill(main.pid, signal.SIGKILL)
        main.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.2)
        assert not _alive(worker)
    finally:
        main.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # a zombie has ended


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the synced files through /proc")
def test_checkpoints_and_bundles_reach_the_disk_before_they_replace_the_previous_one(tmp_path, monkeypatch):
    """--resume after a power cut needs the checkpoint's data, then its rename, on the disk: both are synced
    (outputs of detect are not: a rerun makes them again)."""
    import torch

    from CeVAEAnomalyLib.io import atomic
    from CeVAEAnomalyLib.training.checkpoint import write_checkpoint

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    path = tmp_path / "m.cevae.ckpt"
    write_checkpoint({"step": 3, "weights": torch.zeros(2)}, path)
    assert len(synced) == 2 and synced[0] != str(path) and Path(synced[0]).parent == tmp_path  # the temporary file
    assert synced[1] == str(tmp_path)  # then the folder, after the rename
    synced.clear()
    atomic.write_all({tmp_path / "out.csv": "a,b\n"}, False, ())
    assert synced == []


def test_a_killed_checkpoint_writes_temporary_is_removed_by_a_later_write(tmp_path):
    """SIGKILL during a checkpoint or bundle write left a hidden temporary of its full size, for good (also after
    a successful --resume); a later durable write of the same file removes those an hour old, and no others."""
    import time

    import torch

    from CeVAEAnomalyLib.training.checkpoint import write_checkpoint

    path = tmp_path / "m.cevae.ckpt"
    old = tmp_path / ".m.cevae.ckpt.0123abcd.ckpt"
    fresh = tmp_path / ".m.cevae.ckpt.89abcdef.ckpt"  # another write under way
    other = tmp_path / ".other.ckpt.0123abcd.ckpt"
    for leftover in (old, fresh, other):
        leftover.write_bytes(b"x" * 100)
    hour_ago = time.time() - 2 * 3600
    for leftover in (old, other):
        os.utime(leftover, (hour_ago, hour_ago))
    write_checkpoint({"step": 1, "weights": torch.zeros(2)}, path)
    assert path.is_file() and not old.exists() and fresh.exists() and other.exists()


@pytest.mark.parametrize("command", ["train", "adapt"])
def test_train_and_adapt_where_no_temporary_folder_can_be_written_say_so(inputs, tmp_path, command):
    """Without --cache-dir the slice cache goes into the system's temporary folder: where none can be written (a full
    /tmp, a used-up quota; here a file-size limit of 0), train and adapt ended in "unexpected FileNotFoundError: No
    usable temporary directory found ... report it" (exit code 1)."""
    image, mask, model = inputs
    (tmp_path / "healthy.csv").write_text(f"image,mask\n{image},{mask}\n")
    out = tmp_path / "out" / "m.cevae"
    argv = {"train": ["--channels", "8,16,16,32", "--z-dim", "16", "--max-steps", "2"],
            "adapt": ["--model", str(model), "--steps", "2"]}[command]
    before = tree(tmp_path)
    proc = python("-c", LIMITED, "0", command, "--manifest", str(tmp_path / "healthy.csv"), "--out", str(out),
                  "--device", "cpu", *argv)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, r"^error: The slice cache needs a temporary folder, and none can be written: No usable "
                                r"temporary directory found in \[.*\] \(a full disk or a used-up quota\?\)\. "
                                r"Free space there, or give --cache-dir a folder on a disk with room\.$")
    assert tree(tmp_path) == before and not out.parent.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX limits")
def test_a_write_refused_for_too_many_open_files_says_to_raise_the_limit(tmp_path):
    """batch under `ulimit -n 8` (a job template's or a container's low limit) failed every volume with "Cannot write
    into OUT (Too many open files). Make sure OUT can be written (EMFILE)": the folder was fine, the process's limit
    on open files was not. It says which limit now, and how to raise it."""
    import resource

    from CeVAEAnomalyLib.io.targets import cannot_write_into

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = os.open(os.devnull, os.O_RDONLY)  # the lowest free file number: with this limit, no file opens
    os.close(limit)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with pytest.raises(OSError) as caught:
            open(tmp_path / "out.nii.gz", "wb")
        message = str(cannot_write_into(tmp_path, caught.value))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caught.value.errno == errno.EMFILE
    assert message == (f"Cannot write into {tmp_path} (Too many open files). This process may hold {limit} files "
                       "open at once: raise that limit (ulimit -n), or choose another folder.")
