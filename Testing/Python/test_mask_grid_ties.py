"""A brain mask on a coarser grid than the scan, whose voxel centres fall exactly between the scan's: every other scan
voxel is as near to one mask voxel as to the next, and nearest-neighbour resampling breaks the tie by the mask's
index order and the last bits of both grids' matrices. Scripts/DetectVolume.py must take the brain detect takes from
the same files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head, oblique_direction

pytest.importorskip("slicer")

LEFT_HANDED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # FSL's LAS NIfTI: Slicer reverses its slice axis


def coarse_mask(mask: sitk.Image) -> sitk.Image:
    """``mask`` on a grid of twice its voxel size from the same first voxel centre: each odd voxel of ``mask``'s grid
    lies exactly between two voxel centres of the new one."""
    grid = sitk.Image([n // 2 for n in mask.GetSize()], sitk.sitkUInt8)
    grid.SetSpacing([2 * s for s in mask.GetSpacing()])
    grid.SetOrigin(mask.GetOrigin())
    grid.SetDirection(mask.GetDirection())
    return sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


@pytest.mark.parametrize("direction, suffix", [(LEFT_HANDED, ".nii.gz"), (oblique_direction(25.0), ".nrrd")],
                         ids=["left-handed", "oblique"])
def test_detect_volume_takes_detects_brain_from_a_mask_whose_voxels_tie(script, tiny_bundle, tmp_path: Path,
                                                                         direction, suffix):
    """The script gave a brain thousands of voxels apart from detect's: Slicer reverses a left-handed mask's slice
    axis (a tie fell the other way) and reads an oblique grid's matrices a few bits off the file's."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyLib.engine.preprocess import mask_array

    image, mask = make_head(direction=direction, spacing=(1.1, 0.9, 1.6), origin=(-20.3, 10.7, 5.1), seed=7)
    scan, brain = tmp_path / f"head{suffix}", tmp_path / f"head_mask{suffix}"
    sitk.WriteImage(image, str(scan))
    sitk.WriteImage(coarse_mask(mask), str(brain))
    out = tmp_path / "results"
    assert script.main(["--input", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--output-dir",
                        str(out), "--device", "cpu", "--threshold", "0.3"]) == 0
    image, mask = sitk.ReadImage(str(scan)), sitk.ReadImage(str(brain))
    direct = detect(image, load_bundle(tiny_bundle, "cpu"), mask, threshold=0.3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(direct.brain_mask) > 0, mask_array(mask, image))
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "head_score.nrrd"))),
                               sitk.GetArrayFromImage(direct.score), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "head_labelmap.nrrd"))),
                                  sitk.GetArrayFromImage(direct.labelmap))
    with open(out / "head_record.json") as fh:
        assert json.load(fh)["warnings"] == list(direct.record.warnings)  # the resampling said, as detect says it
