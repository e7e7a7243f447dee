"""A training resumed with another batch size or number of ranks: what it may change, where its data order goes on,
and what the bundle records."""
from __future__ import annotations

import logging
from typing import List, Optional

import pytest
import torch

from conftest import write_cohort
from CeVAEAnomalyLib.cli.main import _main, main
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.checkpoint import check_same_run, run_identity
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.sampler import EpochSampler, epoch_order, resumed_offset


def test_a_resume_may_lower_the_batch_size_as_an_out_of_memory_stop_says(tmp_path, caplog):
    """A distributed run out of memory stops with "rerun with a smaller --batch-size" and SCALING.md says to run
    again with --resume; that resume was refused as another run's ("batch_size (8 in the checkpoint, 4 now)"), so
    the run was lost. It goes on now with the new batch size, and the bundle records from which step each held."""
    out = tmp_path / "m.cevae"
    common = ["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(out), "--checkpoint-every", "2",
              "--channels", "8,8,16,16", "--z-dim", "8", "--device", "cpu", "--val-fraction", "0"]
    assert main([*common, "--batch-size", "8", "--max-steps", "2"]) == 0
    with caplog.at_level(logging.INFO):
        assert main([*common, "--batch-size", "4", "--max-steps", "4", "--resume"]) == 0
    assert "Batch size 4 per rank (the checkpoint's run was given 8); the learning rate is not rescaled." in caplog.text
    assert "batch size 4 per rank, effective batch size 4" in caplog.text
    training = read_header(out).training
    assert training["steps"] == 4 and training["batch_size"] == 4
    assert training["parts"] == [{"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8, "device": "cpu"},
                                 {"from_step": 2, "lr": 0.0002, "ranks": 1, "batch_size": 4, "device": "cpu"}]
    assert torch.load(out.with_name("m.cevae.ckpt"), map_location="cpu", weights_only=True)["batch_size"] == 4


def test_an_earlier_checkpoint_recording_its_batch_size_resumes_and_an_adaptation_keeps_its_own(tiny_bundle, tmp_path):
    out = tmp_path / "m.cevae"
    now = run_identity(TrainConfig(out=out, batch_size=4).run_options(), [], [], {})
    earlier = run_identity(TrainConfig(out=out).run_options(), [], [], {})
    earlier["options"]["batch_size"] = 64  # checkpoints of earlier versions recorded it as the run's
    check_same_run(earlier, now, out)

    def adaptation(batch_size: int) -> dict:  # its fold models calibrate the final one: they are trained alike
        cfg = AdaptOptions(batch_size=batch_size).run_config(out, "fold1", init_from=tiny_bundle)
        return run_identity(cfg.run_options(), [], [], {})

    with pytest.raises(CeVAEError, match=r"--batch-size \(64 in the checkpoint, 4 now\)"):
        check_same_run(adaptation(64), adaptation(4), out)


def test_a_rank_out_of_memory_says_to_resume_with_a_smaller_batch_once_there_is_a_checkpoint():
    """The stop said "rerun with a smaller --batch-size", which started the run anew unless --resume was given too."""
    from types import SimpleNamespace

    from CeVAEAnomalyLib.training.distributed import DistInfo
    from CeVAEAnomalyLib.training.trainer import Trainer

    def out_of_memory(batch: torch.Tensor) -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for saved, advice in ((None, "--batch-size."), (6, "--batch-size and --resume.")):
        rank = SimpleNamespace(batch_size=8, dist=DistInfo(rank=1, world=2), saved_step=saved,
                               device=torch.device("cpu"))
        with pytest.raises(CeVAEError, match=f"rank 1 with batch size 8 per rank; rerun with a smaller {advice}"):
            Trainer.step_with_oom_retry(rank, torch.zeros(8, 1, 4, 4), out_of_memory)


def epoch_share(n: int, batch_size: int, world: int, start: int, stop: Optional[int]) -> List[int]:
    """The slices batches ``start`` to ``stop`` - 1 of epoch 0 give all ranks together (``stop`` None: to its end)."""
    out: List[int] = []
    for rank in range(world):
        for count, (epoch, _, indices) in enumerate(EpochSampler(n, world, rank, 7, lambda: batch_size, 0, start)):
            if epoch > 0 or (stop is not None and count == stop - start):
                break
            out += indices
    return out


@pytest.mark.parametrize("was,now,again", [((8, 2), (16, 1), 0), ((16, 1), (8, 2), 0), ((4, 4), (8, 2), 0),
                                           ((8, 2), (32, 1), 16), ((8, 1), (8, 2), 8)])
def test_an_epoch_resumed_with_other_ranks_or_batch_size_goes_on_where_it_stopped(was, now, again):
    """A resume on fewer or more ranks (or with another batch size) started the current epoch over: up to an epoch
    of slices trained twice, the rest of the cohort's less. The ranks' shares interleave one permutation, so the run
    goes on from its first slice not yet trained, training again at most part of one effective batch."""
    n, stopped = 97, 3
    consumed = epoch_share(n, *was, 0, stopped)
    rest = epoch_share(n, *now, resumed_offset(n, stopped, was, now), None)
    assert len(consumed) == stopped * was[0] * was[1] and len(set(consumed)) == len(consumed)
    assert len(consumed) + len(rest) - len(set(consumed + rest)) == again  # trained twice
    order = epoch_order(n, 1, 0, 7, 0).tolist()  # the epoch's permutation: what was and is trained is a start of it
    assert set(consumed + rest) == set(order[:len(set(consumed + rest))])
    assert len(set(consumed + rest)) >= n - now[0] * now[1]  # (the last, incomplete batch is dropped)


def test_a_resume_with_another_batch_size_goes_on_in_its_epoch(tmp_path, caplog):
    out = tmp_path / "m.cevae"
    common = ["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(out), "--checkpoint-every", "3",
              "--channels", "8,8,16,16", "--z-dim", "8", "--device", "cpu", "--val-fraction", "0"]
    assert main([*common, "--batch-size", "4", "--max-steps", "3"]) == 0  # 12 slices of the first epoch
    assert main([*common, "--batch-size", "8", "--max-steps", "4", "--resume"]) == 0
    state = torch.load(out.with_name("m.cevae.ckpt"), map_location="cpu", weights_only=True)
    assert (state["epoch"], state["offset"]) == (0, 2)  # batch 1 of 8 (slices 8 to 15, 8 to 11 again), then 2


def test_more_ranks_on_a_machine_than_its_gpus_are_refused_in_words(monkeypatch):
    """torchrun --nproc_per_node 4 on a machine with 2 visible GPUs: ranks 2 and 3 ended in "unexpected
    RuntimeError: CUDA error: invalid device ordinal ... report it", which reads as a bug."""
    from CeVAEAnomalyLib.training.distributed import rank_device

    gpus = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", str(gpus))
    with pytest.raises(CeVAEError, match=rf"rank {gpus} of its machine \(LOCAL_RANK\) and would use GPU cuda:{gpus}, "
                                         rf"but the machine has {gpus} visible GPU\(s\): start at most {gpus} "):
        rank_device(torch.device("cuda"))
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    if gpus:
        monkeypatch.setenv("LOCAL_RANK", str(gpus - 1))
        assert rank_device(torch.device("cuda")) == torch.device("cuda", gpus - 1)


def test_a_gpu_named_by_its_index_under_torchrun_is_refused_in_words(monkeypatch):
    """--device cuda:1 under torchrun was replaced, without a word, by the GPU of each rank's LOCAL_RANK."""
    from CeVAEAnomalyLib.training.distributed import rank_device

    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(CeVAEError, match=r"^--device cuda:1 names one GPU, but under torchrun each rank uses the GPU "
                                         r"of its LOCAL_RANK; pass --device cuda and choose the GPUs with "
                                         r"CUDA_VISIBLE_DEVICES \(e\.g\. CUDA_VISIBLE_DEVICES=1 torchrun \.\.\.\)\.$"):
        rank_device(torch.device("cuda", 1))
    monkeypatch.delenv("LOCAL_RANK")
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # (no torchrun: the GPU asked for)


def test_training_on_a_gpu_named_by_its_index_makes_it_the_current_one(monkeypatch):
    """--device cuda:1 (no torchrun) put the model on GPU 1, but the current CUDA device stayed cuda:0, where torch
    does its own work: the loader's memory-pinning thread pins on the current device, so every training on cuda:1 also
    made a CUDA context on GPU 0 (its memory taken there; refused where GPU 0 is another process's in exclusive mode).
    Logic only: this machine has no GPU, so torch's set_device is recorded, not run (not run on a GPU)."""
    from CeVAEAnomalyLib.training.distributed import init_distributed

    made_current: List[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cuda", 1)).world == 1
    assert made_current == [torch.device("cuda", 1)]
    for other in (torch.device("cuda"), torch.device("cpu")):  # cuda: torch's current GPU is the one used
        init_distributed(other)
    assert made_current == [torch.device("cuda", 1)]


def test_a_stopped_rank_says_which_it_is(monkeypatch, capsys, tmp_path):
    """SIGTERM to one rank of a torchrun: rank 0 said "another rank stopped (see its own error)", and the stopped
    rank's line, "terminated; ...", did not say which rank it was (every rank's Ctrl-C line was the same too)."""
    from CeVAEAnomalyLib.interrupts import Terminated
    from CeVAEAnomalyLib.training.trainer import Trainer

    def terminated(*args, **kwargs) -> None:
        raise Terminated()

    monkeypatch.setattr(Trainer, "__init__", terminated)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _main(["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(tmp_path / "m.cevae")]) == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith("[rank 1] terminated before its first checkpoint")


def test_a_run_that_halved_its_batch_mid_epoch_resumes_at_the_slice_where_it_stopped(tmp_path, monkeypatch):
    """Out of memory mid-epoch halved the batch, but the rest of the epoch still read batches of the old size (their
    second halves left out) and the checkpoint counted the epoch's place in them: a resume, taking that count in
    batches of the new size, trained slices again. The epoch now goes on in batches of the new size from its first
    slice not trained, so every slice of it is trained once, and a resumed run trains what an uninterrupted one
    does, to the same weights."""
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.training.config import NO_AUGMENT
    from CeVAEAnomalyLib.training.data import Subject
    from CeVAEAnomalyLib.training.trainer import Trainer

    write_cohort(tmp_path)
    subjects = [Subject(tmp_path / f"h{s}.nii.gz", tmp_path / f"h{s}_mask.nii.gz") for s in (1, 2)]
    real_step, trained = Trainer._train_step, []

    def out_of_memory_at_step_2(self: Trainer, batch: torch.Tensor) -> dict:
        if self.step == 2 and len(batch) == 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        trained.extend(batch.sum(dim=(1, 2, 3)).round(decimals=2).tolist())  # each slice by its sum
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", out_of_memory_at_step_2)

    def fit(folder: str, steps: int, resume: bool = False) -> Trainer:
        cfg = TrainConfig(out=tmp_path / folder / "m.cevae", model=ModelConfig(channels=(8, 8, 16, 16), z_dim=8),
                          batch_size=8, max_steps=steps, checkpoint_every=4, device="cpu", val_fraction=0.0,
                          augment=NO_AUGMENT, resume=resume, cache_dir=tmp_path / "cache")
        trainer = Trainer(cfg, subjects)
        trainer.fit()
        return trainer

    whole = fit("whole", 8)  # 8 + 8 slices, then 6 steps of 4: 40 slices of epoch 0
    order = epoch_order(len(whole.train), 1, 0, 0, 0)[:40].tolist()
    assert len(whole.train) > 40 and trained == whole.train[order].sum(dim=(1, 2, 3)).round(decimals=2).tolist()
    uninterrupted = trained[:]
    trained.clear()
    fit("parts", 4)
    parts = fit("parts", 8, resume=True)
    assert trained == uninterrupted
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(parts.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "two"), ("LOCAL_RANK", ""), ("RANK", "0x1")])
def test_a_torchrun_variable_that_is_no_number_is_refused_in_words_by_the_library(name, value, monkeypatch, tmp_path,
                                                                              capsys):
    """The command line refused a WORLD_SIZE that is no whole number in one line, but a Trainer of the Python API
    ended in "ValueError: invalid literal for int()" (WORLD_SIZE, LOCAL_RANK); and under torchrun a RANK that is no
    number made the command line's error line itself fail (a traceback). Each is now the same CeVAEError."""
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.training.data import Subject
    from CeVAEAnomalyLib.training.distributed import rank_device
    from CeVAEAnomalyLib.training.trainer import Trainer

    message = (f"The environment variable {name} must be a whole number (torchrun sets it), got {value!r}; unset it "
               "to run as one process.")
    if name == "WORLD_SIZE":
        write_cohort(tmp_path)
        cfg = TrainConfig(out=tmp_path / "m.cevae", model=ModelConfig(channels=(8, 8, 16, 16), z_dim=8), device="cpu")
        monkeypatch.setenv(name, value)
        with pytest.raises(CeVAEError) as caught:
            Trainer(cfg, [Subject(tmp_path / "h1.nii.gz", tmp_path / "h1_mask.nii.gz")])
        assert str(caught.value) == message
        monkeypatch.delenv(name)
    if name == "LOCAL_RANK":  # (read where the device is CUDA, or under torchrun)
        monkeypatch.setenv(name, value)
        with pytest.raises(CeVAEError) as caught:
            rank_device(torch.device("cuda"))
        assert str(caught.value) == message
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(name, value)
    assert _main(["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(tmp_path / "m.cevae")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: " + message


@pytest.mark.parametrize("world, rank, first", [("2", "00", True), ("2", " 0", True), (None, "1", True),
                                                 ("2", "1", False)])
def test_train_knows_rank_0_by_its_number_not_its_text(world, rank, first, monkeypatch, tmp_path):
    """train took the process for rank 0 where RANK was the text "0": under torchrun a RANK of "00" or " 0" (read as
    0 everywhere else) held no lock on --out and showed no progress, and a lone run (no WORLD_SIZE) with a stale RANK
    of "1" in its environment, which trains as rank 0, did neither. Rank 0 is now the number, and a lone run's."""
    from CeVAEAnomalyLib.interrupts import Terminated
    from CeVAEAnomalyLib.io.lock import lock_path
    from CeVAEAnomalyLib.training.trainer import Trainer

    out, seen = tmp_path / "m.cevae", []

    def started(self: Trainer, cfg: TrainConfig, subjects: list, progress: Optional[object] = None,
                **kwargs: object) -> None:
        seen.append((progress is not None, lock_path(out).exists()))
        raise Terminated()

    monkeypatch.setattr(Trainer, "__init__", started)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    assert _main(["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(out)]) == 143
    assert seen == [(first, first)]
