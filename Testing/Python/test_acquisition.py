"""Tests of the acquisition variants in CeVAEAnomalyResearch.acquisition (thick slices, crops, noise, contrast)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_head

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.acquisition import (
    VARIANTS, Recipe, bias_field, crop_axial, crop_index, derive, downsample_isotropic, gamma, post_contrast,
    rician_noise, slab_average,
)


def head(spacing=(1.0, 1.0, 1.0), size=(40, 44, 48)):
    return make_head(size=size, spacing=spacing)


def test_slab_average_integrates_like_a_scanner() -> None:
    arr = np.zeros((12, 3, 4), np.float32)
    arr[4] = 1.0  # one bright 1 mm slice
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin((0.0, 0.0, 10.0))
    thick = slab_average(img, 2, 3.0)
    out = sitk.GetArrayFromImage(thick)
    assert out.shape == (4, 3, 4) and thick.GetSpacing() == (1.0, 1.0, 3.0)
    # slabs [0,3), [3,6), [6,9), [9,12) of the input's extent: slice 4 falls in the second
    assert np.allclose(out[:, 0, 0], [0, 1 / 3, 0, 0])
    # the slab's centre is the mean of the centres of the slices it integrates
    assert thick.TransformIndexToPhysicalPoint((0, 0, 1))[2] == pytest.approx(10.0 + 4.0)
    # a fractional overlap is weighted by its length: 2.5 mm slabs over 1 mm slices
    ramp = sitk.GetImageFromArray(np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32))
    half = sitk.GetArrayFromImage(slab_average(ramp, 2, 2.5))[:, 0, 0]
    assert np.allclose(half, [(0 + 1 + 0.5 * 2) / 2.5, (0.5 * 2 + 3 + 4) / 2.5, (5 + 6 + 0.5 * 7) / 2.5,
                              (0.5 * 7 + 8 + 9) / 2.5])


def test_slab_average_keeps_the_mean_and_refuses_thin_slabs() -> None:
    image, _ = head()
    thick = slab_average(image, 2, 4.0)  # 48 mm: 12 whole slabs, nothing dropped
    assert sitk.GetArrayViewFromImage(thick).mean() == pytest.approx(sitk.GetArrayViewFromImage(image).mean(), rel=1e-5)
    with pytest.raises(CeVAEError, match="thinner"):
        slab_average(image, 2, 0.5)
    iso = downsample_isotropic(image, 2.0)
    assert iso.GetSpacing() == (2.0, 2.0, 2.0) and iso.GetSize() == (20, 22, 24)


def test_crop_cuts_the_named_side_of_the_brain() -> None:
    image, mask = head()
    for direction, top_high in (((1, 0, 0, 0, 1, 0, 0, 0, 1), True), ((1, 0, 0, 0, 1, 0, 0, 0, -1), False)):
        image.SetDirection(direction)
        mask.SetDirection(direction)
        start, stop = crop_axial(image, mask, 0.3, "top")
        kept = crop_index(mask, 2, start, stop)
        z = [kept.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(kept.GetSize()[2])]
        full_z = [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(image.GetSize()[2])]
        assert max(z) < max(full_z) and min(z) == min(full_z)  # the superior part is gone
        brain_slices = np.flatnonzero(sitk.GetArrayViewFromImage(mask).reshape(48, -1).any(1))
        assert (stop - start) < 48 and len(brain_slices) * 0.6 < np.count_nonzero(
            sitk.GetArrayViewFromImage(kept).reshape(stop - start, -1).any(1)) < len(brain_slices) * 0.8
    with pytest.raises(CeVAEError, match="side"):
        crop_axial(image, mask, 0.3, "left")


def test_rician_noise_is_positive_with_the_asked_spread() -> None:
    image, mask = head()
    noisy = sitk.GetArrayFromImage(rician_noise(image, mask, 0.05, 0))
    arr = sitk.GetArrayFromImage(image)
    top = np.percentile(arr[sitk.GetArrayViewFromImage(mask) > 0], 99)
    assert noisy.min() >= 0
    bright = arr > 0.5 * top  # where Rician noise is nearly Gaussian
    assert np.std(noisy[bright] - arr[bright]) == pytest.approx(0.05 * top, rel=0.1)
    assert np.array_equal(noisy, sitk.GetArrayFromImage(rician_noise(image, mask, 0.05, 0)))


def test_bias_field_and_gamma() -> None:
    image, _ = head()
    arr = sitk.GetArrayFromImage(image)
    ratio = sitk.GetArrayFromImage(bias_field(image, 0.2, 1))[arr > 10] / arr[arr > 10]
    assert ratio.min() >= np.exp(-0.2) - 1e-5 and ratio.max() <= np.exp(0.2) + 1e-5 and ratio.std() > 0.02
    g = sitk.GetArrayFromImage(gamma(image, 0.7))
    assert g.max() == pytest.approx(arr.max()) and np.all(g[arr > 0] >= arr[arr > 0] - 1e-3)


def test_post_contrast_brightens_thin_structures_only() -> None:
    image, mask = head(size=(60, 64, 56))
    out, where = post_contrast(image, mask, 3)
    before, after = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(out)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    assert np.all(after >= before - 1e-4)
    changed = (after > before + 1) & brain
    assert 0.005 < changed.mean() / brain.mean() < 0.3  # a part of the brain (this phantom: a large dark core)
    top = np.percentile(before[brain], 99)
    assert after[changed].max() >= 1.1 * top - 1e-3  # the enhanced cores are brighter than the brain
    assert after[changed].mean() > before[brain].mean() + 0.1 * top
    assert np.array_equal(after[~brain], before[~brain])
    assert where.midline > 0


def test_derive_keeps_truth_on_the_variant_grid_and_leaves_inputs_alone() -> None:
    image, mask = head()
    truth_arr = np.zeros(sitk.GetArrayViewFromImage(mask).shape, np.uint8)
    truth_arr[20:30, 18:26, 16:24] = 1  # a 10 x 8 x 8 mm block
    truth = sitk.GetImageFromArray(truth_arr)
    truth.CopyInformation(mask)
    copy = sitk.GetArrayFromImage(image)
    img, brain, gt = derive(Recipe(slice_mm=5.0, noise=0.03), image, mask, truth, seed=2)
    assert img.GetSize() == brain.GetSize() == gt.GetSize() == (40, 44, 10)  # 48 mm: 9 slabs and a last 3 mm one (more than half a slab)
    assert gt.GetSpacing() == img.GetSpacing() == (1.0, 1.0, 5.0) and gt.GetOrigin() == img.GetOrigin()
    gt_arr = sitk.GetArrayFromImage(gt)
    # slabs [20,25) and [25,30) are fully lesion: the volume is kept
    assert gt_arr.sum() * 5.0 == pytest.approx(truth_arr.sum())
    assert np.array_equal(sitk.GetArrayFromImage(image), copy)
    cut = derive(Recipe(crop=("top", 0.5)), image, mask, truth, seed=2)
    assert cut[0].GetSize()[2] < 48 and cut[2].GetSize() == cut[0].GetSize()
    again = derive(VARIANTS["clinical: post-contrast, 6.5 mm, noise 3 %"], image, mask, truth, seed=2)[0]
    assert np.array_equal(sitk.GetArrayFromImage(again),
                          sitk.GetArrayFromImage(derive(VARIANTS["clinical: post-contrast, 6.5 mm, noise 3 %"],
                                                        image, mask, truth, seed=2)[0]))
