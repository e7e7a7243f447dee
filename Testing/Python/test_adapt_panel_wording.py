"""The errors an adaptation started from Slicer's Adapt panel (its worker's run_adapt) can end with say what to do with
the panel's controls, not with command-line flags the panel has not (--resume, --overwrite, --channels); those of
`cevae-anomaly adapt` name its own options, not train's (--channels, --z-dim, --input-size)."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import CeVAEAnomalyLib.training.trainer as trainer_mod
from CeVAEAnomalyLib.cli.commands import ADAPT_WORDING
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.errors import CeVAEError, Wording
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.slicer.worker import PANEL_WORDING, run_adapt
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.trainer import Trainer
from conftest import write_heads

pytestmark = pytest.mark.usefixtures("one_thread")
START_ANEW = "press Adapt again and answer No (start anew) when it asks whether to resume"  # the panel's dialog
RESUME = "press Adapt again with the same volumes and file name and choose to resume (it asks first)"
EVERY = 2  # steps between checkpoints


@pytest.fixture
def panel_task(tmp_path) -> Dict[str, Any]:
    """A worker request of the panel's to resume an adaptation of two site scans (Colin27 at 2 mm, shipped with the
    package, and a noisy copy) to site.cevae, without the model (each test adds it)."""
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    copies = [tmp_path / "01_scan.nii.gz", tmp_path / "02_scan.nii.gz"]
    shutil.copyfile(data_path("colin27_t1_2mm.nii.gz"), copies[0])
    array = sitk.GetArrayFromImage(t1)
    noisy = sitk.GetImageFromArray(array + np.random.default_rng(0).normal(0, 0.03 * array.max(), array.shape))
    noisy.CopyInformation(t1)
    sitk.WriteImage(noisy, str(copies[1]))
    mask = data_path("colin27_brainmask_2mm.nii.gz")
    return {"out": str(tmp_path / "site.cevae"), "device": "cpu",
            "options": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "resume": True},
            "subjects": [{"image": str(p), "mask": str(mask), "name": p.stem} for p in copies]}


def checkpoint_of_another_run(base: Path, task: Dict[str, Any], change: Dict[str, Any]) -> None:
    """Write, where the final run of ``task``'s adaptation keeps its checkpoint, one of a training run of ``base``'s
    architecture (its fields in ``change`` changed) on the same scans."""
    bundle = load_bundle(base, "cpu")
    subjects = [Subject(Path(s["image"]), Path(s["mask"])) for s in task["subjects"]]
    cfg = TrainConfig(out=Path(task["out"]), model=replace(bundle.header.model, **change), batch_size=8, max_steps=4,
                      checkpoint_every=2, device="cpu")
    Trainer(cfg, subjects, bundle.preprocess).save_checkpoint()


def damaged_checkpoint(base: Path, task: Dict[str, Any], change: Dict[str, Any]) -> None:
    Path(f"{task['out']}.ckpt").write_bytes(b"not a checkpoint")


@pytest.mark.parametrize("make,change,said", [
    (checkpoint_of_another_run, {}, "belongs to another run"),
    (checkpoint_of_another_run, {"z_dim": 8}, "holds a model of another architecture"),
    (damaged_checkpoint, {}, "is damaged or not a CeVAEAnomaly checkpoint"),
])
def test_a_resume_the_checkpoint_refuses_says_what_to_do_in_the_panels_words(
        tiny_bundle, panel_task, make: Callable[..., None], change: Dict[str, Any], said: str):
    """Resuming (Yes when Adapt asked) from a checkpoint of another run, of another model or damaged told the panel's
    user to "start anew with --overwrite instead of --resume" or to resume "with the same --channels, --z-dim and
    --input-size"."""
    make(tiny_bundle, dict(panel_task, model=str(tiny_bundle)), change)
    messages: List[str] = []
    with pytest.raises(CeVAEError) as refused:
        run_adapt(dict(panel_task, model=str(tiny_bundle)), lambda fraction, message: messages.append(message))
    text = str(refused.value)
    assert said in text and text.endswith(f"{START_ANEW}."), text
    assert "--" not in text, text
    assert not [m for m in messages if m.startswith("Fine-tuning") and "step" in m]  # refused before any run trained


