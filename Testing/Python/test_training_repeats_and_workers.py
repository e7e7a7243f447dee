"""train and calibrate count the same scan in two files once; a loader worker's error is one line; a validation
loss that is not finite is not recorded."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.checkpoint import write_checkpoint
from CeVAEAnomalyLib.training.config import NO_AUGMENT, TrainConfig
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.training.data import Subject, split_subjects
from CeVAEAnomalyLib.training.trainer import Trainer, content_order
from conftest import make_head

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--device", "cpu", "--no-augment"]


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """A folder of two small synthetic heads with masks, and the first head saved again uncompressed (s4.nii:
    the same voxels as s4.nii.gz, other file bytes)."""
    d = tmp_path_factory.mktemp("heads")
    for seed in (4, 5):
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        sitk.WriteImage(image, str(d / f"s{seed}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"s{seed}_mask.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(d / "s4.nii.gz")), str(d / "s4.nii"))
    assert (d / "s4.nii").read_bytes() != (d / "s4.nii.gz").read_bytes()
    return d


def test_train_counts_the_same_scan_in_two_formats_once(heads, tmp_path, caplog):
    """s4.nii and s4.nii.gz were two volumes: with --val-fraction 0.5 two of three were held out, so the model was
    validated and calibrated on the scan it was trained on."""
    manifest = tmp_path / "train.csv"
    manifest.write_text("image,mask\n" + "".join(f"{heads / n},{heads / m}\n" for n, m in (
        ("s4.nii.gz", "s4_mask.nii.gz"), ("s5.nii.gz", "s5_mask.nii.gz"), ("s4.nii", "s4_mask.nii.gz"))))
    out = tmp_path / "model.cevae"
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--manifest", str(manifest), "--out", str(out), "--max-steps", "2",
                     "--val-fraction", "0.5", *SMALL]) == 0
    assert f"{heads / 's4.nii'} repeats the image {heads / 's4.nii.gz'} (same content); it is used once." in caplog.text
    training = read_header(out).training
    names = [s["name"] for s in training["subjects"] + training["validation_subjects"]]
    assert len(training["subjects"]) == len(training["validation_subjects"]) == 1 and sorted(names) == ["s4", "s5"]


def test_a_brain_mask_given_only_on_a_repeat_is_the_one_used_and_the_warning_says_which(heads, caplog):
    from CeVAEAnomalyLib.training.data import unique_subjects

    scan, given, other = heads / "s4.nii.gz", heads / "s4_mask.nii.gz", heads / "s5_mask.nii.gz"
    checksums = {scan: "same", heads / "s4.nii": "same"}
    with caplog.at_level(logging.WARNING):  # the first listing has no mask: the automatic one was trained on
        assert unique_subjects([Subject(scan), Subject(heads / "s4.nii", given)], checksums) == [Subject(scan, given)]
    assert f"it is used once, with the brain mask {given} given on its repeat." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = unique_subjects([Subject(scan, given), Subject(heads / "s4.nii", other)], checksums)
    assert kept == [Subject(scan, given)]
    assert f"it is used once, with the brain mask {given} (the repeat's {other} is not used)." in caplog.text


def test_calibrate_counts_the_same_scan_in_two_formats_once(heads, tiny_bundle, tmp_path, caplog):
    out, manifest = tmp_path / "calibrated.cevae", tmp_path / "healthy.csv"
    mask = heads / "s4_mask.nii.gz"
    manifest.write_text("image,mask\n" + "".join(f"{heads / n},{mask}\n" for n in ("s4.nii.gz", "s4.nii")))
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", "--manifest", str(manifest), "--model", str(tiny_bundle), "--out", str(out),
                     "--device", "cpu"]) == 0
    assert "repeats the image" in caplog.text and "(1 healthy volume(s))" in caplog.text
    assert read_header(out).extra["calibration_subjects"] == ["s4"]


def trainer(heads: Path, tmp_path: Path, **kw) -> Trainer:
    subjects = [Subject(heads / f"s{s}.nii.gz", heads / f"s{s}_mask.nii.gz") for s in (4, 5)]
    options = dict(batch_size=8, max_steps=2, checkpoint_every=2, device="cpu", val_fraction=0.0, augment=NO_AUGMENT)
    cfg = TrainConfig(out=tmp_path / "model.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      **dict(options, **kw))
    return Trainer(cfg, subjects)


def test_a_cache_read_error_in_a_loader_worker_is_its_own_message(heads, tmp_path):
    """With --loader-workers 1 the error line was torch's wrapper: "Caught CeVAEError in DataLoader worker process 0.
    Original Traceback (most recent call last): ..."."""
    run = trainer(heads, tmp_path, loader_workers=1, cache_dir=tmp_path / "cache")
    run.open_data()
    for entry in run.train.entries:  # cut short after the slices were prepared and checked
        with open(entry.path, "r+b") as fh:
            fh.truncate(entry.offset)
    batches = run.batches()
    with pytest.raises(CeVAEError) as caught:
        next(batches)
    del batches  # stops the worker
    assert str(caught.value) in {f"The slice cache file {e.path} is truncated (changed while this run read it). A new "
                                 "run prepares it anew; to go on from the last checkpoint, run again with --resume."
                                 for e in run.train.entries}


