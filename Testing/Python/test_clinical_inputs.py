"""Clinical-looking inputs built from the bundled colin27 head (2 mm, with skull) and its brain mask: what detect says
of them is what holds for them."""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import template_dir
from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import detect
from CeVAEAnomalyLib.io.images import warn_if_ct_range
from CeVAEAnomalyResearch.acquisition import slab_average


@pytest.fixture(scope="module")
def colin():
    """(T1 head as float32, its brain mask) on the bundled 2 mm grid."""
    return (sitk.ReadImage(str(template_dir() / TEMPLATE_T1), sitk.sitkFloat32),
            sitk.ReadImage(str(template_dir() / TEMPLATE_MASK)))


def _like(values: np.ndarray, ref: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(ref)
    return image


def _hounsfield_head(t1: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """A CT-like head on the T1's grid: air -1000, scalp 40, a skull of bone at 1200 (700 to 2000 with noise
    of 4), brain 20 to 40 and CSF about 8 HU."""
    values, brain = sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(mask) > 0
    head = values > 5
    skull = head & ndimage.binary_erosion(head, iterations=3) & ~ndimage.binary_dilation(brain, iterations=4)
    hu = np.where(head, 40.0, -1000.0)
    hu[skull] = 1200.0
    hu[brain] = np.where(values[brain] > 40, 38.0, np.where(values[brain] > 20, 28.0, 8.0))
    hu += np.random.default_rng(0).normal(0.0, 4.0, hu.shape)
    return _like(hu.astype(np.float32), t1)


def test_an_mri_with_an_offset_or_negative_outliers_is_not_called_a_ct(tiny_bundle, colin, caplog):
    """The warning fired on the minimum alone (<= -500): an MRI stored with a -500 offset, or with a few negative
    outlier voxels, was said to look like a CT whose scores would not be meaningful, though the offset one scored
    exactly as the original. A CT-range head (air, soft tissue, bone) is still warned of."""
    bundle = load_bundle(tiny_bundle, "cpu")
    t1, mask = colin
    values = sitk.GetArrayFromImage(t1)
    outliers = values.copy()
    outliers.flat[np.random.default_rng(1).choice(values.size, 20, replace=False)] = -800.0
    plain = detect(t1, bundle, mask, threshold=1.0)
    with caplog.at_level(logging.WARNING):
        offset = detect(_like(values - 500.0, t1), bundle, mask, threshold=1.0)
        detect(_like(outliers, t1), bundle, mask, threshold=1.0)
    assert "CT" not in caplog.text
    np.testing.assert_array_equal(sitk.GetArrayFromImage(offset.score), sitk.GetArrayFromImage(plain.score))
    with caplog.at_level(logging.WARNING):
        detect(_hounsfield_head(t1, mask), bundle, mask, threshold=1.0)
    assert "look like a CT in Hounsfield units" in caplog.text


def _outside_the_head(t1: sitk.Image) -> np.ndarray:
    """The (k, j, i) voxels of the T1 outside its head (holes filled): where converters write their padding."""
    return ~ndimage.binary_fill_holes(sitk.GetArrayFromImage(t1) > 5)


@pytest.mark.parametrize("pad, dtype", [(-1024, np.float32), (-1000, np.int16), (-1024, np.int16)])
def test_an_mri_padded_with_minus_1024_outside_the_head_is_not_called_a_ct(colin, caplog, pad, dtype):
    """An MRI whose background a converter or a resampling tool set to -1024 (or -1000) was said to look like a CT in
    Hounsfield units: its padding, one constant value, counted as air. A CT's air is noisy."""
    t1, _ = colin
    values = sitk.GetArrayFromImage(t1)
    values[_outside_the_head(t1)] = pad
    with caplog.at_level(logging.WARNING):
        assert not warn_if_ct_range(_like(np.round(values).astype(dtype), t1), "T1")
    assert "CT" not in caplog.text


@pytest.mark.parametrize("pad", [-3024, -2048, -1024, -1000])
def test_a_ct_padded_outside_its_circular_field_of_view_is_still_called_a_ct(colin, caplog, pad):
    """A CT's scanner writes a constant (-3024, -2048, -1024 ...) outside its circular field of view, and the noisy
    air inside it is air: such a CT is still warned of, also where the padding holds most of the air band."""
    t1, mask = colin
    hu = np.round(sitk.GetArrayFromImage(_hounsfield_head(t1, mask)))
    _, nj, ni = hu.shape
    jj, ii = np.mgrid[:nj, :ni]
    hu[:, (jj - nj / 2) ** 2 + (ii - ni / 2) ** 2 > (0.45 * min(nj, ni)) ** 2] = pad
    air_band = (hu >= -1100) & (hu <= -900)
    assert pad < -1100 or np.mean(hu[air_band] == pad) > 0.5  # -1024 and -1000: the padding is most of the air band
    with caplog.at_level(logging.WARNING):
        assert warn_if_ct_range(_like(hu.astype(np.int16), t1), "T1")
    assert "look like a CT in Hounsfield units" in caplog.text


def _top_third(image: sitk.Image) -> sitk.Image:
    """The upper third of a head on the bundled grid (its k axis runs to superior): a scan of part of the head."""
    return image[:, :, 2 * image.GetSize()[2] // 3:]


# sha256 of the automatic (scored) mask of colin27's upper third as it was made before its volume warning changed
_TOP_THIRD_MASK_SHA256 = "0866dcda882e053e2529cb2814d6f53a85544c56daf322b4cbc5a3eb99324579"


def test_a_scan_of_part_of_the_head_is_said_to_be_so_with_a_given_mask_too(tiny_bundle, colin, tmp_path, caplog):
    """The upper third of a head with its own (cropped) brain mask was scored without a word of its coverage, while
    the automatic mask's path said "covers part of the head"; that path also called the part of a brain it holds
    an implausible brain volume. The automatic mask itself is unchanged; a whole brain cropped to its bounding box
    is no partial scan."""
    t1, mask = colin
    sitk.WriteImage(_top_third(t1), str(tmp_path / "top.nii.gz"))
    sitk.WriteImage(_top_third(mask), str(tmp_path / "top_mask.nii.gz"))
    common = ["--model", str(tiny_bundle), "--device", "cpu", "--threshold", "1"]
    with caplog.at_level(logging.WARNING):
        assert main(["detect", str(tmp_path / "top.nii.gz"), "--mask", str(tmp_path / "top_mask.nii.gz"),
                     "--score", str(tmp_path / "given.nii.gz"), *common]) == 0
    assert "The brain mask reaches the edge of the image (32 % of a face of it): the scan covers part" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        automatic = detect(_top_third(t1), load_bundle(tiny_bundle, "cpu"), threshold=1.0)
    assert "covers part of the head" in caplog.text and "implausible" not in caplog.text
    voxels = sitk.GetArrayFromImage(automatic.brain_mask)
    assert hashlib.sha256(voxels.tobytes()).hexdigest() == _TOP_THIRD_MASK_SHA256
    brain = sitk.GetArrayFromImage(mask)
    (z0, z1), (y0, y1), (x0, x1) = [np.flatnonzero(brain.any(axis=a))[[0, -1]] for a in ((1, 2), (0, 2), (0, 1))]
    sitk.WriteImage(t1[x0:x1 + 1, y0:y1 + 1, z0:z1 + 1], str(tmp_path / "box.nii.gz"))
    sitk.WriteImage(mask[x0:x1 + 1, y0:y1 + 1, z0:z1 + 1], str(tmp_path / "box_mask.nii.gz"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["detect", str(tmp_path / "box.nii.gz"), "--mask", str(tmp_path / "box_mask.nii.gz"),
                     "--score", str(tmp_path / "box_score.nii.gz"), *common]) == 0
    assert "edge of the image" not in caplog.text


def _sagittal_5mm(image: sitk.Image) -> sitk.Image:
    """``image`` in 5 mm sagittal slices (slab averages along its x axis), as a clinical sagittal T1 is acquired."""
    return slab_average(sitk.Cast(image, sitk.sitkFloat32), 0, 5.0)


def test_a_whole_brain_of_thick_slices_cropped_to_its_box_is_no_partial_scan(tiny_bundle, colin, caplog):
    """A whole skull-stripped brain in 5 mm sagittal slices, cropped to its mask's bounding box, was said to cover
    part of the head: its outermost slab, a cap of each hemisphere 5 mm deep, fills 10 % of the box's side face, over
    the 5 % that told a cut brain. A cut of the same scan (its upper third) is still warned of."""
    t1, mask = colin
    thick, brain = _sagittal_5mm(t1), _sagittal_5mm(mask) > 0.5
    inside = sitk.GetArrayFromImage(brain)
    (z0, z1), (y0, y1), (x0, x1) = [np.flatnonzero(inside.any(axis=a))[[0, -1]] for a in ((1, 2), (0, 2), (0, 1))]
    box = (slice(x0, x1 + 1), slice(y0, y1 + 1), slice(z0, z1 + 1))
    bundle = load_bundle(tiny_bundle, "cpu")
    with caplog.at_level(logging.WARNING):
        detect(thick[box], bundle, brain[box], threshold=1.0)
    assert "edge of the image" not in caplog.text
    with caplog.at_level(logging.WARNING):
        detect(_top_third(thick), bundle, _top_third(brain), threshold=1.0)
    assert "The brain mask reaches the edge of the image" in caplog.text


def test_a_skull_stripped_scan_s_nan_background_is_said_to_be_taken_as_outside(tiny_bundle, colin, tmp_path, caplog):
    """A skull-stripped scan whose background is NaN was masked by its foreground with only "Input looks
    skull-stripped": nothing said that its NaN voxels were taken for the outside of the brain."""
    t1, mask = colin
    brain = sitk.GetArrayFromImage(mask) > 0
    stripped = _like(np.where(brain, sitk.GetArrayFromImage(t1), np.nan).astype(np.float32), t1)
    sitk.WriteImage(stripped, str(tmp_path / "stripped.nii.gz"))
    common = ["--model", str(tiny_bundle), "--device", "cpu", "--threshold", "1"]
    with caplog.at_level(logging.INFO):
        assert main(["detect", str(tmp_path / "stripped.nii.gz"), "--score", str(tmp_path / "score.nii.gz"),
                     *common]) == 0
    assert "looks skull-stripped" in caplog.text
    assert (f"{np.count_nonzero(~brain)} voxels of the image are NaN or infinite: the automatic brain mask was made "
            "with them as background, and none of them is scored.") in caplog.text
    caplog.clear()
    sitk.WriteImage(t1, str(tmp_path / "head.nii.gz"))
    with caplog.at_level(logging.INFO):
        assert main(["detect", str(tmp_path / "head.nii.gz"), "--score", str(tmp_path / "head_score.nii.gz"),
                     *common]) == 0
    assert "NaN" not in caplog.text
