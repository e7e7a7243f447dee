"""The bundled lesioned sample scan: made by its script from the 2 mm template, and the bundled model finds it."""
from __future__ import annotations

import importlib.util

import numpy as np
import SimpleITK as sitk

from conftest import REPO
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.detector import detect


def _script():
    spec = importlib.util.spec_from_file_location("make_lesion_sample", REPO / "scripts" / "make_lesion_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_lesioned_scan_is_what_its_script_makes_on_the_templates_grid():
    script = _script()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")))
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    shipped = sitk.ReadImage(str(data_path(script.LESION_SAMPLE)))
    made, truth, lesions = script.make_lesion_sample(t1, mask)
    assert shipped.GetPixelID() == t1.GetPixelID() == sitk.sitkUInt8
    for image in (shipped, made):
        assert (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == (
            t1.GetSize(), t1.GetSpacing(), t1.GetOrigin(), t1.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(shipped), sitk.GetArrayViewFromImage(made))
    assert sorted(lesion.kind for lesion in lesions) == ["hyper", "hypo"]
    changed = sitk.GetArrayViewFromImage(shipped) != sitk.GetArrayViewFromImage(t1)
    lesion = sitk.GetArrayViewFromImage(truth) > 0
    assert lesion.sum() > 400 and not (changed & ~sitk.GetArrayViewFromImage(mask).astype(bool)).any()


def test_the_bundled_model_flags_each_lesion_of_the_sample_and_nothing_on_the_healthy_scan():
    script = _script()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")))
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    _, truth, _ = script.make_lesion_sample(t1, mask)
    result = detect(sitk.ReadImage(str(data_path(script.LESION_SAMPLE))), default_model_path(), device="cpu")
    flagged = sitk.GetArrayViewFromImage(result.labelmap) > 0
    lesions = sitk.GetArrayFromImage(sitk.ConnectedComponent(truth))
    assert lesions.max() == 2 and all(flagged[lesions == n].any() for n in (1, 2))
    assert len(result.components) == 2
    dice = 2 * (flagged & (lesions > 0)).sum() / (flagged.sum() + (lesions > 0).sum())
    assert dice > 0.7
    healthy = detect(t1, default_model_path(), device="cpu")
    assert not (sitk.GetArrayViewFromImage(healthy.labelmap) > 0).any()
