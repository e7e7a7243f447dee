"""A training resumed with another batch size or number of ranks: what it may change, where its data order goes on,
and what the bundle records."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import write_cohort
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.checkpoint import check_same_run, run_identity
from CeVAEAnomalyLib.training.config import TrainConfig


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
    assert ("Batch size 4 per rank (the checkpoint's run was given 8): the current epoch starts over; the learning "
            "rate is not rescaled.") in caplog.text
    assert "batch size 4 per rank, effective batch size 4" in caplog.text
    training = read_header(out).training
    assert training["steps"] == 4 and training["batch_size"] == 4
    assert training["parts"] == [{"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8},
                                 {"from_step": 2, "lr": 0.0002, "ranks": 1, "batch_size": 4}]
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

    with pytest.raises(CeVAEError, match=r"batch_size \(64 in the checkpoint, 4 now\)"):
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
