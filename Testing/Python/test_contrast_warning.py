"""Detection says so when a scan does not have its model's contrast (a T2-like scan given to the T1 model)."""
from __future__ import annotations

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import detect


@pytest.fixture(scope="module")
def colin():
    """The bundled 2 mm Colin27 T1 (float) and its brain mask."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    return image, sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))


def reversed_inside(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """A T2-like copy: the brain's intensities reversed (bright rim and CSF, dark white matter), the rest as it was."""
    arr = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    arr[brain] = arr[brain].max() - arr[brain]
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def contrast_warnings(result) -> list:
    return [w for w in result.record.warnings if "contrast than the model's" in w]


def test_a_reversed_contrast_scan_is_warned_of_and_its_t1_is_not(colin):
    image, mask = colin
    bundle = load_bundle(default_model_path(), "cpu")
    assert contrast_warnings(detect(image, bundle, mask)) == []
    warned = contrast_warnings(detect(reversed_inside(image, mask), bundle, mask))
    assert len(warned) == 1
    assert "T1" in warned[0] and "+0.595" in warned[0]


def test_the_warning_is_led_by_the_volume_it_is_about(colin):
    """A cohort's warnings (batch, calibration lists) say which volume; the automatic brain mask measures it too."""
    from CeVAEAnomalyLib.engine.detector import Detector

    image, mask = colin
    detector = Detector.from_request(load_bundle(default_model_path(), "cpu"), orientations="axial")
    warned = contrast_warnings(detector(reversed_inside(image, mask), None, where="t2.nii.gz: "))
    assert len(warned) == 1 and warned[0].startswith("t2.nii.gz: ")
