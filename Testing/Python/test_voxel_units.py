"""Scans whose header gives a voxel size in other units (a whole head a few millimetres or metres wide)."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.io.images import read_image


def test_a_head_a_few_millimetres_wide_is_refused_in_one_line(tiny_bundle, tmp_path: Path, capsys):
    """A head of 40 x 44 x 36 voxels of 0.02 mm (0.9 mm wide: a voxel size in other units; each voxel size allowed)
    ended detect without a mask in "unexpected IndexError: index -1 is out of bounds" (the automatic brain mask's
    4 mm grid over it is one voxel), while 0.07 mm voxels were refused as too thin for that mask. With a mask it is
    scored (test_detector)."""
    image, _ = make_head(spacing=(0.02, 0.02, 0.02))
    path = tmp_path / "tiny.nii.gz"
    sitk.WriteImage(image, str(path))
    assert main(["detect", str(path), "--score", str(tmp_path / "s.nii.gz"), "--model", str(tiny_bundle),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "error: The image spans at most 0.88 mm (44 voxels of 0.02 mm along its j axis): too little for the automatic "
        "brain mask, and an MRI of a head spans several centimetres, so its header's voxel size may be wrong (or in "
        "other units). Fix the header, or give a brain mask with --mask (in Slicer: choose a brain mask).\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.nii.gz"]


def test_voxels_of_the_smallest_size_said_allowed_are_read(tmp_path: Path):
    """Voxels of 0.01 mm in a NIfTI file (stored as float32: 0.0099999998) were refused as "voxels of 0.01 x 1 x 1 mm;
    an MRI of a head has voxels of 0.01 to 50 mm", a message at odds with itself; 50 mm is stored exactly."""
    image, _ = make_head(spacing=(0.01, 1.0, 1.0))
    path = tmp_path / "fine.nii.gz"
    sitk.WriteImage(image, str(path))
    assert read_image(path).GetSpacing()[0] < 0.01  # (the header's float32 value)
    assert read_image(path).GetSize() == (40, 44, 36)
