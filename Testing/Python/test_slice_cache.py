"""The slice cache: keyed by settings and file checksums, never stale; streamed batches equal the slices."""
from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.config import ModelConfig, PreprocessConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import temp_beside
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.training.cache import SliceCache, SliceSet, write_failure
from CeVAEAnomalyLib.training.config import NO_AUGMENT, TrainConfig
from CeVAEAnomalyLib.training.data import Subject, subject_slices
from CeVAEAnomalyLib.training.sampler import EpochSampler, epoch_order
from CeVAEAnomalyLib.training.trainer import Trainer
from conftest import make_head, other_user_cannot_import

PRE = PreprocessConfig()


def write_subject(d: Path, name: str, seed: int) -> Subject:
    image, mask = make_head(size=(32, 36, 28), seed=seed)
    sitk.WriteImage(image, str(d / f"{name}.nii.gz"))
    sitk.WriteImage(mask, str(d / f"{name}_mask.nii.gz"))
    return Subject(d / f"{name}.nii.gz", d / f"{name}_mask.nii.gz")


def checksums(*subjects: Subject) -> dict:
    return {p: sha256_of(p) for s in subjects for p in (s.image, s.mask) if p is not None}


def children_seen(seen: list) -> Callable[[float, str], None]:
    """A progress callback noting how many child processes this process has at each step."""
    return lambda fraction, message: seen.append(len(multiprocessing.active_children()))


@pytest.fixture
def subjects(tmp_path):
    return [write_subject(tmp_path, f"s{i}", seed=i) for i in (1, 2, 3)]


def test_entries_are_made_once_and_hold_the_subject_slices(subjects, tmp_path):
    cache = SliceCache(tmp_path / "cache", PRE)
    s = subjects[0]
    entries, made = cache.entries_for(s, checksums(s), ("axial", "coronal"))
    assert made and len(entries) == 2
    expected = subject_slices(s, PRE, ("axial", "coronal"))
    for entry, ref in zip(entries, expected):
        np.testing.assert_array_equal(np.load(entry.path), ref)
    again, made_again = cache.entries_for(s, checksums(s), ("axial", "coronal"))
    assert not made_again and again == entries


@pytest.mark.parametrize("change", ["image", "mask", "settings", "orientation"])
def test_a_changed_file_or_setting_is_preprocessed_again(subjects, tmp_path, change):
    s = subjects[0]
    cache = SliceCache(tmp_path / "cache", PRE)
    (old,), _ = cache.entries_for(s, checksums(s), ("axial",))
    pre, orientation = PRE, "axial"
    if change == "image":  # same name and size, other content
        image, _ = make_head(size=(32, 36, 28), seed=9)
        sitk.WriteImage(image, str(s.image))
    elif change == "mask":
        mask = sitk.ReadImage(str(s.mask))
        arr = sitk.GetArrayFromImage(mask)
        arr[: arr.shape[0] // 2] = 0
        new_mask = sitk.GetImageFromArray(arr)
        new_mask.CopyInformation(mask)
        sitk.WriteImage(new_mask, str(s.mask))
    elif change == "settings":
        pre = dataclasses.replace(PRE, clip_max=1.2)
    else:
        orientation = "sagittal"
    cache = SliceCache(tmp_path / "cache", pre)
    (new,), made = cache.entries_for(s, checksums(s), (orientation,))
    assert made and new.path != old.path
    np.testing.assert_array_equal(np.load(new.path), subject_slices(s, pre, (orientation,))[0])


def test_a_damaged_entry_is_made_again(subjects, tmp_path):
    s = subjects[0]
    cache = SliceCache(tmp_path / "cache", PRE)
    (entry,), _ = cache.entries_for(s, checksums(s), ("axial",))
    good = np.load(entry.path)
    data = entry.path.read_bytes()
    entry.path.write_bytes(data[: len(data) - 100])  # a write cut short
    assert cache.lookup(entry.path.stem) is None
    (again,), made = cache.entries_for(s, checksums(s), ("axial",))
    assert made and again.path == entry.path
    np.testing.assert_array_equal(np.load(again.path), good)


def test_an_entry_damaged_in_place_is_made_again(subjects, tmp_path, caplog):
    """Same size, other bytes: only the content checksum can tell (checked at a run's first use)."""
    s = subjects[0]
    (entry,), _ = SliceCache(tmp_path / "cache", PRE).entries_for(s, checksums(s), ("axial",))
    good = np.load(entry.path)
    data = bytearray(entry.path.read_bytes())
    data[-4 * good[0].size:] = np.random.default_rng(0).random(good[0].size, np.float32).tobytes()
    entry.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        (again,), made = SliceCache(tmp_path / "cache", PRE).entries_for(s, checksums(s), ("axial",))
    assert made and "does not match its checksum" in caplog.text
    np.testing.assert_array_equal(np.load(again.path), good)


@pytest.mark.parametrize("what", [("npy",), ("npy", "json")])
def test_entries_swapped_between_subjects_are_made_again(subjects, tmp_path, what):
    a, b = subjects[:2]
    cache = SliceCache(tmp_path / "cache", PRE)
    sums = checksums(a, b)
    (ea,), _ = cache.entries_for(a, sums, ("axial",))
    (eb,), _ = cache.entries_for(b, sums, ("axial",))
    good_a, good_b = np.load(ea.path), np.load(eb.path)
    for ext in what:
        pa, pb = ea.path.with_suffix("." + ext), eb.path.with_suffix("." + ext)
        pa_bytes = pa.read_bytes()
        pa.write_bytes(pb.read_bytes())
        pb.write_bytes(pa_bytes)
    rerun = SliceCache(tmp_path / "cache", PRE)
    (ra,), made_a = rerun.entries_for(a, sums, ("axial",))
    (rb,), made_b = rerun.entries_for(b, sums, ("axial",))
    assert made_a and made_b
    np.testing.assert_array_equal(np.load(ra.path), good_a)
    np.testing.assert_array_equal(np.load(rb.path), good_b)


def test_a_file_as_cache_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CeVAEError, match="is a file; give a folder for --cache-dir"):
        SliceCache(tmp_path / "file", PRE)


