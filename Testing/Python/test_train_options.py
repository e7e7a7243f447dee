"""`train` refuses unusable options and outputs before training, and publishes its bundle once, complete."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import List

import pytest
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import load_bundle, read_header
from CeVAEAnomalyLib.engine.calibrate import calibrate_model
from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.config import NO_AUGMENT, TrainConfig
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyLib.training.packaging import TrainingRecord, package, training_header
from CeVAEAnomalyLib.training.trainer import Trainer
from conftest import make_head, write_cohort

SMALL = ["--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three small synthetic heads with masks and a manifest listing them."""
    d = tmp_path_factory.mktemp("cohort")
    write_cohort(d, seeds=(1, 2, 3), size=(32, 36, 28))
    return d


def run_train(capsys, *argv: str) -> tuple:
    rc = main(["train", *argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("option,value,message", [
    ("--checkpoint-every", "0", "--checkpoint-every must be at least 1, got 0."),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0."),
    ("--max-steps", "0", "--max-steps must be at least 1, got 0."),
    ("--max-steps", "-5", "--max-steps must be at least 1, got -5."),
    ("--lr", "nan", "--lr must be a positive number, got nan."),
    ("--lr", "-1", "--lr must be a positive number, got -1.0."),
    ("--lr", "0", "--lr must be a positive number, got 0.0."),
    ("--max-minutes", "0", "--max-minutes must be a positive number, got 0.0."),
    ("--val-fraction", "1", "--val-fraction must lie in [0, 1)"),
    ("--val-fraction", "-0.1", "--val-fraction must lie in [0, 1)"),
    ("--val-fraction", "nan", "--val-fraction must lie in [0, 1)"),
    ("--orientations", ",", "Give at least one slice orientation (axial, coronal, sagittal)."),
    ("--orientations", "axial,top", "Unknown orientation 'top'; choose one of axial, coronal, sagittal."),
    ("--orientations", "coronal", "--orientations must include axial: a model is scored on axial slices first (the "
                                  "slice scores are axial's), got coronal."),
    ("--orientations", "axial,coronal,axial", "--orientations must name each orientation once, got "
                                              "axial,coronal,axial."),
    ("--channels", "8,8,8,8,8,8,8", "7 encoder layers (--channels) halve the input 7 times, more than input "
                                    "size 64 allows; use at most 6 channel widths"),
    ("--loader-workers", "-1", "--loader-workers must be 0 to 64, got -1"),
    ("--loader-workers", "10000", "--loader-workers must be 0 to 64, got 10000"),
    ("--seed", "-1", "--seed must be a whole number from 0 to 4294967295, got -1."),
    ("--beta", "-1", "beta (--beta, the KL weight) must be a number from 0 to 1e+06, got -1.0."),
    ("--beta", "nan", "beta (--beta, the KL weight) must be a number from 0 to 1e+06, got nan."),
    ("--beta", "2e6", "beta (--beta, the KL weight) must be a number from 0 to 1e+06, got 2000000.0."),
    ("--ce-weight", "2", "ce_weight (--ce-weight) must lie in [0, 1], got 2.0."),
    ("--z-dim", "100000000", "z_dim (--z-dim, the latent size) must be a whole number from 1 to 8192, got 100000000."),
    ("--z-dim", "0", "z_dim (--z-dim, the latent size) must be a whole number from 1 to 8192, got 0."),
    ("--channels", "100000", "channels (--channels) must be widths of 1 to 4096 each, got 100000."),
    ("--channels", "0,16", "channels (--channels) must be widths of 1 to 4096 each, got 0,16."),
    ("--input-size", "32", "input_size (--input-size) must be one of 64, 128, got 32."),
])
def test_bad_options_end_in_one_clear_error_before_training(cohort, tmp_path, capsys, option, value, message):
    out = tmp_path / "m.cevae"
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(out), *SMALL,
                           option, value)
    assert rc == 2 and len(errors) == 1 and message in errors[0], errors
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("network,excess", [
    (["--input-size", "128", "--channels", "1024,1", "--z-dim", "1"],
     "computes 8,407,042 values per slice (the outputs of its layers), more than the limit of 4,000,000"),
    (["--input-size", "128", "--channels", "128,512,2048", "--z-dim", "1"],
     "needs 10,755,768,320 multiply-adds per slice, more than the limit of 10,000,000,000"),
])
def test_a_network_no_model_file_may_hold_is_refused_before_training(cohort, tmp_path, capsys, network, excess):
    """Detection refuses a model whose slices cost more than these limits: training one wasted the run."""
    out = tmp_path / "m.cevae"
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(out), *SMALL, *network,
                           "--max-steps", "1", "--batch-size", "2")
    size, channels, z = network[1], network[3], network[5]
    assert rc == 2 and errors == [
        f"error: The network of --channels {channels} and --z-dim {z} at --input-size {size} {excess}, so no command "
        "could load the model; choose narrower --channels, a smaller --z-dim or --input-size."], errors
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_gpu_asked_for_where_there_is_none_is_refused_before_training(cohort, tmp_path, capsys, device):
    """--device cuda without CUDA trained on the CPU after a one-line warning: hours of a GPU job's time."""
    out = tmp_path / "m.cevae"
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(out), *SMALL,
                           "--device", device)
    assert rc == 2 and len(errors) == 1, errors
    assert f"CUDA was asked for (device {device}) but is not available" in errors[0]
    assert "CPU-only build" in errors[0] or torch.version.cuda is not None
    assert list(tmp_path.iterdir()) == []


