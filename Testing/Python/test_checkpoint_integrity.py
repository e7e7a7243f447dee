"""Checkpoints are checked against the digest written with them; the training log is trimmed or named as damaged."""
from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import List

import pytest
import torch
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.checkpoint import truncate_log
from CeVAEAnomalyLib.training.config import TrainConfig
from test_training_faults import manifest  # noqa: F401 (the two small heads, a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
EVERY = 4
SMALL = ["--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--checkpoint-every", str(EVERY),
         "--device", "cpu", "--val-fraction", "0", "--seed", "3", "--no-augment"]


def train(manifest: Path, out: Path, steps: int, *extra: str) -> int:
    return main(["train", "--manifest", str(manifest), "--out", str(out), "--max-steps", str(steps), *SMALL, *extra])


def errors(err: str) -> List[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]


def flip_a_byte_of_the_largest_tensor(path: Path) -> None:
    """Change one byte in the middle of the largest tensor record (``…/data/N``) of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(
        data[header + 28:header + 30], "little")
    data[start + info.file_size // 2 + 3] ^= 0x40  # (+3: the high byte of a little-endian float32)
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_a_flipped_byte_is_refused(manifest, tmp_path, capsys):
    """A byte flipped in a tensor's data was loaded as it was: the run resumed and trained on the damaged weights
    (the loss became inf, with the wrong remedy). The digest written with the checkpoint now refuses it."""
    out = tmp_path / "model.cevae"
    ckpt = Path(f"{out}.ckpt")
    assert train(manifest, out, EVERY) == 0
    flip_a_byte_of_the_largest_tensor(ckpt)
    damaged = ckpt.read_bytes()
    capsys.readouterr()
    assert train(manifest, out, 2 * EVERY, "--resume") == 2
    lines = errors(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: The checkpoint {ckpt} is damaged"), lines
    assert "its content does not match the checksum written with it" in lines[0]
    assert ckpt.read_bytes() == damaged and read_header(out).training["steps"] == EVERY  # nothing trained or written


def test_a_checkpoint_without_a_digest_still_resumes(manifest, tmp_path):
    """A checkpoint of the previous release (the same version 2, no digest) resumes; the next one has its digest."""
    from CeVAEAnomalyLib.training.checkpoint import DIGEST_KEY, state_digest

    out = tmp_path / "model.cevae"
    ckpt = Path(f"{out}.ckpt")
    assert train(manifest, out, EVERY) == 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state[DIGEST_KEY] == state_digest(state)
    del state[DIGEST_KEY]  # as the previous release wrote it
    torch.save(state, ckpt)
    assert train(manifest, out, 2 * EVERY, "--resume") == 0
    assert read_header(out).training["steps"] == 2 * EVERY
    assert DIGEST_KEY in torch.load(ckpt, map_location="cpu", weights_only=True)  # written anew with its digest


def test_the_digest_covers_tensor_types_shapes_and_the_plain_data():
    from CeVAEAnomalyLib.training.checkpoint import DIGEST_KEY, state_digest

    state = {"model": {"w": torch.arange(6, dtype=torch.float32)}, "step": 4, "parts": [{"lr": 1e-3}], "x": None}
    digest = state_digest(state)
    assert state_digest(dict(reversed(list(state.items())))) == digest  # in a fixed order
    assert state_digest(dict(state, **{DIGEST_KEY: "0" * 64})) == digest  # not over itself
    changed = [
        dict(state, model={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}),
        dict(state, model={"w": torch.arange(6, dtype=torch.int32)}),
        dict(state, model={"w": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.000001])}),
        dict(state, step=5), dict(state, step=4.0), dict(state, parts=[{"lr": 1e-4}]), dict(state, x=False),
    ]
    assert len({digest, *map(state_digest, changed)}) == len(changed) + 1


def test_a_log_row_starting_with_a_non_ascii_digit_names_the_damaged_log(tmp_path):
    """'²'.isdigit() is true but int('²') fails: trimming such a log ended in "unexpected ValueError"."""
    log = tmp_path / "model.cevae.log.csv"
    log.write_text("step,loss\n4,0.5\n\u00b2,0.4\n", encoding="utf-8")
    with pytest.raises(CeVAEError, match=rf"The training log {log} is damaged \(a row does not start with a step "
                                         r"number: '\u00b2'\); move it away to resume"):
        truncate_log(log, 4)
    log.write_text("step,loss\n4,0.5\n\n8,0.4\n", encoding="utf-8")
    truncate_log(log, 4)
    assert log.read_text().splitlines() == ["step,loss", "4,0.5"]
    # a tail that a power cut left zero-filled is dropped like the rows after the checkpoint
    log.write_bytes(b"step,loss\n4,0.5\n8,0.4\n" + b"\0" * 40 + b"\n")
    truncate_log(log, 4)
    assert log.read_text().splitlines() == ["step,loss", "4,0.5"]


def test_a_log_of_the_previous_version_is_kept_as_a_finished_runs_and_resumed_with_the_new_column(tmp_path):
    """Logs written before the checkpoint column hold val_loss "nan" on the checkpoint rows of a run without
    validation: a finished one is still never replaced unasked, and resuming one names the new column in its
    header for the rows the resumed run adds."""
    out = tmp_path / "model.cevae"
    log = out.with_name(out.name + ".log.csv")
    log.write_text("step,loss,kl,rec_vae,rec_ce,val_loss,seconds,slices_per_s\n"
                   "4,0.5,0.1,0.2,0.2,nan,1.0,10\n8,0.4,0.1,0.2,0.1,nan,2.0,10\n")
    assert TrainConfig(out=out).earlier_outputs() == (log,)  # its checkpoint rows say it was not stopped early
    truncate_log(log, 4)
    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["val_loss"], r["checkpoint"]) for r in rows] == [("4", "nan", None)]


def test_a_run_resumed_on_another_kind_of_device_records_the_part_each_trained(manifest, tmp_path):
    """--device may change on --resume, and with --amp it changes what is trained (float16 on CUDA, bfloat16 on the
    CPU), yet the training record's device was the last session's alone: a run trained on CUDA and finished on the CPU
    said "cpu". Its parts now say from which step each device trained (a checkpoint written on CUDA is made here by
    editing its parts, as no GPU is at hand); a part of an earlier version, which names no device, is no change."""
    from CeVAEAnomalyLib.training.checkpoint import DIGEST_KEY, state_digest

    out = tmp_path / "model.cevae"
    ckpt = Path(f"{out}.ckpt")
    assert train(manifest, out, EVERY) == 0
    assert read_header(out).training["device"] == "cpu" and "parts" not in read_header(out).training
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["parts"] == [{"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8, "device": "cpu"}]

    def resave(parts):
        state["parts"] = parts
        del state[DIGEST_KEY]
        state[DIGEST_KEY] = state_digest(state)
        torch.save(state, ckpt)

    resave([{"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8, "device": "cuda"}])
    assert train(manifest, out, 2 * EVERY, "--resume") == 0
    training = read_header(out).training
    assert training["device"] == "cpu" and training["parts"] == [
        {"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8, "device": "cuda"},
        {"from_step": EVERY, "lr": 0.0002, "ranks": 1, "batch_size": 8, "device": "cpu"}]

    assert train(manifest, out, EVERY, "--overwrite") == 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    resave([{"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 8}])  # as an earlier version wrote it
    assert train(manifest, out, 2 * EVERY, "--resume") == 0
    assert "parts" not in read_header(out).training  # the same run on the CPU: nothing more to say
