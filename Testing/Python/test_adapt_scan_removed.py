"""A site scan removed (or replaced by a folder) during an adaptation, between its runs, is refused by name as the next
run that trains on it begins, saying what to do: the run built then hashed it and failed with the raw "... is not a
regular file or a folder" (a folder in its place: "contains no DICOM series"), and a run built before the first (a
resume's) called it "changed ... (replaced or rewritten)"."""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.progress import Cancelled
from CeVAEAnomalyLib.slicer.worker import PANEL_WORDING
from CeVAEAnomalyLib.training.adapt import adapt
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.trainer import content_order

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = AdaptOptions(steps=2, batch_size=8, checkpoint_every=2, device="cpu")


@pytest.fixture
def scans(tmp_path) -> List[Subject]:
    """Colin27 at 2 mm (shipped with the package) and a noisy copy, with its brain mask: two site scans, listed in the
    order adapt takes them, by their content (fold 1 trains on the second alone, fold 2 on the first alone, the final
    run on both)."""
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = Path(shutil.copyfile(data_path("colin27_brainmask_2mm.nii.gz"), tmp_path / "mask.nii.gz"))
    voxels = sitk.GetArrayFromImage(t1)
    subjects = []
    for n, name in enumerate("ab"):
        image = sitk.GetImageFromArray(voxels + np.random.default_rng(n).normal(0, 0.03 * voxels.max(), voxels.shape))
        image.CopyInformation(t1)
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        subjects.append(Subject(tmp_path / f"{name}.nii.gz", mask))
    return content_order(subjects, {p: sha256_of(p) for s in subjects for p in (s.image, s.mask)})


def _removing(scan: Path, when: str, folder: bool = False) -> Callable[[float, str], None]:
    """A progress callback that removes ``scan`` (leaving an empty folder in its place if ``folder``) at the first
    message that starts with ``when``."""
    def remove(fraction: float, message: str) -> None:
        if message.startswith(when) and scan.is_file():
            scan.unlink()
            if folder:
                scan.mkdir()
    return remove


@pytest.mark.parametrize("role, said, train", [("image", "scan", "on"), ("mask", "brain mask", "with")])
def test_a_scan_or_mask_removed_after_the_first_run_is_refused_by_name_saying_what_to_do(tiny_bundle, scans, tmp_path,
                                                                                        role, said, train):
    """A scan removed between runs got a raw "is not a regular file or a folder"; a removed brain mask was called
    "the scan" to put back."""
    out = tmp_path / "site.cevae"
    removed = getattr(scans[0], role)
    with pytest.raises(CeVAEError) as refused:
        adapt(tiny_bundle, scans, out, QUICK, _removing(removed, "Fine-tuning 1/3"))
    assert str(refused.value) == (
        f"{removed} was removed during the adaptation, so its next run cannot train {train} it. The checkpoints"
        f" written so far are kept: with the {said} put back, run again with --resume, or leave it "
        "out and start anew with --overwrite.")
    assert Path(f"{out}.fold1.ckpt").is_file() and not Path(f"{out}.fold2.ckpt").exists()
    trained = torch.load(Path(f"{out}.fold1.ckpt"), map_location="cpu", weights_only=True)["run"]["train"]
    assert [Path(v["image"]) for v in trained] == [scans[1].image]  # fold 1 held the first out, as the fixture says


def test_a_scan_replaced_by_a_folder_before_the_final_run_is_refused_as_replaced(tiny_bundle, scans, tmp_path):
    """(The final run, on both scans, read the folder as a DICOM series: "contains no DICOM series".)"""
    with pytest.raises(CeVAEError, match=rf"^{re.escape(str(scans[1].image))} changed since the adaptation began "
                                         r"\(replaced or rewritten\)"):
        adapt(tiny_bundle, scans, tmp_path / "site.cevae", QUICK,
              _removing(scans[1].image, "Fine-tuning 2/3", folder=True))


def test_a_scan_removed_before_the_first_checkpoint_says_what_to_do_in_the_callers_words(tiny_bundle, scans,
                                                                                         tmp_path):
    with pytest.raises(CeVAEError) as refused:
        adapt(tiny_bundle, scans, tmp_path / "site.cevae", QUICK,
              _removing(scans[1].image, "Preparing the scans: prepared 2 of 2"), wording=PANEL_WORDING)
    assert str(refused.value) == (
        f"{scans[1].image} was removed during the adaptation, so its next run cannot train on it. No checkpoint was "
        "written yet: put the scan back, or leave it out, and press Adapt again.")


class _RemoveWhenResumed(logging.Handler):
    """Removes ``scan`` once the run whose checkpoint is ``checkpoint`` says it resumed: after every run of the resume
    was built (its scans hashed)."""

    def __init__(self, checkpoint: Path, scan: Path) -> None:
        super().__init__(logging.INFO)
        self.said, self.scan = f"Resumed from {checkpoint} ", scan

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.said):
            self.scan.unlink(missing_ok=True)


def test_a_scan_removed_during_a_resume_is_refused_as_removed(tiny_bundle, scans, tmp_path, caplog):
    out = tmp_path / "site.cevae"

    def stop_after_the_second_run(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 3/3"):
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        adapt(tiny_bundle, scans, out, QUICK, stop_after_the_second_run)
    remove = _RemoveWhenResumed(Path(f"{out}.fold1.ckpt"), scans[0].image)
    logging.getLogger("CeVAEAnomalyLib").addHandler(remove)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(CeVAEError) as refused:
            adapt(tiny_bundle, scans, out, replace(QUICK, resume=True))
    finally:
        logging.getLogger("CeVAEAnomalyLib").removeHandler(remove)
    assert str(refused.value) == (
        f"{scans[0].image} was removed during the adaptation, so its next run cannot train on it. The checkpoints "
        "written so far are kept: with the scan put back, run again with --resume, or leave it out and start anew "
        "with --overwrite instead of --resume.")


def test_a_brain_mask_rewritten_before_the_first_checkpoint_is_called_a_mask(tiny_bundle, scans, tmp_path):
    """The refusal told a user whose brain mask was rewritten to run again "once the scan is as it should be"."""
    mask = scans[0].mask

    def rewrite(fraction: float, message: str) -> None:
        if message.startswith("Preparing the scans: prepared 2 of 2"):
            mask.write_bytes(scans[0].image.read_bytes())

    with pytest.raises(CeVAEError) as refused:
        adapt(tiny_bundle, scans, tmp_path / "site.cevae", QUICK, rewrite)
    assert str(refused.value).endswith(
        "No checkpoint was written yet: run again once the brain mask is as it should be."), refused.value
