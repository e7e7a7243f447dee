"""A Ctrl-C or SIGTERM during `train` or `adapt` ended in the one word "interrupted" (or "terminated"): after
minutes of fine-tuning a user could not tell that the checkpoints were kept and that `--resume` continues."""
from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.interrupts import Terminated
from CeVAEAnomalyLib.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--steps", "2", "--batch-size", "8", "--checkpoint-every", "1", "--device", "cpu"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """Two site scans (two persons): the shipped 2 mm Colin27 and a noisy copy, each with its brain mask."""
    folder = tmp_path / "site"
    folder.mkdir()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    noisy = sitk.AdditiveGaussianNoise(t1, 5.0, 0.0, 1)
    for name, image in (("a", t1), ("b", noisy)):
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
        (folder / f"{name}_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    return folder


def _stop_after_checkpoints(monkeypatch, n: int, signal: type) -> None:
    """Raise ``signal`` (what Ctrl-C or SIGTERM raise) once ``n`` checkpoints are written (0: at the first)."""
    save, written = Trainer.save_checkpoint, []

    def save_then_stop(self: Trainer) -> None:
        if len(written) == n:
            raise signal()
        save(self)
        written.append(self.step)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)


def test_an_interrupted_adaptation_says_its_checkpoints_are_kept_and_how_to_resume(tiny_bundle, site, tmp_path,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "site.cevae"
    _stop_after_checkpoints(monkeypatch, 1, KeyboardInterrupt)
    assert main(["adapt", str(site), "--model", str(tiny_bundle), "--out", str(out), *QUICK]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted; its checkpoints are kept (site.cevae.fold1.ckpt)") and \
        "same command with --resume" in last, last


def test_a_stop_before_the_first_checkpoint_says_there_is_nothing_to_resume(tiny_bundle, site, tmp_path,
                                                                            monkeypatch, capsys):
    out = tmp_path / "site.cevae"
    _stop_after_checkpoints(monkeypatch, 0, Terminated)
    assert main(["adapt", str(site), "--model", str(tiny_bundle), "--out", str(out), *QUICK]) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("terminated before its first checkpoint: nothing to resume"), last
    assert main(["adapt", str(site), "--model", str(tiny_bundle), "--out", str(out), *QUICK, "--resume"]) == 2


def test_an_interrupted_training_names_its_checkpoint(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "healthy.csv"
    image, mask = data_path("colin27_t1_2mm.nii.gz"), data_path("colin27_brainmask_2mm.nii.gz")
    manifest.write_text(f"image,mask\n{image},{mask}\n")
    out = tmp_path / "my.cevae"
    _stop_after_checkpoints(monkeypatch, 1, KeyboardInterrupt)
    assert main(["train", "--manifest", str(manifest), "--out", str(out), "--max-steps", "3", "--batch-size", "8",
                 "--checkpoint-every", "1", "--device", "cpu"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted; its checkpoints are kept (my.cevae.ckpt)"), last
