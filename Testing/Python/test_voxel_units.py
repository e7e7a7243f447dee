"""Scans whose header gives a voxel size in other units (a whole head a few millimetres or metres wide)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head, write_cohort
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.detector import brain_size_problem
from CeVAEAnomalyLib.io.images import read_image

DATA = Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomalyLib" / "data"


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


def test_every_automatic_mask_refuses_a_head_a_few_millimetres_wide():
    """The refusal is the brain mask's own, so every caller of it says it: detect and calibrate, and training and
    prepare without masks (given_or_computed_mask), where such a head ended in the same IndexError."""
    from CeVAEAnomalyLib.engine.brainmask import given_or_computed_mask
    from CeVAEAnomalyLib.errors import CeVAEError

    image, _ = make_head(spacing=(0.02, 0.02, 0.02))
    with pytest.raises(CeVAEError, match=r"^The image spans at most 0.88 mm \(44 voxels of 0.02 mm along its j axis\)"):
        given_or_computed_mask(image, None, "tiny.nii.gz")


def test_voxels_of_the_smallest_size_said_allowed_are_read(tmp_path: Path):
    """Voxels of 0.01 mm in a NIfTI file (stored as float32: 0.0099999998) were refused as "voxels of 0.01 x 1 x 1 mm;
    an MRI of a head has voxels of 0.01 to 50 mm", a message at odds with itself; 50 mm is stored exactly."""
    image, _ = make_head(spacing=(0.01, 1.0, 1.0))
    path = tmp_path / "fine.nii.gz"
    sitk.WriteImage(image, str(path))
    assert read_image(path).GetSpacing()[0] < 0.01  # (the header's float32 value)
    assert read_image(path).GetSize() == (40, 44, 36)


SIZE_WARNING = "a human adult brain spans about 140 to 190 mm and holds about 1000 to 1700 ml"


def _warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_head_in_centimetres_is_told_first_and_once(tmp_path: Path, caplog):
    """colin27 with its voxel size in centimetres (0.2 for 2 mm: the head 18 to 22 mm wide) was scored with no word of
    its size; the automatic mask called it skull-stripped and partial, the detector warned of a post-contrast bright
    tail, and the mm and ml were off by 10 to 1000 times. The brain's size is said first, once; no bright tail."""
    image = read_image(DATA / "colin27_t1_2mm.nii.gz")
    image.SetSpacing((0.2, 0.2, 0.2))
    path, record = tmp_path / "cm.nii.gz", tmp_path / "r.json"
    sitk.WriteImage(image, str(path))
    with caplog.at_level(logging.WARNING):
        assert main(["detect", str(path), "--score", str(tmp_path / "s.nii.gz"), "--record", str(record),
                     "--device", "cpu"]) == 0
    said = _warnings(caplog)
    assert SIZE_WARNING in said[0] and sum(SIZE_WARNING in w for w in said) == 1
    assert not any("bright tail" in w for w in said)
    recorded = json.loads(record.read_text())["warnings"]
    assert SIZE_WARNING in recorded[0] and "spans 21.4 mm and holds 4.31 ml" in recorded[0]


def test_calibrate_and_batch_tell_the_size_of_each_brain_once(tiny_bundle, tmp_path: Path, caplog):
    """Healthy scans and a cohort's with masks, in voxels of 0.5 mm (brains 15 mm wide), were taken without a word."""
    listing = write_cohort(tmp_path, spacing=(0.5, 0.5, 0.5))
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", "--manifest", str(listing), "--model", str(tiny_bundle), "--out",
                     str(tmp_path / "c.cevae"), "--device", "cpu"]) == 0
    said = [w for w in _warnings(caplog) if SIZE_WARNING in w]
    assert len(said) == 2 and said[0].startswith(f"{tmp_path / 'h1.nii.gz'}: The brain (its mask) spans 15 mm")
    assert main(["batch", str(listing), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_bundle),
                 "--device", "cpu", "--threshold", "0.3"]) == 0
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["warnings"].count(SIZE_WARNING) for r in rows] == [1, 1]


def test_a_brain_of_a_human_size_is_not_warned_of(tmp_path: Path):
    """The six healthy heads' masks span 159 to 184 mm; a tenth of that is warned of, the heads are not."""
    mask = sitk.GetArrayFromImage(read_image(DATA / "colin27_brainmask_2mm.nii.gz")) > 0
    assert brain_size_problem(mask, (2.0, 2.0, 2.0)) is None
    assert "spans 18 mm" in brain_size_problem(mask, (0.2, 0.2, 0.2))
    few = np.zeros_like(mask)
    few[40:43, 50:53, 40:43] = True  # a mask of a few voxels in a head's image: the mask is at fault, not the units
    assert brain_size_problem(few, (2.0, 2.0, 2.0)) is None