def test_out_a_folder_is_refused_before_training(cohort, tmp_path, capsys):
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(tmp_path), *SMALL)
    assert rc == 2 and errors == [f"error: The --out {tmp_path} is a folder; give the bundle's file name, e.g. "
                                  f"{tmp_path / 'model.cevae'}."]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["h1.nii.gz", "h2_mask.nii.gz", "train.csv"])
def test_out_over_an_input_is_refused_even_with_overwrite(cohort, capsys, target):
    before = sha(cohort / target)
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(cohort / target),
                           "--overwrite", *SMALL)
    assert rc == 2 and errors == [f"error: The output {cohort / target} is the same file as an input "
                                  f"({cohort / target}); choose another path."]
    assert sha(cohort / target) == before


def test_out_a_hard_link_to_an_input_is_refused_even_with_overwrite(cohort, tmp_path, capsys):
    """Another name for an input's inode is that input (the refusal the output checks of every command share)."""
    link = tmp_path / "m.cevae"
    os.link(cohort / "h1.nii.gz", link)
    before = sha(cohort / "h1.nii.gz")
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(link), "--overwrite", *SMALL)
    assert rc == 2 and len(errors) == 1 and "is the same file as an input" in errors[0], errors
    assert sha(cohort / "h1.nii.gz") == before


@pytest.mark.parametrize("change,message", [
    (dict(batch_size=0), "batch_size must be at least 1, got 0."),
    (dict(val_fraction=1.0), "val_fraction must lie in [0, 1)"),
    (dict(model=ModelConfig(channels=(8,) * 7)), "7 encoder layers (channels) halve the input 7 times"),
    (dict(model=ModelConfig(input_size=128, channels=(4096, 1), z_dim=1)),
     "The network of channels 4096,1 and z_dim 1 at input_size 128 computes 33,572,866 values per slice"),
])
def test_library_refusals_name_settings_not_flags(tmp_path, change, message):
    """The library names the setting (the command line turns it into its flag, tested above)."""
    with pytest.raises(CeVAEError) as err:
        TrainConfig(out=tmp_path / "m.cevae", **change).validate()
    assert message in str(err.value) and "--" not in str(err.value)


@pytest.mark.parametrize("orientations, given", [("axial", "the str 'axial'"), (["axial", 1], "the list ['axial', 1]"),
                                                 ({"axial": 1}, "the dict {'axial': 1}"), (5, "the int 5")])
