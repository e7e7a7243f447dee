"""What detection says about a volume's brain mask: in a cohort, which volume; an empty mask, refused at once."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import as_hounsfield, make_head
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import template_dir
from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_T1


def test_batch_warnings_name_the_volume(tiny_bundle, tmp_path: Path, caplog):
    """batch logged "10 brain voxels are NaN ..." and "The brain mask is on another grid ..." without saying of
    which volume; so were the automatic brain mask's warnings."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    image, mask = make_head(size=(36, 40, 30), seed=20)
    values = sitk.GetArrayFromImage(image)
    values[15, 20, 10:20] = np.nan  # 10 voxels inside the brain
    holed = sitk.GetImageFromArray(values)
    holed.CopyInformation(image)
    sitk.WriteImage(holed, str(cohort / "nan1.nii.gz"))
    mask.SetOrigin(tuple(o + 0.5 for o in mask.GetOrigin()))  # half a voxel off: another grid, the same brain
    sitk.WriteImage(mask, str(cohort / "nan1_mask.nii.gz"))
    colin = sitk.ReadImage(str(template_dir() / TEMPLATE_T1), sitk.sitkFloat32)
    sitk.WriteImage(colin[:, :, 40:47], str(cohort / "slab2.nii.gz"))  # 14 mm: the automatic mask reaches the edge
    ct, ct_mask = make_head(size=(36, 40, 30), seed=21)
    sitk.WriteImage(as_hounsfield(ct), str(cohort / "ct3.nii.gz"))
    sitk.WriteImage(ct_mask, str(cohort / "ct3_mask.nii.gz"))
    with caplog.at_level(logging.WARNING):
        assert main(["batch", str(cohort), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_bundle),
                     "--device", "cpu"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "nan1: 10 brain voxels are NaN or infinite; they are left out of the brain." in warned
    assert "nan1: The brain mask is on another grid than the image; resampling it (nearest neighbour)." in warned
    assert any(w.startswith("slab2: The automatic brain mask reaches the edge of the image") for w in warned)
    assert any(w.startswith("ct3: The intensities look like a CT") for w in warned)
    assert [w for w in warned if ("brain" in w or "intensities" in w)
            and not w.startswith(("nan1: ", "slab2: ", "ct3: "))] == []


def test_an_all_zero_mask_is_refused_without_a_warning_that_it_covers_little(tiny_bundle, tmp_path: Path, caplog,
                                                                             capsys):
    """An all-zero --mask gave "WARNING: The brain mask covers only 0.0 ml: too little ..." and then "error: The
    brain mask is empty"."""
    image, mask = make_head(size=(36, 40, 30), seed=20)
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    sitk.WriteImage(mask * 0, str(tmp_path / "zeros.nii.gz"))
    with caplog.at_level(logging.WARNING):
        assert main(["detect", str(tmp_path / "head.nii.gz"), "--mask", str(tmp_path / "zeros.nii.gz"), "--model",
                     str(tiny_bundle), "--device", "cpu", "--score", str(tmp_path / "s.nii.gz")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: The brain mask is empty: no voxel is inside the brain (> 0). Give the brain mask of this scan, or none "
        "for the automatic one.")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert not (tmp_path / "s.nii.gz").exists()
