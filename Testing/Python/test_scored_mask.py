"""Without a brain mask, detection and calibration score the automatic mask at ``SCORED_MARGIN_MM``: inside the mask
that ``compute_brain_mask`` gives by default, whose rim of non-brain tissue thick noisy scans turned into false
components (docs/benchmark.md, "Detection with the automatic brain mask")."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.brainmask import (MARGIN_MM, SCORED_MARGIN_MM, TEMPLATE_MASK, TEMPLATE_T1,
                                              compute_brain_mask, default_template_dir)
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import healthy_scores
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.io.images import voxel_volume_ml
from CeVAEAnomalyLib.io.manifest import Subject


def _voxels(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image) > 0


def test_detection_and_calibration_without_a_mask_score_the_mask_inside_the_template_boundary(tiny_bundle, tmp_path):
    head = sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1), sitk.sitkFloat32)  # a real head with skull
    default = _voxels(compute_brain_mask(head))
    scored = _voxels(compute_brain_mask(head, margin_mm=SCORED_MARGIN_MM))
    assert SCORED_MARGIN_MM < MARGIN_MM
    assert not (scored & ~default).any()
    shell_ml = float((default & ~scored).sum()) * voxel_volume_ml(head)
    assert 100.0 < shell_ml < 600.0  # a 3 mm shell over a brain's surface
    bundle = load_bundle(tiny_bundle, "cpu")
    detector = Detector(bundle)
    np.testing.assert_array_equal(_voxels(detector(head, None).brain_mask), scored)
    path = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(head, str(path))
    opts, post = bundle.header.score_options, bundle.header.postprocess
    calibrated = healthy_scores(bundle, [Subject(path)], opts, post)[0]
    mask = sitk.GetImageFromArray(scored.astype(np.uint8))
    mask.CopyInformation(head)
    np.testing.assert_array_equal(calibrated, detector.brain_scores(head, mask, [opts.score_type])[opts.score_type])


def test_a_skull_stripped_input_is_its_own_mask_at_any_margin():
    head = sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1), sitk.sitkFloat32)
    stripped = sitk.Mask(head, sitk.ReadImage(str(default_template_dir() / TEMPLATE_MASK), sitk.sitkUInt8))
    np.testing.assert_array_equal(_voxels(compute_brain_mask(stripped, margin_mm=SCORED_MARGIN_MM)),
                                  _voxels(compute_brain_mask(stripped)))
