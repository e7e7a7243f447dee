"""A slab too thin for the automatic brain mask's registration is refused in plain words, before registering."""
from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import template_dir
from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_T1, compute_brain_mask
from CeVAEAnomalyLib.errors import CeVAEError

HEALTHY = SHARED_DATA / "colin27_t1.nii.gz"  # colin27 at 1 mm, where this machine has it


def colin(spacing_mm: int) -> sitk.Image:
    path = template_dir() / TEMPLATE_T1 if spacing_mm == 2 else HEALTHY
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


@pytest.mark.parametrize("spacing_mm, first, slices", [(2, 40, 4), (2, 40, 6), (1, 80, 12), (1, 80, 13)])
def test_a_thin_slab_of_a_head_is_refused_before_registering(tiny_bundle, tmp_path: Path, capsys, spacing_mm, first,
                                                             slices):
    """detect without --mask on 12 slices of colin27 at 1 mm (or 4 to 6 at 2 mm) failed with ITK's "Brain-mask
    registration failed (The number of pixels along dimension 2 is less than 4. This filter requires ...)"."""
    slab = tmp_path / "slab.nii.gz"
    sitk.WriteImage(colin(spacing_mm)[:, :, first:first + slices], str(slab))
    assert main(["detect", str(slab), "--score", str(tmp_path / "s.nii.gz"), "--model", str(tiny_bundle),
                 "--device", "cpu"]) == 2
    mm = slices * spacing_mm
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: The scan covers only {mm} mm along its k axis ({slices} voxels of {spacing_mm} mm): too little for "
        "the automatic brain mask, which registers a template on a 4 mm grid and needs 4 of its voxels along each axis "
        "(at least 14 mm). Give a brain mask with --mask (in Slicer: choose a brain mask).")
    assert not (tmp_path / "s.nii.gz").exists()


@pytest.mark.parametrize("spacing_mm, first, slices", [(2, 40, 7), (1, 80, 14)])
def test_a_slab_of_the_extent_the_refusal_names_is_masked(spacing_mm, first, slices):
    """The 14 mm the refusal asks for are enough."""
    mask = compute_brain_mask(colin(spacing_mm)[:, :, first:first + slices])
    assert sitk.GetArrayViewFromImage(mask).any()


def test_a_thin_slab_is_refused_by_the_library_too():
    with pytest.raises(CeVAEError, match=r"^The scan covers only 10 mm along its k axis"):
        compute_brain_mask(colin(2)[:, :, 40:45])
