"""Where "jump to the most anomalous finding" and a component row's click take the slice views (real vtkMRMLScene)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import add_volume, make_head, oblique_direction  # noqa: E402

from CeVAEAnomalyLib.engine.postprocess import components  # noqa: E402
from CeVAEAnomalyLib.result import DetectionResult, SliceScoreRow, load_result, save_result  # noqa: E402
from CeVAEAnomalyLib.slicer import mrml, nodes  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyResult  # noqa: E402


def ring_detection(image: sitk.Image, mask: sitk.Image, hot=(28, 22, 18)) -> DetectionResult:
    """A ring-enhancing finding: a flagged ring (a torus around the K axis) whose hole holds no flagged voxel, one
    voxel of it (``hot``, i j k) scoring highest."""
    nx, ny, nz = image.GetSize()
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    radius = np.hypot(ii - nx / 2, jj - ny / 2)
    ring = (np.abs(radius - 8) < 2) & (np.abs(kk - nz / 2) < 3)
    scores = np.where(ring, 2.0, 0.1).astype(np.float32)
    assert ring[hot[2], hot[1], hot[0]]
    scores[hot[2], hot[1], hot[0]] = 5.0
    score, labelmap = sitk.GetImageFromArray(scores), sitk.GetImageFromArray(ring.astype(np.uint8))
    for im in (score, labelmap):
        im.CopyInformation(image)
    rows = [SliceScoreRow(2, k, 1.0, 1.0, 1.0, 0.5, 1.0, False) for k in range(nz)]
    return DetectionResult(score, labelmap, mask, 1.0, "absolute", rows, components(labelmap, score, "summed"))


def voxel_at(volume, world) -> tuple:
    """The (i, j, k) voxel of ``volume`` (no parent transform) at a world RAS point."""
    ijk = np.linalg.inv(nodes.ijk_to_ras(volume)) @ np.array([*world, 1.0])
    return tuple(int(v) for v in np.round(ijk[:3]))


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
def test_the_jump_to_a_ring_shaped_finding_lands_on_the_ring_not_in_its_hole(direction):
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(direction=direction)
    volume = add_volume(scene, image)
    detection = ring_detection(image, mask)
    assert len(detection.components) == 1
    hole = voxel_at(volume, detection.components[0].centroid_ras)
    assert sitk.GetArrayViewFromImage(detection.labelmap)[hole[::-1]] == 0  # the centroid lies in the hole
    out = mrml.publish(scene, volume, detection)
    hot = nodes.ijk_to_ras(volume) @ np.array([28.0, 22.0, 18.0, 1.0])
    jump = nodes.stored_result(out.score).jump_ras
    assert jump == pytest.approx(hot[:3])  # the ring's highest-scoring voxel
    assert CeVAEAnomalyResult(volume, out, detection).topSliceRas == pytest.approx(hot[:3])
    # the table's row shows where it jumps, beside the centroid the command line writes
    assert [nodes.table_column(out.components, c)[0] for c in nodes.PEAK_COLUMNS] == pytest.approx(hot[:3])
    assert nodes.component_position(out.components, 0) == pytest.approx(hot[:3])
    assert [nodes.table_column(out.components, c)[0] for c in "RAS"] == pytest.approx(
        detection.components[0].centroid_ras)
    for column in nodes.PEAK_COLUMNS:  # a table of a scene saved before the peak was recorded: its centroid
        out.components.RemoveColumn(out.components.GetColumnIndex(column))
    assert nodes.component_position(out.components, 0) == pytest.approx(detection.components[0].centroid_ras)


def hot_slice_detection(image: sitk.Image, mask: sitk.Image, top: int, hot) -> DetectionResult:
    """Nothing flagged; slice ``top`` (along K) ranked most anomalous, its highest score at voxel ``hot`` (i j k),
    far from the slice's centre."""
    scores = np.where(sitk.GetArrayViewFromImage(mask) > 0, 0.2, 0.0).astype(np.float32)
    scores[hot[2], hot[1], hot[0]] = 3.0
    score = sitk.GetImageFromArray(scores)
    score.CopyInformation(image)
    labelmap = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labelmap.CopyInformation(image)
    rows = [SliceScoreRow(2, k, 1.0, 1.0, 1.0, 0.9 if k == top else 0.1, 1.0, False) for k in range(image.GetSize()[2])]
    return DetectionResult(score, labelmap, mask, 10.0, "absolute", rows, [])


