"""A voxel size read with a last-bit difference (1.2 mm from a NRRD header, 1.1999999999999997 mm from Slicer's
IJK-to-RAS matrix) gives the same map: lengths in mm that fall on a rounding tie in voxels (a 3 mm rim on 1.2 or
2 mm voxels: 2.5 or 1.5 voxels) no longer round one way or the other by the noise."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.engine.postprocess import refine_reach, refine_scores, threshold_labelmap
from CeVAEAnomalyLib.options import PostprocessOptions

NOISY = [(exact, float(np.nextafter(exact, towards))) for exact in (1.2, 2.0) for towards in (0, 9)]


@pytest.mark.parametrize("exact, noisy", NOISY)
def test_the_rim_does_not_depend_on_the_last_bit_of_the_voxel_size(exact, noisy):
    brain = np.zeros((30, 30, 30), bool)
    brain[3:27, 4:26, 5:25] = True
    score = np.random.default_rng(0).random(brain.shape).astype(np.float32)
    opts = PostprocessOptions(rim_mm=3.0)
    for spacing in ((exact, 1.0, 1.0), (1.0, 1.0, exact)):
        other = tuple(noisy if s == exact else s for s in spacing)
        assert refine_reach(opts, spacing) == refine_reach(opts, other)
        np.testing.assert_array_equal(refine_scores(score, brain, spacing, opts),
                                      refine_scores(score, brain, other, opts))


def test_the_minimum_volume_does_not_depend_on_the_last_bit_of_the_voxel_size():
    score = np.zeros((10, 10, 10), np.float32)
    score[2:7, 2:7, 2:4] = 1.0  # 50 voxels of 1 mm^3: exactly the minimum volume
    kept = [int(threshold_labelmap(score, spacing, 0.5, min_volume_mm3=50.0).sum())
            for spacing in ((1.0, 1.0, 1.0), (1.0, 1.0, 0.9999999999999998))]
    assert kept == [50, 50]


@pytest.mark.parametrize("exact, noisy", NOISY)
def test_detection_does_not_depend_on_the_last_bit_of_the_voxel_size(tiny_bundle, exact, noisy):
    """The Slicer module and Scripts/DetectVolume.py read a .nrrd or .mha scan's voxel size from Slicer's matrices,
    one bit off what detect reads: maps differed by up to the whole score range."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import Detector
    from CeVAEAnomalyLib.options import DetectionRequest

    detector = Detector.from_request(load_bundle(tiny_bundle, "cpu"), DetectionRequest.of(threshold=1.0))
    maps = []
    for size in (exact, noisy):
        image, mask = make_head(spacing=(size, 1.0, 1.5), seed=5)
        result = detector(image, mask)
        maps.append((sitk.GetArrayFromImage(result.score), sitk.GetArrayFromImage(result.labelmap)))
    np.testing.assert_array_equal(maps[0][0], maps[1][0])
    np.testing.assert_array_equal(maps[0][1], maps[1][1])


@pytest.mark.parametrize("exact, noisy", [(1.6, 1.5999999999999996), (1.1428571428571428, 1.142857142857143)])
def test_the_asymmetry_does_not_depend_on_the_last_bits_of_the_voxel_size(exact, noisy):
    """The mid-sagittal plane is searched on ~4 mm bins: 4 mm is 2.5 voxels of 1.6 mm and 3.5 of 1.142857 mm, and a
    voxel size a few bits off (Slicer's IJK-to-RAS matrix) binned by 3 instead of 2 (4 instead of 3): the asymmetry,
    and so the default map, moved by up to a quarter of its range on a real scan."""
    from CeVAEAnomalyLib.engine.preprocess import brain_region
    from CeVAEAnomalyLib.engine.symmetry import box_asymmetry

    maps = []
    for size in (exact, noisy):
        image, mask = make_head(size=(60, 64, 50), spacing=(size, size, size), seed=3)
        brain = sitk.GetArrayFromImage(mask) > 0
        region = brain_region(brain, 2)
        maps.append(box_asymmetry(image, brain[region], region, 3.0).asymmetry)
    np.testing.assert_array_equal(maps[0], maps[1])


@pytest.mark.parametrize("exact", [3.2, 0.64])  # the 4 mm margins on both sides: 2.5 and 12.5 voxels
@pytest.mark.parametrize("towards", [0.0, 9.0])
def test_the_crop_box_does_not_depend_on_the_last_bits_of_the_voxel_size(exact, towards):
    from CeVAEAnomalyLib.engine.config import PreprocessConfig
    from CeVAEAnomalyLib.engine.preprocess import prepare

    image, mask = make_head(seed=3, size=(40, 44, 36))
    brain = sitk.GetArrayFromImage(mask) > 0
    boxes = []
    for sp in (exact, float(np.nextafter(np.nextafter(exact, towards), towards))):
        image.SetSpacing((sp, sp, sp))
        boxes.append([prepare(image, brain, PreprocessConfig(), o).record.box
                      for o in ("axial", "coronal", "sagittal")])
    assert boxes[0] == boxes[1]
