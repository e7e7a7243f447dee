"""The errors and warnings of an adaptation started from Slicer's Adapt panel (its worker's run_adapt), or of a
calibration from its Calibrate button, say what to do with the panel's controls, not with command-line flags the panel
has not (--resume, --overwrite, --channels, --default-fpr); those of `cevae-anomaly adapt` name its own options, not
train's (--channels, --z-dim, --input-size) or calibrate's (--default-fpr)."""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.errors import COMMAND_LINE_ADAPT, COMMAND_LINE_TRAIN, CeVAEError, Wording
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.options import DetectionRequest
from CeVAEAnomalyLib.slicer.worker import PANEL_WORDING, run_adapt, run_calibrate
from CeVAEAnomalyLib.training.adapt import adapt
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.checkpoint import DIGEST_KEY, write_checkpoint
from CeVAEAnomalyLib.training.trainer import Trainer, content_order
from conftest import full_disk_after_step, make_head, write_heads

pytestmark = pytest.mark.usefixtures("one_thread")
START_ANEW = "press Adapt again and answer No (start anew) when it asks whether to resume"  # the panel's dialog
RESUME = "press Adapt again with the same volumes and file name and choose to resume (it asks first)"
EVERY = 2  # steps between checkpoints
TOO_LOW = "The model's default rate is too low for"
REPLACE = ("press Adapt again and answer Yes when it asks whether to replace them, or choose another file name for the "
           "adapted model")
HIGHER_RATE = "detect with a higher false-positive rate (Sensitivity: Chosen false-positive rate)"  # the panel's


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
    """A fine-tuning run of a tiny model on two synthetic heads, with ``wording`` and a slice cache folder (as adapt
    gives its runs)."""
    cfg = TrainConfig(out=folder / "site.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16), batch_size=8,
                      max_steps=3 * EVERY, checkpoint_every=EVERY, device="cpu", val_fraction=0.0,
                      cache_dir=folder / "slices")
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
    full_disk_after_step(monkeypatch, EVERY)
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

    adapting = fine_tuning(tmp_path, COMMAND_LINE_ADAPT)
    adapting.batch_size = 1
    with pytest.raises(CeVAEError) as refused:
        adapting.step_with_oom_retry(torch.arange(8), out_of_memory)
    text = str(refused.value)
    assert text.endswith("close other programs that use its memory, or give another --device."), text
    assert "--input-size" not in text and "--channels" not in text, text