def test_a_failed_write_names_the_file_that_failed(subjects, tmp_path):
    s = subjects[0]
    cache = SliceCache(tmp_path / "cache", PRE)
    key = cache.key(s, checksums(s), "axial")
    (tmp_path / "cache" / f"{key}.json").mkdir(parents=True)  # the metadata cannot replace a folder; the slices can be written
    with pytest.raises(CeVAEError, match=rf"entry \S+{key}\.json: "):
        cache.entries_for(s, checksums(s), ("axial",))


def test_an_empty_cache_folder_is_refused_not_the_current_one(subjects, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", str(subjects[0].image), "--cache-dir", ""]) == 2
    assert "argument --cache-dir: an empty path" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npy"))


@pytest.mark.parametrize("orientations", ["coronal", "axial,coronal,axial"])
def test_prepare_refuses_the_orientations_train_refuses_in_trains_words_before_any_work(subjects, tmp_path, capsys,
                                                                                         orientations):
    """prepare --orientations coronal filled a cache (of coronal and axial slices) that no train could use."""
    given = [str(subjects[0].image), "--orientations", orientations]
    assert main(["train", *given, "--out", str(tmp_path / "m.cevae")]) == 2
    train_said = capsys.readouterr().err.strip()
    assert "--orientations must" in train_said
    assert main(["prepare", *given, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.strip() == train_said
    assert not (tmp_path / "cache").exists()


def test_streamed_batches_equal_the_slices_in_memory(subjects, tmp_path):
    """Any batch of indices read from the cache equals the same rows of all slices concatenated."""
    orientations = ("axial", "sagittal")
    per_subject = SliceCache(tmp_path / "cache", PRE).prepare(subjects, checksums(*subjects), orientations)
    stream = SliceSet([e for entries in per_subject for e in entries], PRE.input_size)
    memory = np.concatenate([a for s in subjects for a in subject_slices(s, PRE, orientations)])
    assert len(stream) == len(memory)
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(len(memory))[:37], [0, len(memory) - 1, 5, 5], range(len(memory))):
        batch = stream[list(idx)]
        assert batch.shape == (len(list(idx)), 1, PRE.input_size, PRE.input_size)
        np.testing.assert_array_equal(batch[:, 0].numpy(), memory[list(idx)])
    with pytest.raises(IndexError):
        stream[[len(memory)]]


def test_slab_reads_average_the_neighbours_within_each_subject(subjects, tmp_path):
    """A slab is the mean of the slice and its neighbours in the same subject's stack, cut at its ends."""
    per_subject = SliceCache(tmp_path / "cache", PRE).prepare(subjects, checksums(*subjects), ("axial",))
    stream = SliceSet([e for entries in per_subject for e in entries], PRE.input_size)
    stacks = [subject_slices(s, PRE, ("axial",))[0] for s in subjects]
    n0, n1 = len(stacks[0]), len(stacks[1])
    idx = [5, 0, n0 - 1, n0, n0 + 3, n0 + n1 - 1, 7]
    half = [2, 3, 2, 1, 0, 4, 0]
    batch = stream.read(idx, half)[:, 0].numpy()
    expected = [stacks[0][3:8].mean(0), stacks[0][0:4].mean(0), stacks[0][n0 - 3:].mean(0), stacks[1][0:2].mean(0),
                stacks[1][3], stacks[1][n1 - 5:].mean(0), stacks[0][7]]
    for got, want in zip(batch, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(batch[0], stacks[0][5])  # the slab is not the slice itself
    np.testing.assert_array_equal(stream.read(idx, [0] * len(idx)).numpy(), stream[idx].numpy())


def test_slab_batches_repeat_for_the_same_position_and_are_not_the_plain_slices(subjects, tmp_path):
    cfg = small_cfg(tmp_path, cache_dir=tmp_path / "cache",
                    augment=dataclasses.replace(NO_AUGMENT, slab=3))
    trainer = Trainer(cfg, subjects)
    trainer.open_data()
    first = next(trainer.batches())
    again = next(trainer.batches())
    torch.testing.assert_close(first[2], again[2], rtol=0, atol=0)  # a resumed run reads the same slabs
    plain = Trainer(small_cfg(tmp_path, cache_dir=tmp_path / "cache"), subjects)
    plain.open_data()
    single = next(plain.batches())
    assert single[:2] == first[:2]
    assert not torch.equal(single[2], first[2])  # same slices, averaged with their neighbours


@pytest.mark.parametrize("slab", [-1, 17])
def test_an_unusable_slab_is_refused(slab):
    with pytest.raises(CeVAEError, match="slab augmentation must average 0 to 16 neighbours"):
        dataclasses.replace(NO_AUGMENT, slab=slab)


@pytest.mark.parametrize("n,world", [(10, 1), (11, 2), (3, 4), (100, 3)])
def test_epoch_order_is_the_distributed_sampler_order(n, world):
    for rank in range(world):
        for epoch in range(3):
            ref = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
            ref.set_epoch(epoch)
            assert epoch_order(n, world, rank, 7, epoch).tolist() == list(ref)


def test_sampler_resumes_at_its_position():
    def first(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    full = first(EpochSampler(50, 1, 0, 3, lambda: 8), 20)  # 6 batches per epoch, over 3 epochs
    assert [b[:2] for b in full[:8]] == [(0, i) for i in range(6)] + [(1, 0), (1, 1)]
    for cut in (4, 6, 13):
        epoch, number, _ = full[cut - 1]
        assert first(EpochSampler(50, 1, 0, 3, lambda: 8, epoch, number + 1), 20 - cut) == full[cut:]


def small_cfg(tmp_path: Path, **kw) -> TrainConfig:
    kw.setdefault("augment", NO_AUGMENT)
    return TrainConfig(out=tmp_path / "out" / "m.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                       batch_size=8, device="cpu", val_fraction=0.34, **kw)


@pytest.mark.slow
def test_loader_workers_give_the_same_batches(subjects, tmp_path):
    torch.set_num_threads(1)
    got = []
    for workers in (0, 2):
        trainer = Trainer(small_cfg(tmp_path, loader_workers=workers, cache_dir=tmp_path / "cache"), subjects)
        trainer.open_data()
        batches = trainer.batches()
        got.append([next(batches) for _ in range(12)])
        del batches
    for (e0, n0, x0), (e1, n1, x1) in zip(*got):
        assert (e0, n0) == (e1, n1)
        torch.testing.assert_close(x0, x1, rtol=0, atol=0)


def test_prepare_then_train_from_the_cache_equals_training_without_it(subjects, tmp_path, caplog):
    """`prepare` fills the cache once; `train --cache-dir` preprocesses nothing and trains the same model."""
    rows = ["image,mask"] + [f"{s.image.name},{s.mask.name}" for s in subjects]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    assert main(["prepare", "--manifest", str(tmp_path / "train.csv"), "--cache-dir", str(cache)]) == 0
    assert len(list(cache.glob("*.npy"))) == 3 and len(list(cache.glob("*.json"))) == 3
    caplog.clear()
    common = ["train", "--manifest", str(tmp_path / "train.csv"), "--max-steps", "3", "--channels", "8,16,16,32",
              "--z-dim", "16", "--batch-size", "8", "--device", "cpu", "--val-fraction", "0.34"]
    with caplog.at_level(logging.INFO):
        assert main([*common, "--out", str(tmp_path / "a.cevae"), "--cache-dir", str(cache)]) == 0
    assert "0 volume(s) preprocessed now, 2 found ready" in caplog.text  # training subjects
    assert "0 volume(s) preprocessed now, 1 found ready" in caplog.text  # the validation subject
    assert len(list(cache.glob("*.npy"))) == 3  # nothing new, nothing stale
    assert main([*common, "--out", str(tmp_path / "b.cevae")]) == 0
    a, b = load_bundle(tmp_path / "a.cevae"), load_bundle(tmp_path / "b.cevae")
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], rtol=0, atol=0)
    assert a.header.calibration == b.header.calibration


@pytest.mark.slow
def test_prepare_with_worker_processes_makes_the_same_entries(subjects, tmp_path, monkeypatch):
    from CeVAEAnomalyLib.training import prepare
    from CeVAEAnomalyLib.training.prepare import prepare_cohort

    monkeypatch.setattr(prepare, "VOLUMES_PER_PROCESS", 1)  # else 3 volumes are not worth a second process
    one = prepare_cohort(subjects, tmp_path / "one", PRE, ("coronal", "axial"), workers=1)
    seen = []
    two = prepare_cohort(subjects, tmp_path / "two", PRE, ("coronal", "axial"), workers=2, progress=children_seen(seen))
    assert max(seen) == 2  # the volumes were really prepared by worker processes
    assert "3 volume(s), 3 preprocessed now and 0 found ready" in one and "in coronal, axial" in one
    assert one.split("(")[0].replace("one", "two") == two.split("(")[0]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 12 and names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))


def test_prepare_starts_no_process_for_a_cohort_too_small_to_repay_its_start_up(subjects, tmp_path, caplog):
    """--workers 10000 once filled the memory with idle processes, and --workers 2 on 3 volumes took 12 s where one
    process took 3 s (each spawned process imports torch); now a small cohort is prepared here, and it says so."""
    from CeVAEAnomalyLib.training.prepare import prepare_cohort

    seen = []
    with caplog.at_level(logging.INFO):
        summary = prepare_cohort(subjects, tmp_path / "c", PRE, ("axial",), workers=10000,
                                 progress=children_seen(seen))
    assert seen == [0, 0, 0]
    assert ("Preprocessing with 1 process(es): 10000 asked, but a process takes about as long to start as 15 volumes "
            "take to preprocess, so 3 volume(s) repay no more than 1.") in caplog.text
    assert "3 volume(s), 3 preprocessed now" in summary


@pytest.mark.parametrize("asked, volumes, cores, count, why", [
    (4, 100, 8, 4, ""),
    (2, 30, 8, 2, ""),
    (16, 200, 8, 8, "16 asked, but this process may use 8 core(s)"),
    (8, 50, 8, 3, "8 asked, but a process takes about as long to start as 15 volumes take to preprocess, "
                  "so 50 volume(s) repay no more than 3"),
    (2, 29, 8, 1, "2 asked, but a process takes about as long to start as 15 volumes take to preprocess, "
                  "so 29 volume(s) repay no more than 1"),
    (1, 0, 8, 1, ""),
])
def test_prepare_starts_only_the_processes_that_pay_and_the_cores_allow(asked, volumes, cores, count, why):
    from CeVAEAnomalyLib.training.prepare import process_count

    assert process_count(asked, volumes, cores) == (count, why)


def test_a_fifo_or_a_deeply_nested_json_in_the_cache_is_made_again_not_a_hang_or_a_crash(subjects, tmp_path, caplog):
    import os

    s = subjects[0]
    cache = SliceCache(tmp_path / "cache", PRE)
    key = cache.key(s, checksums(s), "axial")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{key}.json").write_text("[" * 100000 + "]" * 100000)
    np.save(tmp_path / "cache" / f"{key}.npy", np.zeros((1, 64, 64), np.float32))
    with caplog.at_level(logging.WARNING):
        (entry,), made = cache.entries_for(s, checksums(s), ("axial",))
    assert made and "is damaged (RecursionError)" in caplog.text
    if os.name == "posix":
        other = subjects[1]
        fifo = tmp_path / "cache" / f"{cache.key(other, checksums(other), 'axial')}.npy"
        os.mkfifo(fifo)
        (tmp_path / "cache" / f"{fifo.stem}.json").write_text("{}")
        assert cache.lookup(fifo.stem) is None  # never opened (opening a FIFO waits for a writer)


def test_a_cache_folder_in_an_input_series_folder_is_refused(subjects, tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"x")
    subject = Subject(series)
    with pytest.raises(CeVAEError, match="lies in the input series folder"):
        SliceCache(series / "cache", PRE).prepare([subject], {series: "0"}, ("axial",))
    assert main(["prepare", str(series), "--cache-dir", str(series)]) == 2
    assert [p.name for p in series.iterdir()] == ["IM0001.dcm"]  # nothing written into the series


def test_a_cache_folder_that_holds_an_input_scan_or_mask_is_refused_before_any_work(subjects, tmp_path, capsys):
    """--cache-dir the scans' own folder wrote its .npy/.json entries among them (a cache deleted later took the scans
    with it); as batch's --out-dir, it must differ (a subfolder of theirs is a folder of its own)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    image, mask = scans / "s1.nii.gz", masks / "s1_mask.nii.gz"
    shutil.copy(subjects[0].image, image)
    shutil.copy(subjects[0].mask, mask)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"image,mask\n{image},{mask}\n")
    before = {p: sorted(p.iterdir()) for p in (scans, masks)}
    for folder, what, path in ((scans, "scan", image), (masks, "mask", mask)):
        said = (f"The cache folder {folder} is the folder of the input {what} {path}: its entries would be written "
                "among the input files; give --cache-dir a folder of its own.")
        assert main(["prepare", "--manifest", str(manifest), "--cache-dir", str(folder)]) == 2
        assert said in capsys.readouterr().err
        for command in (["train", "--max-steps", "1"], ["adapt", "--steps", "1"]):
            assert main([*command, "--manifest", str(manifest), "--cache-dir", str(folder),
                         "--out", str(tmp_path / "m.cevae")]) == 2
            assert said in capsys.readouterr().err
        with pytest.raises(CeVAEError, match="is the folder of the input"):
            SliceCache(folder, PRE).prepare([Subject(image, mask)], checksums(Subject(image, mask)), ("axial",))
    assert {p: sorted(p.iterdir()) for p in (scans, masks)} == before  # nothing written among them
    assert not list(tmp_path.glob("m.*"))
    assert main(["prepare", str(scans), "--cache-dir", str(scans / "slices")]) == 0  # a folder of its own


def test_temporaries_of_killed_writes_are_removed_when_an_hour_old(subjects, tmp_path, caplog):
    cache = SliceCache(tmp_path / "cache", PRE)
    s = subjects[0]
    cache.entries_for(s, checksums(s), ("axial",))
    root = cache.root
    # named as the cache's writes name them (io.atomic.temp_beside), as a killed write leaves them
    old = [Path(temp_beside(root / f"{'a' * 32}.npy")), Path(temp_beside(root / f"{'b' * 32}.json"))]
    recent = Path(temp_beside(root / f"{'c' * 32}.npy"))  # a write in progress elsewhere
    other = Path(temp_beside(root / "notes.npy"))  # not an entry's temporary
    for path in old + [recent, other]:
        path.write_bytes(b"x" * 100)
    for path in old + [other]:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    with caplog.at_level(logging.INFO):
        cache.prepare([s], checksums(s), ("axial",))
    assert not any(p.exists() for p in old)
    assert recent.exists() and other.exists()
    assert "removed 2 temporary file(s)" in caplog.text
    assert len(list(root.glob("[!.]*.npy"))) == 1  # the entry itself is kept


def test_prepare_says_when_a_volume_repeats_another(subjects, tmp_path, caplog):
    import shutil

    from CeVAEAnomalyLib.training.prepare import prepare_cohort

    s = subjects[0]
    copy = Subject(tmp_path / "copy.nii.gz", s.mask)
    other_mask = Subject(tmp_path / "copy2.nii.gz", tmp_path / "eroded_mask.nii.gz")  # the same image, another mask
    sitk.WriteImage(sitk.BinaryErode(sitk.ReadImage(str(s.mask)) > 0, [1, 1, 1]), str(other_mask.mask))
    for c in (copy, other_mask):
        shutil.copy(s.image, c.image)
    with caplog.at_level(logging.WARNING):
        summary = prepare_cohort([s, copy, other_mask], tmp_path / "cache", PRE, ("axial",))
    repeats = [r.getMessage() for r in caplog.records if "repeats the image" in r.getMessage()]
    assert repeats == [  # train's own warnings (unique_subjects)
        f"{copy.image} repeats the image {s.image} (same content); it is used once.",
        f"{other_mask.image} repeats the image {s.image} (same content); it is used once, with the brain mask {s.mask} "
        f"(the repeat's {other_mask.mask} is not used)."]
    entries = list((tmp_path / "cache").glob("[!.]*.npy"))  # two: the masks differ; the copy shares the first
    assert len(entries) == 2 and f" {sum(len(np.load(e)) for e in entries)} slices" in summary  # each counted once


def test_a_change_to_the_slicing_code_is_a_decision_about_the_cache_version():
    """Cached slices are keyed by SLICING_VERSION, not by the code that made them: an upgrade that changed what
    slices a volume gives reused stale slices. Changing engine/preprocess.py, engine/brainmask.py or
    training/data.py (what slices of a volume are kept) fails here
    until someone decides: raise SLICING_VERSION if slices change, then record the files' new digest."""
    import hashlib
    import json

    from CeVAEAnomalyLib.training.cache import SLICING_VERSION

    recorded = json.loads((Path(__file__).parent / "slicing_sources.json").read_text())
    library = Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomalyLib"
    now = {name: hashlib.sha256((library / name).read_bytes().replace(b"\r\n", b"\n")).hexdigest()  # any checkout
           for name in recorded["sha256"]}
    assert (now, SLICING_VERSION) == (recorded["sha256"], recorded["slicing_version"]), (
        "the slicing code or SLICING_VERSION changed: raise training.cache.SLICING_VERSION if the slices of a "
        "volume change, then record the digests and version in Testing/Python/slicing_sources.json")


@pytest.mark.skipif(os.name != "posix", reason="process ids are looked up on POSIX")
def test_a_killed_runs_temporary_cache_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """train and adapt without --cache-dir keep their slices in a temporary folder they remove at the end; one
    killed with SIGKILL left it behind for good (about 1 MB per volume and orientation)."""
    import socket
    import subprocess
    import tempfile

    from CeVAEAnomalyLib.io.atomic import machine_tag
    from CeVAEAnomalyLib.training.cache import temporary_cache

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()  # its process id is now no process's
    host = socket.gethostname()
    ours = f"{host}@{machine_tag()}"
    dead = tmp_path / f"cevae-slices-{ended.pid}@{ours}@abcd"
    dead.mkdir()
    (dead / "slices.npy").write_bytes(b"x" * 10)
    alive = tmp_path / f"cevae-slices-{os.getppid()}@{ours}@efgh"  # a run still going (here: this test's parent)
    elsewhere = tmp_path / f"cevae-slices-{ended.pid}@another-node@{machine_tag()}@ijkl"  # a shared temporary folder's
    container = tmp_path / f"cevae-slices-{ended.pid}@{host}@0000ffff@mnop"  # another process-id namespace's
    older = tmp_path / f"cevae-slices-{ended.pid}@{host}@qrst"  # an earlier version's (no namespace named)
    other = tmp_path / "cevae-slicesXYZ"  # not one of ours
    for folder in (alive, elsewhere, container, older, other):
        folder.mkdir()
    made = temporary_cache("cevae-slices-")
    assert made.is_dir() and made.name.startswith(f"cevae-slices-{os.getpid()}@{ours}@")
    assert not dead.exists() and all(f.is_dir() for f in (alive, elsewhere, container, older, other))


_IN_ANOTHER_NAMESPACE = """
import os, sys, tempfile
tempfile.tempdir, outside = sys.argv[1], set(map(int, sys.argv[2].split(",")))
while True:  # a run whose process id names no process outside this namespace
    pid = os.fork()
    if pid == 0:
        if os.getpid() in outside:
            os._exit(3)
        from CeVAEAnomalyLib.training.cache import temporary_cache
        print(temporary_cache("cevae-slices-"), flush=True)
        sys.stdin.read()  # runs until the test closes its input
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 3:
        break
"""


def _pid_namespace_works() -> bool:
    """Whether this user may start a process in a process-id namespace of its own (a container's, here)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-r", "-pf", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(os.name != "posix" or not _pid_namespace_works(), reason="needs unshare -r -pf (namespaces)")
def test_a_live_runs_temporary_cache_in_another_container_is_kept(tmp_path, monkeypatch):
    """Containers that share the temporary folder and the host name, each with its own process ids: a run in one took
    a live run's cache in the other for a killed run's (its process id names no process here) and removed it."""
    import tempfile

    from CeVAEAnomalyLib.training.cache import temporary_cache

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    outside = ",".join(p for p in os.listdir("/proc") if p.isdigit())
    other = subprocess.Popen(["unshare", "-r", "-pf", "--mount-proc", sys.executable, "-c", _IN_ANOTHER_NAMESPACE,
                              str(tmp_path), outside], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        live = Path(other.stdout.readline().strip())
        assert live.is_dir() and live.parent == tmp_path
        ours = temporary_cache("cevae-slices-")
        assert live.is_dir() and ours.is_dir() and ours != live
    finally:
        other.stdin.close()
        other.wait(timeout=30)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run as two users")
def test_a_run_removes_no_file_of_another_users_folder_named_as_a_killed_runs_cache():
    """A shared temporary folder: a run removed what it could of another user's folder named as a killed run's cache
    of this machine (the files of one that user let others write; a link's target never), and logged it as removed at
    every run, though the folder stayed. Only this user's own folders are removed."""
    from CeVAEAnomalyLib.io.atomic import machine_tag

    if other_user_cannot_import():
        pytest.skip(other_user_cannot_import())
    shared = Path(tempfile.mkdtemp(prefix="cevae-shared-tmp-"))  # (pytest's own folder is private to this user)
    try:
        os.chmod(shared, 0o1777)
        ended = subprocess.Popen(["true"])
        ended.wait()
        theirs = shared / f"cevae-slices-{ended.pid}@{socket.gethostname()}@{machine_tag()}@abcd"
        theirs.mkdir(mode=0o777)
        os.chmod(theirs, 0o777)
        (theirs / "kept.txt").write_text("another user's")
        os.chown(theirs / "kept.txt", 60002, 60002)
        os.chown(theirs, 60002, 60002)
        run = ("import logging, tempfile; logging.basicConfig(level=logging.INFO); "
               f"tempfile.tempdir = {str(shared)!r}; from CeVAEAnomalyLib.training.cache import temporary_cache; "
               "temporary_cache('cevae-slices-')")
        proc = subprocess.run(["setpriv", "--reuid=60001", "--regid=60001", "--clear-groups", sys.executable, "-c",
                               run], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert proc.returncode == 0, proc.stderr
        assert (theirs / "kept.txt").is_file() and "Removing" not in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(shared)


def test_a_temporary_cache_folder_that_cannot_be_made_is_one_clear_line(tmp_path, monkeypatch):
    """The system's temporary folder found, but the cache's own folder not made in it (here: the folder Python
    found was removed since; a full disk, a used-up quota likewise): a CeVAEError saying where and what to do, not
    Python's bare FileNotFoundError."""
    import tempfile

    from CeVAEAnomalyLib.training.cache import temporary_cache

    gone = tmp_path / "gone"
    monkeypatch.setattr(tempfile, "tempdir", str(gone))  # Python's cached choice, removed since it was made
    with pytest.raises(CeVAEError, match=rf"^Could not make the slice cache folder in {re.escape(str(gone))}: No such "
                                         r"file or directory\. Free space there, or give --cache-dir a folder on a "
                                         r"disk with room\.$"):
        temporary_cache("cevae-slices-")
    assert list(tmp_path.iterdir()) == []


def test_a_cache_folder_that_cannot_be_made_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """prepare --cache-dir on a read-only file system ended in "unexpected OSError" (tried as root here, so the
    folder is made impossible by a file in the way of its parent)."""
    from CeVAEAnomalyLib.cli.main import main

    image, mask = make_head(size=(32, 36, 28), seed=1)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    (tmp_path / "blocked").write_text("a file, not a folder")
    code = main(["prepare", str(tmp_path / "h.nii.gz"), "--cache-dir", str(tmp_path / "blocked" / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "unexpected" not in err and "blocked" in err


def test_a_file_replaced_between_its_hash_and_its_read_is_not_cached_under_the_old_hash(subjects, tmp_path,
                                                                                       monkeypatch):
    """The cache key is the file's checksum taken before the volume is read: a file replaced in between had
    another subject's slices cached under it, used by every later run."""
    from CeVAEAnomalyLib.training import cache as cache_module

    s, other = subjects[0], subjects[1]
    known = checksums(s)
    real = cache_module.subject_slices

    def replaced_while_read(subject, pre, orientations):
        out = real(subject, pre, orientations)
        s.image.write_bytes(other.image.read_bytes())  # e.g. a copy still being written
        return out

    monkeypatch.setattr(cache_module, "subject_slices", replaced_while_read)
    cache = SliceCache(tmp_path / "cache", PRE)
    with pytest.raises(CeVAEError, match="changed while it was being read"):
        cache.entries_for(s, known, ("axial",))
    assert cache.lookup(cache.key(s, known, "axial")) is None


def test_a_scan_whose_voxel_size_makes_it_metres_wide_is_refused_before_its_brain_mask(tmp_path, capsys):
    """A head of 189 x 233 x 197 voxels of 50 mm (each voxel size allowed, the scan 9 to 12 m wide) ended prepare and
    train without a mask in "unexpected RuntimeError: Failed to allocate memory for image" (the automatic brain
    mask's 4 mm grid over the whole extent)."""
    image, _ = make_head(size=(40, 44, 36), spacing=(30.0, 30.0, 30.0))  # 1.2 to 1.3 m: small enough to try
    sitk.WriteImage(image, str(tmp_path / "wide.nii.gz"))
    assert main(["prepare", str(tmp_path / "wide.nii.gz"), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (
        f"error: The image {tmp_path / 'wide.nii.gz'} spans 1.32 m along its j axis (44 voxels of "
        "30 mm); an MRI of a head spans well under 1 m, so its header's voxel size is wrong (or in other units). "
        "Fix the header first.\n")


def _unshare_works() -> bool:
    """Whether this user may make a mount namespace of its own (user namespaces allowed, unshare installed)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(os.name != "posix" or not _unshare_works(), reason="needs unshare -rm (user namespaces)")
def test_a_full_disk_under_the_cache_is_said_in_those_words(tmp_path):
    """A cache folder on a full disk was reported in NumPy's words ('Could not write the slice cache entry ...:
    147456 requested and 65504 written'). Run on a real 256 KiB tmpfs, mounted in a namespace of this user's own."""
    write_subject(tmp_path, "h", 1)
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", small]
    prepare = [sys.executable, "-m", "CeVAEAnomalyLib.cli", "prepare", tmp_path / "h.nii.gz",
               tmp_path / "h_mask.nii.gz", "--cache-dir", small / "cache"]
    script = " && exec ".join(" ".join(shlex.quote(str(w)) for w in words) for words in (mount, prepare))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"^error: Could not write the slice cache entry \S+/small/cache/s\d+-\w+\.npy: the disk holding "
                     r"\S+/small/cache is full \([\d.]+ MB free, the entry needs [\d.]+ MB\)\. Free space there, or "
                     r"give --cache-dir a folder on a disk with room\.$", proc.stderr.strip(), re.M), proc.stderr


def test_the_cache_write_error_names_a_full_disk_or_quota_and_what_to_do(tmp_path):
    """The message on real OSErrors: a write to /dev/full (ENOSPC), NumPy's errno-less short write there, a quota."""
    target = tmp_path / "cache" / "entry.npy"
    target.parent.mkdir()
    free = shutil.disk_usage(target.parent).free
    errors = {}
    for name, write in (("python", lambda fh: fh.write(b"x" * 10)),
                        ("numpy", lambda fh: np.zeros(10240, np.float32).tofile(fh))):
        with pytest.raises(OSError) as caught:
            with open("/dev/full", "wb") as fh:
                write(fh)
        errors[name] = caught.value
    assert errors["python"].errno == errno.ENOSPC and errors["numpy"].errno is None
    advice = "Free space there, or give --cache-dir a folder on a disk with room."
    full = f"Could not write the slice cache entry {target}: the disk holding {target.parent} is full ("
    assert write_failure(target, errors["python"], 100) == f"{full[:-2]}. {advice}"  # room for 100 bytes: no sizes
    assert write_failure(target, errors["numpy"], free + 10 ** 9).startswith(full)  # more than the disk has left
    # a short write where the disk has room (e.g. a file-size limit) keeps NumPy's words, not a wrong cause
    assert write_failure(target, errors["numpy"], 40960) == (
        f"Could not write the slice cache entry {target}: 10240 requested and 0 written. Check the disk holding "
        f"{target.parent} (move the run to another disk if it fails again), or give --cache-dir another folder.")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert write_failure(target, quota, 100) == (f"Could not write the slice cache entry {target}: your disk quota on "
                                                 f"{target.parent} is used up. {advice}")
    other = OSError(errno.EIO, os.strerror(errno.EIO))
    assert write_failure(target, other, 100).startswith(f"Could not write the slice cache entry {target}: Input/output "
                                                        f"error. Check the disk holding {target.parent} ")


SIZE_LIMITED_PREPARE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as past a quota
resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_slice_file_write_refused_by_the_system_says_why(tmp_path):
    """The slices were written by NumPy, whose failed write drops the system's reason (its OSError has no errno):
    past a file-size limit, or over a disk quota on a disk with room, prepare said only '98304 requested and 1218
    written. Check the disk holding ...', never the cause the system gave."""
    subject = write_subject(tmp_path, "h", 1)
    cache = tmp_path / "cache"
    (tmp_path / "healthy.csv").write_text(f"image,mask\n{subject.image},{subject.mask}\n")
    proc = subprocess.run([sys.executable, "-c", SIZE_LIMITED_PREPARE, "prepare", "--manifest",
                           str(tmp_path / "healthy.csv"), "--cache-dir", str(cache)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 2, proc.stderr
    folder = re.escape(str(cache))
    assert re.search(rf"^error: Could not write the slice cache entry {folder}/s\d+-\w+\.npy: "
                     rf"{os.strerror(errno.EFBIG)}\. "
                     rf"Make sure {folder} can be written \(EFBIG\), or give --cache-dir another folder\.$",
                     proc.stderr.strip(), re.M), proc.stderr
    assert list(cache.iterdir()) == []  # nothing of the entry left


@pytest.mark.parametrize("number, remedy", [
    (errno.EACCES, "Make sure you may write in {folder} (its permissions)"),
    (errno.EROFS, "The disk holding {folder} is mounted read-only: make it writable")])
def test_a_cache_write_refused_for_another_cause_than_space_says_what_to_do(tmp_path, number, remedy):
    """Any failed write but a full disk ended with the bare OSError and no word of what to do ("...: [Errno 13]
    Permission denied: '/cache/.KEY.npy.1a2b3c4d-...-PID.npy'.", the hidden temporary's name)."""
    target = tmp_path / "entry.npy"
    assert write_failure(target, OSError(number, os.strerror(number), str(tmp_path / ".entry.npy.x.npy")), 100) == (
        f"Could not write the slice cache entry {target}: {os.strerror(number)}. "
        f"{remedy.format(folder=tmp_path)}, or give --cache-dir another folder.")


def refuses_new_files(folder: str) -> bool:
    """Whether making a file in ``folder`` fails with EACCES (sysfs: even for root, whom chmod does not stop)."""
    try:
        open(os.path.join(folder, f".cevae-probe-{os.getpid()}"), "xb").close()  # a new file, never one there
    except OSError as exc:
        return exc.errno == errno.EACCES
    os.unlink(os.path.join(folder, f".cevae-probe-{os.getpid()}"))
    return False


@pytest.mark.skipif(not refuses_new_files("/sys/fs"), reason="needs a folder that refuses new files: Linux's sysfs")
def test_prepare_in_a_folder_that_refuses_new_files_says_to_see_to_its_permissions(subjects):
    """As `cevae-anomaly train --cache-dir /sys/fs` met it: sysfs refuses a new file even to root."""
    with pytest.raises(CeVAEError) as caught:
        SliceCache(Path("/sys/fs"), PRE).prepare(subjects[:1], checksums(subjects[0]), ("axial",))
    message = str(caught.value)
    assert re.fullmatch(r"Could not write the slice cache entry /sys/fs/s\d+-\w+\.npy: Permission denied\. Make sure "
                        r"you may write in /sys/fs \(its permissions\), or give --cache-dir another folder\.",
                        message), message


def test_an_entry_whose_npy_header_has_an_unclosed_bracket_is_made_again(subjects, tmp_path, caplog):
    """numpy reads a .npy header with Python's tokenizer, whose TokenError (not a ValueError) went through the
    lookup and stopped the run; the entry is damaged like any other and is made again."""
    s = subjects[0]
    cache = SliceCache(tmp_path / "cache", PRE)
    (entry,), _ = cache.entries_for(s, checksums(s), ("axial",))
    good = np.load(entry.path)
    data = entry.path.read_bytes()
    end = data.index(b"}")
    entry.path.write_bytes(data[:end] + b" " + data[end + 1:])  # the header's dict loses its closing brace
    with caplog.at_level(logging.WARNING):
        (again,), made = SliceCache(tmp_path / "cache", PRE).entries_for(s, checksums(s), ("axial",))
    assert made and "is damaged" in caplog.text
    np.testing.assert_array_equal(np.load(again.path), good)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_prepare_names_every_volume_that_cannot_be_read_in_one_error(subjects, tmp_path, capsys, monkeypatch,
                                                                      workers):
    """`prepare` (in this process or its worker processes) stopped at the first damaged volume of a cohort, so its
    damaged scans were found one run at a time; it now names them all, as train does, once the others are prepared."""
    from CeVAEAnomalyLib.training import prepare

    monkeypatch.setattr(prepare, "VOLUMES_PER_PROCESS", 1)  # else 5 volumes are not worth a second process
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image\n")
    (tmp_path / "cut.nii.gz").write_bytes(subjects[1].image.read_bytes()[:300])
    rows = [f"{subjects[0].image},{subjects[0].mask}", f"{tmp_path / 'garbage.nii.gz'},{subjects[0].mask}",
            f"{subjects[1].image},{subjects[1].mask}", f"{tmp_path / 'cut.nii.gz'},{subjects[1].mask}",
            f"{subjects[2].image},{subjects[2].mask}"]
    (tmp_path / "cohort.csv").write_text("image,mask\n" + "\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    assert main(["prepare", "--manifest", str(tmp_path / "cohort.csv"), "--cache-dir", str(cache),
                 "--workers", str(workers)]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: 2 of the 5 volumes could not be read (the others were "
                                                 "prepared): "), err
    assert f"{tmp_path / 'garbage.nii.gz'} could not be read as an image" in said[0]
    assert f"{tmp_path / 'cut.nii.gz'} is truncated or corrupt" in said[0]
    assert len(list(cache.glob("*.npy"))) == 3  # the three readable volumes' axial slices