def test_orientations_that_are_no_sequence_of_names_are_refused_naming_their_type(tmp_path, orientations, given):
    """TrainConfig(orientations="axial") was split into letters and refused as "Unknown orientation 'a'"."""
    with pytest.raises(CeVAEError) as err:
        TrainConfig(out=tmp_path / "m.cevae", orientations=orientations).validate()
    assert str(err.value) == ("orientations must be a sequence of orientation names (axial, coronal, sagittal), "
                              f"e.g. ('axial', 'coronal'), got {given}.")


def test_checkpoint_or_log_over_an_input_is_refused(cohort, tmp_path, capsys):
    """OUT.ckpt and OUT.log.csv are outputs too: an image named like them is never replaced."""
    image = tmp_path / "m.cevae.ckpt"
    shutil.copy(cohort / "h1.nii.gz", image)
    before = sha(image)
    rc, errors = run_train(capsys, str(image), "--out", str(tmp_path / "m.cevae"), "--overwrite", *SMALL)
    assert rc == 2 and errors == [f"error: The output {image} is the same file as an input ({image}); "
                                  "choose another path."]
    assert sha(image) == before


def exists_error(path) -> str:
    """The one line a run prints for an existing output without --overwrite or --resume, where no checkpoint is
    there to resume (--resume was offered, and then refused for want of one)."""
    return (f"error: {path} already exists (there is no checkpoint of the run that wrote it to resume); pass "
            "--overwrite to train again and replace it, or choose another --out.")


def test_an_existing_output_needs_overwrite(cohort, tmp_path, capsys):
    out = tmp_path / "m.cevae"
    out.write_text("an older file")
    argv = ["--manifest", str(cohort / "train.csv"), "--out", str(out), "--max-steps", "2", *SMALL]
    rc, errors = run_train(capsys, *argv)
    assert rc == 2 and errors == [exists_error(out)]
    assert out.read_text() == "an older file"
    rc, errors = run_train(capsys, *argv, "--overwrite")
    assert rc == 0 and errors == []
    assert read_header(out).training["steps"] == 2


def test_a_file_of_the_users_under_the_log_name_needs_overwrite_but_a_lone_run_log_does_not(cohort, tmp_path,
                                                                                          capsys):
    """OUT.log.csv without OUT or OUT.ckpt: a run's own log (its header) is what a run stopped before its first
    checkpoint leaves, and a new run replaces it; anything else there is the user's and is kept."""
    out = tmp_path / "m.cevae"
    log = out.with_name(out.name + ".log.csv")
    log.write_text("my lab notebook: run 17\n")
    argv = ["--manifest", str(cohort / "train.csv"), "--out", str(out), "--max-steps", "2", *SMALL]
    rc, errors = run_train(capsys, *argv)
    assert rc == 2 and errors == [exists_error(log)]
    assert log.read_text() == "my lab notebook: run 17\n"
    log.write_text("step,loss,kl,rec_vae,rec_ce,val_loss,seconds,slices_per_s\n1,0.5,0.1,0.2,0.2,,1.0,10\n")
    rc, errors = run_train(capsys, *argv)
    assert rc == 0 and errors == [] and out.exists()
    out.unlink()
    out.with_name(out.name + ".ckpt").unlink()
    log.write_bytes(b"")  # a run killed before it wrote anything
    rc, errors = run_train(capsys, *argv)
    assert rc == 0 and errors == [] and out.exists()


@pytest.mark.parametrize("name", ["model.nii.gz", "model.cevae.gz", "model.nrrd"])
def test_a_model_named_like_an_image_or_compressed_is_refused_before_training(cohort, tmp_path, capsys, name):
    """The check that the written bundle is whole goes by its name: such a name failed after the training, as a
    'disk full', and again on every --resume."""
    out = tmp_path / name
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(out), "--max-steps", "2",
                           *SMALL)
    assert rc == 2 and errors == [f"error: The model {out} is written as a .cevae bundle; give it a name such as "
                                  "one ending in .cevae (not compressed, not an image name)."]
    assert list(tmp_path.iterdir()) == []


