"""Distributed training: `cevae-anomaly train` under torchrun with 2 CPU ranks (gloo)."""
import csv
import io
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, write_cohort
from CeVAEAnomalyLib.engine.bundle import load_bundle, read_header
from CeVAEAnomalyLib.training.distributed import parameter_checksum

CHECKSUM = re.compile(r"\[rank (\d)\] INFO: Rank (\d) of 2: parameter checksum ([0-9a-f]{64})\.")


def torchrun_train(tmp_path, *extra):
    """Run the train command on 2 local CPU ranks; return the combined output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "CeVAEAnomalyLib.cli", "train", "--manifest", str(tmp_path / "train.csv"),
           "--out", str(tmp_path / "model" / "m.cevae"), "--channels", "8,16,16,32", "--z-dim", "16",
           "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu", "--seed", "5", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def logged_steps(bundle):
    return [int(r["step"]) for r in csv.DictReader(bundle.with_name("m.cevae.log.csv").read_text().splitlines())]


def rank_checksums(out):
    found = {int(r): s for r, r2, s in CHECKSUM.findall(out) if r == r2}
    assert sorted(found) == [0, 1], out
    return found


@pytest.fixture
def cohort(tmp_path):
    write_cohort(tmp_path, seeds=(1, 2, 3))
    return tmp_path


@pytest.mark.slow
def test_two_ranks_train_one_model_and_resume(cohort):
    bundle = cohort / "model" / "m.cevae"
    out = torchrun_train(cohort, "--max-steps", "4")

    # the ranks end with bit-identical weights, and the bundle holds exactly those
    sums = rank_checksums(out)
    assert sums[0] == sums[1]
    assert parameter_checksum(load_bundle(bundle).model) == sums[0]
    assert "effective batch size 16" in out and "learning rate 0.0002" in out
    # rank 0 alone writes: one bundle, one checkpoint, one log with each step once, no leftovers
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["m.cevae", "m.cevae.ckpt", "m.cevae.log.csv"]
    assert out.count("Model bundle written") == 1
    assert logged_steps(bundle) == [2, 4]
    training = read_header(bundle).training
    assert training["ranks"] == 2 and training["batch_size"] == 16 and training["steps"] == 4

    # --resume: every rank restores the checkpoint and they stay in step; with a shared slice cache
    # the ranks preprocess their share of the subjects, then all read every entry from it
    out = torchrun_train(cohort, "--max-steps", "6", "--resume", "--cache-dir", str(cohort / "cache"))
    assert len(list((cohort / "cache").glob("*.npy"))) == 3  # 2 training + 1 validation subject, axial
    assert out.count("at step 4.") == 1  # "Resumed from ... at step 4.": a fact of the run, said by rank 0
    sums2 = rank_checksums(out)
    assert sums2[0] == sums2[1] != sums[0]
    assert parameter_checksum(load_bundle(bundle).model) == sums2[0]
    assert logged_steps(bundle) == [2, 4, 6]
    assert read_header(bundle).training["steps"] == 6
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["m.cevae", "m.cevae.ckpt", "m.cevae.log.csv"]

    # the resumed run is the uninterrupted one, bit for bit: every rank's random streams were checkpointed (rank
    # 1's used to be drawn anew, so the weights parted from step 5 on)
    straight = cohort / "straight"
    straight.mkdir()
    for f in cohort.glob("h*.nii.gz"):
        (straight / f.name).write_bytes(f.read_bytes())
    (straight / "train.csv").write_text((cohort / "train.csv").read_text())
    out = torchrun_train(straight, "--max-steps", "6")
    assert rank_checksums(out)[0] == sums2[0]


@pytest.mark.slow
def test_a_resume_on_more_ranks_says_the_run_wide_changes_once(cohort):
    """Resumed on 2 ranks from a 1-process checkpoint, with another --batch-size and --lr and the volumes listed in
    another order (taken in one order by content, as the checkpoint's run was): every rank said the effective-batch,
    --batch-size and learning-rate lines and "Resumed from ...", facts of the whole run (8 ranks: 8 times each). Rank 0
    says them now; each rank still says its own parameter checksum."""
    cmd = [sys.executable, "-m", "CeVAEAnomalyLib.cli", "train", "--manifest", str(cohort / "train.csv"),
           "--out", str(cohort / "model" / "m.cevae"), "--channels", "8,16,16,32", "--z-dim", "16",
           "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu", "--seed", "5", "--max-steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, *rows = (cohort / "train.csv").read_text().splitlines()
    (cohort / "train.csv").write_text("\n".join([header, *reversed(rows)]) + "\n")  # the same volumes, reordered
    out = torchrun_train(cohort, "--max-steps", "3", "--resume", "--batch-size", "4", "--lr", "0.0001")
    said = ("[rank 0] WARNING: The checkpoint was written by 1 rank(s), this run has 2: the effective batch size is "
            "8 (it was 8).",
            "[rank 0] WARNING: Batch size 4 per rank (the checkpoint's run was given 8); the learning rate is not "
            "rescaled.",
            "[rank 0] INFO: Learning rate 0.0001 (the checkpoint used 0.0002).",
            f"[rank 0] INFO: Resumed from {cohort / 'model' / 'm.cevae.ckpt'} at step 2.")
    lines = out.splitlines()
    for line in said:  # once, by rank 0 (torchrun's output holds no other copy of it, by any rank)
        assert sum(line.split(": ", 1)[1] in other for other in lines) == 1 and line in lines, out
    assert sorted(rank_checksums(out)) == [0, 1]
    shown = subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.cli", "info", str(cohort / "model" / "m.cevae")],
                           cwd=REPO, capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert ("Ranks: 1 for steps 1-2, 2 for step 3 (torchrun), at the end an effective batch of 8 (4 slices per "
            "rank).") in shown, shown


def test_single_forward_computes_both_branches():
    """DDP needs one forward per step: model(x, x_corrupted) must equal the two branches run apart."""
    import torch

    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.engine.model import CeVAE

    torch.manual_seed(0)
    model = CeVAE(ModelConfig(channels=(8, 16, 16, 32), z_dim=16))
    x = torch.rand(3, 1, 64, 64)
    xc = x.clone()
    xc[:, :, 10:30, 20:40] = 0.5
    torch.manual_seed(1)
    rec, mu, logvar, rec_ce = model(x, xc)
    torch.manual_seed(1)
    rec_ref, mu_ref, logvar_ref = model(x)
    rec_ce_ref = model.decode(model.encode(xc)[0])
    for got, ref in ((rec, rec_ref), (mu, mu_ref), (logvar, logvar_ref), (rec_ce, rec_ce_ref)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _mean_on_rank(rank: int, store: str, results: str) -> None:
    import json

    import torch
    import torch.distributed as dist
    from CeVAEAnomalyLib.training.distributed import DistInfo, mean_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mean = mean_over_ranks(DistInfo(rank=rank, world=2), {"loss": 1.0 + rank, "kl": 0.25 * rank},
                               torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as f:
        json.dump(mean, f)


def test_the_logged_loss_is_the_mean_over_the_ranks(tmp_path):
    """Under several ranks the loss log held rank 0's own batch's loss (0.2628 where rank 1's was 0.2816): every
    rank's share of the effective batch is averaged now, on every rank alike."""
    import json

    import torch.multiprocessing as mp

    results = str(tmp_path / "mean")
    mp.spawn(_mean_on_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads(open(f"{results}.{rank}").read()) == {"kl": 0.125, "loss": 1.5}


def test_under_torchrun_only_train_runs_and_errors_name_their_rank(monkeypatch, capsys, tmp_path):
    """adapt under torchrun: each rank took the output lock and refused its sibling ("An adapt (process N) is
    writing ..."); detect and the others would all do the same work. And a rank's error line did not say which."""
    from CeVAEAnomalyLib.cli.main import _main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _main(["adapt", "a.nii.gz", "b.nii.gz", "--out", str(tmp_path / "site.cevae")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "[rank 1] error: only train runs in several processes (torchrun); run adapt as one process."]
    assert list(tmp_path.iterdir()) == []
    assert _main(["train", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "m.cevae")]) == 2
    assert capsys.readouterr().err.startswith("[rank 1] error: ")


def test_a_collective_broken_by_another_ranks_end_is_not_called_a_bug():
    from CeVAEAnomalyLib.cli.main import _peer_gone

    assert _peer_gone(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:"
                                   "51234: Connection reset by peer"))
    assert not _peer_gone(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_rank_kept_waiting_past_the_timeout_is_not_called_a_bug(monkeypatch, capsys, tmp_path):
    """A collective that another rank kept waiting longer than the process group's timeout (gloo's words below) was
    said as "unexpected RuntimeError: ... (run again with --debug for the traceback and report it)"."""
    from CeVAEAnomalyLib.cli.main import _main
    from CeVAEAnomalyLib.training.trainer import Trainer

    def timed_out(*args, **kwargs) -> None:
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms "
                           "for recv operation to complete")

    monkeypatch.setattr(Trainer, "__init__", timed_out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _main(["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(tmp_path / "m.cevae")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "[rank 1] error: another rank kept this one waiting longer than the process group's timeout (stuck, or much "
        "slower); this one stopped too before its first checkpoint: nothing to resume; run the same command again to "
        "start anew.")


KILLED_RANK_RUN = '''"""The train command, where rank 1 is killed (SIGKILL: no word of its own) as it starts step
3."""
import os
import signal
import sys

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.training.trainer import Trainer

step = Trainer._train_step


def killed_at_step_3(self, batch):
    if self.dist.rank == 1 and self.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch)


Trainer._train_step = killed_at_step_3
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_rank_left_by_a_killed_one_says_what_to_do(tmp_path):
    """Rank 1 killed after the checkpoint of step 2 (SIGKILL, or the kernel's out-of-memory killer): rank 0 said
    "error: another rank stopped (see its own error); this one stops too.", but the killed rank said no error, and
    nothing said that the checkpoint was kept and --resume goes on from it."""
    (tmp_path / "killed_rank.py").write_text(KILLED_RANK_RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "killed_rank.py"), "train", "--manifest", str(write_cohort(tmp_path, seeds=(1, 2, 3))),
           "--out", str(tmp_path / "m.cevae"), "--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8",
           "--max-steps", "4", "--checkpoint-every", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "see its own error" not in out, out
    resume = "its checkpoints are kept (m.cevae.ckpt): run the same command with --resume (and without --overwrite) to "
    assert (f"[rank 0] error: another rank ended without an error of its own (killed: torchrun's summary gives its "
            f"exit code); this one stopped too; {resume}continue." in out.splitlines()
            or f"[rank 0] terminated; {resume}continue." in out.splitlines()), out  # (torchrun's stop came first)


FAULTY_RUN = '''"""The train command, where the ranks named in sys.argv[1] meet a user error as they open their
data; the others are busy elsewhere until torchrun stops them."""
import sys
import time

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.trainer import Trainer

failing = [int(r) for r in sys.argv[1].split(",")]


def open_data(self):
    if self.dist.rank in failing:
        raise CeVAEError("The image file h2.nii.gz is truncated or corrupt; copy or export it again.")
    time.sleep(600)


Trainer.open_data = open_data
sys.exit(main(sys.argv[2:]))
'''


def torchrun_failing(tmp_path, failing: str) -> str:
    """Train on 2 local CPU ranks where the ranks ``failing`` meet a user error; return the combined output."""
    (tmp_path / "faulty_run.py").write_text(FAULTY_RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "faulty_run.py"), failing, "train", "--manifest", str(write_cohort(tmp_path)),
           "--out", str(tmp_path / "m.cevae"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_ranks_torchrun_stops_after_one_failed_point_to_its_error(tmp_path):
    """Rank 1 met a bad scan; torchrun stopped rank 0 with SIGTERM, which said "[rank 0] terminated before its first
    checkpoint: nothing to resume; run the same command again to start anew", advice that the error contradicts.
    Where both ranks met the same error, both said it."""
    error = "error: The image file h2.nii.gz is truncated or corrupt; copy or export it again."
    out = torchrun_failing(tmp_path, "1")
    assert f"[rank 1] {error}" in out and out.count(error) == 1, out
    assert "[rank 0] terminated: torchrun stops every rank once one fails; see rank 1's error." in out, out
    assert "run the same command" not in out, out

    out = torchrun_failing(tmp_path, "0,1")
    assert out.count(error) == 1, out
    assert re.search(r"\[rank (\d)\] error: the same as rank (?!\1)\d's\.", out), out


SLOW_RANK_RUN = '''"""The train command under a process-group timeout of 3 s (instead of 30 min), where rank 0 takes 8 s
longer than rank 1 in the method named in sys.argv[1] (preparing its data, or validating at a checkpoint)."""
import functools
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.training.trainer import Trainer

dist.init_process_group = functools.partial(dist.init_process_group, timeout=timedelta(seconds=3))
method = getattr(Trainer, sys.argv[1])


def slow_on_rank_0(self, *args):
    if self.dist.rank == 0:
        time.sleep(8)
    return method(self, *args)


setattr(Trainer, sys.argv[1], slow_on_rank_0)
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("slow", ["open_data", "validate"])
def test_a_rank_waits_for_another_longer_than_the_process_groups_timeout(tmp_path, slow):
    """A rank that prepared its data (or validated) much later than another: the other waited in a collective, which
    gives up after the process group's timeout (30 min: a large cohort's preprocessing on a slower node, a CPU
    validation of many volumes), and the run ended with "[rank 1] error: unexpected RuntimeError: [...gloo...] Timed
    out waiting 1800000ms for send operation to complete (... report it)". Measured here with a timeout of 3 s and a
    rank 8 s late: the ranks wait for each other as long as it takes now, and the run ends with its model."""
    (tmp_path / "slow_rank.py").write_text(SLOW_RANK_RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "slow_rank.py"), slow, "train", "--manifest", str(write_cohort(tmp_path, seeds=(1, 2, 3))),
           "--out", str(tmp_path / "m.cevae"), "--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8",
           "--max-steps", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Timed out" not in out, out
    assert read_header(tmp_path / "m.cevae").training["ranks"] == 2


@pytest.mark.slow
def test_every_damaged_scan_is_named_once_when_the_ranks_share_a_slice_cache(tmp_path):
    """With a shared --cache-dir each rank preprocesses its share; a rank stopped at its share's first damaged
    training scan, so its held-out ones went unread and unnamed (3 damaged scans: 2 named, by 2 ranks in 2 lines),
    where one process (or the ranks without a shared cache) names all of them in one error. Now so do the ranks."""
    write_cohort(tmp_path, seeds=(1, 2, 3))
    for image in ("h1.nii.gz", "h2.nii.gz", "h3.nii.gz"):
        data = (tmp_path / image).read_bytes()
        (tmp_path / image).write_bytes(data[: len(data) // 2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "CeVAEAnomalyLib.cli", "train", "--manifest", str(tmp_path / "train.csv"),
           "--out", str(tmp_path / "m.cevae"), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if re.match(r"\[rank \d\] error: ", line)]
    named = [line for line in errors if "None of the 3 volumes could be read" in line]
    assert len(named) == 1 and all(f"h{s}.nii.gz is truncated" in named[0] for s in (1, 2, 3)), out
    assert [line for line in errors if line not in named] == [
        f"[rank {1 - int(named[0][6])}] error: the same as rank {named[0][6]}'s."], out


class _Writes(io.FileIO):
    """A file that records each write it is given (the system calls of an unbuffered stream)."""

    def __init__(self, path) -> None:
        super().__init__(path, "w")
        self.calls = []

    def write(self, data) -> int:
        self.calls.append(bytes(data))
        return super().write(data)


def test_a_ranks_line_reaches_the_shared_stderr_in_one_write(monkeypatch, tmp_path):
    """torchrun starts every rank with ``python -u``, whose stderr writes each piece at once, and a rank's line and
    its newline were two writes: two ranks erring together came out as "[rank 0] error: ...[rank 1] error: the same
    as rank 0's." on one line. Each line is one write now."""
    from CeVAEAnomalyLib.cli.main import _main

    raw = _Writes(tmp_path / "stderr")
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, write_through=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _main(["adapt", "a.nii.gz", "--out", str(tmp_path / "site.cevae")]) == 2
    assert _main(["train", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "m.cevae")]) == 2
    assert len(raw.calls) == 2 and all(c.startswith(b"[rank 1] error: ") and c.endswith(b"\n") and c.count(b"\n") == 1
                                       for c in raw.calls), raw.calls
