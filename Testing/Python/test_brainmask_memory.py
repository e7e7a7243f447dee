"""The automatic brain mask's steps that keep fewer copies of a large scan (a 512x512x300 float32 scan, 300 MB,
peaked at 1.97 GB while masked; 1.15 GB since, measured in the commits and README) give what the copying steps
gave. The peaks themselves are figures for a benchmark, not assertions of a test."""
from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.brainmask import _check_input, _float32, _largest_filled_component, _reordered


def buffer_address(image: sitk.Image) -> int:
    view = sitk.GetArrayViewFromImage(image)
    return view.__array_interface__["data"][0]


def test_a_float32_scan_is_not_copied_to_float32_again():
    """``_check_input`` cast a float32 scan to float32 (ITK copies every voxel: 300 MB held while masking); other
    pixel types are still cast."""
    values = np.ones((20, 20, 20), np.float32)
    values[0] = 0.0
    image = sitk.GetImageFromArray(values)
    assert buffer_address(_check_input(image)) == buffer_address(image)
    assert _float32(image) is image
    short = sitk.Cast(image, sitk.sitkInt16)
    assert _float32(short).GetPixelID() == sitk.sitkFloat32 and _float32(short) is not short


def test_a_scan_is_reordered_as_dicomorient_does_with_one_flip_where_only_axes_flip():
    """``_reordered`` flips a scan whose axes only point the other way (NIfTI's RAS, LAS) in one copy instead of
    DICOMOrient's two, and leaves a permutation to DICOMOrient: the same voxels and grid either way."""
    rng = np.random.default_rng(5)
    image = sitk.GetImageFromArray(rng.random((5, 6, 7)).astype(np.float32))
    image.SetSpacing((0.9, 1.1, 1.3))
    image.SetOrigin((4.0, -3.0, 2.0))
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            direction = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(order, signs)):
                direction[row, column] = sign
            image.SetDirection(direction.ravel().tolist())
            ours, theirs = _reordered(image), sitk.DICOMOrient(image, "LPS")
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))
            assert (ours.GetSize(), ours.GetSpacing(), ours.GetDirection()) == (
                theirs.GetSize(), theirs.GetSpacing(), theirs.GetDirection())
            np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-9)


def whole_grid_largest_filled(mask: sitk.Image) -> sitk.Image:
    """The largest hole-filled component as it was found before, labelling the whole grid."""
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.Cast(mask, sitk.sitkUInt8)), sortByObjectSize=True)
    return sitk.Cast(sitk.BinaryFillhole(components == 1), sitk.sitkUInt8)


def test_the_largest_component_is_labelled_within_the_mask_s_box():
    """The whole grid was labelled twice in 32 bits (ConnectedComponent, then RelabelComponent: 600 MB at once for a
    512x512x300 scan); now only the mask's bounding box is, with the same component, holes and ties as before."""
    rng = np.random.default_rng(7)
    for edge, noise in ((0, 0.25), (4, 0.25), (4, 0.0)):  # the mask reaching the image's border or not
        values = np.zeros((40, 46, 52), np.uint8)
        inner = values[edge:40 - edge, edge:46 - edge, edge:52 - edge]
        inner[...] = rng.random(inner.shape) < noise  # many small components
        inner[2:14, 2:14, 2:14] = 1
        inner[5:11, 5:11, 5:11] = 0  # a hole: filled
        inner[16:28, 16:28, 0:12] = 1
        inner[19:25, 19:25, 0:9] = 0  # a pit open at the box's face: not a hole
        inner[16:28, 0:12, 30:42] = 1
        inner[19:25, 3:9, 33:39] = 0  # as big as the first: without noise a tie, which the first in raster order wins
        mask = sitk.GetImageFromArray(values)
        mask.SetSpacing((0.7, 1.1, 1.3))
        mask.SetOrigin((3.0, -4.0, 5.0))
        mask.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        largest, reference = _largest_filled_component(mask), whole_grid_largest_filled(mask)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(largest), sitk.GetArrayViewFromImage(reference))
        assert (largest.GetPixelID(), largest.GetSize(), largest.GetOrigin(), largest.GetSpacing(),
                largest.GetDirection()) == (sitk.sitkUInt8, mask.GetSize(), mask.GetOrigin(), mask.GetSpacing(),
                                            mask.GetDirection())
    empty = _largest_filled_component(sitk.Image([5, 6, 7], sitk.sitkUInt8))
    assert empty.GetSize() == (5, 6, 7) and not sitk.GetArrayViewFromImage(empty).any()