def fine_tuning(folder: Path, wording: Wording) -> Trainer:
    """A fine-tuning run of a tiny model on two synthetic heads, with ``wording`` (as adapt gives its runs)."""
    cfg = TrainConfig(out=folder / "site.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16), batch_size=8,
                      max_steps=3 * EVERY, checkpoint_every=EVERY, device="cpu", val_fraction=0.0)
    return Trainer(cfg, write_heads(folder), wording=wording)


@pytest.fixture
def panel_trainer(tmp_path) -> Trainer:
    return fine_tuning(tmp_path, PANEL_WORDING)


def test_out_of_memory_at_batch_size_one_says_what_to_do_in_the_panels_words(panel_trainer):
    """It told the panel's user to "use a smaller --input-size or --channels": an adaptation has the architecture of
    the model it starts from, and the panel has neither."""
    def out_of_memory(batch: torch.Tensor) -> Dict[str, float]:
        raise RuntimeError("CUDA out of memory")

    panel_trainer.batch_size = 1
    with pytest.raises(CeVAEError) as refused:
        panel_trainer.step_with_oom_retry(torch.arange(8), out_of_memory)
    text = str(refused.value)
    assert text.startswith("Out of memory even with batch size 1 on cpu; ") and "Device selector" in text, text
    assert "--" not in text, text


def test_a_full_disk_at_a_log_row_says_how_to_resume_in_the_panels_words(panel_trainer, monkeypatch):
    """It told the panel's user to "run again with --resume to go on from" the checkpoint it kept."""
    real_writer = trainer_mod.csv.writer

    class FullAfterCheckpoint:
        def __init__(self, f):
            self.inner = real_writer(f)

        def writerow(self, row):
            if isinstance(row[0], int) and row[0] > EVERY:
                raise OSError(28, "No space left on device")
            return self.inner.writerow(row)

    monkeypatch.setattr(trainer_mod.csv, "writer", FullAfterCheckpoint)
    with pytest.raises(CeVAEError) as refused:
        panel_trainer.fit()
    text = str(refused.value)
    assert f"The last good checkpoint (step {2 * EVERY}) is kept" in text, text  # (written before its step's row)
    assert text.endswith(f"Free some space, then {RESUME} to go on from it."), text
    assert "--" not in text, text


def test_the_adapt_command_refusing_a_checkpoint_of_another_architecture_names_its_own_options(
        tiny_bundle, panel_task, tmp_path, capsys):
    """`cevae-anomaly adapt --resume` from a checkpoint of another architecture said "Resume with the same
    --channels, --z-dim and --input-size", options adapt has not (an adaptation has its --model's architecture)."""
    checkpoint_of_another_run(tiny_bundle, panel_task, {"z_dim": 8})
    manifest = tmp_path / "site.csv"
    manifest.write_text("image,mask\n" + "".join(f"{s['image']},{s['mask']}\n" for s in panel_task["subjects"]))
    assert main(["adapt", "--manifest", str(manifest), "--model", str(tiny_bundle), "--out", panel_task["out"],
                 "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a model of another architecture" in err, err
    assert "Resume with the --model that adaptation started from, or start anew with --overwrite" in err, err
    assert not [flag for flag in ("--channels", "--z-dim", "--input-size") if flag in err], err


def test_the_adapt_command_out_of_memory_at_batch_size_one_names_its_own_options(tmp_path):
    """It said "use a smaller --input-size or --channels" to `cevae-anomaly adapt`, which has neither."""
    def out_of_memory(batch: torch.Tensor) -> Dict[str, float]:
        raise RuntimeError("CUDA out of memory")

    adapting = fine_tuning(tmp_path, ADAPT_WORDING)
    adapting.batch_size = 1
    with pytest.raises(CeVAEError) as refused:
        adapting.step_with_oom_retry(torch.arange(8), out_of_memory)
    text = str(refused.value)
    assert text.endswith("close other programs that use its memory, or give another --device."), text
    assert "--input-size" not in text and "--channels" not in text, text