def test_without_components_the_views_jump_onto_the_top_slices_finding_also_for_an_oblique_volume():
    """The most anomalous slice of an oblique volume is not a plane of the (patient-aligned) slice views: a view
    through its centre cuts other slices away from it. The jump goes to the slice's highest-scoring voxel, so that an
    axial view through the jump shows it."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(direction=oblique_direction(30.0, (1.0, 0.0, 0.0)))
    volume = add_volume(scene, image)
    hot = (12, 10, 18)
    assert sitk.GetArrayViewFromImage(mask)[hot[::-1]]
    detection = hot_slice_detection(image, mask, 18, hot)
    out = mrml.publish(scene, volume, detection)
    where = (nodes.ijk_to_ras(volume) @ np.array([*hot, 1.0]))[:3]
    jump = nodes.stored_result(out.score).jump_ras
    assert jump == pytest.approx(where)
    assert CeVAEAnomalyResult(volume, out, detection).topSliceRas == pytest.approx(where)
    axial = slicer.vtkMRMLSliceNode()  # a patient-aligned (axial) slice view, centred on the jump
    axial.JumpSliceByCentering(*jump)
    to_slice = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(axial.GetSliceToRAS(), to_slice)
    assert abs(to_slice.MultiplyPoint([*where, 1.0])[2]) < 0.5  # the finding lies on the view's plane


def blocks_detection(image: sitk.Image, mask: sitk.Image, hot) -> DetectionResult:
    """Two flagged 3x3x3 blocks, as large as each other; each scores highest at its voxel in ``hot`` (i j k)."""
    flagged = np.zeros(image.GetSize()[::-1], bool)
    flagged[10:13, 10:13, 8:11] = flagged[20:23, 25:28, 26:29] = True
    scores = np.where(flagged, 2.0, 0.1).astype(np.float32)
    for n, (i, j, k) in enumerate(hot):
        assert flagged[k, j, i]
        scores[k, j, i] = 3.0 + n
    score, labelmap = sitk.GetImageFromArray(scores), sitk.GetImageFromArray(flagged.astype(np.uint8))
    for im in (score, labelmap):
        im.CopyInformation(image)
    rows = [SliceScoreRow(2, k, 1.0, 1.0, 1.0, 0.5, 1.0, False) for k in range(image.GetSize()[2])]
    return DetectionResult(score, labelmap, mask, 1.0, "absolute", rows, components(labelmap, score, "summed"))


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
def test_two_equal_sized_findings_each_jump_to_their_own_highest_scoring_voxel(direction):
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(direction=direction)
    volume = add_volume(scene, image)
    hot = [(9, 12, 11), (28, 25, 22)]  # (i, j, k): each on an edge of its block, away from its centroid
    detection = blocks_detection(image, mask, hot)
    assert [c.voxels for c in detection.components] == [27, 27]
    out = mrml.publish(scene, volume, detection)
    where = [tuple((nodes.ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]) for ijk in hot[::-1]]  # (higher first)
    for row in range(2):
        assert nodes.component_position(out.components, row) == pytest.approx(where[row])
        assert [nodes.table_column(out.components, c)[row] for c in nodes.PEAK_COLUMNS] == pytest.approx(where[row])
    assert CeVAEAnomalyResult(volume, out, detection).topSliceRas == pytest.approx(where[0])


def test_the_jump_goes_to_the_recorded_peak_whatever_the_labelmap_holds_now():
    """The peak is recorded with the component: a result whose labelmap no longer holds its components (a foreign
    or edited one) still jumps to each component's highest-scoring voxel, not to its centroid."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(direction=oblique_direction())
    volume = add_volume(scene, image)
    detection = ring_detection(image, mask)
    cleared = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    cleared.CopyInformation(image)
    detection = dataclasses.replace(detection, labelmap=cleared)
    hot = tuple((nodes.ijk_to_ras(volume) @ np.array([28.0, 22.0, 18.0, 1.0]))[:3])
    out = mrml.publish(scene, volume, detection)
    assert nodes.component_position(out.components, 0) == pytest.approx(hot)
    assert CeVAEAnomalyResult(volume, out, detection).topSliceRas == pytest.approx(hot)


def test_a_result_saved_before_peaks_were_recorded_jumps_to_the_centroid(tmp_path):
    """A worker's result of a version that recorded no peak (detection.json without peak_lps) reads back, and its
    table's peak columns and the jump give the centroid, as for any result without its peak."""
    scene = slicer.vtkMRMLScene()
    image, mask = make_head()
    volume = add_volume(scene, image)
    save_result(ring_detection(image, mask), tmp_path)
    summary = json.loads((tmp_path / "detection.json").read_text())
    del summary["components"][0]["peak_lps"]
    (tmp_path / "detection.json").write_text(json.dumps(summary))
    detection = load_result(tmp_path)
    assert detection.components[0].peak_lps is None
    centroid = detection.components[0].centroid_ras
    out = mrml.publish(scene, volume, detection)
    assert [nodes.table_column(out.components, c)[0] for c in nodes.PEAK_COLUMNS] == pytest.approx(centroid)
    assert nodes.component_position(out.components, 0) == pytest.approx(centroid)
    assert CeVAEAnomalyResult(volume, out, detection).topSliceRas == pytest.approx(centroid)