def _unshare_works() -> bool:
    """Whether this user may make a mount namespace of its own (user namespaces allowed, unshare installed)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(os.name != "posix" or not _unshare_works(), reason="needs unshare -rm (user namespaces)")
def test_a_full_disk_under_the_panels_slice_cache_says_what_to_do_in_the_panels_words(tiny_bundle, panel_task,
                                                                                      tmp_path):
    """An adaptation from the panel prepares its slices in the system's temporary folder, which the panel's user does
    not choose: a full disk there told them to "give --cache-dir a folder on a disk with room". Run through run_adapt
    with the temporary folder on a real 256 KiB tmpfs, mounted in a namespace of this user's own."""
    small = tmp_path / "small"
    small.mkdir()
    request = tmp_path / "request.json"
    request.write_text(json.dumps(dict(panel_task, model=str(tiny_bundle),
                                       options=dict(panel_task["options"], resume=False))))
    run = ("import json, sys; from CeVAEAnomalyLib.errors import CeVAEError; "
           "from CeVAEAnomalyLib.slicer.worker import run_adapt\n"
           "try:\n    run_adapt(json.load(open(sys.argv[1])), lambda fraction, message: None)\n"
           "except CeVAEError as exc:\n    sys.exit(str(exc))")
    script = " && exec ".join(" ".join(shlex.quote(str(w)) for w in words) for words in (
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", small], [sys.executable, "-c", run, request]))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(small), PYTHONPATH=os.pathsep.join(sys.path)))
    text = proc.stderr.strip().splitlines()[-1]
    assert text.startswith(f"Could not write the slice cache entry {small}/cevae-adapt-"), proc.stderr
    assert "is full" in text and text.endswith(
        "Free space there (the system's temporary folder, where an adaptation prepares its slices), then press "
        "Adapt again."), text
    assert "--" not in text, text


def test_a_cache_folder_the_slicer_logic_gave_the_worker_is_refused_in_its_callers_words(tiny_bundle, panel_task,
                                                                                          tmp_path):
    """An adaptation the Slicer logic's caller started with options={'cache_dir': ...} (the panel's own prepare their
    slices in a temporary folder) naming a file was told to "give a folder for --cache-dir", the command line's."""
    file = tmp_path / "cache"
    file.write_text("")
    task = dict(panel_task, model=str(tiny_bundle),
                options=dict(panel_task["options"], resume=False, cache_dir=str(file)))
    with pytest.raises(CeVAEError) as refused:
        run_adapt(task, lambda fraction, message: None)
    text = str(refused.value)
    assert text == f"The cache folder {file} is a file; give a folder for the adaptation option cache_dir.", text


def test_slices_removed_under_a_panels_run_say_what_to_do_in_the_panels_words(panel_trainer):
    """The panel's slice cache (a temporary folder) deleted while an adaptation reads it (a cleaner of temporary files)
    told the panel's user that "--resume continues from the last checkpoint"."""
    panel_trainer.open_data()
    for entry in panel_trainer.train.entries:
        entry.path.unlink()
    with pytest.raises(CeVAEError) as refused:
        panel_trainer.train[[0]]
    text = str(refused.value)
    assert "were removed while this run read them (was the slice cache deleted?)" in text, text
    assert text.endswith(f"A new run prepares them anew; to go on from the last checkpoint, {RESUME}."), text
    assert "--" not in text, text


def test_a_slice_file_cut_short_under_a_panels_run_says_what_to_do_and_a_resume_makes_it_again(tmp_path, caplog):
    """A prepared slice file cut short while an adaptation reads it told the panel's user to "run again to remake it",
    where Adapt asks first whether to resume the adaptation, whose checkpoints are kept. Resumed, the run makes the
    file again and goes on."""
    first = fine_tuning(tmp_path, PANEL_WORDING)
    first.fit()  # (its checkpoints: steps 2, 4 and 6)
    entry = first.train.entries[0]
    whole = entry.path.stat().st_size
    with open(entry.path, "r+b") as fh:
        fh.truncate(entry.offset + 4 * first.pre.input_size ** 2)  # its first slice only
    with pytest.raises(CeVAEError) as refused:
        first.train[[entry.slices - 1]]
    text = str(refused.value)
    assert text == (f"The slice cache file {entry.path} is truncated (changed while this run read it). A new run "
                    f"prepares it anew; to go on from the last checkpoint, {RESUME}."), text
    resumed = Trainer(replace(first.cfg, resume=True, max_steps=4 * EVERY), first.train_subjects,
                      wording=PANEL_WORDING)
    with caplog.at_level(logging.WARNING):
        resumed.fit()
    assert resumed.step == 4 * EVERY and entry.path.stat().st_size == whole
    assert f"The cache entry {entry.path} is incomplete; it is made again." in caplog.messages


def _rate_warning(records: List[logging.LogRecord]) -> str:
    said = [r.getMessage() for r in records if r.getMessage().startswith(TOO_LOW)]
    assert len(said) == 1, [r.getMessage() for r in records]
    return said[0]


def _assert_panel_rate_warning(records: List[logging.LogRecord], rests: str) -> None:
    """The one default-rate warning among ``records`` says what it ``rests`` on and what to do in the panel's words."""
    text = _rate_warning(records)
    assert rests in text, text
    assert text.endswith(f"Calibrate on more healthy scans, or {HIGHER_RATE}."), text
    assert "--" not in text, text


def test_a_default_rate_too_low_for_a_panels_calibration_says_what_to_do_in_the_panels_words(tmp_path, caplog):
    """Calibrate in the panel on one coarse scan (4 mm voxels: 10552 brain voxels, 2.3 above the bundled model's
    default rate) warned "give a higher --default-fpr": the panel sets no model's default rate; detection's Sensitivity
    chooses another."""
    image, mask = make_head(seed=1, spacing=(4.0, 4.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "h_mask.nii.gz"))
    task = dict(subjects=[{"image": str(tmp_path / "h.nii.gz"), "mask": str(tmp_path / "h_mask.nii.gz")}],
                model=str(default_model_path()), request=DetectionRequest.of(device="cpu").to_dict(),
                out=str(tmp_path / "site.cevae"))
    with caplog.at_level(logging.WARNING):
        run_calibrate(task, lambda fraction, message: None)
    _assert_panel_rate_warning(caplog.records, "rests on 2.3 of the 10552 healthy brain voxels")


@pytest.fixture
def coarse_site(tiny_bundle, tmp_path) -> Dict[str, Any]:
    """A worker request of the panel's to adapt the tiny model to two small synthetic heads (28 voxels a side: 7088
    brain voxels in all, 7.1 above its default rate 0.001)."""
    site = write_heads(tmp_path, seeds=(7, 8), size=(28, 28, 28))
    return {"out": str(tmp_path / "site.cevae"), "device": "cpu", "model": str(tiny_bundle),
            "options": {"steps": 4, "batch_size": 8, "checkpoint_every": 2},
            "subjects": [{"image": str(s.image), "mask": str(s.mask), "name": s.image.name} for s in site]}


def test_a_default_rate_too_low_for_a_panels_adaptation_says_what_to_do_in_the_panels_words(coarse_site, caplog):
    """An adaptation in the panel calibrates the adapted model on the site scans at its base's default rate: too few
    voxels there warned "give a higher --default-fpr", an option of `cevae-anomaly calibrate` only."""
    with caplog.at_level(logging.WARNING):
        run_adapt(coarse_site, lambda fraction, message: None)
    _assert_panel_rate_warning(caplog.records, "rests on 7.1 of the 7088 healthy brain voxels")


def test_the_adapt_command_warning_of_a_default_rate_too_low_names_its_own_options(coarse_site, tmp_path, caplog):
    """`cevae-anomaly adapt` warned "give a higher --default-fpr", which it has not (the adapted model keeps its
    --model's default rate); detect's --fpr chooses another."""
    volumes = [path for s in coarse_site["subjects"] for path in (s["image"], s["mask"])]
    with caplog.at_level(logging.WARNING):
        assert main(["adapt", *volumes, "--model", coarse_site["model"], "--out", coarse_site["out"], "--steps", "4",
                     "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu"]) == 0
    text = _rate_warning(caplog.records)
    assert text.endswith("Calibrate on more healthy scans, or detect with a higher --fpr."), text
    assert "--default-fpr" not in text, text


@pytest.mark.parametrize("resume,files,said", [
    (False, ("site.cevae",), "already exists (a finished adaptation keeps no fold checkpoints to resume); "),
    (True, ("site.cevae", "site.cevae.ckpt"), "is complete (its model file is written); there is nothing to resume: "),
])
def test_a_finished_adaptation_met_by_the_worker_says_what_to_do_in_the_panels_words(
        tiny_bundle, panel_task, tmp_path, resume: bool, files: Tuple[str, ...], said: str):
    """A finished adaptation's files written after the panel checked the file name (by another adaptation to it) told
    the panel's user to "pass --overwrite to adapt again and replace it, or choose another --out"."""
    for name in files:
        shutil.copyfile(tiny_bundle, tmp_path / name)  # (the checkpoint is not read: refused before)
    with pytest.raises(CeVAEError) as refused:
        run_adapt(dict(panel_task, model=str(tiny_bundle), options=dict(panel_task["options"], resume=resume)),
                  lambda fraction, message: None)
    text = str(refused.value)
    assert text.endswith(f"{said}{REPLACE}."), text
    assert "--" not in text, text


@pytest.fixture
def earlier_checkpoint(coarse_site) -> Dict[str, Any]:
    """``coarse_site``'s adaptation (4 steps a run) interrupted after its final run's last checkpoint, which an earlier
    version wrote (its run record without the adaptation's steps and learning rate): the request to resume it."""
    run_adapt(coarse_site, lambda fraction, message: None)
    out = Path(coarse_site["out"])
    out.unlink()  # (the final checkpoint stays: as if stopped before the model was written)
    ckpt = out.with_name(out.name + ".ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["run"]["options"]["adaptation"], state[DIGEST_KEY]  # (an earlier version's had no digest either)
    write_checkpoint(state, ckpt)
    return dict(coarse_site, options=dict(coarse_site["options"], resume=True))


def _other_model(base: Path, out: Path) -> str:
    """A copy of the model ``base`` at ``out`` with one bias changed: another model of the same kind."""
    from CeVAEAnomalyLib.engine.bundle import save_bundle

    bundle = load_bundle(base, "cpu")
    with torch.no_grad():
        next(iter(bundle.model.parameters())).add_(1e-3)
    save_bundle(out, bundle.model, bundle.header)
    return str(out)


def test_a_panels_resume_of_another_runs_checkpoint_says_what_differs_in_the_panels_words(coarse_site, tmp_path):
    """Resuming from the panel an interrupted adaptation with other healthy volumes, another model or other settings
    (one started from the command line) was refused with "belongs to another run: adaptation ({'steps': 4, ...} in
    the checkpoint, ...); init_from ({'sha256': ...}, ...); training volume(s) ... (the job folder's copies) ... Resume
    with the same volumes and options": the panel sets no options, and its volumes and model are its choices."""
    run_adapt(coarse_site, lambda fraction, message: None)
    Path(coarse_site["out"]).unlink()  # (its final checkpoint stays: as if stopped before the model was written)
    resume = dict(coarse_site, options=dict(coarse_site["options"], resume=True))
    other = write_heads(tmp_path, seeds=(9,), size=(28, 28, 28))[0]
    cases = {
        "it was started on other healthy volumes than those chosen":
            dict(resume, subjects=[resume["subjects"][0], {"image": str(other.image), "mask": str(other.mask)}]),
        "it adapts another model than the one chosen (Use bundled model, or Model bundle)":
            dict(resume, model=_other_model(Path(coarse_site["model"]), tmp_path / "other.cevae")),
        "it was started with other settings than the panel's (from the command line)":
            dict(resume, options=dict(resume["options"], steps=6)),
    }
    for differs, task in cases.items():
        with pytest.raises(CeVAEError) as refused:
            run_adapt(task, lambda fraction, message: None)
        text = str(refused.value)
        assert text == (f"Resume refused: the checkpoint {coarse_site['out']}.ckpt belongs to another run: {differs}. "
                        "To resume it, choose the model and the healthy volumes it was started with and press Adapt "
                        "again (one started from the command line: resume it with the command that started it), or "
                        f"{START_ANEW}."), text


def test_a_panels_resume_of_a_checkpoint_past_its_steps_says_what_to_do_in_the_panels_words(earlier_checkpoint):
    """Resuming from the panel a checkpoint at a step past the steps of the panel's runs said "--resume refused: ...
    past --max-steps N; give --max-steps M or more": train's option, which neither the panel nor adapt has."""
    task = dict(earlier_checkpoint, options=dict(earlier_checkpoint["options"], steps=2))
    with pytest.raises(CeVAEError) as refused:
        run_adapt(task, lambda fraction, message: None)
    text = str(refused.value)
    assert text.startswith("Resume refused: the checkpoint "), text
    assert "is at step 4, past the 2 steps each run takes from the panel" in text, text
    assert text.endswith(f"(cevae-anomaly adapt, with 4 steps or more), or {START_ANEW}."), text
    assert "--" not in text, text


def test_the_adapt_command_resuming_a_checkpoint_past_its_steps_names_its_own_option(earlier_checkpoint, capsys):
    """`cevae-anomaly adapt --resume --steps 2` said "give --max-steps 4 or more", an option of train's; so did
    adapt() called from Python with its default wording, which was the command line's train's there."""
    volumes = [path for s in earlier_checkpoint["subjects"] for path in (s["image"], s["mask"])]
    assert main(["adapt", *volumes, "--model", earlier_checkpoint["model"], "--out", earlier_checkpoint["out"],
                 "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is at step 4, past --steps 2; give --steps 4 or more." in err, err
    assert "--max-steps" not in err, err
    subjects = [Subject(Path(s["image"]), Path(s["mask"])) for s in earlier_checkpoint["subjects"]]
    with pytest.raises(CeVAEError) as refused:
        adapt(Path(earlier_checkpoint["model"]), subjects, Path(earlier_checkpoint["out"]),
              AdaptOptions(steps=2, batch_size=8, checkpoint_every=2, device="cpu", resume=True))
    assert str(refused.value).endswith("is at step 4, past --steps 2; give --steps 4 or more."), str(refused.value)


def test_a_panels_resume_of_an_earlier_versions_checkpoint_warns_in_the_panels_words(earlier_checkpoint, caplog):
    """Resuming from the panel a checkpoint of an earlier version warned "make sure --steps 4 and --lr 0.0001 are
    those it was started with": the panel sets neither (its runs take the default steps and learning rate)."""
    with caplog.at_level(logging.WARNING):
        run_adapt(earlier_checkpoint, lambda fraction, message: None)
    said = [r.getMessage() for r in caplog.records if "was written before an adaptation recorded" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert (": the panel resumes it with 4 steps and learning rate 0.0001 a run; if it was started with others (from "
            "the command line), press Cancel and resume it with the command that started it (its fold models"
            in said[0]), said
    assert "--" not in said[0], said


def test_a_panels_resume_of_an_earlier_versions_checkpoint_with_its_volumes_reordered_warns_once_in_its_words(
        earlier_checkpoint, caplog):
    """The same resume with the healthy volumes chosen in another order warned twice, first in the command line's
    words ("make sure --steps 4 and --lr 0.0001 ..."): the check whether the checkpoint's run is this one in its own
    order said it too, without the panel's wording."""
    task = dict(earlier_checkpoint, subjects=earlier_checkpoint["subjects"][::-1])
    with caplog.at_level(logging.WARNING):
        run_adapt(task, lambda fraction, message: None)
    said = [r.getMessage() for r in caplog.records if "was written before an adaptation recorded" in r.getMessage()]
    assert len(said) == 1 and ": the panel resumes it with 4 steps" in said[0], said


def test_the_train_command_warning_of_a_default_rate_too_low_names_what_train_offers(tmp_path, caplog):
    """`cevae-anomaly train` calibrates the model it writes at its default rate: too few voxels there warned "give a
    higher --default-fpr", which train has not (calibrate has)."""
    volumes = [str(p) for s in write_heads(tmp_path, seeds=(7, 8), size=(28, 28, 28)) for p in (s.image, s.mask)]
    with caplog.at_level(logging.WARNING):
        assert main(["train", *volumes, "--out", str(tmp_path / "model.cevae"), "--max-steps", "2", "--channels",
                     "8,16,16,32", "--z-dim", "16", "--input-size", "64", "--batch-size", "8", "--checkpoint-every",
                     "2", "--val-fraction", "0", "--device", "cpu", "--no-augment"]) == 0
    text = _rate_warning(caplog.records)
    assert text.endswith("Calibrate on more healthy scans, or give a higher --default-fpr to `cevae-anomaly "
                         "calibrate` on the trained model."), text


def _summary(records: List[logging.LogRecord]) -> str:
    said = [r.getMessage() for r in records if r.getMessage().startswith("Adapted model written to ")]
    assert len(said) == 1, [r.getMessage() for r in records]
    return said[0]


def test_a_panels_adaptation_summary_says_how_to_detect_in_the_panels_words(coarse_site, caplog):
    """The summary an adaptation from the panel logs (Slicer's log, through the worker's output) ended "Detect with
    it: cevae-anomaly detect SCAN --model PATH", a command line, where the panel detects with its Model bundle."""
    with caplog.at_level(logging.INFO):
        run_adapt(coarse_site, lambda fraction, message: None)
    text = _summary(caplog.records)
    assert text.endswith(" there. To detect with it, choose it as the Model bundle (the panel does so when the "
                         "adaptation ends)"), text  # (no full stop: the command line's ends with a path)
    assert "--" not in text and "cevae-anomaly" not in text, text


def test_an_adaptation_summary_without_a_threshold_says_what_to_do_in_the_panels_words():
    """An adapted model whose threshold at the default rate is 0 (None: it would flag the whole brain) was said to the
    panel's user with "detect with a lower --fpr, or a --threshold"."""
    from CeVAEAnomalyLib.training.adapt import threshold_said

    text = threshold_said(None, PANEL_WORDING)
    assert text == ("none (it gets 0 there, which would flag the whole brain: detect with a lower false-positive rate "
                    "(Sensitivity: Chosen false-positive rate) or an absolute threshold (Sensitivity: Absolute "
                    "threshold))"), text
    assert threshold_said(None, COMMAND_LINE_ADAPT).endswith("detect with a lower --fpr, or a --threshold)")
    assert threshold_said(2.3577, PANEL_WORDING) == "2.36"


def test_the_panel_gives_every_phrase_in_its_own_words():
    """Every phrase of the panel's differs from the command line's train's and adapt's and names no option."""
    for field in fields(PANEL_WORDING):
        said = getattr(PANEL_WORDING, field.name)
        assert "--" not in said, field.name
        command_line = (getattr(COMMAND_LINE_TRAIN, field.name), getattr(COMMAND_LINE_ADAPT, field.name))
        assert not said or said not in command_line, field.name


def test_each_command_says_only_its_own_options():
    """errors.Wording's defaults were train's options with adapt's in some phrases: a caller giving no wording of its
    own, as adapt() from Python, told its user train's --max-steps. It has no defaults now; the command line's train
    and adapt each name their own options only."""
    with pytest.raises(TypeError):
        Wording()  # type: ignore[call-arg]
    for wording, others in ((COMMAND_LINE_TRAIN, ("--steps ", "adapt again")),
                            (COMMAND_LINE_ADAPT, ("--max-steps", "--channels", "--z-dim", "--input-size",
                                                  "--default-fpr", "train again"))):
        said = " ".join(str(getattr(wording, field.name)) for field in fields(wording))  # (option_names: pairs)
        assert not [flag for flag in others if flag in said], said


def _adapt_refusal(task: Dict[str, Any]) -> str:
    """The one line run_adapt refuses ``task`` with."""
    with pytest.raises(CeVAEError) as refused:
        run_adapt(task, lambda fraction, message: None)
    return str(refused.value)


def test_outputs_the_worker_refuses_say_what_to_do_in_the_panels_words(tiny_bundle, panel_task, tmp_path):
    """An adaptation the Slicer logic started (startAdaptation) to a folder, with its slice cache on its own
    checkpoint, or over an unfinished adaptation's earlier fold files was told to "pass --resume", "--overwrite",
    "choose another --out", of "--out" and "--cache-dir": the command line's options."""
    fresh = dict(panel_task, model=str(tiny_bundle), options=dict(panel_task["options"], resume=False))
    folder = tmp_path / "folder.cevae"
    folder.mkdir()
    text = _adapt_refusal(dict(fresh, out=str(folder)))
    assert text == (f"The file name for the adapted model {folder} is a folder; give the bundle's file name, e.g. "
                    f"{folder / 'model.cevae'}."), text
    ckpt = f"{fresh['out']}.ckpt"
    text = _adapt_refusal(dict(fresh, options=dict(fresh["options"], cache_dir=ckpt)))
    assert text == (f"The slice cache folder {ckpt} is the run's output {ckpt}; give the adaptation option cache_dir "
                    "a folder of its own."), text
    fold = tmp_path / "site.cevae.fold1"  # a fold's model of an earlier adaptation, without its checkpoint
    fold.write_bytes(b"an earlier fold model")
    text = _adapt_refusal(fresh)
    assert text.startswith(f"{fold} already exists (there is no checkpoint of the run that wrote it to resume); "), text
    assert text.endswith(f"{REPLACE}."), text
    assert "--" not in text, text


def test_an_earlier_runs_files_refused_in_the_panels_words_say_how_to_resume_or_start_anew(tmp_path):
    """The files of an unfinished run, with its checkpoint, were refused telling the panel's user to "pass --overwrite
    to replace it, or --resume to continue the run that wrote it"."""
    cfg = TrainConfig(out=tmp_path / "site.cevae")
    cfg.out.write_bytes(b"a model")
    cfg.checkpoint_path.write_bytes(b"a checkpoint")
    with pytest.raises(CeVAEError) as refused:
        cfg.check_outputs((), False, PANEL_WORDING)
    assert str(refused.value) == (f"{cfg.out} already exists; {RESUME} to continue the run that wrote it, or "
                                  f"{START_ANEW} to replace it."), str(refused.value)


def test_an_output_onto_an_input_the_worker_refuses_says_what_to_do_in_the_panels_words(tiny_bundle, panel_task):
    """An adaptation the Slicer logic started to write over the model it adapts was told to "choose another --out"."""
    text = _adapt_refusal(dict(panel_task, model=str(tiny_bundle), out=str(tiny_bundle)))
    assert text == (f"The output {tiny_bundle} is the same file as the input {tiny_bundle}; choose another file name "
                    "for the adapted model."), text


def test_a_full_disk_at_a_panels_first_checkpoint_says_what_to_do_in_the_panels_words(panel_trainer, monkeypatch):
    """A checkpoint write that failed before any checkpoint was kept told the panel's user to "run again", as the
    command line's."""
    def full_disk(obj: Any, f: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CeVAEError) as refused:
        panel_trainer.fit()
    text = str(refused.value)
    assert text.endswith("No checkpoint had been written yet. Free some space, then press Adapt again."), text


def test_a_scan_changed_before_a_panels_first_checkpoint_says_what_to_do_in_the_panels_words(tiny_bundle, panel_task):
    """A site scan rewritten once the scans were prepared, before the first run trained, was refused with the words
    "adapt again once the scan is as it should be" whatever the caller, not with the panel's Adapt button."""
    listed = [Subject(Path(s["image"]), Path(s["mask"])) for s in panel_task["subjects"]]
    first, second = content_order(listed, {p: sha256_of(p) for s in listed for p in (s.image, s.mask)})
    scan = second.image  # the one fold 1 trains on: it holds out the first in adapt's order (by content, not as listed)
    task = dict(panel_task, model=str(tiny_bundle), options=dict(panel_task["options"], resume=False))

    def rewrite_once_prepared(fraction: float, message: str) -> None:
        if message.startswith("Preparing the scans: prepared 2 of 2"):
            shutil.copyfile(first.image, scan)

    with pytest.raises(CeVAEError) as refused:
        run_adapt(task, rewrite_once_prepared)
    text = str(refused.value)
    assert text.startswith(f"{scan} changed since the adaptation began"), text
    assert text.endswith("No checkpoint was written yet: press Adapt again once the scan is as it should be."), text
    assert not list(Path(panel_task["out"]).parent.glob("site.cevae*"))


def test_a_panels_resume_with_a_model_trained_with_other_augmentation_names_only_the_model(tmp_path):
    """An adaptation fine-tunes with the augmentation its model was trained with, so a resume with another model of
    other augmentation differs in the model alone; the panel also said "it was started with other settings than the
    panel's (from the command line)", which its user never gave."""
    from CeVAEAnomalyLib.training.checkpoint import check_same_run, run_identity
    from CeVAEAnomalyLib.training.config import AugmentConfig

    def identity(sha256: str, augment: AugmentConfig) -> Dict[str, Any]:
        cfg = AdaptOptions().run_config(tmp_path / "site.cevae", "final", init_from=tmp_path / "base.cevae")
        return run_identity(replace(cfg, augment=augment).run_options(sha256), [], [], {})

    saved, current = identity("a" * 64, AugmentConfig()), identity("b" * 64, AugmentConfig(flip=0.0))
    with pytest.raises(CeVAEError) as refused:
        check_same_run(saved, current, tmp_path / "site.cevae.ckpt", PANEL_WORDING)
    assert f"belongs to another run: {PANEL_WORDING.other_model}. " in str(refused.value), str(refused.value)
    with pytest.raises(CeVAEError) as refused:
        check_same_run(saved, current, tmp_path / "site.cevae.ckpt", COMMAND_LINE_ADAPT)
    assert "augment.flip, set by --model (0.5 in the checkpoint, 0.0 now)" in str(refused.value), str(refused.value)


def test_a_panels_calibration_on_volumes_of_unknown_persons_says_how_to_name_them_in_the_panel(tmp_path, caplog):
    """Calibrate in the panel on volumes whose names say no person told its user to "name it in a 'subject' column" of
    a manifest, which the panel has not: there a person comes from a volume's name (sub-<label>_...)."""
    subjects = []
    for seed in (1, 2):
        image, mask = make_head(seed=seed, spacing=(4.0, 4.0, 4.0))
        sitk.WriteImage(image, str(tmp_path / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(tmp_path / f"h{seed}_mask.nii.gz"))
        subjects.append({"image": str(tmp_path / f"h{seed}.nii.gz"), "mask": str(tmp_path / f"h{seed}_mask.nii.gz")})
    task = dict(subjects=subjects, model=str(default_model_path()), request=DetectionRequest.of(device="cpu").to_dict(),
                out=str(tmp_path / "site.cevae"))
    with caplog.at_level(logging.INFO):
        run_calibrate(task, lambda fraction, message: None)
    said = [r.getMessage() for r in caplog.records if "taken for a different person" in r.getMessage()]
    assert len(said) == 1 and "manifest" not in said[0] and "sub-<label>_" in said[0], said
    assert said == [f"{PANEL_WORDING.unknown_persons} says who was scanned, so each of the 2 volumes is taken for a "
                    f"different person; where some are scans of one person (sessions), {PANEL_WORDING.same_person} "
                    "so that they are held out together."], said
