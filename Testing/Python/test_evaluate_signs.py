"""evaluate reads a mask, ground truth and label map as detect reads a brain mask: > 0 is foreground."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main

SHAPE = (8, 8, 8)  # (z, y, x)


def write(array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 1.0, 1.5))
    sitk.WriteImage(image, str(path))
    return path


def evaluate(tmp_path: Path, background: float, dtype: type) -> dict:
    """The metrics ``evaluate`` writes for one case whose mask, truth and label map hold ``background`` outside."""
    score = np.zeros(SHAPE, np.float32)
    score[1, 2, 1:4] = [0.6, 0.9, 0.8]
    score[3, 0, 0] = 5.0  # outside the mask
    inside = np.zeros(SHAPE, bool)
    inside[:3, 1:4, 1:5] = True
    lesion = np.zeros(SHAPE, bool)
    lesion[1, 2, 2:4] = True
    files = {"score": write(score, tmp_path / "score.nii.gz")}
    for role, foreground in (("mask", inside), ("gt", lesion), ("labelmap", score >= 0.6)):
        files[role] = write(np.where(foreground, 1, background).astype(dtype), tmp_path / f"{role}.nii.gz")
    (tmp_path / "cases.csv").write_text("score,gt,mask,labelmap,name\n"
                                        + ",".join(str(files[k]) for k in ("score", "gt", "mask", "labelmap"))
                                        + ",case\n")
    assert main(["evaluate", "--cases", str(tmp_path / "cases.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    with open(tmp_path / "m.csv", newline="") as stream:
        return next(csv.DictReader(stream))


@pytest.mark.parametrize("background, dtype", [(np.nan, np.float32), (-1, np.int16), (-1.0, np.float32)],
                         ids=["NaN", "-1", "-1.0"])
def test_nan_and_negative_backgrounds_are_background(tmp_path: Path, background: float, dtype: type) -> None:
    """A mask with NaN outside made every voxel evaluated; a truth with -1 outside made every voxel lesion (AUPRC
    1.0 whatever the scores); a label map's -1 voxels counted as flagged."""
    row = evaluate(tmp_path, background, dtype)
    assert (row["n_voxels"], row["n_positive"]) == ("36", "2")  # the 36 voxels above 0 in the mask, 2 lesion
    assert float(row["auroc"]) == 1.0 and float(row["auprc"]) == 1.0
    assert float(row["flagged_ml"]) == pytest.approx(4 * 3.0 / 1000)  # the 4 voxels scoring >= 0.6
    assert float(row["dice_at_threshold"]) == pytest.approx(2 * 2 / (3 + 2))  # 3 flagged in the mask, 2 lesion