def test_duplicate_rows_are_used_once_and_never_in_both_splits(cohort, tmp_path, caplog):
    """The same volume listed twice (and once more under another name) is one subject."""
    copy = tmp_path / "copy_of_h1.nii.gz"
    shutil.copy(cohort / "h1.nii.gz", copy)
    subjects = [Subject(cohort / "h1.nii.gz", cohort / "h1_mask.nii.gz"),
                Subject(cohort / "h1.nii.gz", cohort / "h1_mask.nii.gz"),
                Subject(copy, cohort / "h1_mask.nii.gz"),
                Subject(cohort / "h2.nii.gz", cohort / "h2_mask.nii.gz")]
    cfg = TrainConfig(out=tmp_path / "m.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      augment=NO_AUGMENT, batch_size=8, device="cpu", val_fraction=0.5, max_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, subjects)
    assert caplog.text.count("(same content); it is used once.") == 2
    train = [s.image for s in trainer.train_subjects]
    val = [s.image for s in trainer.val_subjects]
    assert sorted(train + val) == sorted([cohort / "h1.nii.gz", cohort / "h2.nii.gz"])
    assert len(train) == len(val) == 1


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(out=tmp_path / "out" / "m.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                       augment=NO_AUGMENT, batch_size=8, device="cpu", val_fraction=0.34, **kw)


def cohort_subjects(d: Path) -> List[Subject]:
    return [Subject(d / f"h{s}.nii.gz", d / f"h{s}_mask.nii.gz") for s in (1, 2, 3)]


def test_a_failure_while_packaging_leaves_no_bundle(cohort, tmp_path):
    """The bundle is calibrated before it is written: if calibration fails (here the held-out volume
    is damaged after training read it), nothing appears under the final name."""
    d = tmp_path / "data"
    shutil.copytree(cohort, d)
    trainer = Trainer(tiny_config(tmp_path, max_steps=3, checkpoint_every=3), cohort_subjects(d))
    (held_out,) = trainer.val_subjects

    def damage_at_the_end(fraction: float, message: str) -> None:
        if fraction >= 1.0:
            held_out.image.write_bytes(b"not an image any more")

    trainer.progress = damage_at_the_end
    with pytest.raises(CeVAEError):
        trainer.run()
    out = trainer.cfg.out
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.cevae.ckpt", "m.cevae.log.csv"]


def test_a_scan_replaced_before_calibration_is_refused_not_recorded_under_its_old_checksum(cohort, tmp_path):
    """The bundle records each volume's sha256, taken before training read it, but calibration reads the validation
    volume again once training is done: one replaced meanwhile was scored as new content and recorded under the old
    checksum. It is now refused in one line and no bundle is written (the last checkpoint stays)."""
    d = tmp_path / "data"
    shutil.copytree(cohort, d)
    trainer = Trainer(tiny_config(tmp_path, max_steps=3, checkpoint_every=3), cohort_subjects(d))
    (held_out,) = trainer.val_subjects
    original = held_out.image.read_bytes()

    def replace_at_the_end(fraction: float, message: str) -> None:
        if fraction >= 1.0:  # training is done, calibration not started
            sitk.WriteImage(make_head(seed=9, size=(32, 36, 28))[0], str(held_out.image))

    trainer.progress = replace_at_the_end
    with pytest.raises(CeVAEError, match=rf"^{held_out.image} changed while it was being read \(replaced or still "
                                         r"being written\); the trained weights are in the last checkpoint: with "
                                         r"the scan as it was when the run began, run again with --resume to "
                                         r"write the model"):
        trainer.run()
    out = trainer.cfg.out
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.cevae.ckpt", "m.cevae.log.csv"]

    held_out.image.write_bytes(original)  # as the message says: the scan back, then --resume
    Trainer(tiny_config(tmp_path, max_steps=3, checkpoint_every=3, resume=True), cohort_subjects(d)).run()
    assert out.is_file()


def test_a_brain_mask_replaced_before_calibration_is_named_a_brain_mask(cohort, tmp_path):
    """The same refusal for a validation volume's brain mask told the user to put back "the scan", which had not
    changed: it now names the brain mask."""
    d = tmp_path / "data"
    shutil.copytree(cohort, d)
    trainer = Trainer(tiny_config(tmp_path, max_steps=3, checkpoint_every=3), cohort_subjects(d))
    (held_out,) = trainer.val_subjects

    def replace_at_the_end(fraction: float, message: str) -> None:
        if fraction >= 1.0:  # training is done, calibration not started
            sitk.WriteImage(sitk.BinaryErode(sitk.ReadImage(str(held_out.mask)), [1, 1, 1]), str(held_out.mask))

    trainer.progress = replace_at_the_end
    with pytest.raises(CeVAEError) as refused:
        trainer.run()
    message = str(refused.value)
    assert message.startswith(f"{held_out.mask} changed while it was being read"), message
    assert "with the brain mask as it was when the run began, run again with --resume to write the model" in message
    assert "the scan" not in message
    assert not trainer.cfg.out.exists()


def test_acquisition_augment_trains_with_slabs_and_records_it(cohort, tmp_path, capsys):
    out = tmp_path / "m.cevae"
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(out), "--max-steps", "2",
                           "--acquisition-augment", *SMALL)
    assert rc == 0 and not errors
    augment = read_header(out).training["augment"]
    assert augment["slab"] == 3 and augment["noise"] == 0.07 and augment["bias_field"] == 0.3
    rc, errors = run_train(capsys, "--manifest", str(cohort / "train.csv"), "--out", str(tmp_path / "b.cevae"),
                           "--no-augment", "--acquisition-augment", *SMALL)
    assert rc != 0 and not (tmp_path / "b.cevae").exists()


@pytest.mark.parametrize("half", [False, True])
def test_the_bundle_is_calibrated_on_the_weights_it_holds(cohort, tmp_path, half):
    """In-memory calibration equals calibrating the written file (fp16-rounded weights with --half)."""
    cfg = tiny_config(tmp_path, max_steps=2, checkpoint_every=2, half_bundle=half)
    path = Trainer(cfg, cohort_subjects(cohort)).run()
    bundle = load_bundle(path)
    header = bundle.header
    assert header.weights_dtype == ("float16" if half else "float32")
    (name,) = [s["name"] for s in header.training["validation_subjects"]]
    again = calibrate_model(bundle, [Subject(cohort / f"{name}.nii.gz", cohort / f"{name}_mask.nii.gz")],
                            "validation subjects", header.score_options, header.postprocess)
    assert again == header.calibration


def test_a_failed_bundle_write_publishes_nothing(cohort, tmp_path):
    """The bundle write failing (file-size limit) ends in one clear error and leaves no file at all."""
    resource = pytest.importorskip("resource")  # POSIX
    trainer = Trainer(tiny_config(tmp_path, max_steps=1), cohort_subjects(cohort))
    trainer.open_data()
    out = trainer.cfg.out
    header = training_header("m", trainer.pre, trainer.cfg.loss, TrainingRecord(
        subjects=[], validation_subjects=[], train_slices=len(trainer.train), orientations=["axial"], steps=0,
        batch_size=8, lr=1e-3, seed=0, seconds=0.0, ranks=1, augment={}, val_loss=0.0, amp=False, device="cpu"))
    out.parent.mkdir(parents=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CeVAEError, match=rf"Could not write the model bundle {out}: .*File too large"):
            package(out, trainer.model, header, trainer.val_subjects, "validation subjects", trainer.device, False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(out.parent.iterdir()) == []


def test_a_failed_checkpoint_write_keeps_the_previous_one(cohort, tmp_path):
    """A real write failure (file-size limit, as with a full disk) ends in a clear error; the last
    checkpoint stays complete and no temporary file is left."""
    resource = pytest.importorskip("resource")  # POSIX
    trainer = Trainer(tiny_config(tmp_path), cohort_subjects(cohort))
    trainer.cfg.out.parent.mkdir(parents=True)
    trainer.step = 4
    trainer.save_checkpoint()
    ckpt = trainer.cfg.checkpoint_path
    good = sha(ckpt)
    trainer.step = 8
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (ckpt.stat().st_size // 2, hard))
    try:
        with pytest.raises(CeVAEError) as info:
            trainer.save_checkpoint()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(info.value) == (f"Could not write the checkpoint {ckpt}: the file could not be written completely "
                               "(disk full or a file-size limit?). The last good checkpoint (step 4) is kept at "
                               f"{ckpt}. Free some space, then run again with --resume to go on from it.")
    assert sha(ckpt) == good and torch.load(ckpt, weights_only=True)["step"] == 4
    assert trainer.saved_step == 4
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]


def test_a_volume_that_cannot_be_prepared_is_named(cohort, tmp_path, capsys, caplog):
    """In a cohort, "the brain mask is empty" alone cannot be acted on: the error and the warnings name the scan."""
    image, mask = make_head(size=(32, 36, 28), seed=9)
    sitk.WriteImage(image, str(tmp_path / "odd.nii.gz"))
    far = sitk.Image(mask)
    far.SetOrigin((5000.0, 5000.0, 5000.0))  # another grid, nowhere near the head
    sitk.WriteImage(far, str(tmp_path / "odd_mask.nii.gz"))
    rows = (cohort / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join([rows[0], *[f"{cohort}/{r}".replace(",", f",{cohort}/") for r in rows[1:]],
                                                   "odd.nii.gz,odd_mask.nii.gz"]) + "\n")
    with caplog.at_level(logging.WARNING):
        rc, errors = run_train(capsys, "--manifest", str(tmp_path / "train.csv"), "--out", str(tmp_path / "m.cevae"),
                               "--max-steps", "1", *SMALL)
    odd = tmp_path / "odd.nii.gz"
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(f"error: {odd}: The brain mask does not overlap"), errors
    assert f"{odd}: The brain mask is on another grid than the image" in caplog.text


@pytest.mark.parametrize("earlier_log", [True, False])
def test_a_log_that_is_a_link_is_replaced_not_written_through(cohort, tmp_path, earlier_log):
    """A fresh run replaces ``OUT.log.csv`` that is a symbolic link by its own file, as it replaces a linked bundle
    or checkpoint: the file the link points to (a user's, here with an earlier log's header, or missing) is kept."""
    users = tmp_path / "users_notes.csv"
    if earlier_log:
        users.write_text("step,loss\nmy own notes\n")
    cfg = tiny_config(tmp_path, max_steps=2, checkpoint_every=2)
    cfg.out.parent.mkdir()
    cfg.log_path.symlink_to(users)
    Trainer(cfg, cohort_subjects(cohort)).run()
    assert (users.read_text() == "step,loss\nmy own notes\n") if earlier_log else not users.exists()
    assert not cfg.log_path.is_symlink() and cfg.log_path.read_text().startswith("step,loss,kl")


@pytest.mark.parametrize("margin", [100.5, -1.0, float("nan")])
def test_a_preprocessing_margin_no_bundle_may_hold_is_refused_before_training(margin):
    """A model file holds a margin of at most 100 mm (detection allocates slices of the brain plus twice it): a
    Trainer given more would train a model no command could load."""
    from CeVAEAnomalyLib.engine.config import PreprocessConfig

    with pytest.raises(CeVAEError, match=r"^The preprocessing margin \(margin_mm\) must be a number from 0 to 100 "
                                         r"mm, got (100\.5|-1\.0|nan)\.$"):
        PreprocessConfig(margin_mm=margin)
    assert PreprocessConfig(margin_mm=100).margin_mm == 100


def test_a_trained_model_records_mixed_precision_and_the_device(cohort, tmp_path):
    """Mixed precision (--amp: bfloat16 on the CPU) trains other weights from the same seed (3 steps on the sample
    heads: every tensor differed), yet the training record said neither it nor the device: it says both now."""
    from CeVAEAnomalyLib.engine.bundle import read_header

    for amp in (False, True):
        out = Trainer(tiny_config(tmp_path / str(amp), max_steps=2, amp=amp), cohort_subjects(cohort)).run()
        training = read_header(out).to_dict()["training"]
        assert (training["amp"], training["device"]) == (amp, "cpu")
