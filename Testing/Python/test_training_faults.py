"""Training survives faults: SIGKILL + resume, atomic checkpoints, NaN loss, out-of-memory."""
from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import CeVAEAnomalyLib.training.trainer as train_mod
import pytest
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.engine.bundle import load_bundle, read_header
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig
from CeVAEAnomalyLib.training.checkpoint import check_same_run, write_checkpoint
from CeVAEAnomalyLib.training.config import NO_AUGMENT
from CeVAEAnomalyLib.training.data import Subject, split_subjects
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.errors import CeVAEError, RunFailed
from CeVAEAnomalyLib.training.trainer import TrainConfig, Trainer
from conftest import full_disk_after_step, make_head

EVERY = 8  # checkpoint interval (steps); the log also gets a row every 10 steps
SMALL = ["--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--checkpoint-every", str(EVERY),
         "--device", "cpu", "--val-fraction", "0", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Two small synthetic heads with masks, listed in a manifest CSV."""
    d = tmp_path_factory.mktemp("healthy")
    rows = ["image,mask"]
    for seed in (4, 5):
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        sitk.WriteImage(image, str(d / f"s{seed}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"s{seed}_mask.nii.gz"))
        rows.append(f"s{seed}.nii.gz,s{seed}_mask.nii.gz")
    (d / "train.csv").write_text("\n".join(rows) + "\n")
    return d / "train.csv"


def train_argv(manifest: Path, out: Path, steps: int, *extra: str) -> List[str]:
    return ["train", "--manifest", str(manifest), "--out", str(out), "--max-steps", str(steps), *SMALL, *extra]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def log_rows(path: Path) -> List[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def past_checkpoint(log: Path) -> bool:
    """The log's last complete row is not a checkpoint step: killing now loses training."""
    if not log.exists():
        return False
    lines = [ln for ln in log.read_text().split("\n")[1:-1] if ln]  # [:-1]: a line being written
    return bool(lines) and int(lines[-1].split(",")[0]) % EVERY != 0


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_run(manifest, tmp_path):
    """Killed between checkpoints, ``--resume`` continues from the checkpoint as if never stopped."""
    out = tmp_path / "run" / "model.cevae"
    ckpt = out.with_name(out.name + ".ckpt")
    cmd = [sys.executable, "-m", "CeVAEAnomalyLib.cli", *train_argv(manifest, out, 100_000, "--no-augment")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out.with_name(out.name + ".log.csv")
    try:
        deadline = time.monotonic() + 120
        while not past_checkpoint(log) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ckpt.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    killed_at = checkpoint_step(ckpt)  # a complete, loadable file under the final name
    assert killed_at > 0 and killed_at % EVERY == 0

    final = killed_at + 2 * EVERY
    resumed = subprocess.run([*cmd[:3], *train_argv(manifest, out, final, "--no-augment", "--resume")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resumed from {ckpt} at step {killed_at}." in resumed.stderr
    assert read_header(out).training["steps"] == final
    steps = [int(r["step"]) for r in log_rows(log)]
    assert steps == sorted(set(steps)), f"log rows repeat or go back after the resume: {steps}"
    assert steps[-1] == final and killed_at in steps

    # the same run without the interruption gives the same weights: optimiser, sampler and RNG restored
    ref_out = tmp_path / "ref" / "model.cevae"
    assert main(train_argv(manifest, ref_out, final, "--no-augment")) == 0
    got, ref = load_bundle(out).model.state_dict(), load_bundle(ref_out).model.state_dict()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)


def tiny_trainer(tmp_path: Path, manifest: Path, **kw) -> Trainer:
    subjects = [Subject(manifest.parent / f"s{s}.nii.gz", manifest.parent / f"s{s}_mask.nii.gz") for s in (4, 5)]
    options = dict(batch_size=8, checkpoint_every=EVERY, device="cpu", val_fraction=0.0, augment=NO_AUGMENT)
    cfg = TrainConfig(out=tmp_path / "model.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      **dict(options, **kw))
    return Trainer(cfg, subjects)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_write_is_atomic(manifest, tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint intact and no stray file."""
    trainer = tiny_trainer(tmp_path, manifest)
    trainer.step = 4
    trainer.save_checkpoint()
    ckpt = trainer.cfg.checkpoint_path
    good = sha256(ckpt)
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    trainer.step = 8
    with pytest.raises(CeVAEError, match=r"Could not write the checkpoint .*No space left on device\. The last good "
                                         r"checkpoint \(step 4\) is kept"):
        trainer.save_checkpoint()
    assert sha256(ckpt) == good and checkpoint_step(ckpt) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_a_full_disk_at_a_log_row_is_said_with_the_checkpoint_it_keeps(manifest, tmp_path, monkeypatch):
    """The loss log gets a row every 10 steps, checkpoints come less often: a disk that filled in between ended the run
    as "unexpected OSError ... report it", without saying that the last checkpoint was kept."""
    full_disk_after_step(monkeypatch, EVERY)
    trainer = tiny_trainer(tmp_path, manifest, max_steps=3 * EVERY)
    with pytest.raises(CeVAEError) as caught:
        trainer.run()
    message = str(caught.value)
    assert message.startswith(f"Could not write the training log {trainer.cfg.log_path}: No space left on device.")
    assert f"The last good checkpoint (step {EVERY}) is kept" in message and "--resume" in message
    assert checkpoint_step(trainer.cfg.checkpoint_path) == EVERY


def checkpoints_fail_after(monkeypatch, writes: int, error: OSError = OSError(28, "No space left on device")) -> None:
    """Checkpoint writes after the first ``writes`` fail with ``error`` (torch.save raises it; by default ENOSPC, as on
    a full disk)."""
    real_save, done = torch.save, []

    def failing(obj, f):
        if len(done) >= writes:
            raise error
        done.append(f)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", failing)


def test_a_full_disk_at_a_checkpoint_says_to_free_space_and_resume(manifest, tmp_path, monkeypatch):
    """A disk that filled up at a checkpoint ended train and adapt with "...; the previous one is kept." and no word of
    what to do: the user was not told to free space and resume from it (a log row's failure said both)."""
    checkpoints_fail_after(monkeypatch, 1)
    trainer = tiny_trainer(tmp_path, manifest, max_steps=3 * EVERY)
    with pytest.raises(CeVAEError) as caught:
        trainer.run()
    ckpt = trainer.cfg.checkpoint_path
    assert str(caught.value) == (
        f"Could not write the checkpoint {ckpt}: No space left on device. The last good checkpoint (step {EVERY}) is "
        f"kept at {ckpt}. Free some space, then run again with --resume to go on from it.")
    assert checkpoint_step(ckpt) == EVERY


def test_a_full_disk_at_the_first_checkpoint_claims_no_previous_one(manifest, tmp_path, monkeypatch):
    """It said "the previous one is kept" where the run had written none, and did not say what to do."""
    checkpoints_fail_after(monkeypatch, 0)
    trainer = tiny_trainer(tmp_path, manifest, max_steps=2 * EVERY)
    with pytest.raises(CeVAEError) as caught:
        trainer.run()
    assert str(caught.value) == (
        f"Could not write the checkpoint {trainer.cfg.checkpoint_path}: No space left on device. No checkpoint had "
        "been written yet. Free some space, then run again.")
    assert not trainer.cfg.checkpoint_path.exists()


@pytest.mark.parametrize("error, remedy", [
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Make sure you may write in {folder} (its permissions)"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)),
     "The disk holding {folder} is mounted read-only: make it writable"),
    (OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)), "Give {folder} and its files shorter names"),
    (OSError(errno.EMLINK, os.strerror(errno.EMLINK)), "Make sure {folder} can be written (EMLINK)")])
def test_a_checkpoint_write_on_a_read_only_disk_or_for_another_cause_is_told_its_own_remedy(manifest, tmp_path,
                                                                                          monkeypatch, error, remedy):
    """Every failed checkpoint write said "Free some space", one refused for its permissions too; later a disk
    remounted read-only (as Linux does after a disk error) and any other refused write were told the same guess, "Make
    sure FOLDER can be written (its permissions, a disk mounted read-only)": permissions for a read-only disk, either
    for a name too long."""
    checkpoints_fail_after(monkeypatch, 1, error)
    trainer = tiny_trainer(tmp_path, manifest, max_steps=3 * EVERY)
    with pytest.raises(CeVAEError) as caught:
        trainer.run()
    ckpt = trainer.cfg.checkpoint_path
    assert str(caught.value) == (
        f"Could not write the checkpoint {ckpt}: {error.strerror}. The last good checkpoint (step {EVERY}) is kept at "
        f"{ckpt}. {remedy.format(folder=ckpt.parent)}, then run again with --resume to go on from it.")
    assert "Free some space" not in str(caught.value)


def test_a_checkpoint_temporary_left_by_a_killed_write_is_removed_by_the_next_run(manifest, tmp_path):
    """A SIGKILL while a checkpoint was written left its hidden temporary (as large as a checkpoint) beside the model
    for good: only a later checkpoint write removed it, and only once an hour old."""
    first = tiny_trainer(tmp_path, manifest, max_steps=EVERY)
    first.run()
    ckpt = first.cfg.checkpoint_path
    left = tmp_path / f".{ckpt.name}.0123abcd.ckpt"  # the name temp_beside gives it
    left.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.txt"
    other.write_text("the user's")
    tiny_trainer(tmp_path, manifest, max_steps=2 * EVERY, resume=True).run()
    assert not left.exists() and other.read_text() == "the user's"


def nan_from_call(n: int):
    """A cevae_loss that returns NaN from the n-th training call on."""
    real = train_mod.cevae_loss
    calls = {"train": 0}

    def loss(model, x, xc, cfg):
        value, terms = real(model, x, xc, cfg)
        if model.training:
            calls["train"] += 1
            if calls["train"] >= n:
                value = value * float("nan")
        return value, terms

    return loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "cevae_loss", nan_from_call(EVERY + 3))
    out = tmp_path / "model.cevae"
    rc = main(train_argv(manifest, out, 50, "--no-augment"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: The loss became nan at step {EVERY + 2}; training stopped. The last good checkpoint "
        f"(step {EVERY}) is kept at {out}.ckpt. Try a lower learning rate."]
    assert checkpoint_step(Path(f"{out}.ckpt")) == EVERY
    assert not out.exists()


def bundle_write_fails(monkeypatch, folder: Path, number: int) -> None:
    """safetensors' write of the bundle fails with the system's error ``number``, in safetensors' words (they name the
    temporary file it wrote)."""
    import safetensors.torch

    def failing(*args, **kwargs):
        temporary = folder / ".tmpXyZ12"
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(number)} (os error "
                                          f'{number}) at path "{temporary}"')

    monkeypatch.setattr(safetensors.torch, "save_file", failing)


def test_a_full_disk_at_the_bundle_keeps_the_checkpoint_and_says_how_to_go_on(manifest, tmp_path, monkeypatch, capsys):
    bundle_write_fails(monkeypatch, tmp_path, errno.ENOSPC)
    out = tmp_path / "model.cevae"
    rc = main(train_argv(manifest, out, EVERY, "--no-augment"))
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert errors == [f"error: Could not write the model bundle {out}: No space left on device. The last checkpoint "
                      "is kept. Free some space, then run again with --resume."]  # (not safetensors' own words)
    assert checkpoint_step(Path(f"{out}.ckpt")) == EVERY and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("number, remedy", [
    (errno.EACCES, "Make sure you may write in {folder} (its permissions)"),
    (errno.EROFS, "The disk holding {folder} is mounted read-only: make it writable")])
def test_a_bundle_write_refused_for_another_cause_than_space_says_what_fits(manifest, tmp_path, monkeypatch, capsys,
                                                                           number, remedy):
    """The bundle write said "free some space" whatever failed it: save_bundle kept only the words of the cause, so
    a folder made read-only or a disk remounted read-only after the last checkpoint was told to free space."""
    bundle_write_fails(monkeypatch, tmp_path, number)
    out = tmp_path / "model.cevae"
    rc = main(train_argv(manifest, out, EVERY, "--no-augment"))
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and errors == [
        f"error: Could not write the model bundle {out}: {os.strerror(number)}. The last checkpoint is kept. "
        f"{remedy.format(folder=tmp_path)}, then run again with --resume."]
    assert checkpoint_step(Path(f"{out}.ckpt")) == EVERY and not out.exists()


def test_non_finite_weights_are_never_checkpointed(manifest, tmp_path):
    """Weights that blew up while the loss was still finite do not replace the last good checkpoint."""
    trainer = tiny_trainer(tmp_path, manifest, max_steps=3 * EVERY)
    real_step = trainer.opt.step

    def step():
        real_step()
        if trainer.step == 2 * EVERY - 1:  # the update that ends step 2*EVERY poisons the weights
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("inf"))

    trainer.opt.step = step
    with pytest.raises(CeVAEError, match=rf"weights became NaN or infinite by step {2 * EVERY}.*checkpoint \(step {EVERY}\) is kept"):
        trainer.run()
    assert checkpoint_step(trainer.cfg.checkpoint_path) == EVERY
    state = torch.load(trainer.cfg.checkpoint_path, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def oom_once(sizes: List[int], message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    def step_fn(idx: torch.Tensor):
        sizes.append(len(idx))
        if len(sizes) == 1:
            raise RuntimeError(message)
        return {"loss": 1.0}

    return step_fn


def test_out_of_memory_halves_the_batch_and_says_so(manifest, tmp_path, caplog):
    trainer = tiny_trainer(tmp_path, manifest)
    trainer.batch_size = 16
    sizes: List[int] = []
    with caplog.at_level(logging.WARNING):
        assert trainer.step_with_oom_retry(torch.arange(16), oom_once(sizes)) == {"loss": 1.0}
    assert sizes == [16, 8] and trainer.batch_size == 8
    assert "Out of memory; retrying with batch size 8." in caplog.text
    trainer.save_checkpoint()  # the smaller batch is what a resumed run uses
    assert torch.load(trainer.cfg.checkpoint_path, weights_only=True)["batch_size"] == 8
    assert trainer.step_with_oom_retry(torch.arange(16), lambda idx: {"n": len(idx)}) == {"n": 8}


def test_out_of_memory_error_type_is_recognised(manifest, tmp_path):
    trainer = tiny_trainer(tmp_path, manifest)
    calls: List[int] = []

    def step_fn(idx):
        calls.append(len(idx))
        if len(calls) < 3:
            raise torch.cuda.OutOfMemoryError("allocation failed")
        return {"loss": 0.5}

    assert trainer.step_with_oom_retry(torch.arange(8), step_fn) == {"loss": 0.5}
    assert calls == [8, 4, 2]


def test_the_cpu_allocators_out_of_memory_halves_the_batch_too(manifest, tmp_path, caplog):
    """On the CPU (a laptop's training) torch's allocator says "can't allocate memory" in a plain RuntimeError, not
    CUDA's "out of memory": that step ended the run instead of retrying with half the batch as on a GPU."""
    trainer = tiny_trainer(tmp_path, manifest)
    sizes: List[int] = []

    def step_fn(idx: torch.Tensor):
        sizes.append(len(idx))
        if len(idx) > 2:  # a real allocation the CPU cannot make (1 PiB per slice)
            torch.empty(len(idx) << 50, dtype=torch.uint8)
        return {"loss": 1.0}

    with caplog.at_level(logging.WARNING):
        assert trainer.step_with_oom_retry(torch.arange(8), step_fn) == {"loss": 1.0}
    assert sizes == [8, 4, 2] and trainer.batch_size == 2
    assert "Out of memory; retrying with batch size 2." in caplog.text


def test_other_errors_and_oom_at_batch_one(manifest, tmp_path):
    trainer = tiny_trainer(tmp_path, manifest)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer.step_with_oom_retry(torch.arange(8), oom_once([], "shape mismatch"))
    assert trainer.batch_size == 8
    trainer.batch_size = 1

    def always_oom(idx):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RunFailed, match=r"Out of memory even with batch size 1"):  # (exit 1, not 2: refused)
        trainer.step_with_oom_retry(torch.arange(8), always_oom)


def test_resume_uses_the_new_learning_rate(manifest, tmp_path):
    """After a NaN stop the advice is a lower --lr; a resumed run must actually use it."""
    first = tiny_trainer(tmp_path, manifest, lr=1e-2)
    first.step = EVERY
    first.save_checkpoint()
    resumed = tiny_trainer(tmp_path, manifest, lr=1e-4, resume=True)
    resumed.load_checkpoint()
    assert resumed.step == EVERY
    assert [g["lr"] for g in resumed.opt.param_groups] == [1e-4]


def saved_trainer(tmp_path: Path, manifest: Path, **kw) -> Trainer:
    first = tiny_trainer(tmp_path, manifest, **kw)
    first.step = EVERY
    first.save_checkpoint()
    return first


@pytest.mark.parametrize("change,named", [
    ({"seed": 4}, r"--seed \(0 in the checkpoint, 4 now\)"),
    ({"amp": True}, r"--amp \(False in the checkpoint, True now\)"),  # (the batch size may change: see
    # test_resume_batch_and_ranks.py)
    ({"val_fraction": 0.5}, r"--val-fraction \(0\.0 in the checkpoint, 0\.5 now\).*training volume\(s\) in the "
                            r"checkpoint's run, not in this one: .*s[45]\.nii\.gz.*validation volume\(s\) in this run"),
    ({"orientations": ("axial", "coronal")},
     r"--orientations \(\['axial'\] in the checkpoint, \['axial', 'coronal'\] now"),
    ({"loss": LossConfig(rec="l2")}, r"--rec-loss \('l1' in the checkpoint, 'l2' now\)"),
])
def test_resume_refuses_other_options_and_names_them(manifest, tmp_path, change, named):
    saved_trainer(tmp_path, manifest)
    resumed = tiny_trainer(tmp_path, manifest, resume=True, **change)
    with pytest.raises(CeVAEError, match=r"--resume refused: the checkpoint .*model\.cevae\.ckpt belongs to another "
                                         r"run: " + named):
        resumed.load_checkpoint()
    assert resumed.step == 0


@pytest.mark.parametrize("slab", [0, 3])
def test_a_checkpoint_older_than_an_option_resumes_only_with_that_option_off(manifest, tmp_path, slab):
    """A checkpoint written before ``augment.slab`` existed behaved as slab 0: that resumes, slab 3 does not."""
    first = saved_trainer(tmp_path, manifest)
    older = first.run_identity()
    del older["options"]["augment"]["slab"]
    resumed = tiny_trainer(tmp_path, manifest, resume=True, augment=dataclasses.replace(first.cfg.augment, slab=slab))
    if slab == 0:
        check_same_run(older, resumed.run_identity(), first.cfg.checkpoint_path)
    else:
        with pytest.raises(CeVAEError, match=r"augment\.slab, set by --no-augment or --acquisition-augment \(none in "
                                             r"the checkpoint, 3 now\)"):
            check_same_run(older, resumed.run_identity(), first.cfg.checkpoint_path)


def test_a_resume_with_other_augmentation_names_its_option_once(manifest, tmp_path):
    """A run trained with augmentation resumed with --no-augment was refused with one clause per strength, ten times
    "augment.X, set by --no-augment or --acquisition-augment (... in the checkpoint, 0 now)" in one line."""
    from CeVAEAnomalyLib.training.config import AugmentConfig

    first = saved_trainer(tmp_path, manifest, augment=AugmentConfig())
    resumed = tiny_trainer(tmp_path, manifest, resume=True)  # (NO_AUGMENT)
    with pytest.raises(CeVAEError) as refused:
        check_same_run(first.run_identity(), resumed.run_identity(), first.cfg.checkpoint_path)
    said = str(refused.value)
    assert said.count("--no-augment or --acquisition-augment") == 1, said
    assert ("augment, set by --no-augment or --acquisition-augment (bias_field 0.2, elastic 0.02, flip 0.5, gamma 0.3, "
            "intensity_scale 0.1, intensity_shift 0.05, noise 0.03, rotate_deg 10.0, scale 0.1, translate 0.05 in the "
            "checkpoint; all 0 now)") in said, said


def test_resume_refuses_other_or_changed_volumes(manifest, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    subjects = []
    for seed in (4, 5, 6):
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        sitk.WriteImage(image, str(d / f"s{seed}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"s{seed}_mask.nii.gz"))
        subjects.append(Subject(d / f"s{seed}.nii.gz", d / f"s{seed}_mask.nii.gz"))
    cfg = tiny_trainer(tmp_path, manifest).cfg
    first = Trainer(cfg, subjects[:2])
    first.step = EVERY
    first.save_checkpoint()
    resume = dataclasses.replace(cfg, resume=True)
    with pytest.raises(CeVAEError, match=r"training volume\(s\) in this run, not in the checkpoint's: .*s6\.nii\.gz"):
        Trainer(resume, subjects).load_checkpoint()
    sitk.WriteImage(make_head(size=(32, 36, 28), seed=9)[0], str(subjects[1].image))  # changed in place
    with pytest.raises(CeVAEError, match=r"training volume\(s\) changed since the checkpoint: .*s5\.nii\.gz"):
        Trainer(resume, subjects[:2]).load_checkpoint()


def test_a_resume_whose_brain_mask_was_removed_or_rewritten_names_the_mask(manifest, tmp_path):
    """A resume after a volume's mask was left out of the manifest (or rewritten) said the volume "changed since the
    checkpoint": its scan had not, so the user could not tell what differed."""
    d = tmp_path / "data"
    d.mkdir()
    subjects = []
    for seed in (4, 5):
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        sitk.WriteImage(image, str(d / f"s{seed}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"s{seed}_mask.nii.gz"))
        subjects.append(Subject(d / f"s{seed}.nii.gz", d / f"s{seed}_mask.nii.gz"))
    cfg = tiny_trainer(tmp_path, manifest).cfg
    first = Trainer(cfg, subjects)
    first.step = EVERY
    first.save_checkpoint()
    resume = dataclasses.replace(cfg, resume=True)
    without_mask = [subjects[0], Subject(subjects[1].image, None)]
    with pytest.raises(CeVAEError, match=r"run: training volume\(s\) whose brain mask was removed since the "
                                         r"checkpoint: \S*s5\.nii\.gz\. "):
        Trainer(resume, without_mask).load_checkpoint()
    mask = sitk.ReadImage(str(subjects[1].mask))
    mask[16, 18, 14] = 1 - mask[16, 18, 14]
    sitk.WriteImage(mask, str(subjects[1].mask))  # rewritten in place, one voxel other
    with pytest.raises(CeVAEError, match=r"run: training volume\(s\) whose brain mask changed since the "
                                         r"checkpoint: \S*s5\.nii\.gz\. "):
        Trainer(resume, subjects).load_checkpoint()


def test_a_run_begun_in_the_order_listed_resumes_in_that_order(manifest, tmp_path, caplog):
    """Earlier versions trained in the order the volumes were listed (now: by content). A checkpoint of such a run
    resumes in its own order and split: the restored sampler's place counts slices in that order (a reordered list
    was accepted and then read other volumes' slices, or refused when the split moved)."""
    listed = [Subject(p, p.with_name(p.name.replace(".nii.gz", "_mask.nii.gz")))
              for p in sorted(manifest.parent.glob("s?.nii.gz"), key=lambda p: sha256_of(p), reverse=True)]
    cfg = TrainConfig(out=tmp_path / "straight.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      batch_size=8, checkpoint_every=EVERY, device="cpu", val_fraction=0.5, seed=3,
                      augment=NO_AUGMENT, max_steps=2 * EVERY)

    def begun_as_listed(cfg: TrainConfig) -> Path:
        trainer = Trainer(cfg, listed)
        trainer.train_subjects, trainer.val_subjects = split_subjects(listed, 0.5, 3)  # as earlier versions did
        return trainer.run()

    straight = begun_as_listed(cfg)
    resumed = dataclasses.replace(cfg, out=tmp_path / "resumed.cevae", max_steps=EVERY)
    begun_as_listed(resumed)
    with caplog.at_level(logging.INFO):
        Trainer(dataclasses.replace(resumed, max_steps=2 * EVERY, resume=True), listed[::-1]).run()
    assert "listed in another order than in the run being resumed" in caplog.text
    a, b = load_bundle(straight, "cpu"), load_bundle(resumed.out, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert read_header(straight).training["subjects"] == read_header(resumed.out).training["subjects"]


def test_a_run_stopped_by_max_minutes_logs_its_last_checkpoint_and_its_log_is_kept(manifest, tmp_path):
    """The checkpoint written when --max-minutes ran out had no log row with a validation loss, so its finished
    run's log looked like one stopped before its first checkpoint and was replaced without --overwrite."""
    out = tmp_path / "model.cevae"
    assert main(train_argv(manifest, out, 100_000, "--max-minutes", "0.003", "--checkpoint-every", "5000")) == 0
    rows = log_rows(out.with_name(out.name + ".log.csv"))
    step = checkpoint_step(out.with_name(out.name + ".ckpt"))
    assert 0 < step < 5000 and rows[-1]["step"] == str(step) and rows[-1]["checkpoint"] == "1"
    moved = tmp_path / "kept"
    moved.mkdir()
    for path in (out, out.with_name(out.name + ".ckpt")):
        path.rename(moved / path.name)
    assert TrainConfig(out=out).earlier_outputs() == (out.with_name(out.name + ".log.csv"),)


def test_a_run_without_validation_leaves_val_loss_empty_and_marks_its_checkpoint_rows(manifest, tmp_path):
    """Without a validation volume, checkpoint rows logged val_loss "nan" and the others nothing: two ways to say
    "not measured" for a log's readers. Every row now leaves it empty; the rows of checkpoints say so in their own
    column, which tells a finished run's log from one stopped before its first checkpoint."""
    out = tmp_path / "model.cevae"
    assert main(train_argv(manifest, out, 2 * EVERY + 4)) == 0
    rows = log_rows(out.with_name(out.name + ".log.csv"))
    assert [(r["step"], r["val_loss"], r["checkpoint"]) for r in rows] == [
        (str(EVERY), "", "1"), ("10", "", ""), (str(2 * EVERY), "", "1"), ("20", "", "1")]
    moved = tmp_path / "kept"
    moved.mkdir()
    for path in (out, out.with_name(out.name + ".ckpt")):
        path.rename(moved / path.name)
    assert TrainConfig(out=out).earlier_outputs() == (out.with_name(out.name + ".log.csv"),)


def test_a_checkpoint_checked_before_the_run_is_read_and_checked_once(manifest, tmp_path, monkeypatch):
    """adapt checks every run's checkpoint first, then each run loads it: it was read and checked twice (and its
    warnings given twice)."""
    saved_trainer(tmp_path, manifest)
    reads = []
    real = train_mod.read_checkpoint
    monkeypatch.setattr(train_mod, "read_checkpoint", lambda *a, **k: reads.append(a) or real(*a, **k))
    resumed = tiny_trainer(tmp_path, manifest, resume=True)
    resumed.check_resume()
    resumed.load_checkpoint()
    assert resumed.step == EVERY and len(reads) == 1
    assert resumed._resume_state is None  # its weights and optimiser state are not held during training


def test_resume_accepts_the_same_run_with_the_options_it_may_change(manifest, tmp_path):
    saved_trainer(tmp_path, manifest)
    resumed = tiny_trainer(tmp_path, manifest, resume=True, max_steps=50, checkpoint_every=5, loader_workers=0)
    resumed.load_checkpoint()
    assert resumed.step == EVERY


# The first run pauses once its data are open, so that a second run starts while it holds --out.
PAUSED_TRAIN = """
import sys, time
from CeVAEAnomalyLib.training.trainer import Trainer
open_data = Trainer.open_data
def pause(self):
    open_data(self)
    print("training", flush=True)
    time.sleep(120)
Trainer.open_data = pause
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_train_on_the_same_out_is_refused_while_the_first_runs(manifest, tmp_path, capsys):
    out = tmp_path / "model.cevae"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN, *train_argv(manifest, out, 4)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout.readline().strip() == "training"
        assert main(train_argv(manifest, out, 4, "--overwrite")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: A train (process {first.pid}) is writing") and str(out) in err
        assert "\n" not in err
        assert not out.exists() and not out.with_name(out.name + ".ckpt").exists()
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    assert main(train_argv(manifest, out, 2, "--overwrite")) == 0  # the lock ends with its holder, even killed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class Exploit:
    """Unpickling this would run code: a checkpoint holding it must be refused without running it."""

    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def tampered(change):
    """A checkpoint with ``change`` made to its fields, written with a digest that matches them: the fields are
    checked whatever the digest says."""
    def write(good: Path, bad: Path) -> None:
        state = torch.load(good, map_location="cpu", weights_only=True)
        change(state)
        write_checkpoint(state, bad)

    return write


BAD_CHECKPOINTS = {
    "empty": (lambda good, bad: bad.write_bytes(b""), r"\(the file is empty\)"),
    "random bytes": (lambda good, bad: bad.write_bytes(os.urandom(4096)), r"cannot be read as a checkpoint"),
    "cut short": (lambda good, bad: bad.write_bytes(good.read_bytes()[:5000]), r"cannot be read as a checkpoint"),
    "code to run": (lambda good, bad: torch.save({"version": 2, "x": Exploit()}, bad),
                    r"holds objects other than tensors and plain data, which are never unpickled"),
    "no optimiser state": (tampered(lambda s: s.pop("opt")), r"its field 'opt' is not the optimiser state"),
    "a step that is text": (tampered(lambda s: s.update(step="x")), r"its field 'step' is not a step count"),
    "batch size 0": (tampered(lambda s: s.update(batch_size=0)), r"its field 'batch_size' is 0"),
    "a weight of another shape": (tampered(lambda s: s["model"].update(
        {k: torch.zeros(3) for k in list(s["model"])[:1]})),
                                  r"its weights do not fit this run: 'encoder.0.weight' is float32 of shape \(3,\), "
                                  r"this model's is float32 of shape \(\d+, 1, 4, 4\)"),
    "another random state": (tampered(lambda s: s.update(gen=torch.zeros(3, dtype=torch.uint8))),
                             r"its weights or states do not fit this run"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS, ids=list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_in_one_line_and_never_unpickled(manifest, tmp_path, capsys, monkeypatch, case):
    good = tmp_path / "good.cevae"
    assert main(train_argv(manifest, good, EVERY, "--no-augment")) == 0
    out = tmp_path / "bad.cevae"
    make, message = BAD_CHECKPOINTS[case]
    make(Path(f"{good}.ckpt"), Path(f"{out}.ckpt"))
    before = Path(f"{out}.ckpt").read_bytes()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(train_argv(manifest, out, 2 * EVERY, "--no-augment", "--resume"))
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert rc == 2 and len(errors) == 1, err
    assert errors[0].startswith(f"error: The checkpoint {out}.ckpt is damaged or not a CeVAEAnomaly checkpoint")
    assert re.search(message, errors[0]) and errors[0].endswith("start anew with --overwrite instead of --resume.")
    assert not (tmp_path / "EXPLOITED").exists() and Path(f"{out}.ckpt").read_bytes() == before and not out.exists()


def test_resume_without_a_checkpoint_is_refused_before_any_preprocessing(manifest, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run" / "model.cevae"
    assert main(train_argv(manifest, out, EVERY, "--resume", "--cache-dir", str(cache))) == 2
    assert "--resume was given but there is no checkpoint" in capsys.readouterr().err
    assert not cache.exists() and not out.parent.exists()  # no volume preprocessed, nothing written (no folder)


def test_a_damaged_training_log_is_named_when_resuming(manifest, tmp_path, capsys):
    trainer = saved_trainer(tmp_path, manifest)
    log = trainer.cfg.log_path
    log.write_bytes(b"step,loss\n4,0.5\n" + bytes(range(128, 256)))
    resumed = tiny_trainer(tmp_path, manifest, resume=True)
    with pytest.raises(CeVAEError, match=rf"training log {re.escape(str(log))} is damaged .*move it away"):
        resumed.run()


def test_a_run_stopped_before_its_first_checkpoint_can_be_run_again(manifest, tmp_path):
    """Only its log is left (nothing to resume): a plain rerun starts anew instead of asking for --overwrite."""
    out = tmp_path / "model.cevae"
    log = out.with_name(out.name + ".log.csv")
    log.write_text("step,loss\n1,0.5\n")
    assert main(train_argv(manifest, out, 2)) == 0
    assert out.is_file() and "1,0.5" not in log.read_text()
    assert main(train_argv(manifest, out, 2)) == 2  # a finished run is still refused without --overwrite


def test_how_often_the_run_validates_does_not_change_the_training(manifest, tmp_path):
    """Validation draws its own rectangles and latent samples: the checkpoint cadence (a validation each) and a
    stop on a validated step leave the training's random streams, hence its weights, as they were."""
    weights = []
    for every in (2, 3):
        trainer = tiny_trainer(tmp_path / str(every), manifest, max_steps=6, checkpoint_every=every, val_fraction=0.5)
        trainer.fit()
        assert trainer.val_subjects  # there is something to validate
        weights.append(trainer.model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


def test_the_last_checkpoint_is_written_once(manifest, tmp_path, monkeypatch):
    written = []
    real = train_mod.write_checkpoint
    monkeypatch.setattr(train_mod, "write_checkpoint", lambda state, path, **kw: written.append(state["step"]) or
                        real(state, path, **kw))
    tiny_trainer(tmp_path, manifest, max_steps=4, checkpoint_every=2).fit()
    assert written == [2, 4]


def test_a_run_out_of_time_before_its_first_step_writes_nothing(manifest, tmp_path, capsys):
    out = tmp_path / "model.cevae"
    assert main(train_argv(manifest, out, 4, "--max-minutes", "1e-9")) == 2
    assert "No training step was completed: --max-minutes 1e-09" in capsys.readouterr().err
    assert not out.exists() and not out.with_name(out.name + ".ckpt").exists()


def test_no_held_out_volume_is_said_before_training(manifest, tmp_path, caplog):
    """Two volumes at the default --val-fraction 0.2: none held out, so the model calibrates on its training
    volumes; the user hears it at the start, and the header holds no NaN validation loss."""
    out = tmp_path / "model.cevae"
    argv = [a for a in train_argv(manifest, out, 2) if a not in ("--val-fraction", "0")]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "No volume is held out for validation (2 different volume(s) of 2 person(s), --val-fraction 0.2)" \
        in caplog.text
    assert "Give volumes of at least 3 persons at this fraction" in caplog.text
    assert read_header(out).training["val_loss"] is None


def test_a_model_calibrated_on_one_held_out_person_is_said_before_training(manifest, tmp_path, caplog):
    """Two volumes at --val-fraction 0.5: one held out, and the bundle was calibrated on that scan alone without a
    word ("Calibrated combi, rec, grad on 1 healthy volume(s)."), where `calibrate` on one scan warns that no other
    scan shows whether it is typical (a lesion or an artefact in it would raise the threshold unnoticed)."""
    out = tmp_path / "model.cevae"
    with caplog.at_level(logging.INFO):
        assert main(train_argv(manifest, out, 2, "--val-fraction", "0.5")) == 0
    said = [r.getMessage() for r in caplog.records]
    held = read_header(out).training["validation_subjects"]
    assert len(held) == 1
    warning = next(n for n, m in enumerate(said) if m.startswith("The model is calibrated on the held-out volume(s) "
                                                                  "of a single person"))
    assert held[0]["name"] in said[warning] and "Hold out volumes of 2 or more persons" in said[warning]
    assert warning < next(n for n, m in enumerate(said) if m.startswith("Loaded "))  # before any step


@pytest.mark.parametrize("val_fraction", ["0", "0.5"])
def test_every_volume_of_a_cohort_that_cannot_be_read_is_named_in_one_error(manifest, tmp_path, capsys, val_fraction):
    """A cohort with two damaged scans stopped at the first one it preprocessed, naming it alone: the user fixed it,
    ran again (its temporary cache, the others' slices, gone) and learnt of the next only then."""
    d = manifest.parent
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image\n")
    (tmp_path / "cut.nii.gz").write_bytes((d / "s5.nii.gz").read_bytes()[:3000])
    rows = [f"{d / 's4.nii.gz'},{d / 's4_mask.nii.gz'}", f"{tmp_path / 'garbage.nii.gz'},{d / 's4_mask.nii.gz'}",
            f"{d / 's5.nii.gz'},{d / 's5_mask.nii.gz'}", f"{tmp_path / 'cut.nii.gz'},{d / 's5_mask.nii.gz'}"]
    listed = tmp_path / "cohort.csv"
    listed.write_text("image,mask\n" + "\n".join(rows) + "\n")
    out = tmp_path / "model.cevae"
    assert main(train_argv(listed, out, 2, "--val-fraction", val_fraction)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 of the 4 volumes could not be read (the others were prepared): ")
    assert f"{tmp_path / 'garbage.nii.gz'} could not be read as an image" in err
    assert f"{tmp_path / 'cut.nii.gz'} is truncated or corrupt" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("suffix", ["", ".ckpt", ".log.csv"])
def test_a_cache_folder_on_an_output_is_refused_before_any_volume_is_read(manifest, tmp_path, capsys, suffix):
    out = tmp_path / "model.cevae"
    cache = out.with_name(out.name + suffix)
    assert main(train_argv(manifest, out, 2, "--cache-dir", str(cache))) == 2
    assert f"The slice cache folder {cache} is the run's output" in capsys.readouterr().err
    assert not cache.exists()


def test_an_output_folder_that_cannot_be_written_is_one_error(manifest, tmp_path, capsys, monkeypatch):
    import CeVAEAnomalyLib.io.lock as lock

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lock, "_open_lock", read_only)
    assert main(train_argv(manifest, tmp_path / "model.cevae", 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot write into") and "Read-only file system" in err and "unexpected" not in err


def test_nan_voxels_of_a_cohort_volume_are_said_with_its_name(tmp_path, caplog):
    from CeVAEAnomalyLib.engine.config import PreprocessConfig
    from CeVAEAnomalyLib.training.data import subject_slices

    image, mask = make_head(size=(32, 36, 28), seed=6)
    arr = sitk.GetArrayFromImage(image)
    arr[14, 18, 10:14] = float("nan")
    holed = sitk.GetImageFromArray(arr)
    holed.CopyInformation(image)
    sitk.WriteImage(holed, str(tmp_path / "holed.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "holed_mask.nii.gz"))
    with caplog.at_level(logging.WARNING):
        subject_slices(Subject(tmp_path / "holed.nrrd", tmp_path / "holed_mask.nii.gz"),
                       PreprocessConfig(), ("axial", "coronal"))
    said = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert said == [f"{tmp_path / 'holed.nrrd'}: 4 brain voxels are NaN or infinite; they are left out of the brain."]


def test_the_header_counts_every_part_of_a_resumed_run_and_names_the_masks(manifest, tmp_path):
    out = tmp_path / "model.cevae"
    ckpt = out.with_name(out.name + ".ckpt")
    assert main(train_argv(manifest, out, EVERY)) == 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["seconds"] > 0
    state["seconds"] = 1000.0  # as if the first part had trained for 1000 s
    write_checkpoint(state, ckpt)
    assert main(train_argv(manifest, out, 2 * EVERY, "--resume")) == 0
    training = read_header(out).training
    assert training["steps"] == 2 * EVERY and 1000.0 < training["seconds"] < 1100.0
    assert training["batch_size"] == 8  # the batch it used (SMALL's --batch-size: fewer than its slices)
    masks = {s["name"]: s["mask_sha256"] for s in training["subjects"]}
    assert masks == {f"s{n}": sha256(manifest.parent / f"s{n}_mask.nii.gz") for n in (4, 5)}


def test_the_recorded_batch_size_is_the_one_used(manifest, tmp_path):
    """A --batch-size above the number of slices trains on all of them at once; the header says that many."""
    out = tmp_path / "model.cevae"
    argv = train_argv(manifest, out, 2)
    argv[argv.index("--batch-size") + 1] = "100000"
    assert main(argv) == 0
    training = read_header(out).training
    assert training["batch_size"] == training["train_slices"] < 100000


def test_resume_with_another_architecture_names_what_differs(manifest, tmp_path, capsys):
    out = tmp_path / "model.cevae"
    assert main(train_argv(manifest, out, EVERY)) == 0
    argv = train_argv(manifest, out, 2 * EVERY, "--resume")
    argv[argv.index("--z-dim") + 1] = "32"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a model of another architecture: z_dim (16 in the checkpoint, 32 now)" in err
    assert "--overwrite" in err


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.34, 0.5, 0.9])
def test_the_advised_number_of_volumes_does_hold_one_out(fraction):
    from CeVAEAnomalyLib.training.data import split_subjects, persons_to_hold_out

    n = persons_to_hold_out(fraction)
    subjects = [Subject(Path(f"s{i}.nii.gz")) for i in range(n)]
    assert split_subjects(subjects, fraction, seed=0)[1]  # n volumes hold one out ...
    assert not split_subjects(subjects[:-1], fraction, seed=0)[1]  # ... and n - 1 do not
    assert persons_to_hold_out(0.0) is None


def test_a_fresh_run_stopped_before_its_first_checkpoint_keeps_the_earlier_runs_log(manifest, tmp_path):
    """--overwrite over a finished run: until the new run has a checkpoint, the earlier bundle, checkpoint and log
    stay together (the log was deleted at the start)."""
    out = tmp_path / "model.cevae"
    assert main(train_argv(manifest, out, EVERY)) == 0
    files = {p: p.read_bytes() for p in (out, out.with_name(out.name + ".ckpt"), out.with_name(out.name + ".log.csv"))}
    again = tiny_trainer(tmp_path, manifest, max_steps=2 * EVERY)  # (the command checked --overwrite)
    real_step = again.opt.step

    def interrupted_before_the_first_checkpoint():
        real_step()
        if again.step == EVERY - 2:
            raise KeyboardInterrupt

    again.opt.step = interrupted_before_the_first_checkpoint
    with pytest.raises(KeyboardInterrupt):
        again.run()
    assert {p: p.read_bytes() for p in files} == files
    assert main(train_argv(manifest, out, EVERY, "--overwrite")) == 0  # a finished fresh run replaces the log
    rows = log_rows(out.with_name(out.name + ".log.csv"))
    assert [int(r["step"]) for r in rows] == [EVERY]


def test_a_fresh_run_stopped_after_its_first_checkpoint_keeps_the_earlier_model_until_it_writes_its_own(
        manifest, tmp_path, monkeypatch, caplog, capsys):
    """--overwrite over a finished run removed the earlier bundle at the new run's first checkpoint, so a run stopped
    later (Ctrl-C, an error, the machine down) left the user without a working model. The earlier model now stays,
    byte for byte, beside the new run's checkpoint and log, which record it as the model this run replaces; the
    stop says so, and a --resume continues the new run and replaces the model only when it writes its own."""
    out = tmp_path / "model.cevae"
    ckpt = out.with_name(out.name + ".ckpt")
    assert main(train_argv(manifest, out, EVERY)) == 0
    earlier = out.read_bytes()
    save, written = Trainer.save_checkpoint, []

    def save_then_stop(self: Trainer) -> None:
        if written:
            raise KeyboardInterrupt
        save(self)
        written.append(self.step)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert main(train_argv(manifest, out, 3 * EVERY, "--overwrite", "--seed", "5")) == 130
    assert out.exists() and out.read_bytes() == earlier and checkpoint_step(ckpt) == EVERY
    assert "The earlier model" in caplog.text and "stays in place, usable, until this run writes" in caplog.text
    assert "The earlier model model.cevae is kept as it was" in capsys.readouterr().err
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["replaces"] == sha256(out)
    assert [int(r["step"]) for r in log_rows(out.with_name(out.name + ".log.csv"))] == [EVERY, 10]  # the new run's
    assert main(train_argv(manifest, out, 3 * EVERY, "--seed", "5")) == 2  # neither flag: it says what is there
    said = capsys.readouterr().err  # (it said the checkpoint's run wrote the earlier model)
    assert f"{out} is the earlier model, kept until the unfinished run whose checkpoint is {ckpt} writes its own; " \
           "run again with --resume to continue that run, or start anew with --overwrite (the earlier model stays " \
           "until the new one is written), or choose another --out." in said

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(train_argv(manifest, out, 3 * EVERY, "--resume", "--seed", "5")) == 0
    assert f"{out} is still the earlier model this run replaces" in caplog.text
    assert out.read_bytes() != earlier and read_header(out).training["steps"] == 3 * EVERY

    out.write_bytes(b"a model written by calibrate or adapt: no log beside it")
    for path in (ckpt, out.with_name(out.name + ".log.csv")):
        path.unlink()
    written.clear()
    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    assert main(train_argv(manifest, out, 3 * EVERY, "--overwrite")) == 130
    assert out.read_bytes() == b"a model written by calibrate or adapt: no log beside it"


def test_a_resume_starts_again_a_log_left_by_the_earlier_run_not_mixing_the_two(manifest, tmp_path, monkeypatch,
                                                                                caplog):
    """A fresh run over an earlier one holds its log rows until its first checkpoint; killed (or stopped) between
    that checkpoint's rename and the rows' write, it left its checkpoint beside the earlier run's log, and --resume
    cut that log back to the checkpoint's step and appended to it: the earlier run's rows, then the new run's. The
    checkpoint records its run's first log row now, and a resume starts a log of another run again, saying so."""
    out = tmp_path / "model.cevae"
    log = out.with_name(out.name + ".log.csv")
    assert main(train_argv(manifest, out, 2 * EVERY)) == 0
    earlier = {int(r["step"]): r["loss"] for r in log_rows(log)}
    publish = train_mod._RunLog.publish

    def killed_before_the_held_rows(self: train_mod._RunLog) -> None:
        if self._held is not None:
            raise KeyboardInterrupt
        publish(self)

    monkeypatch.setattr(train_mod._RunLog, "publish", killed_before_the_held_rows)
    assert main(train_argv(manifest, out, 3 * EVERY, "--overwrite", "--seed", "5")) == 130
    assert checkpoint_step(out.with_name(out.name + ".ckpt")) == EVERY and log_rows(log)[-1]["step"] == str(2 * EVERY)
    monkeypatch.setattr(train_mod._RunLog, "publish", publish)
    with caplog.at_level(logging.WARNING):
        assert main(train_argv(manifest, out, 3 * EVERY, "--resume", "--seed", "5")) == 0
    assert f"The training log {log} holds another run's rows" in caplog.text
    rows = log_rows(log)
    assert [int(r["step"]) for r in rows] == [10, 2 * EVERY, 20, 3 * EVERY]  # the new run's alone
    assert rows[0]["loss"] != earlier[10]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # its own log: continued
        assert main(train_argv(manifest, out, 4 * EVERY, "--resume", "--seed", "5")) == 0
    assert "holds another run's rows" not in caplog.text
    assert [int(r["step"]) for r in log_rows(log)] == [10, 2 * EVERY, 20, 3 * EVERY, 30, 4 * EVERY]


def _worker_signal_handlers() -> tuple:
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM).__name__


def test_pool_workers_leave_ctrl_c_to_the_main_process_and_clean_up_on_sigterm():
    """The initializer of ``prepare --workers N``'s and ``batch --workers N``'s pools: without it Ctrl-C printed a
    traceback per worker, and SIGTERM to the group (a scheduler's time limit) killed a worker mid-write, leaving
    its temporary file in the slice cache."""
    import concurrent.futures
    import multiprocessing

    from CeVAEAnomalyLib.interrupts import pool_worker_signals

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=pool_worker_signals) as pool:
        assert pool.submit(_worker_signal_handlers).result(timeout=120) == (True, "raise_terminated")


def test_a_run_resumed_with_another_learning_rate_records_its_parts_and_its_time(manifest, tmp_path):
    """The header said lr 1e-4 for a run that trained most of its steps at 2e-4, and the log's seconds started
    again from 0 after the resume."""
    out = tmp_path / "model.cevae"
    assert main(train_argv(manifest, out, EVERY, "--lr", "0.0002")) == 0
    first = log_rows(out.with_name(out.name + ".log.csv"))
    assert "parts" not in read_header(out).training  # one learning rate, one process: nothing more to say
    assert main(train_argv(manifest, out, 2 * EVERY, "--lr", "0.0001", "--resume")) == 0
    training = read_header(out).training
    assert training["lr"] == 0.0001 and training["parts"] == [
        {"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8, "device": "cpu"},
        {"from_step": EVERY, "lr": 0.0001, "ranks": 1, "batch_size": 8, "device": "cpu"}]
    rows = log_rows(out.with_name(out.name + ".log.csv"))
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[-1] > float(first[-1]["seconds"])
    assert main(train_argv(manifest, out, 3 * EVERY, "--lr", "0.0001", "--resume")) == 0  # the same lr: no new part
    assert len(read_header(out).training["parts"]) == 2


def test_a_checkpoint_of_a_newer_version_asks_for_an_update_not_a_fresh_start(manifest, tmp_path, capsys):
    """A checkpoint of a later format is not called one of a version that records nothing: updating resumes it."""
    good = tmp_path / "good.cevae"
    assert main(train_argv(manifest, good, EVERY, "--no-augment")) == 0
    out = tmp_path / "newer.cevae"
    tampered(lambda s: s.update(version=99))(Path(f"{good}.ckpt"), Path(f"{out}.ckpt"))
    capsys.readouterr()
    assert main(train_argv(manifest, out, 2 * EVERY, "--no-augment", "--resume")) == 2
    err = capsys.readouterr().err
    assert "written by a newer version of CeVAEAnomaly (checkpoint format 99; this one reads 2)" in err
    assert "update CeVAEAnomaly to resume it" in err and "does not record" not in err


@pytest.mark.parametrize("again", ["--overwrite", "--resume"])
def test_a_training_log_hard_linked_elsewhere_is_never_written_through(manifest, tmp_path, again):
    """A backup made with hard links (cp -al, rsync --link-dest) shares the log's file: a new run (--overwrite) or a
    resumed one must write a log of its own, as the bundle and checkpoint are replaced, not the backup's."""
    out = tmp_path / "run" / "model.cevae"
    assert main(train_argv(manifest, out, EVERY)) == 0
    log = out.with_name(out.name + ".log.csv")
    backup = tmp_path / "backup.log.csv"
    os.link(log, backup)
    kept = backup.read_bytes()
    assert main(train_argv(manifest, out, 2 * EVERY, again)) == 0
    assert backup.read_bytes() == kept
    assert log.read_bytes() != kept and not os.path.samefile(log, backup)


def test_a_run_stopped_just_after_a_checkpoint_resumes_with_that_checkpoints_log_row(manifest, tmp_path, monkeypatch):
    """A stop (Ctrl-C) that came after a checkpoint was written and before the log row of its step (found with a
    real Ctrl-C): --resume went on from the next step, so that row, with the validation loss there, was never
    written. The checkpoint records its step's row, and a resume puts it back."""
    whole = tmp_path / "whole.cevae"
    assert main(train_argv(manifest, whole, 3 * EVERY)) == 0
    out = tmp_path / "model.cevae"
    save = Trainer.save_checkpoint

    def save_then_stop(self: Trainer) -> None:
        save(self)
        if self.step == 2 * EVERY:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    assert main(train_argv(manifest, out, 3 * EVERY)) == 130
    assert checkpoint_step(out.with_name(out.name + ".ckpt")) == 2 * EVERY
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    assert main(train_argv(manifest, out, 3 * EVERY, "--resume")) == 0
    columns = ("step", "loss", "kl", "val_loss")
    expected = [[r[c] for c in columns] for r in log_rows(whole.with_name(whole.name + ".log.csv"))]
    assert [[r[c] for c in columns] for r in log_rows(out.with_name(out.name + ".log.csv"))] == expected
    assert [int(r[0]) for r in expected] == [EVERY, 10, 2 * EVERY, 20, 3 * EVERY]
