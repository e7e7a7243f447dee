"""What a resumed or repeated training or adaptation may change and what it may replace: an adaptation's runs share
their length and learning rate, a finished run's log is kept, the advice names only what works, the base model is
read once, and a cache deleted under a run is said in words."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig
from CeVAEAnomalyLib.errors import COMMAND_LINE_ADAPT, CeVAEError
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.cache import Entry, SliceSet
from CeVAEAnomalyLib.training.checkpoint import check_same_run, run_identity
from CeVAEAnomalyLib.training.config import LOG_HEADER, TrainConfig
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyLib.training.trainer import Trainer


def test_an_adaptation_resumed_with_other_steps_or_learning_rate_is_refused(tiny_bundle, tmp_path, caplog):
    """A fold finished with 8 steps and the others resumed with 3 calibrated the model with fold models of different
    lengths, and the bundle recorded 3 for every run."""
    out = tmp_path / "site.cevae"

    def identity(**options):
        cfg = AdaptOptions(**options).run_config(out, "fold1", init_from=tiny_bundle)
        return run_identity(cfg.run_options(), [], [], {})

    check_same_run(identity(steps=8), identity(steps=8, checkpoint_every=4), out)  # how often: may change
    with pytest.raises(CeVAEError, match=r"adaptation\.steps \(8 in the checkpoint, 3 now\)"):
        check_same_run(identity(steps=8), identity(steps=3), out)
    with pytest.raises(CeVAEError, match=r"adaptation\.lr \(0\.0001 in the checkpoint, 5e-05 now\)"):
        check_same_run(identity(steps=8), identity(steps=8, lr=5e-5), out)
    older = identity(steps=8)
    del older["options"]["adaptation"]  # written before adaptations recorded them: resumes, with a warning
    with caplog.at_level("WARNING"):
        check_same_run(older, identity(steps=8), out, COMMAND_LINE_ADAPT)
    assert "make sure --steps 8 and --lr 0.0001 are those it was started with" in caplog.text
    train = TrainConfig(out=out)  # a train run may be resumed to more steps or at a lower rate
    check_same_run(run_identity(train.run_options(), [], [], {}),
                   run_identity(dataclasses.replace(train, max_steps=9000, lr=1e-5).run_options(), [], [], {}), out)


def test_resume_and_overwrite_together_are_refused(capsys):
    for command in (["train", "x.nii.gz"], ["adapt", "x.nii.gz", "y.nii.gz"]):
        assert main([*command, "--out", "m.cevae", "--overwrite", "--resume"]) == 2
        assert "argument --resume: not allowed with argument --overwrite" in capsys.readouterr().err
    with pytest.raises(CeVAEError, match=r"resume continues an adaptation and overwrite starts anew"):
        AdaptOptions(resume=True, overwrite=True).validate()


def write_log(path: Path, rows) -> None:
    path.write_text(",".join(LOG_HEADER) + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))


def test_a_finished_runs_log_is_kept_and_a_run_stopped_before_its_first_checkpoint_is_replaced(tmp_path):
    cfg = TrainConfig(out=tmp_path / "m.cevae", checkpoint_every=20)
    early = [(10, 0.5, 0.1, 0.2, 0.2, "", 1.0, 100.0, "")]  # no checkpoint yet
    write_log(cfg.log_path, early)
    assert cfg.earlier_outputs() == ()
    cfg.check_outputs((), overwrite=False)
    write_log(cfg.log_path, [*early, (20, 0.4, 0.1, 0.2, 0.1, "", 2.0, 100.0, 1)])  # a checkpoint (no validation set)
    assert cfg.earlier_outputs() == (cfg.log_path,)  # the model and checkpoint moved away: the log is the run's record
    with pytest.raises(CeVAEError, match=r"m\.cevae\.log\.csv already exists \(there is no checkpoint of the run that "
                                         r"wrote it to resume\); pass --overwrite to train again and replace it, or "
                                         r"choose another --out"):
        cfg.check_outputs((), overwrite=False)


def test_an_existing_model_without_a_checkpoint_is_not_advised_to_be_resumed(tmp_path):
    cfg = TrainConfig(out=tmp_path / "m.cevae")
    cfg.out.write_bytes(b"a finished model")
    with pytest.raises(CeVAEError) as refused:
        cfg.check_outputs((), overwrite=False)
    assert "--resume" not in str(refused.value)  # "--resume was given but there is no checkpoint" came next
    cfg.checkpoint_path.write_bytes(b"a checkpoint")
    with pytest.raises(CeVAEError, match=r"; run again with --resume to continue the run that wrote it, or start "
                                         r"anew with --overwrite to replace it\.$"):
        cfg.check_outputs((), overwrite=False)


def test_given_start_weights_are_the_ones_a_fine_tuning_starts_from(tiny_bundle, tmp_path, head):
    """adapt loads its base once and gives every run those weights: a base file replaced during an adaptation
    started the later runs from the replacement."""
    base = load_bundle(tiny_bundle, "cpu")
    other = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in base.model.state_dict().items()}
    image, mask = head
    cfg = TrainConfig(out=tmp_path / "m.cevae", model=base.model_config, loss=LossConfig(), device="cpu",
                      val_fraction=0.0, init_from=tiny_bundle)
    started = Trainer(cfg, [Subject(image, mask)], base.preprocess, start_weights=other)
    assert all(torch.equal(a, b) for a, b in zip(started.model.state_dict().values(), other.values()))
    from_file = Trainer(cfg, [Subject(image, mask)], base.preprocess)
    assert all(torch.equal(a, b) for a, b in zip(from_file.model.state_dict().values(),
                                                 base.model.state_dict().values()))
    assert base.model_config == ModelConfig(**base.model_config.to_dict())


def test_slices_deleted_under_a_run_are_said_in_words(tmp_path):
    path = tmp_path / "slices.npy"
    np.save(path, np.zeros((3, 8, 8), np.float32))
    slices = SliceSet([Entry(path, 3, 128)], 8)
    assert slices[[0, 1]].shape == (2, 1, 8, 8)
    slices.close()
    path.unlink()  # the cache folder deleted while the run uses it
    with pytest.raises(CeVAEError, match=r"slices\.npy were removed while this run read them \(was the slice cache "
                                         r"deleted\?\)\. .* to go on from the last checkpoint, run again with "
                                         r"--resume\.$"):
        slices[[2]]


def test_a_resume_with_fewer_steps_than_its_checkpoint_is_refused(tmp_path, capsys):
    """--resume with --max-steps below the checkpoint's step ran no step and published the checkpoint's model as if
    asked for, saying nothing."""
    from conftest import write_cohort

    out = tmp_path / "m.cevae"
    common = ["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(out), "--checkpoint-every", "2",
              "--batch-size", "8", "--channels", "8,8,16,16", "--z-dim", "8", "--device", "cpu"]
    assert main([*common, "--max-steps", "4"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*common, "--max-steps", "2", "--resume"]) == 2
    assert (f"--resume refused: the checkpoint {out}.ckpt is at step 4, past --max-steps 2; give --max-steps 4 or "
            "more.") in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*common, "--max-steps", "6", "--resume"]) == 0


def test_a_refused_resume_names_the_callers_options_not_the_checkpoints_fields(tiny_bundle, tmp_path):
    """`adapt --resume --steps 30` of a run of 20 steps was refused naming "adaptation.steps (20 in the checkpoint, 30
    now)", a field of the checkpoint, not the option to give; train's named "loss.rec" for --rec-loss. The panel
    names what differs by kind, in its own words."""
    from CeVAEAnomalyLib.errors import COMMAND_LINE_TRAIN
    from CeVAEAnomalyLib.slicer.worker import PANEL_WORDING

    out = tmp_path / "site.cevae"

    def adaptation(**options):
        cfg = AdaptOptions(**options).run_config(out, "fold1", init_from=tiny_bundle)
        return run_identity(cfg.run_options(), [], [], {})

    def refusal(saved: dict, now: dict, wording) -> str:
        with pytest.raises(CeVAEError) as refused:
            check_same_run(saved, now, out, wording)
        return str(refused.value)

    said = refusal(adaptation(steps=20, seed=1), adaptation(steps=30, lr=5e-5), COMMAND_LINE_ADAPT)
    assert ("belongs to another run: --lr (0.0001 in the checkpoint, 5e-05 now); --steps (20 in the checkpoint, 30 "
            "now); --seed (1 in the checkpoint, 0 now). Resume with the same volumes and options") in said, said
    train = TrainConfig(out=out)
    said = refusal(run_identity(train.run_options(), [], [], {}),
                   run_identity(dataclasses.replace(train, loss=LossConfig(rec="l2"), val_fraction=0.5,
                                                    model=ModelConfig(z_dim=32)).run_options(), [], [], {}),
                   COMMAND_LINE_TRAIN)
    assert ("belongs to another run: --rec-loss ('l1' in the checkpoint, 'l2' now); --z-dim (256 in the checkpoint, "
            "32 now); --val-fraction (0.2 in the checkpoint, 0.5 now).") in said, said
    said = refusal(adaptation(steps=20), adaptation(steps=30), PANEL_WORDING)
    assert PANEL_WORDING.other_settings in said and "steps" not in said.split(": ", 1)[1], said


def test_a_resume_of_a_finished_training_is_refused_and_its_model_kept(tmp_path, capsys):
    """`train --resume` with the --max-steps a finished run ended at ran no step and wrote its model file again (its
    calibration and record redone) without a word; adapt refuses the same. A run stopped after its last checkpoint,
    before its model was written, still resumes to write it; a higher --max-steps goes on training."""
    from conftest import write_cohort

    out = tmp_path / "m.cevae"
    common = ["train", "--manifest", str(write_cohort(tmp_path)), "--out", str(out), "--checkpoint-every", "2",
              "--batch-size", "8", "--channels", "8,8,16,16", "--z-dim", "8", "--device", "cpu", "--max-steps", "2"]
    assert main(common) == 0
    before, written = out.read_bytes(), out.stat().st_mtime_ns
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2
    assert (f"error: The training to {out} is complete (its model file is written, at step 2); there is nothing to "
            "resume at --max-steps 2: give a higher --max-steps to train it further, or pass --overwrite to train "
            "again and replace it, or choose another --out.") in capsys.readouterr().err
    assert out.read_bytes() == before and out.stat().st_mtime_ns == written
    assert main([*common, "--overwrite"]) == 0
    out.write_bytes(before)  # as if stopped after its last checkpoint: the earlier model stays until it writes its own
    assert main([*common, "--resume"]) == 0 and out.read_bytes() != before
    out.unlink()  # stopped after its last checkpoint, before the model was written
    assert main([*common, "--resume"]) == 0 and out.is_file()
