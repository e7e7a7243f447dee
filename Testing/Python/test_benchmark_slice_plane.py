"""The slice-plane study script: which axis each plane's slabs run along, and the held-out threshold."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("benchmark_slice_plane")


def coronal_stored() -> sitk.Image:
    """A volume stored in coronal slices (index axes: left-right, inferior-superior, anterior-posterior in depth)."""
    image = sitk.Image(20, 30, 10, sitk.sitkFloat32)
    image.SetDirection((1, 0, 0, 0, 0, -1, 0, -1, 0))
    return image


def test_each_plane_thickens_the_index_axis_along_its_physical_axis(study):
    image = coronal_stored()
    mask = sitk.Cast(image + 1, sitk.sitkUInt8)
    sizes = {plane: study.thick(image, mask, plane)[0].GetSize() for plane in study.PLANES}
    assert sizes == {"axial": (20, 6, 10), "coronal": (20, 30, 2), "sagittal": (4, 30, 10)}
    assert study.thick(image, mask, "axial")[1].GetSize() == (20, 6, 10)


def test_the_threshold_comes_from_the_other_heads_scans_of_the_calibration_plane(study):
    scores = {("a", "axial"): np.arange(1000.0), ("b", "axial"): np.full(1000, 5.0),
              ("b", "coronal"): np.arange(1000.0), ("a", "coronal"): np.full(1000, 1e6)}
    # a's coronal rate at b's axial threshold (5): all of a's coronal voxels above it; a's own scans not pooled
    assert study.held_out_rate(scores, "a", "axial", "coronal", 0.01) == 1.0
    assert study.held_out_rate(scores, "b", "coronal", "axial", 0.01) == pytest.approx(0.0)
    assert study.held_out_rate(scores, "a", "coronal", "axial", 0.1) == pytest.approx(0.1, abs=0.002)