def open_files() -> List[str]:
    """The files this process holds open (Linux)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
@pytest.mark.parametrize("val_fraction", [0.0, 0.5])
def test_a_run_leaves_no_file_of_its_temporary_cache_open(heads, tmp_path, val_fraction):
    """The slice sets kept their .npy files open when the run removed its temporary cache: on Windows, which
    removes no open file, the cache (copies of the slices of every scan) stayed in the temporary folder."""
    run = trainer(heads, tmp_path, val_fraction=val_fraction)
    run.fit()
    assert run._temp_cache is not None and not os.path.exists(run._temp_cache)
    assert [name for name in open_files() if name.startswith(run._temp_cache)] == []


def test_a_validation_loss_that_overflows_is_not_recorded(heads, tmp_path):
    """Weights whose validation loss overflows to inf (finite, so checkpointed) made the bundle's header hold inf:
    "Could not write the model bundle …: Out of range float values are not JSON compliant"."""
    manifest = tmp_path / "train.csv"
    manifest.write_text("image,mask\n" + "".join(f"{heads}/s{s}.nii.gz,{heads}/s{s}_mask.nii.gz\n" for s in (4, 5)))
    out = tmp_path / "model.cevae"
    argv = ["train", "--manifest", str(manifest), "--out", str(out), "--max-steps", "2", "--checkpoint-every", "2",
            "--val-fraction", "0.5", *SMALL]
    assert main(argv) == 0
    ckpt = Path(f"{out}.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["model"]["decoder.8.bias"].fill_(1e38)  # the output layer: every reconstruction error is about 1e38
    write_checkpoint(state, ckpt)
    out.unlink()  # as a run stopped after its last checkpoint, before writing its model (a finished one is refused)
    assert main([*argv, "--resume"]) == 0  # at --max-steps already: validated, calibrated and written
    assert read_header(out).training["val_loss"] is None


def test_the_same_scan_compressed_again_is_named_when_it_is_trained_on_and_held_out(heads, tmp_path, caplog):
    """Two files of one format with the same voxels (a scan gzipped again: other bytes) were two persons, without a
    word: with --val-fraction 0.5 one was trained on and the other calibrated the model."""
    again = bytearray((heads / "s4.nii.gz").read_bytes())
    again[4:8] = b"\x01\x02\x03\x04"  # the gzip header's time stamp: other file bytes, the same decompressed scan
    (tmp_path / "s4again.nii.gz").write_bytes(bytes(again))
    mask = heads / "s4_mask.nii.gz"
    cfg = TrainConfig(out=tmp_path / "model.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      batch_size=8, device="cpu", val_fraction=0.5, cache_dir=tmp_path / "cache")
    run = Trainer(cfg, [Subject(heads / "s4.nii.gz", mask), Subject(tmp_path / "s4again.nii.gz", mask)])
    with caplog.at_level(logging.WARNING):
        run.open_data()
    (held,), (trained,) = run.val_subjects, run.train_subjects
    assert (f"{held.image} (validation) gives the same slices as {trained.image} (training): the same scan saved "
            "twice; the model is validated and calibrated on a scan it was trained on") in caplog.text


def test_a_held_out_volume_of_another_contrast_is_named(tmp_path, caplog):
    """A T2-like scan among T1 scans was trained on or calibrated on without a word (only the mean contrast of the
    training volumes was looked at: two T1 and one reversed one still read as a T1 model)."""
    from CeVAEAnomalyLib.data import data_path

    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = data_path("colin27_brainmask_2mm.nii.gz")
    a, brain = sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) > 0
    noise = np.random.default_rng(0).normal(0, 0.03 * a[brain].max(), a.shape)
    scans = {"t1": a, "t1_noisy": a + noise, "reversed": np.where(brain, np.clip(np.percentile(a[brain], 99) - a, 0,
                                                                                     None), a)}
    subjects = []
    for name, array in scans.items():
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(t1)
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        subjects.append(Subject(tmp_path / f"{name}.nii.gz", mask))
    sums = {p: sha256_of(p) for s in subjects for p in (s.image, s.mask)}  # a seed that holds the reversed one out
    seed = next(n for n in range(100) if [s.image.name for s in split_subjects(content_order(subjects, sums), 0.34, n)[
        1]] == ["reversed.nii.gz"])
    cfg = TrainConfig(out=tmp_path / "model.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      batch_size=8, device="cpu", val_fraction=0.34, seed=seed, cache_dir=tmp_path / "cache")
    run = Trainer(cfg, subjects)
    with caplog.at_level(logging.WARNING):
        run.open_data()
    assert [s.image.name for s in run.val_subjects] == ["reversed.nii.gz"]  # (the one calibrated on)
    assert "The volumes do not share one contrast: the depth contrast (deep brain minus brain rim) of " \
           f"{tmp_path / 'reversed.nii.gz'} (" in caplog.text
    assert "t1.nii.gz (" not in caplog.text and "t1_noisy.nii.gz (" not in caplog.text


def test_more_loader_workers_than_cores_are_said_once_in_one_line_and_capped(heads, tmp_path, caplog):
    """--loader-workers 8 on 2 cores printed torch's UserWarning ("This DataLoader will create 8 worker processes in
    total. Our suggested max number of worker in current system is 2 ...") twice, and a run halved by running out of
    memory or an adaptation's runs said it again for each loader, with no word of ours; the 4 workers CUDA runs
    start by default did the same on a 2-core allocation."""
    from CeVAEAnomalyLib.system import usable_cores

    cores = usable_cores()
    asked = cores + 2
    run = trainer(heads, tmp_path, loader_workers=asked, max_steps=1)
    run.open_data()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        for _ in range(2):  # (a loader made again after halving the batch)
            batches = run.batches()
            assert next(batches)[2].shape[0] == 8
            del batches
    assert [str(w.message) for w in raised if "worker" in str(w.message)] == []
    said = [r.getMessage() for r in caplog.records if "--loader-workers" in r.getMessage()]
    assert said == [f"--loader-workers {asked} asked, but this process may use {cores} core(s): the slices are read "
                    f"by {cores} worker process(es)."]


def test_the_default_loader_workers_on_cuda_are_at_most_the_cores():
    from CeVAEAnomalyLib.training.trainer import loader_workers

    assert loader_workers(None, "cuda", 2) == (2, "") and loader_workers(None, "cuda", 16) == (4, "")
    assert loader_workers(None, "cpu", 16) == (0, "") and loader_workers(3, "cpu", 16) == (3, "")
    assert loader_workers(6, "cuda", 2) == (2, "--loader-workers 6 asked, but this process may use 2 core(s)")
