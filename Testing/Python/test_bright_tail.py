"""The bright tail: a calibration records how far its healthy scans' brightest brain voxels lie above their white
matter, and detection says when a scan's lie much further (a post-contrast look) than those scans'."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import recalibrate
from CeVAEAnomalyLib.engine.calibration import BRIGHT_TAIL_MARGIN, acquisition_difference, calibrate
from CeVAEAnomalyLib.engine.detector import detect
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.engine.modality import bright_tail, scan_bright_tail
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions
from CeVAEAnomalyResearch.acquisition import bias_field, gamma, post_contrast, rician_noise
from CeVAEAnomalyResearch.lesions import insert_lesions


@pytest.fixture(scope="module")
def colin():
    """The bundled 2 mm Colin27 T1 (float) and its brain mask."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    return image, sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))


def test_enhancement_raises_the_tail_beyond_the_margin_and_plain_changes_do_not(colin):
    image, mask = colin
    plain = scan_bright_tail(image, mask)
    for seed in range(3):
        assert scan_bright_tail(post_contrast(image, mask, seed)[0], mask) > plain + BRIGHT_TAIL_MARGIN
    for changed in (rician_noise(image, mask, 0.03, 0), bias_field(image, 0.25, 0), gamma(image, 0.7),
                    gamma(image, 1.4)):
        assert abs(scan_bright_tail(changed, mask) - plain) < BRIGHT_TAIL_MARGIN


def test_one_bright_lesion_moves_the_tail_less_than_enhancement(colin):
    image, mask = colin
    lesioned, truth, _ = insert_lesions(image, mask, 0, n=1, kinds=("hyper",), radius_mm=(15.0, 15.0))
    assert sitk.GetArrayViewFromImage(truth).sum() * 8 / 1000 > 3  # a lesion of a few ml (2 mm voxels)
    assert scan_bright_tail(lesioned, mask) < scan_bright_tail(image, mask) + BRIGHT_TAIL_MARGIN


def test_the_tail_leaves_out_non_finite_voxels_and_is_none_with_nothing_to_measure(colin):
    image, mask = colin
    arr = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    with_nan = arr.copy()
    with_nan[tuple(np.argwhere(brain)[::50].T)] = np.nan
    assert bright_tail(with_nan, brain) == pytest.approx(bright_tail(arr, brain), abs=0.05)
    assert bright_tail(arr, np.zeros_like(brain)) is None
    assert bright_tail(np.full_like(arr, 7.0), brain) is None


def test_a_calibration_records_the_range_and_names_a_brighter_scan():
    entry = calibrate([np.linspace(0, 1, 100)], "healthy", [1.0, 1.0, 1.0], [0.2, None, 0.5])
    assert entry["bright_tail"] == [0.2, 0.5]
    assert acquisition_difference(entry, (1.0, 1.0, 1.0), 0.5 + BRIGHT_TAIL_MARGIN - 0.01) is None
    told = acquisition_difference(entry, (1.0, 1.0, 1.0), 1.4)
    assert "bright tail 1.40, theirs up to 0.50" in told and "contrast agent" in told
    both = acquisition_difference(entry, (1.0, 1.0, 6.5), 1.4)
    assert both.startswith("its voxels are up to 6.5 mm") and "; its brightest brain voxels" in both
    assert "bright_tail" not in calibrate([np.linspace(0, 1, 100)], "healthy", [1.0], [None])
    assert acquisition_difference({"fpr": [], "threshold": []}, (1.0, 1.0, 1.0), 5.0) is None  # not recorded


def test_detection_warns_of_a_post_contrast_look_that_the_calibration_scans_lack(tmp_path, tiny_bundle, colin,
                                                                                  caplog):
    image, mask = colin
    sitk.WriteImage(image, str(tmp_path / "plain.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "plain_mask.nii.gz"))
    sitk.WriteImage(gamma(image, 1.2), str(tmp_path / "gamma.nii.gz"))
    subjects = [Subject(tmp_path / f"{n}.nii.gz", tmp_path / "plain_mask.nii.gz") for n in ("plain", "gamma")]
    out = recalibrate(load_bundle(tiny_bundle, "cpu"), subjects, tmp_path / "site.cevae", ScoreOptions(),
                      PostprocessOptions())
    tails = [scan_bright_tail(image, mask), scan_bright_tail(gamma(image, 1.2), mask)]
    assert all(e["bright_tail"] == [min(tails), max(tails)] for e in read_header(out).calibration.values())
    bundle = load_bundle(out, "cpu")
    enhanced = post_contrast(image, mask, 0)[0]

    def told(volume, **options):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            detect(volume, bundle, mask, **options)
        return [r.getMessage() for r in caplog.records if "contrast agent" in r.getMessage()]

    assert told(image) == []
    warning = told(enhanced)
    assert len(warning) == 1 and "not known" in warning[0] and "calibrat" in warning[0]
    assert told(enhanced, threshold=3.0) == []  # an absolute threshold claims no rate


def test_the_bundled_model_tells_a_post_contrast_scan_and_not_the_plain_one(colin, caplog):
    """Its calibration records its healthy scans' bright tails (the 2 mm sample lies inside their range)."""
    image, mask = colin
    bundle = load_bundle(default_model_path(), "cpu")
    for volume, expected in ((image, 0), (post_contrast(image, mask, 1)[0], 1)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            detect(volume, bundle, mask)
        assert sum("contrast agent" in r.getMessage() for r in caplog.records) == expected
