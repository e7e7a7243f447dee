"""A scan without a brain mask is registered to the template once per process: training reads it at one margin,
calibrating at another (engine/brainmask.py's kept registrations), and the masks are those of a fresh registration."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk

import CeVAEAnomalyLib.engine.brainmask as brainmask
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.engine.brainmask import MARGIN_MM, SCORED_MARGIN_MM, compute_brain_mask
from CeVAEAnomalyLib.io.manifest import Subject

SAMPLE = "colin27_t1_2mm.nii.gz"


@pytest.fixture
def registrations(monkeypatch) -> List[int]:
    """One entry per registration that really runs (the registration itself is left to do its work)."""
    calls: List[int] = []
    register = brainmask._register

    def counted(*args, **kwargs):
        calls.append(1)
        return register(*args, **kwargs)

    monkeypatch.setattr(brainmask, "_register", counted)
    return calls


def _write(array: np.ndarray, like: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


def test_training_then_calibrating_two_maskless_scans_registers_each_once(tmp_path, registrations):
    """Training slices (margin MARGIN_MM) and then calibration scores (SCORED_MARGIN_MM) of the same two scans, as
    `adapt` and `train` read them: each registration ran twice per scan, seconds to tens of seconds each."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import calibrate_model
    from CeVAEAnomalyLib.training.data import subject_slices

    t1 = sitk.ReadImage(str(data_path(SAMPLE)), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(t1)
    noise = np.random.default_rng(0).normal(0.0, 3.0, voxels.shape)
    subjects = [Subject(_write(voxels, t1, tmp_path / "a.nii.gz"), None),
                Subject(_write(voxels + noise, t1, tmp_path / "b.nii.gz"), None)]
    bundle = load_bundle(data_path("cevae_t1_default.cevae"), "cpu")
    for subject in subjects:
        assert subject_slices(subject, bundle.preprocess, ("axial",))[0].shape[0] > 0
    calibrate_model(bundle, subjects, "test", bundle.header.score_options, bundle.header.postprocess)
    assert len(registrations) == 2


def test_a_reused_registration_gives_the_masks_of_a_fresh_one_at_both_margins(registrations):
    """Byte for byte, on the input's grid: the mask at each margin made after the other one (the registration
    reused) equals the mask made with nothing kept."""
    image = sitk.ReadImage(str(data_path(SAMPLE)))
    fresh = {}
    for margin in (MARGIN_MM, SCORED_MARGIN_MM):
        brainmask.forget_registrations()
        fresh[margin] = compute_brain_mask(image, margin_mm=margin)
    assert len(registrations) == 2
    for margin in (SCORED_MARGIN_MM, MARGIN_MM):  # the first reuses the MARGIN_MM mask's registration, and so on
        reused = compute_brain_mask(image, margin_mm=margin)
        assert reused.GetPixelID() == fresh[margin].GetPixelID() == sitk.sitkUInt8
        assert (reused.GetSize(), reused.GetOrigin(), reused.GetSpacing(), reused.GetDirection()) == \
            (image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        assert sitk.GetArrayFromImage(reused).tobytes() == sitk.GetArrayFromImage(fresh[margin]).tobytes()
    assert len(registrations) == 2
    assert not np.array_equal(sitk.GetArrayFromImage(fresh[MARGIN_MM]),
                              sitk.GetArrayFromImage(fresh[SCORED_MARGIN_MM]))  # the margins do differ


def test_a_scan_whose_voxels_changed_is_registered_again(tmp_path, registrations):
    """Kept by content, not by name: a file rewritten under the same name with other voxels (here the head moved by
    a few voxels) gets its own registration, and so the mask of its own head."""
    t1 = sitk.ReadImage(str(data_path(SAMPLE)), sitk.sitkFloat32)
    path = _write(sitk.GetArrayFromImage(t1), t1, tmp_path / "scan.nii.gz")
    first = compute_brain_mask(sitk.ReadImage(str(path)))
    _write(np.roll(sitk.GetArrayFromImage(t1), 6, axis=0), t1, path)
    moved = compute_brain_mask(sitk.ReadImage(str(path)))
    assert len(registrations) == 2
    expected = np.roll(sitk.GetArrayFromImage(first), 6, axis=0)
    overlap = np.count_nonzero(expected & sitk.GetArrayViewFromImage(moved)) / np.count_nonzero(expected)
    assert overlap > 0.95
