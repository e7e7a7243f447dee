"""Each component's highest-scoring voxel, recorded where the components are made (engine.postprocess.components),
kept by the tables and the saved result, and read by the Slicer module's jump."""
from __future__ import annotations

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head, oblique_direction

from CeVAEAnomalyLib.engine.postprocess import components
from CeVAEAnomalyLib.result import DetectionResult, SliceScoreRow, components_csv, load_result, save_result


def on_grid(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def detection(image: sitk.Image, mask: sitk.Image, scores: np.ndarray, flagged: np.ndarray) -> DetectionResult:
    """A detection result of ``scores`` with the labelmap ``flagged`` (k, j, i arrays on the image's grid)."""
    score, labelmap = on_grid(scores.astype(np.float32), image), on_grid(flagged.astype(np.uint8), image)
    rows = [SliceScoreRow(2, k, 1.0, 1.0, 1.0, 0.5, 1.0, False) for k in range(image.GetSize()[2])]
    return DetectionResult(score, labelmap, mask, 1.0, "absolute", rows, components(labelmap, score, "summed"))


def ring(image: sitk.Image) -> np.ndarray:
    """A flagged ring (a torus around the K axis) whose hole, where its centroid lies, holds no flagged voxel."""
    nx, ny, nz = image.GetSize()
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return (np.abs(np.hypot(ii - nx / 2, jj - ny / 2) - 8) < 2) & (np.abs(kk - nz / 2) < 3)


def two_equal_blocks(image: sitk.Image) -> np.ndarray:
    """Two flagged 3x3x3 blocks, as large as each other, apart."""
    flagged = np.zeros(image.GetSize()[::-1], bool)
    flagged[10:13, 10:13, 8:11] = flagged[20:23, 25:28, 26:29] = True
    return flagged


def voxel_of(image: sitk.Image, lps) -> tuple:
    """The (k, j, i) array index of the voxel whose centre is ``lps``, checked to be a voxel centre."""
    at = np.array(image.TransformPhysicalPointToContinuousIndex(lps))
    assert at == pytest.approx(np.round(at), abs=1e-6)
    return tuple(int(v) for v in np.round(at)[::-1])


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
def test_a_ring_shaped_components_peak_lies_on_the_ring_at_its_highest_score(direction):
    image, mask = make_head(direction=direction)
    flagged = ring(image)
    scores = np.where(flagged, 2.0, 0.1)
    scores[18, 22, 28] = 5.0
    found = detection(image, mask, scores, flagged).components
    assert len(found) == 1
    hole = np.round(image.TransformPhysicalPointToContinuousIndex(found[0].centroid_lps)).astype(int)[::-1]
    assert not flagged[tuple(hole)]  # the centroid lies in the hole, the peak on the ring
    assert voxel_of(image, found[0].peak_lps) == (18, 22, 28)
    x, y, z = found[0].peak_lps
    assert found[0].peak_ras == (-x, -y, z)


def test_of_equal_scores_the_peak_is_the_first_voxel_in_array_order():
    image, mask = make_head()
    flagged = ring(image)
    scores = np.where(flagged, 2.0, 0.1)
    first = np.argwhere(flagged)[5]  # (k, j, i): the sixth flagged voxel in array order
    last = np.argwhere(flagged)[-3]
    scores[tuple(last)] = scores[tuple(first)] = 4.0
    found = detection(image, mask, scores, flagged).components
    assert voxel_of(image, found[0].peak_lps) == tuple(int(v) for v in first)


def test_two_equal_sized_components_each_get_their_own_peak():
    image, mask = make_head(direction=oblique_direction())
    flagged = two_equal_blocks(image)
    scores = np.where(flagged, 2.0, 0.1)
    scores[11, 12, 9] = 3.0  # the first block's peak, on its edge
    scores[22, 25, 27] = 6.0  # the second's, on another
    found = detection(image, mask, scores, flagged).components
    assert [c.voxels for c in found] == [27, 27]
    assert sorted(voxel_of(image, c.peak_lps) for c in found) == [(11, 12, 9), (22, 25, 27)]
    for c in found:  # each its own: the voxel scoring its maximum
        assert scores[voxel_of(image, c.peak_lps)] == c.max_score


def test_the_saved_result_and_the_component_table_keep_the_peak(tmp_path):
    image, mask = make_head(direction=oblique_direction())
    flagged = two_equal_blocks(image)
    scores = np.where(flagged, 2.0, 0.1)
    scores[11, 12, 9] = 3.0
    result = detection(image, mask, scores, flagged)
    save_result(result, tmp_path)
    back = load_result(tmp_path)
    assert [c.peak_lps for c in back.components] == [c.peak_lps for c in result.components]
    rows = list(csv.DictReader(io.StringIO(components_csv(back))))
    assert len(rows) == 2
    for row, c in zip(rows, result.components):
        assert [float(row[f"peak_{axis}"]) for axis in "ras"] == pytest.approx(c.peak_ras, abs=0.005)
        assert [float(row[axis]) for axis in "ras"] == pytest.approx(c.centroid_ras, abs=0.005)


def test_a_result_saved_before_peaks_were_recorded_reads_back_without_them(tmp_path):
    """A detection.json whose components have no peak_lps (an earlier version's, or a null one): read back with the
    peak None, and its component table leaves the peak columns empty."""
    image, mask = make_head()
    flagged = two_equal_blocks(image)
    result = detection(image, mask, np.where(flagged, 2.0, 0.1), flagged)
    for name, edit in (("older", lambda c: c.pop("peak_lps")), ("null", lambda c: c.update(peak_lps=None))):
        folder = tmp_path / name
        save_result(result, folder)
        summary = json.loads((folder / "detection.json").read_text())
        for component in summary["components"]:
            edit(component)
        (folder / "detection.json").write_text(json.dumps(summary))
        back = load_result(folder)
        assert [c.peak_lps for c in back.components] == [None, None]
        assert [c.peak_ras for c in back.components] == [None, None]
        assert back.components == [dataclasses.replace(c, peak_lps=None) for c in result.components]
        rows = list(csv.DictReader(io.StringIO(components_csv(back))))
        assert [(r["peak_r"], r["peak_a"], r["peak_s"]) for r in rows] == [("", "", "")] * 2


def test_a_peak_that_is_not_a_point_is_refused(tmp_path):
    from CeVAEAnomalyLib.errors import CeVAEError

    image, mask = make_head()
    flagged = two_equal_blocks(image)
    save_result(detection(image, mask, np.where(flagged, 2.0, 0.1), flagged), tmp_path)
    summary = json.loads((tmp_path / "detection.json").read_text())
    summary["components"][0]["peak_lps"] = [1.0, "2"]
    (tmp_path / "detection.json").write_text(json.dumps(summary))
    with pytest.raises(CeVAEError, match=r"component 1: peak_lps \[1.0, '2'\] is not of its type"):
        load_result(tmp_path)


def test_a_component_on_the_midline_is_at_r_0_not_minus_0_in_the_table_and_the_result():
    """RAS negates ITK's x and y: a peak or centroid at x = 0 (a midline finding of a scan whose voxel centres pass
    through 0, as an MNI-space scan's do) read "-0.00" in the component table and -0.0 in the result."""
    image, mask = make_head(origin=(-12.0, -10.0, 5.0))  # (spacing 1.2, 1.0: voxel (10, 10, k) lies at x = y = 0)
    flagged = np.zeros(image.GetSize()[::-1], bool)
    flagged[15:18, 9:12, 9:12] = True
    scores = np.where(flagged, 2.0, 0.1)
    scores[16, 10, 10] = 3.0
    result = detection(image, mask, scores, flagged)
    (found,) = result.components
    assert found.peak_lps[:2] == (0.0, 0.0)
    (row,) = csv.DictReader(io.StringIO(components_csv(result)))
    assert [row[f] for f in ("r", "a", "peak_r", "peak_a")] == ["0.00"] * 4
    for value in (*found.centroid_ras[:2], *found.peak_ras[:2]):
        assert value == 0 and np.copysign(1.0, value) == 1.0  # no negative zero for a program or Slicer's table
