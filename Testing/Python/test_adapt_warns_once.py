"""`cevae-anomaly adapt` (and `train`) warn of a given brain mask of several values, or of NaN voxels in a scan's brain,
once per scan: the run masks each scan for its slices and again for its calibration, and said both warnings twice."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.engine.preprocess import brain_array

pytestmark = pytest.mark.usefixtures("one_thread")
SEVERAL = "The brain mask holds several values"
NAN = "brain voxels are NaN or infinite"


@pytest.fixture
def site(tmp_path) -> Path:
    """A folder of two site scans of Colin27 at 2 mm (shipped with the package): a.nii.gz with a mask of values 1 and
    2 (its upper half 2), and a noisy copy b.nii.gz with 5 NaN voxels in its brain and the plain mask."""
    folder = tmp_path / "site"
    folder.mkdir()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    shutil.copyfile(data_path("colin27_t1_2mm.nii.gz"), folder / "a.nii.gz")
    labels = sitk.GetArrayFromImage(mask).astype(np.uint8)
    labels[labels.shape[0] // 2:][labels[labels.shape[0] // 2:] > 0] = 2
    _write(labels, mask, folder / "a_mask.nii.gz")
    voxels = sitk.GetArrayFromImage(t1)
    voxels = voxels + np.random.default_rng(1).normal(0, 0.03 * voxels.max(), voxels.shape).astype(np.float32)
    for index in np.argwhere(labels > 0)[:5]:
        voxels[tuple(index)] = np.nan
    _write(voxels, t1, folder / "b.nii.gz")
    shutil.copyfile(data_path("colin27_brainmask_2mm.nii.gz"), folder / "b_mask.nii.gz")
    return folder


def _write(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))


def _said(records: List[logging.LogRecord], words: str) -> List[str]:
    return [r.getMessage() for r in records if words in r.getMessage()]


def test_the_adapt_command_warns_of_a_mask_of_several_values_and_of_nan_voxels_once_per_scan(
        tiny_bundle, site, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["adapt", str(site), "--model", str(tiny_bundle), "--out", str(tmp_path / "site.cevae"),
                     "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu"]) == 0
    assert _said(caplog.records, SEVERAL) == [
        f"{site / 'a.nii.gz'}: {SEVERAL} (1 to 2); every voxel above 0 is taken as brain."], caplog.text
    assert _said(caplog.records, NAN) == [
        f"{site / 'b.nii.gz'}: 5 {NAN}; they are left out of the brain."], caplog.text


def test_outside_a_run_each_masking_says_what_it_finds(site, caplog):
    """(A detection's scan, or a batch's: the run's filter lets them through.)"""
    import CeVAEAnomalyLib.training.said_once  # noqa: F401 - its filter installed, as in a session that trained

    image = sitk.ReadImage(str(site / "a.nii.gz"))
    mask = sitk.ReadImage(str(site / "a_mask.nii.gz"))
    with caplog.at_level(logging.WARNING):
        brain_array(image, mask, "a: ")
        brain_array(image, mask, "a: ")
    assert len(_said(caplog.records, SEVERAL)) == 2, caplog.text
