"""The overlay picture (demo-output/overlay.png, scripts/benchmark_figures.py) says its orientation: it had no R/L or
A/P letters, nothing said it was radiological, and its "axial slice N" was the index in the re-oriented array, not in
the file (the same only for the demo's scan, whose slice axis runs inferior to superior)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import matplotlib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from CeVAEAnomalyResearch.figures import overlay_figure  # noqa: E402
from CeVAEAnomalyResearch.lesions import insert_lesions  # noqa: E402

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="needs the demo's sample scan")


@pytest.fixture(scope="module")
def demo_case() -> Tuple[sitk.Image, sitk.Image]:
    """The demo's scan with its lesions (seed 7, hyper and ring) and their truth."""
    image = sitk.ReadImage(str(SHARED_DATA / "robex_t1.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(SHARED_DATA / "robex_brainmask.nii.gz"), sitk.sitkUInt8)
    lesioned, truth, _ = insert_lesions(image, mask, 7, n=2, kinds=("hyper", "ring"), radius_mm=(6.0, 12.0),
                                        min_separation_mm=15.0)
    return lesioned, truth


def picture(image: sitk.Image, truth: sitk.Image) -> Tuple[str, Dict[str, str], np.ndarray]:
    """The image panel's title, its edge letters by edge, and its pixels (score: the truth itself)."""
    fig = overlay_figure(image, sitk.Cast(truth, sitk.sitkFloat32), truth, truth, title="demo")
    try:
        ax = fig.axes[0]
        edges = {}
        for text in ax.texts:
            x, y = text.get_position()
            edges["left" if x < 0.1 else "right" if x > 0.9 else "top" if y > 0.9 else "bottom"] = text.get_text()
        assert len(ax.texts) == 4 and all(len(t.get_text()) for t in ax.texts)
        assert [t.get_text() for t in fig.axes[1].texts] == [t.get_text() for t in ax.texts]  # both panels
        assert any("radiological" in t.get_text() and "right is on the viewer's left" in t.get_text()
                   for t in fig.texts)
        return ax.get_title(), edges, np.asarray(ax.images[0].get_array())
    finally:
        plt.close(fig)


def lesion_slices(truth: sitk.Image) -> List[Tuple[str, int]]:
    """(axis, index) of the file's voxel slices with the most truth, along its voxel axis closest to LPS z."""
    d = np.abs(np.array(truth.GetDirection()).reshape(3, 3))
    axis = int(np.argmax(d[2]))  # i, j or k
    counts = sitk.GetArrayViewFromImage(truth).sum(axis=tuple(a for a in range(3) if a != 2 - axis))
    return [("ijk"[axis], int(i)) for i in np.flatnonzero(counts == counts.max())]


def flipped(image: sitk.Image, axes: Tuple[bool, bool, bool]) -> sitk.Image:
    out = sitk.Flip(image, list(axes))
    assert out.TransformIndexToPhysicalPoint((0, 0, 0)) == image.TransformIndexToPhysicalPoint(
        tuple(s - 1 if f else 0 for s, f in zip(image.GetSize(), axes)))  # the same physical space
    return out


def test_the_demo_picture_shows_right_on_the_left_anterior_on_top_and_the_files_slice(demo_case) -> None:
    image, truth = demo_case
    title, edges, _ = picture(image, truth)
    assert edges == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    [(axis, index)] = lesion_slices(truth)
    assert title == f"image, axial slice {axis}={index} of the file"


@pytest.mark.parametrize("transform,axis,reversed_", [
    (lambda im: flipped(im, (True, False, False)), "k", False),
    (lambda im: flipped(im, (False, True, True)), "k", True),
    (lambda im: sitk.PermuteAxes(im, [2, 0, 1]), "i", False),
    (lambda im: sitk.PermuteAxes(flipped(im, (True, True, True)), [1, 2, 0]), "j", True),
], ids=["flip-i", "flip-jk", "permute-kij", "flip-all-permute-jki"])
def test_a_flipped_or_permuted_copy_is_the_same_picture_with_the_same_letters_and_its_own_slice_index(
        demo_case, transform, axis: str, reversed_: bool) -> None:
    """The drawing reorients to the radiological view: a copy of the scan with its voxel axes flipped or permuted
    (the same physical space) is the same picture with the same letters; the title names the copy's own slice."""
    image, truth = demo_case
    _, edges, pixels = picture(image, truth)
    [(_, index)] = lesion_slices(truth)
    copy_image, copy_truth = transform(image), transform(truth)
    copy_title, copy_edges, copy_pixels = picture(copy_image, copy_truth)
    assert copy_edges == edges == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    np.testing.assert_array_equal(copy_pixels, pixels)
    expected = image.GetSize()[2] - 1 - index if reversed_ else index
    assert lesion_slices(copy_truth) == [(axis, expected)]  # the copy's lesion is in that slice of its file
    assert copy_title == f"image, axial slice {axis}={expected} of the file"


def test_an_oblique_scan_gets_the_letters_of_the_directions_its_rows_and_columns_run(demo_case) -> None:
    """A scan tilted 30 degrees about its superior axis: its pictured columns run toward the patient's left and
    back, its rows toward the back and right, so the letters name both (as viewers do for oblique scans)."""
    image, truth = demo_case
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    tilt = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(image.GetDirection()).reshape(3, 3)
    tilted, tilted_truth = sitk.Image(image), sitk.Image(truth)
    for volume in (tilted, tilted_truth):
        volume.SetDirection(tuple(tilt.ravel()))
    _, edges, _ = picture(tilted, tilted_truth)
    # columns run along i, LPS (c, s, 0): left, then posterior; rows along -j, LPS (-s, c, 0): posterior, then right
    assert edges == {"left": "RA", "right": "LP", "top": "AL", "bottom": "PR"}
