"""The MRML adapter on a real vtkMRMLScene (slicer-core): geometry, output nodes, transactions."""
from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from conftest import add_volume, grid_transform, make_head, oblique_direction  # noqa: E402

from CeVAEAnomalyLib.slicer import mrml, nodes  # noqa: E402
from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.engine.detector import DetectionResult, SliceScoreRow  # noqa: E402
from CeVAEAnomalyLib.engine.postprocess import components, threshold_labelmap  # noqa: E402

GEOMETRIES = {
    "axis-aligned": dict(direction=None),
    "oblique": dict(direction=oblique_direction(), spacing=(0.9, 1.3, 2.0), origin=(12.5, -40.0, 7.25)),
}


def fake_detection(image: sitk.Image, mask: sitk.Image, threshold: float = 1.1) -> DetectionResult:
    """A detection result on the image grid: score = intensity/100 inside the brain (stripes above 1.1)."""
    score = sitk.Mask(sitk.Cast(image, sitk.sitkFloat32) / 100.0, mask)
    labels = threshold_labelmap(sitk.GetArrayViewFromImage(score), score.GetSpacing(), threshold)
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(score)
    rows = [SliceScoreRow(2, k, 0.1 * k, 1.0, 2.0 + k, 0.5, 0.2 * k, k % 2 == 1) for k in range(image.GetSize()[2])]
    return DetectionResult(score, labelmap, mask, threshold, "absolute", rows, components(labelmap, score))


def array(node) -> np.ndarray:
    return sitk.GetArrayFromImage(mrml.image_from_volume(node))


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
def test_volume_round_trip_is_exact(scene, geometry):
    image, _ = make_head(**GEOMETRIES[geometry])
    node = add_volume(scene, image)
    back = mrml.image_from_volume(node)
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
def test_ijk_to_ras_agrees_with_simpleitk(scene, geometry):
    """MRML maps each voxel to the RAS point that SimpleITK maps it to in LPS (x, y negated)."""
    image, _ = make_head(**GEOMETRIES[geometry])
    matrix = nodes.ijk_to_ras(add_volume(scene, image))
    for ijk in [(0, 0, 0), (5, 17, 3), tuple(s - 1 for s in image.GetSize())]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = matrix @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_image_from_volume_refuses_empty_and_vector_volumes(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(CeVAEError, match="no image data"):
        mrml.image_from_volume(empty)
    data = vtk.vtkImageData()
    data.SetDimensions(8, 8, 8)
    data.AllocateScalars(vtk.VTK_FLOAT, 3)
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    colour.SetAndObserveImageData(data)
    with pytest.raises(CeVAEError, match="3 components"):
        mrml.image_from_volume(colour)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
def test_publish_puts_every_output_on_the_input_grid(scene, geometry):
    image, mask = make_head(**GEOMETRIES[geometry])
    volume = add_volume(scene, image)
    result = fake_detection(image, mask)
    assert len(result.components) > 1  # several stripes
    out = mrml.publish(scene, volume, result, create_labelmap=True)

    for node in (out.score, out.labelmap):
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        assert np.array_equal(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume))
    assert np.array_equal(array(out.score), sitk.GetArrayFromImage(result.score))
    assert np.array_equal(array(out.labelmap), sitk.GetArrayFromImage(result.labelmap))

    segmentation = out.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == mrml.SEGMENT_NAME
    assert segment.GetColor() == pytest.approx(mrml.SEGMENT_COLOR)
    exported = mrml.mask_image(out.segmentation, volume, segmentation.GetNthSegmentID(0))
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, sitk.GetArrayFromImage(result.labelmap) > 0)


def test_component_and_slice_tables_match_the_result(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    result = fake_detection(image, mask)
    out = mrml.publish(scene, volume, result)
    table = out.components
    assert table.GetNumberOfRows() == len(result.components)
    np.testing.assert_array_equal(nodes.table_column(table, "Component"), [c.label for c in result.components])
    np.testing.assert_allclose(nodes.table_column(table, "Volume"), [c.volume_ml for c in result.components])
    np.testing.assert_allclose(nodes.table_column(table, "Max score"), [c.max_score for c in result.components])
    np.testing.assert_allclose(nodes.table_column(table, "Mean score"), [c.mean_score for c in result.components])
    peaks = mrml.peak_ras(volume, result)
    for row, component in enumerate(result.components):
        assert [nodes.table_column(table, axis)[row] for axis in "RAS"] == pytest.approx(component.centroid_ras)
        assert nodes.component_position(table, row) == pytest.approx(peaks[row])  # its highest-scoring voxel
    assert table.GetColumnUnitLabel("Volume") == "ml"
    with pytest.raises(CeVAEError, match="not in the component table"):
        nodes.component_position(table, len(result.components))

    slices = out.slice_table
    np.testing.assert_array_equal(nodes.table_column(slices, "Slice"), [r.index for r in result.slices])
    np.testing.assert_allclose(nodes.table_column(slices, "Sample score"), [r.neg_elbo for r in result.slices])
    np.testing.assert_allclose(nodes.table_column(slices, "Slice anomaly"), [r.anomaly for r in result.slices])
    np.testing.assert_allclose(nodes.table_column(slices, "Highest score"), [r.map_max for r in result.slices])
    np.testing.assert_array_equal(nodes.table_column(slices, "Flagged"), [int(r.flagged) for r in result.slices])
    series = scene.GetNodeByID(out.slice_chart.GetPlotSeriesNodeID())
    assert series.GetTableNodeID() == slices.GetID()
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("Slice", "Slice anomaly")


def test_nothing_above_threshold_gives_an_empty_anomaly_segment(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    out = mrml.publish(scene, volume, fake_detection(image, mask, threshold=1e6))
    segmentation = out.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetNthSegment(0).GetName() == mrml.SEGMENT_NAME
    assert out.components.GetNumberOfRows() == 0


def test_second_publish_updates_the_same_nodes(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    ids = mrml.node_ids(scene)
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    assert mrml.node_ids(scene) == ids
    for name in ("score", "segmentation", "components", "slice_table", "slice_chart"):
        assert getattr(second, name).GetID() == getattr(first, name).GetID()



def test_the_result_tables_are_read_only_in_the_tables_module_and_a_rerun_still_updates_them(scene):
    """The component and slice tables were editable in the Tables module: a user could change the reported volumes
    and scores. They are locked (vtkMRMLTableNode.Locked: no edit through the user interface); a rerun writes them."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    assert first.components.GetLocked() and first.slice_table.GetLocked()
    lower = fake_detection(image, mask, 1.05)
    second = mrml.publish(scene, volume, lower)
    assert second.components is first.components and second.slice_table is first.slice_table
    assert second.components.GetLocked() and second.slice_table.GetLocked()
    assert list(nodes.table_column(second.components, "Voxels")) == [c.voxels for c in lower.components]
    assert len(lower.components) != len(fake_detection(image, mask, 1.1).components)

def test_a_rerun_without_the_labelmap_option_keeps_the_earlier_labelmap_current(scene):
    """A labelmap left from a run with the option would otherwise show that run's anomalies beside the new map."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1), create_labelmap=True)
    ids = mrml.node_ids(scene)
    lower = fake_detection(image, mask, 1.05)
    second = mrml.publish(scene, volume, lower)
    assert mrml.node_ids(scene) == ids and second.labelmap is first.labelmap
    assert np.array_equal(array(second.labelmap), sitk.GetArrayFromImage(lower.labelmap))
    assert second.labelmap.GetAttribute(nodes.RUN_ATTRIBUTE) == second.score.GetAttribute(nodes.RUN_ATTRIBUTE)
    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my scores")  # new nodes, no labelmap asked: none
    third = mrml.publish(scene, volume, fake_detection(image, mask, 1.1), mrml.OutputNodes(score=mine))
    assert third.labelmap is None


def test_publish_fills_the_nodes_it_is_given(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my scores")
    out = mrml.publish(scene, volume, fake_detection(image, mask), mrml.OutputNodes(score=mine))
    assert out.score is mine and mine.GetName() == "my scores"
    assert mine.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()


@pytest.mark.parametrize("reuse", [False, True], ids=["new nodes", "reused nodes"])
def test_failing_publish_leaves_the_node_set_unchanged(scene, monkeypatch, reuse):
    image, mask = make_head()
    volume = add_volume(scene, image)
    if reuse:
        mrml.publish(scene, volume, fake_detection(image, mask))
    before = mrml.node_ids(scene)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml, "_fill_slices", broken)  # fails after volumes and segmentation exist
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    assert mrml.node_ids(scene) == before


def test_a_failing_publish_gives_the_nodes_it_reused_their_earlier_content(scene, monkeypatch):
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    scores, rows = array(first.score), first.components.GetNumberOfRows()
    window = first.score.GetVolumeDisplayNode().GetWindowLevelMax()
    segment = anomaly_voxels(first.segmentation, volume)
    assert segment.any()
    run = first.score.GetAttribute(nodes.RUN_ATTRIBUTE)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml, "_fill_slices", broken)
    doubled = fake_detection(image, mask, 2.0)
    doubled.score = doubled.score * 2.0
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.publish(scene, volume, doubled)
    assert np.array_equal(array(first.score), scores) and first.components.GetNumberOfRows() == rows
    assert first.score.GetVolumeDisplayNode().GetWindowLevelMax() == window
    assert np.array_equal(anomaly_voxels(first.segmentation, volume), segment)
    assert first.score.GetAttribute(nodes.RUN_ATTRIBUTE) == run == first.components.GetAttribute(nodes.RUN_ATTRIBUTE)


def anomaly_voxels(segmentation, volume) -> np.ndarray:
    return sitk.GetArrayFromImage(mrml.mask_image(segmentation, volume, nodes.anomaly_segment_id(segmentation)))


def class_counts(scene):
    counts = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_a_rerun_after_the_score_volume_was_deleted_updates_the_other_results(scene):
    """The score volume is made again; the segmentation, tables and chart are not doubled."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask))
    counts = class_counts(scene)
    for node in (first.score.GetDisplayNode(), first.score):  # as the Data module deletes it
        scene.RemoveNode(node)
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    assert class_counts(scene) == counts
    for name in ("segmentation", "components", "slice_table", "slice_chart"):
        assert getattr(second, name) is getattr(first, name)


def test_a_run_sent_to_a_new_score_volume_leaves_the_earlier_results_whole(scene):
    """As the panel sends it: the earlier run's segmentation and component table are still chosen."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    rows, segment = first.components.GetNumberOfRows(), anomaly_voxels(first.segmentation, volume)
    fresh = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "new scores")
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1e6),
                          mrml.OutputNodes(score=fresh, segmentation=first.segmentation, components=first.components))
    assert second.score is fresh and second.components is not first.components
    assert second.segmentation is not first.segmentation and second.components.GetNumberOfRows() == 0
    assert first.components.GetNumberOfRows() == rows > 0
    assert np.array_equal(anomaly_voxels(first.segmentation, volume), segment)
    assert nodes.stored_result(first.score).components is first.components


def test_a_rerun_into_an_earlier_runs_score_volume_leaves_a_later_runs_results_whole(scene):
    """Run 1, run 2 into a new score volume, then a run into run 1's score volume with run 2's segmentation and
    table still chosen (as the panel keeps them): run 1's nodes are updated, run 2's stay as they were."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    fresh = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "new scores")
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05), mrml.OutputNodes(score=fresh))
    rows, segment = second.components.GetNumberOfRows(), anomaly_voxels(second.segmentation, volume)
    third = mrml.publish(scene, volume, fake_detection(image, mask, 1e6),
                         mrml.OutputNodes(score=first.score, segmentation=second.segmentation,
                                          components=second.components))
    assert third.segmentation is first.segmentation and third.components is first.components
    assert second.components.GetNumberOfRows() == rows > 0 and third.components.GetNumberOfRows() == 0
    assert np.array_equal(anomaly_voxels(second.segmentation, volume), segment)


def test_a_run_to_a_new_score_volume_leaves_the_results_of_a_scene_saved_before_run_stamps_whole(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    for node in vars(first).values():
        if node is not None:
            node.RemoveAttribute(nodes.RUN_ATTRIBUTE)
    rows, segment = first.components.GetNumberOfRows(), anomaly_voxels(first.segmentation, volume)
    fresh = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "new scores")
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1e6),
                          mrml.OutputNodes(score=fresh, segmentation=first.segmentation, components=first.components))
    assert second.components is not first.components and first.components.GetNumberOfRows() == rows > 0
    assert np.array_equal(anomaly_voxels(first.segmentation, volume), segment)


def test_a_failing_publish_keeps_the_segments_look_and_the_outputs_transforms(scene, monkeypatch):
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    anomaly = nodes.anomaly_segment_id(first.segmentation)
    display = first.segmentation.GetDisplayNode()
    assert display.GetSegmentVisibility2DOutline(anomaly) and not display.GetSegmentVisibility2DFill(anomaly)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(moved.GetID())  # the user moves the input before the rerun

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml, "_fill_slices", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    anomaly = nodes.anomaly_segment_id(first.segmentation)
    display = first.segmentation.GetDisplayNode()
    assert display.GetSegmentVisibility2DOutline(anomaly) and not display.GetSegmentVisibility2DFill(anomaly)
    assert first.score.GetTransformNodeID() is None and first.segmentation.GetTransformNodeID() is None


@pytest.mark.parametrize("earlier_labelmap", [False, True], ids=["first labelmap", "module colours in the scene"])
def test_a_failing_publish_gives_a_segmentation_back_its_labelmap_conversion_colours(scene, monkeypatch,
                                                                                     earlier_labelmap):
    """Importing the anomaly labelmap sets the segmentation's labelmap conversion colour table (Slicer's
    ImportLabelmapToSegmentationNode takes the labelmap's). A failed run left a user's segmentation without its own
    table (the module's, made in the run, removed) or pointing at the module's label colours."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    if earlier_labelmap:  # the module's label colour table is in the scene already
        mrml.publish(scene, add_volume(scene, image, "other head"), fake_detection(image, mask), create_labelmap=True)
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my findings")
    colours = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "my label colours")
    mine.SetLabelmapConversionColorTableNodeID(colours.GetID())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml, "_fill_components", broken)  # fails after the segmentation is filled
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.publish(scene, volume, fake_detection(image, mask), mrml.OutputNodes(segmentation=mine),
                     create_labelmap=True)
    assert mine.GetLabelmapConversionColorTableNodeID() == colours.GetID()


def exported_values(segmentation, segment_id: str, volume) -> list:
    """The label values of ``segment_id`` exported to a labelmap with the segmentation's labelmap conversion colour
    table, as the Segmentations module's export does."""
    labelmap = segmentation.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation, ids, labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        segmentation.GetLabelmapConversionColorTableNode())
    return sorted(set(numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).tolist()))


@pytest.mark.parametrize("own_table", [True, False], ids=["own colour table", "no colour table"])
def test_a_publish_with_a_labelmap_keeps_a_users_segmentation_s_labelmap_conversion_colours(scene, own_table):
    """Importing the anomaly labelmap pointed the segmentation's labelmap conversion colour table at the module's
    label colours: a user's segmentation chosen as the output then exported its own segments with the module's
    values (its "brain", 7 in the user's table, came out as 2). Only a segmentation of the module's own takes them."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my findings")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        add_volume(scene, mask, "brain", "vtkMRMLLabelMapVolumeNode"), mine)
    brain_id = mine.GetSegmentation().GetNthSegmentID(0)
    colours = None
    if own_table:
        colours = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "my label colours")
        colours.SetTypeToUser()
        colours.SetNumberOfColors(8)
        colours.SetColor(7, "brain", 0.2, 0.6, 0.3, 1.0)
        mine.SetLabelmapConversionColorTableNodeID(colours.GetID())
    before = exported_values(mine, brain_id, volume)
    mrml.publish(scene, volume, fake_detection(image, mask), mrml.OutputNodes(segmentation=mine),
                 create_labelmap=True)
    assert mine.GetLabelmapConversionColorTableNodeID() == (colours.GetID() if own_table else None)
    assert exported_values(mine, brain_id, volume) == before == ([0, 7] if own_table else [0, 1])
    own = mrml.publish(scene, add_volume(scene, image, "other head"), fake_detection(image, mask),
                       create_labelmap=True).segmentation
    assert own.GetLabelmapConversionColorTableNodeID() == mrml.label_color_node_id(scene)


def test_a_failing_publish_leaves_the_nodes_picked_as_outputs_unmarked(scene, monkeypatch):
    """Empty nodes and a segmentation of the user's picked as outputs are not left marked as the input's outputs by a
    run that failed (the segmentation kept its role and link: an empty one was then hidden from the mask field and
    refused as a brain mask, one with segments refused as another scan's output)."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    brain = add_volume(scene, mask, "brain", "vtkMRMLLabelMapVolumeNode")
    users = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(brain, users)
    picked = [mrml.OutputNodes(score=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my score"),
                               segmentation=scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation"),
                               labelmap=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "my labelmap"),
                               components=scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")),
              mrml.OutputNodes(segmentation=users)]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml, "_fill_slices", broken)
    for targets in picked:
        drawn_on = targets.segmentation.GetReferenceImageGeometryReferenceRole()
        before = targets.segmentation.GetNodeReferenceID(drawn_on)
        with pytest.raises(RuntimeError, match="disk full"):
            mrml.publish(scene, volume, fake_detection(image, mask), targets)
        for node in vars(targets).values():
            if node is not None:
                assert node.GetAttributeNames() == (), node.GetName()
                assert node.GetNodeReferenceID(nodes.SOURCE_REFERENCE) is None, node.GetName()
        assert targets.segmentation.GetNodeReferenceID(drawn_on) == before  # the volume it was drawn on, if any
    assert nodes.module_volume_ids(scene) == []
    assert nodes.segment_ids(users) == nodes.user_segment_ids(users) and len(nodes.segment_ids(users)) == 1


def test_a_score_volume_whose_display_node_was_deleted_behind_its_legend_is_shown_again(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask))
    colors = slicer.vtkSlicerColorLogic()  # what CeVAEAnomalyLogic.showResults calls in Slicer
    colors.SetMRMLScene(scene)
    legend = colors.AddDefaultColorLegendDisplayNode(first.score)
    scene.RemoveNode(first.score.GetDisplayNode())
    assert first.score.GetDisplayNode() is legend
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    display = second.score.GetVolumeDisplayNode()
    assert display is not None and display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(1.05)
    assert legend.GetPrimaryDisplayNode() is display


def test_a_threshold_of_zero_shows_heat_in_the_brain_only(scene):
    """Scores are 0 outside the brain: a threshold of 0 (an absolute one, or a calibrated one at a high rate)
    must not draw the whole field of view over the scan."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    result = fake_detection(image, mask, threshold=0.0)
    display = mrml.publish(scene, volume, result).score.GetVolumeDisplayNode()
    scores = sitk.GetArrayFromImage(result.score)
    drawn = scores >= display.GetLowerThreshold()
    assert drawn[scores > 0].all() and not drawn[sitk.GetArrayFromImage(mask) == 0].any()


def test_a_new_score_volume_deleted_during_the_run_leaves_the_earlier_run_alone(scene):
    """A run sent to a new score volume that is deleted before its results load gets nodes of its own; it does
    not fall back to the input's latest results."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    earlier = mrml.publish(scene, volume, fake_detection(image, mask, threshold=1.05))
    voxels, rows = array(earlier.score), earlier.components.GetNumberOfRows()
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my new score")
    scene.RemoveNode(chosen)
    later = mrml.publish(scene, volume, fake_detection(image, mask, threshold=1.5),
                         mrml.OutputNodes(score=chosen, segmentation=earlier.segmentation,
                                          components=earlier.components))
    assert later.score is not earlier.score and later.components is not earlier.components
    assert np.array_equal(array(earlier.score), voxels) and earlier.components.GetNumberOfRows() == rows
    assert earlier.score.GetDisplayNode().GetLowerThreshold() == pytest.approx(1.05)


def test_publish_refuses_a_result_on_another_grid(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    small, small_mask = make_head(size=(20, 22, 18))
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match="grid"):
        mrml.publish(scene, volume, fake_detection(small, small_mask))
    assert mrml.node_ids(scene) == before


def test_publish_refuses_a_result_of_another_scan_of_the_same_size(scene):
    """A detection of another scan with the same number of voxels (a console slip: publish(volumeB, detectionOfA))
    is refused, not written as B's results where A lies."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    other, other_mask = make_head(origin=(30.0, 10.0, 5.0), seed=3)
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match="the score map lies on another grid than the input volume 'head' \\(origin"):
        mrml.publish(scene, volume, fake_detection(other, other_mask))
    assert mrml.node_ids(scene) == before


@pytest.mark.parametrize("part", ["labelmap", "brain_mask"])
def test_publish_refuses_a_result_whose_labelmap_or_brain_mask_lies_on_another_grid(scene, part):
    """A result put together at the console (its labelmap re-thresholded at half the resolution) was loaded with the
    labelmap's voxels stretched over the input's grid, anomalies where there are none; a brain mask of another grid
    failed with a bare IndexError. Each is refused in one line, naming the part, and the earlier results stay."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    labelmap_before = array(first.labelmap)
    before = mrml.node_ids(scene)
    detection = fake_detection(image, mask)
    coarse = getattr(detection, part)[::2, ::2, ::2]
    with pytest.raises(CeVAEError, match=f"The {part.replace('_', ' ')} of this detection lies on another grid than "
                                         "the input volume 'head'"):
        mrml.publish(scene, volume, dataclasses.replace(detection, **{part: coarse}), create_labelmap=True)
    assert mrml.node_ids(scene) == before
    assert np.array_equal(array(first.labelmap), labelmap_before)


def test_score_display_uses_inferno_and_hides_low_scores(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    result = fake_detection(image, mask, threshold=0.8)
    display = mrml.publish(scene, volume, result).score.GetDisplayNode()
    colors = scene.GetNodeByID(display.GetColorNodeID())
    assert colors.GetName() == mrml.HEAT_COLOR_NAME and colors.GetNumberOfColors() == 256
    first, last = [0.0] * 4, [0.0] * 4
    colors.GetColor(0, first)
    colors.GetColor(255, last)
    assert 0.2126 * first[0] + 0.7152 * first[1] + 0.0722 * first[2] > 0.15  # the weakest shown are not black
    assert first[0] > first[1] and first[2] > first[1] and last[0] > 0.95 and last[1] > 0.95  # magenta to pale yellow
    brain_scores = sitk.GetArrayFromImage(result.score)[sitk.GetArrayFromImage(mask) > 0]
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.8)  # below: transparent
    assert display.GetWindowLevelMin() == pytest.approx(0.8)  # the threshold in the first colour
    assert display.GetWindowLevelMax() == pytest.approx(float(np.percentile(brain_scores, 99)))
    assert display.GetWindowLevelMax() < float(brain_scores.max())  # a few hot voxels do not wash the map out


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, -1.0])
def test_the_colour_legend_shows_no_score_below_the_threshold_nor_below_0(scene, threshold):
    """Slicer's colour legend spans a score volume's display window. The window started a third of the colour map
    below the threshold, so for a threshold under a third of the top score the legend read negative scores, which
    do not exist (scores are >= 0), and showed colours the overlay never draws."""
    image, mask = make_head()
    display = mrml.publish(scene, add_volume(scene, image), fake_detection(image, mask, threshold)).score \
        .GetVolumeDisplayNode()
    colors = slicer.vtkSlicerColorLogic()  # what CeVAEAnomalyLogic.showResults calls in Slicer
    colors.SetMRMLScene(scene)
    legend = colors.AddDefaultColorLegendDisplayNode(display.GetDisplayableNode())
    assert legend.GetPrimaryDisplayNode() is display
    window_min = display.GetLevel() - display.GetWindow() / 2  # what the legend shows first
    assert window_min == pytest.approx(max(threshold, 0.0), abs=1e-6) and window_min >= 0.0


def test_display_window_when_the_percentile_is_under_the_threshold():
    image, mask = make_head()
    score = sitk.Mask(sitk.Cast(image, sitk.sitkFloat32) / 100.0, mask)
    values = sitk.GetArrayFromImage(score)[sitk.GetArrayFromImage(mask) > 0]
    top, p99 = float(values.max()), float(np.percentile(values, 99))
    between = (top + p99) / 2
    assert mrml.display_range(between, score, mask) == pytest.approx((between, top))
    assert mrml.display_range(top + 1.0, score, mask) == pytest.approx((top + 1.0, 2 * (top + 1.0)))


def test_outputs_follow_the_parent_transform_of_the_input(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)
    matrix.SetElement(2, 3, -5.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = fake_detection(image, mask)
    out = mrml.publish(scene, volume, result)
    for node in (out.score, out.segmentation):
        assert node.GetTransformNodeID() == transform.GetID()
    r, a, s = mrml.peak_ras(volume, result)[0]
    assert nodes.component_position(out.components, 0) == pytest.approx((r + 10.0, a, s - 5.0))
    exported = mrml.mask_image(out.segmentation, volume, out.segmentation.GetSegmentation().GetNthSegmentID(0))
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, sitk.GetArrayFromImage(result.labelmap) > 0)
    centre = nodes.ijk_to_ras(volume) @ np.array([19.5, 21.5, 7.0, 1.0])
    assert nodes.slice_center_ras(volume, 2, 7) == pytest.approx((centre[0] + 10.0, centre[1], centre[2] - 5.0))


def test_mask_from_labelmap_and_from_a_chosen_segment(scene):
    image, mask = make_head(direction=oblique_direction())
    volume = add_volume(scene, image)
    labelmap = add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    expected = sitk.GetArrayFromImage(mask) > 0
    assert np.array_equal(sitk.GetArrayFromImage(mrml.mask_image(labelmap, volume)) > 0, expected)

    other = sitk.Cast(sitk.BinaryErode(mask, [3, 3, 3]), sitk.sitkUInt8) * 2
    two_labels = add_volume(scene, sitk.Maximum(mask, other), "two", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(two_labels, segmentation)
    ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(2)]
    before = mrml.node_ids(scene)
    union = sitk.GetArrayFromImage(mrml.mask_image(segmentation, volume)) > 0
    inner = sitk.GetArrayFromImage(mrml.mask_image(segmentation, volume, ids[1])) > 0
    assert mrml.node_ids(scene) == before  # the temporary export nodes are gone
    assert np.array_equal(union, expected)
    assert np.array_equal(inner, sitk.GetArrayFromImage(other) > 0) and inner.sum() < union.sum()
    with pytest.raises(CeVAEError, match="no segment 'nope'"):
        mrml.mask_image(segmentation, volume, "nope")


def test_mask_errors(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(CeVAEError, match="has no segments"):
        mrml.mask_image(empty, volume)
    with pytest.raises(CeVAEError, match="labelmap volume or a segmentation"):
        mrml.mask_image(scene.AddNewNodeByClass("vtkMRMLTableNode"), volume)


def test_a_labelmap_mask_under_another_non_linear_transform_or_lying_off_the_volume_is_refused(scene):
    """A labelmap mask under another transform than its volume is used where it lies in world space (resampled
    through linear transforms): a non-linear one between the two is refused, naming both transforms, as is a mask
    that lies off the volume in world space; neither node is changed."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    labelmap = add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    warp = grid_transform(scene)
    labelmap.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(CeVAEError, match=r"^The brain mask 'mask' \(under 'warp'\) and the volume 'head' \(under no "
                                         r"transform\) are under different transforms, and a non-linear one lies "
                                         r"between them, which a labelmap mask is not resampled through: harden the "
                                         r"transforms \(Transforms module\) or put the mask under the volume's "
                                         r"transform\.$"):
        mrml.mask_image(labelmap, volume)
    far = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "far")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 500.0)
    far.SetMatrixTransformToParent(shift)
    labelmap.SetAndObserveTransformNodeID(far.GetID())
    with pytest.raises(CeVAEError, match=r"^The brain mask 'mask' \(under 'far'\) does not overlap the volume 'head' "
                                         r"\(under no transform\) where they lie in world space"):
        mrml.mask_image(labelmap, volume)
    assert np.array_equal(array(labelmap), sitk.GetArrayFromImage(mask))
    assert labelmap.GetTransformNodeID() == far.GetID() and volume.GetTransformNodeID() is None

def test_a_segmentation_mask_under_another_transform_is_said_to_be_used_in_world_space(scene, caplog):
    """A segmentation mask under another transform than its volume is matched in world
    space (as the Segment Editor draws on a moved, unhardened volume), which was done without a word: a mask drawn on
    the scan before it was registered then lies off the brain unnoticed. Both transforms are now named."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    labelmap = add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    with caplog.at_level(logging.WARNING):
        mrml.mask_image(segmentation, volume)
    assert not caplog.records  # the same transform (none): nothing to say
    segmentation.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reg").GetID())
    with caplog.at_level(logging.WARNING):
        used = mrml.mask_image(segmentation, volume)
    assert sitk.GetArrayFromImage(used).any()  # used, as before
    assert [r.getMessage() for r in caplog.records] == [
        "The brain mask 'brain' (under 'reg') and the volume 'head' (under no transform) are under different "
        "transforms: the segmentation is used where it lies in world space, resampled onto the volume's grid. If it "
        "was drawn on this scan before the scan was registered, put it under the volume's transform."]


def test_show_3d_builds_the_closed_surface(scene):
    # Slicer registers this converter at start-up; slicer-core does not.
    slicer.vtkSegmentationConverterFactory.GetInstance().RegisterConverterRule(
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    image, mask = make_head()
    out = mrml.publish(scene, add_volume(scene, image), fake_detection(image, mask), show_3d=True)
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert out.segmentation.GetSegmentation().ContainsRepresentation(surface)
    assert out.segmentation.GetDisplayNode().GetVisibility3D()
    assert out.segmentation.GetDisplayNode().GetVisibility2DOutline()


def segment_names(node):
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def test_an_existing_segmentation_keeps_its_other_segments(scene):
    """Choosing the user's segmentation as output replaces only this module's segment."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    labels = add_volume(scene, mask, "brain", "vtkMRMLLabelMapVolumeNode")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, mine)
    brain_id = mine.GetSegmentation().GetNthSegmentID(0)
    for threshold in (1.1, 1.05):  # the second run replaces the first run's segment
        mrml.publish(scene, volume, fake_detection(image, mask, threshold), mrml.OutputNodes(segmentation=mine))
        assert sorted(segment_names(mine)) == sorted(["brain", mrml.SEGMENT_NAME])
    anomaly = nodes.anomaly_segment_id(mine)
    assert anomaly is not None and anomaly != brain_id
    exported = mrml.mask_image(mine, volume, brain_id)
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, sitk.GetArrayFromImage(mask) > 0)
    exported = mrml.mask_image(mine, volume, anomaly)
    expected = sitk.GetArrayFromImage(fake_detection(image, mask, 1.05).labelmap) > 0
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, expected)


def test_outputs_are_linked_to_their_input_by_a_reference_that_survives_scene_import(scene, tmp_path):
    """Scene import renames clashing node IDs and updates references only (not ID attributes)."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    out = mrml.publish(scene, volume, fake_detection(image, mask))
    assert out.score.GetNodeReferenceID(nodes.SOURCE_REFERENCE) == volume.GetID()
    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Commit()

    other = slicer.vtkMRMLScene()
    first = add_volume(other, image, "already loaded")  # takes the ID the saved volume had
    assert first.GetID() == volume.GetID()
    other.SetURL(str(tmp_path / "saved.mrml"))
    other.Import()
    imported = [other.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                for i in range(other.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    source = next(n for n in imported if n.GetName() == "head")
    assert source.GetID() != volume.GetID()  # renamed on import
    score = mrml.find_output(other, "vtkMRMLScalarVolumeNode", "score", source)
    assert score is not None and score.GetName() == out.score.GetName()
    assert mrml.find_output(other, "vtkMRMLScalarVolumeNode", "score", first) is None
    assert nodes.source_volume(score) is source


def saved_and_reloaded(scene, folder):
    """The scene saved as a data bundle in ``folder`` and imported into a new scene, and its volume "head"."""
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(scene)
    assert application.SaveSceneToSlicerDataBundleDirectory(str(folder))
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(next(folder.glob("*.mrml"))))
    assert reloaded.Import()
    volumes = [reloaded.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
               for i in range(reloaded.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    return reloaded, next(v for v in volumes if v.GetName() == "head")


def test_the_top_slice_of_a_left_handed_volume_survives_a_saved_scene(scene, tmp_path):
    """A scene save stores a left-handed volume with its slice axis reversed: the table's indices are read on the
    grid they were written on."""
    image, mask = make_head(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    volume = add_volume(scene, image)
    out = mrml.publish(scene, volume, fake_detection(image, mask, 1e6))  # no component: the jump is the top slice
    jump = nodes.stored_result(out.score).jump_ras
    reloaded, source = saved_and_reloaded(scene, tmp_path)
    assert np.linalg.det(nodes.ijk_to_ras(source)[:3, :3]) > 0  # stored the other way round
    score = mrml.find_output(reloaded, "vtkMRMLScalarVolumeNode", "score", source)
    assert nodes.stored_result(score).jump_ras == pytest.approx(jump, abs=1e-6)


def test_a_renamed_anomaly_segment_is_kept_by_the_next_run(scene):
    """A radiologist who corrects the segment and names it owns it; the next run adds its own."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    corrected = first.segmentation.GetSegmentation().GetSegment(nodes.anomaly_segment_id(first.segmentation))
    corrected.SetName("Lesion (corrected)")
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    assert second.segmentation is first.segmentation
    assert sorted(segment_names(second.segmentation)) == sorted(["Lesion (corrected)", mrml.SEGMENT_NAME])
    assert nodes.user_segment_ids(second.segmentation) != []  # the kept one is the user's now
    mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    assert sorted(segment_names(second.segmentation)) == sorted(["Lesion (corrected)", mrml.SEGMENT_NAME])


def test_a_labelmap_or_segment_edited_since_its_run_is_kept_by_the_next_run(scene, caplog):
    """Corrections painted into the anomaly labelmap or segment are not overwritten: the next run keeps them, named
    "... (edited)", says so, and writes its own; unedited ones are updated in place, also after a scene save."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1), create_labelmap=True)
    again = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))  # nothing edited: updated in place
    assert (again.labelmap, again.segmentation) == (first.labelmap, first.segmentation)
    assert segment_names(again.segmentation) == [mrml.SEGMENT_NAME]

    painted = slicer.util.arrayFromVolume(first.labelmap)
    painted[2:4, 2:4, 2:4] = 1  # the radiologist adds a region
    slicer.util.arrayFromVolumeModified(first.labelmap)
    kept = painted.copy()
    segment = first.segmentation.GetSegmentation().GetSegment(nodes.anomaly_segment_id(first.segmentation))
    binary = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    scalars = binary.GetPointData().GetScalars()
    erased = int(np.count_nonzero(numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue()))
    numpy_support.vtk_to_numpy(scalars)[:] = 0  # ... and erases the segment
    binary.Modified()
    with caplog.at_level(logging.WARNING):
        third = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    assert third.labelmap is not first.labelmap and first.labelmap.GetScene() is scene
    assert first.labelmap.GetName().endswith(" (edited)") and not first.labelmap.GetAttribute(nodes.ROLE_ATTRIBUTE)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(first.labelmap), kept)
    assert third.segmentation is first.segmentation
    assert sorted(segment_names(third.segmentation)) == sorted([mrml.SEGMENT_NAME, mrml.SEGMENT_NAME + " (edited)"])
    assert erased > 0 and caplog.text.count("was edited since the run that wrote it") == 2


def test_a_result_table_edited_since_its_run_is_kept_by_the_next_run(scene, caplog):
    """A table the user unlocked in the Tables module and edited (a component's row corrected, a slice's score) was
    overwritten by the next run without a word: it is kept, named "... (edited)", said so, and the run writes its own;
    the slice plot shows the new run's slice table."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))
    for table in (first.components, first.slice_table):
        table.SetLocked(False)
        assert table.SetCellText(0, 1, "12345")
    with caplog.at_level(logging.WARNING):
        second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    for table, new in ((first.components, second.components), (first.slice_table, second.slice_table)):
        assert new is not table and table.GetScene() is scene and new.GetAttribute(nodes.ROLE_ATTRIBUTE)
        assert table.GetName().endswith(" (edited)") and not table.GetAttribute(nodes.ROLE_ATTRIBUTE)
        assert table.GetCellText(0, 1) == "12345" and new.GetCellText(0, 1) != "12345"
    assert caplog.text.count("was edited since the run that wrote it") == 2
    series = second.slice_chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNodeID() == second.slice_table.GetID()
    third = mrml.publish(scene, volume, fake_detection(image, mask, 1.1))  # not edited: updated in place
    assert (third.components, third.slice_table) == (second.components, second.slice_table)


def test_a_saved_and_reloaded_scene_s_results_are_not_taken_for_edited(scene, tmp_path, caplog):
    image, mask = make_head(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))  # left-handed: a save stores it the other way
    volume = add_volume(scene, image)
    mrml.publish(scene, volume, fake_detection(image, mask, 1.1), create_labelmap=True)
    reloaded, source = saved_and_reloaded(scene, tmp_path)
    labelmap = mrml.find_output(reloaded, "vtkMRMLLabelMapVolumeNode", "labelmap", source)
    segmentation = mrml.find_output(reloaded, "vtkMRMLSegmentationNode", "segmentation", source)
    components = mrml.find_output(reloaded, "vtkMRMLTableNode", "components", source)
    slices = mrml.find_output(reloaded, "vtkMRMLTableNode", "slice scores", source)
    again = mrml.image_from_volume(source)
    brain = sitk.Resample(mask, again, sitk.Transform(), sitk.sitkNearestNeighbor)
    with caplog.at_level(logging.WARNING):
        out = mrml.publish(reloaded, source, fake_detection(again, brain, 1.05))
    assert "edited" not in caplog.text
    assert (out.labelmap, out.segmentation) == (labelmap, segmentation)
    assert segment_names(out.segmentation) == [mrml.SEGMENT_NAME]
    assert (out.components, out.slice_table) == (components, slices)  # their values rounded by the save


def labelled_detection(image: sitk.Image, mask: sitk.Image, labels: np.ndarray) -> DetectionResult:
    """A detection on the image grid that labels the non-zero voxels of ``labels`` (a [k, j, i] array), score 2."""
    labelmap = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    labelmap.CopyInformation(image)
    score = sitk.GetImageFromArray((labels > 0).astype(np.float32) * 2.0)
    score.CopyInformation(image)
    return DetectionResult(score, labelmap, mask, 1.1, "absolute", [], components(labelmap, score))


@pytest.mark.parametrize("spacing, k", [((1.2, 1.0, 0.7), 24), ((1.2, 1.0, 1.5), 1)], ids=["labelmap", "segment"])
def test_a_small_component_s_outputs_are_not_taken_for_edited_after_a_saved_scene(scene, tmp_path, caplog, spacing, k):
    """A scene save stores a left-handed volume with its slice axis reversed: a two-voxel component's centroid, read
    back through the other matrix, rounded to the other side of 0.05 mm (the labelmap's S -12.1 read -12.2, the
    segment's 2.8 read 2.7), and a rerun kept the labelmap or segment as "... (edited)" and made a new one. One step of
    that rounding is no edit now; a voxel erased or the component moved by a voxel still is."""
    image, mask = make_head(spacing=spacing, direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    labels[k:k + 2, 20, 16] = 1
    mrml.publish(scene, add_volume(scene, image), labelled_detection(image, mask, labels), create_labelmap=True)
    reloaded, source = saved_and_reloaded(scene, tmp_path)
    labelmap = mrml.find_output(reloaded, "vtkMRMLLabelMapVolumeNode", "labelmap", source)
    segmentation = mrml.find_output(reloaded, "vtkMRMLSegmentationNode", "segmentation", source)
    again = mrml.image_from_volume(source)
    brain = sitk.Resample(mask, again, sitk.Transform(), sitk.sitkNearestNeighbor)
    rerun = labelled_detection(again, brain, array(labelmap))  # the same voxels, on the reloaded grid
    with caplog.at_level(logging.WARNING):
        out = mrml.publish(reloaded, source, rerun)
    assert "edited" not in caplog.text
    assert (out.labelmap, out.segmentation) == (labelmap, segmentation)
    assert segment_names(segmentation) == [mrml.SEGMENT_NAME]

    moved = slicer.util.arrayFromVolume(labelmap)
    moved[:] = np.roll(moved.copy(), 1, axis=1)  # the component moved by one voxel: as many voxels, elsewhere
    slicer.util.arrayFromVolumeModified(labelmap)
    segment = segmentation.GetSegmentation().GetSegment(nodes.anomaly_segment_id(segmentation))
    binary = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    voxels = numpy_support.vtk_to_numpy(binary.GetPointData().GetScalars())
    voxels[np.flatnonzero(voxels == segment.GetLabelValue())[0]] = 0  # one of its two voxels erased
    binary.Modified()
    with caplog.at_level(logging.WARNING):
        edited = mrml.publish(reloaded, source, rerun)
    assert edited.labelmap is not labelmap and labelmap.GetName().endswith(" (edited)")
    assert sorted(segment_names(segmentation)) == sorted([mrml.SEGMENT_NAME, mrml.SEGMENT_NAME + " (edited)"])
    assert caplog.text.count("was edited since the run that wrote it") == 2


def test_a_content_signature_one_rounding_step_away_or_in_the_old_form_is_no_edit():
    """The text a run recorded (an earlier version's scenes hold the same form: count, then the centroid to 0.1 mm)
    still compares: the same text or one 0.1 mm step on an axis is no edit; another count, two steps, any other
    recorded text (a table's digest) that differs are."""
    left_handed = np.diag([-1.2, -1.0, -0.7, 1.0])
    left_handed[:3, 3] = (20.0, -10.0, 5.0)
    flipped = left_handed.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = (left_handed @ [0, 0, 35, 1])[:3]  # how a scene save stores it: slice axis reversed
    voxels = np.array([[16, 20, 24], [16, 20, 25]])
    written = nodes.content_signature(voxels, left_handed)
    reread = nodes.content_signature(voxels * [1, 1, -1] + [0, 0, 35], flipped)
    assert written != reread and not nodes.edited_since_written(written, reread)
    assert not nodes.edited_since_written("2:0.8,-30.0,-12.1", "2:0.8,-30.0,-12.2")  # an earlier version's text
    assert not nodes.edited_since_written("0", "0") and not nodes.edited_since_written(None, "2:0.0,0.0,0.0")
    for now in ("3:0.8,-30.0,-12.1", "2:0.8,-30.0,-12.3", "2:1.0,-30.0,-12.1", "0"):
        assert nodes.edited_since_written("2:0.8,-30.0,-12.1", now)
    assert nodes.edited_since_written("0" * 64, "0" * 63 + "1")  # a table's digest: only the same text is no edit


def test_the_panels_choices_come_back_on_the_reloaded_nodes_when_a_saved_scene_is_imported_over_another(
        scene, tmp_path):
    """The panel's parameter node (parameterNodeWrapper keeps each node field as a node reference of its name) saved
    with its scene and imported into a scene whose panel is open and whose node IDs clash: every choice (input, mask,
    outputs) names the reloaded node of the same name, the outputs are still its input's, and a model file that is
    gone meanwhile is said in one line by the panel's check, not raised."""
    from types import SimpleNamespace

    from CeVAEAnomalyLib.slicer.settings import model_problem

    image, mask = make_head(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    volume = add_volume(scene, image)
    brain = add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    out = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    chosen = {"inputVolume": volume, "brainMask": brain, "scoreVolume": out.score, "anomalySegmentation":
              out.segmentation, "anomalyLabelmap": out.labelmap, "componentTable": out.components}
    panel = slicer.vtkMRMLScriptedModuleNode()
    panel.SetSingletonTag("CeVAEAnomaly")
    scene.AddNode(panel)
    for name, node in chosen.items():
        panel.SetNodeReferenceID(name, node.GetID())
    panel.SetParameter("modelPath", str(tmp_path / "moved away.cevae"))
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(scene)
    (tmp_path / "saved").mkdir()
    assert application.SaveSceneToSlicerDataBundleDirectory(str(tmp_path / "saved"))

    other = slicer.vtkMRMLScene()
    for class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode",
                       "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        other.AddNewNodeByClass(class_name, "already here")  # takes the saved nodes' IDs
    open_panel = slicer.vtkMRMLScriptedModuleNode()
    open_panel.SetSingletonTag("CeVAEAnomaly")
    other.AddNode(open_panel)
    open_panel.SetNodeReferenceID("inputVolume", other.GetFirstNodeByName("already here").GetID())
    other.SetURL(str(next((tmp_path / "saved").glob("*.mrml"))))
    assert other.Import()
    panels = [other.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
              for i in range(other.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
    assert panels == [open_panel]  # the singleton: the panel's own node takes the saved choices
    reloaded = {name: open_panel.GetNodeReference(name) for name in chosen}
    for name, node in chosen.items():
        assert reloaded[name] is not None and reloaded[name].GetName() == node.GetName(), name
        assert reloaded[name].GetID() != node.GetID(), name  # renamed on import, the reference with it
    for name, class_name, role in (("scoreVolume", "vtkMRMLScalarVolumeNode", "score"),
                                   ("anomalySegmentation", "vtkMRMLSegmentationNode", "segmentation"),
                                   ("anomalyLabelmap", "vtkMRMLLabelMapVolumeNode", "labelmap")):
        assert mrml.find_output(other, class_name, role, reloaded["inputVolume"]) is reloaded[name]
    gone = SimpleNamespace(useBundledModel=False, modelPath=open_panel.GetParameter("modelPath"))
    assert "moved away.cevae does not exist" in model_problem(gone)


def test_outputs_follow_a_renamed_input_unless_the_user_named_them(scene):
    image, mask = make_head()
    volume = add_volume(scene, image, "T1")
    first = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    assert first.score.GetName() == "T1 anomaly score"
    first.components.SetName("findings of patient A")  # a name the user gave
    volume.SetName("Patient A T1")
    again = mrml.publish(scene, volume, fake_detection(image, mask))
    assert again.score is first.score and again.score.GetName() == "Patient A T1 anomaly score"
    assert again.labelmap.GetName() == "Patient A T1 anomaly labelmap"
    assert again.segmentation.GetName() == "Patient A T1 anomaly segmentation"
    assert again.components.GetName() == "findings of patient A"


def test_the_labelmap_names_its_label_as_the_segment_and_in_its_colour(scene):
    image, mask = make_head()
    volume = add_volume(scene, image)
    out = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    colors = out.labelmap.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    assert colors.GetColor(1, rgba)
    assert colors.GetColorName(1) == mrml.SEGMENT_NAME and rgba[:3] == pytest.approx(mrml.SEGMENT_COLOR, abs=1 / 255)
    again = mrml.publish(scene, add_volume(scene, image, "other"), fake_detection(image, mask), create_labelmap=True)
    assert again.labelmap.GetDisplayNode().GetColorNode() is colors  # one table per scene


def test_the_panels_jump_and_the_result_agree_on_tied_slices(scene):
    """Slices tied on the slice anomaly: the stored table's top slice is the result's (the highest map score
    first, then the sample score), so the panel, the command line and ``topSliceRas`` name one slice."""
    from CeVAEAnomalyLib.result import SliceScoreRow
    from CeVAEAnomalyLib.slicer.nodes import stored_result

    image, mask = make_head()
    volume = add_volume(scene, image)
    result = fake_detection(image, mask)
    n = image.GetSize()[2]
    result.slices = [SliceScoreRow(2, k, 1.0, 1.0, 9.0 if k == 4 else 1.0, 0.9 if k in (4, 9) else 0.1,
                                   5.0 if k == 9 else 1.0, False) for k in range(n)]
    top = result.top_slice
    assert top.index == 9  # tied with slice 4 on the anomaly; slice 4 has the higher sample score
    out = mrml.publish(scene, volume, result)
    peak = nodes.slice_peak_ijk(sitk.GetArrayViewFromImage(result.score), 2, 9)  # (the jump: its highest score)
    assert peak[2] == 9
    assert stored_result(out.score).top_slice_ras == pytest.approx((nodes.ijk_to_ras(volume) @ [*peak, 1.0])[:3])


def test_results_are_found_from_the_score_volume_alone(scene):
    """After a reload the Results section works from the parameter node's score volume."""
    from CeVAEAnomalyLib.slicer.nodes import stored_result

    image, mask = make_head(direction=oblique_direction())
    volume = add_volume(scene, image)
    result = fake_detection(image, mask)
    out = mrml.publish(scene, volume, result)
    stored = stored_result(out.score)
    assert stored.volume is volume and stored.slice_table is out.slice_table and stored.slice_chart is out.slice_chart
    top = result.top_slice
    assert stored.top_slice_ras == pytest.approx(nodes.slice_center_ras(volume, top.axis, top.index))
    assert stored.components is out.components
    expected = (nodes.component_position(out.components, 0) if result.components
                else nodes.slice_center_ras(volume, top.axis, top.index))
    assert stored.jump_ras == pytest.approx(expected)
    assert stored_result(volume) is None and stored_result(None) is None


def test_a_results_jump_follows_the_inputs_transform_after_its_score_volume_is_deleted(scene):
    """``topSliceRas`` goes where the panel's jump goes: a score volume deleted from the scene has no parent transform
    left, so the input's is used (as nodes.run_frame does), not the point in the input's own RAS."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyResult

    image, mask = make_head()
    volume = add_volume(scene, image)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 100.0)
    moved.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(moved.GetID())
    detection = fake_detection(image, mask)
    for result in (detection, fake_detection(image, mask, 1e6)):  # the top component, the top slice
        out = mrml.publish(scene, volume, result)
        jump = CeVAEAnomalyResult(volume, out, result).topSliceRas
        assert jump == pytest.approx(nodes.stored_result(out.score).jump_ras)
        scene.RemoveNode(out.score)
        assert CeVAEAnomalyResult(volume, out, result).topSliceRas == pytest.approx(jump)
    assert jump[0] == pytest.approx(nodes.slice_center_ras(volume, 2, result.top_slice.index)[0])


def test_showing_a_scans_results_hides_the_anomaly_outlines_of_other_scans_and_runs(scene):
    """Apply on A, then on B: A's cyan "Anomaly" outline, drawn in every slice view, would lie over B (scans of two
    patients overlap in RAS) and pass for one of B's findings. Showing a run's results shows its segment alone among
    the module's; a user's own segments keep their visibility."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    image_a, mask_a = make_head(seed=1)
    image_b, mask_b = make_head(seed=2)
    a, b = add_volume(scene, image_a, "A"), add_volume(scene, image_b, "B")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my findings")
    brain = add_volume(scene, mask_b, "B brain", "vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(brain, mine)
    mine.CreateDefaultDisplayNodes()
    own = nodes.user_segment_ids(mine)[0]

    def visible(node) -> bool:
        return bool(node.GetDisplayNode().GetSegmentVisibility(nodes.anomaly_segment_id(node)))

    logic = CeVAEAnomalyLogic()
    out_a = mrml.publish(scene, a, fake_detection(image_a, mask_a))
    logic.showResults(out_a.score, a)
    out_b = mrml.publish(scene, b, fake_detection(image_b, mask_b), mrml.OutputNodes(segmentation=mine))
    logic.showResults(out_b.score, b)
    assert visible(mine) and not visible(out_a.segmentation)
    new_score = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "new")
    again = mrml.publish(scene, a, fake_detection(image_a, mask_a, 1.05), mrml.OutputNodes(score=new_score))
    logic.showResults(out_a.score, a)  # the first run of A shown again (console)
    assert visible(out_a.segmentation) and not visible(again.segmentation) and not visible(mine)
    assert mine.GetDisplayNode().GetSegmentVisibility(own)


def test_overlay_opacity_acts_only_on_views_showing_the_score_volume(scene):
    from CeVAEAnomalyLib.slicer.nodes import set_overlay_opacity

    image, mask = make_head()
    volume = add_volume(scene, image)
    out = mrml.publish(scene, volume, fake_detection(image, mask))
    other = add_volume(scene, image, "another overlay")
    views = []
    for foreground in (out.score, other, None):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(0.5)
        views.append(composite)
    assert set_overlay_opacity(scene, out.score, 0.8) == 1
    assert [v.GetForegroundOpacity() for v in views] == pytest.approx([0.8, 0.5, 0.5])


def test_calibration_masks_are_paired_with_volumes_by_grid(scene):
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    image_a, mask_a = make_head()
    image_b, mask_b = make_head(size=(36, 40, 30))
    a, b = add_volume(scene, image_a, "a"), add_volume(scene, image_b, "b")
    ma = add_volume(scene, mask_a, "mask a", "vtkMRMLLabelMapVolumeNode")
    mb = add_volume(scene, mask_b, "mask b", "vtkMRMLLabelMapVolumeNode")
    assert pair_masks([a, b], [mb]) == [None, mb]
    assert pair_masks([a, b], [mb, ma]) == [ma, mb]
    assert pair_masks([b], [ma]) == [ma]  # the only volume chosen: on another grid, resampled onto b's at the start
    twin = add_volume(scene, mask_a, "mask a again", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match="two brain masks"):
        pair_masks([a], [ma, twin])
    # scans in one template space share a grid: a mask goes to the volume whose name leads its own
    c1, c10 = add_volume(scene, image_a, "c1"), add_volume(scene, image_a, "c10")
    m1 = add_volume(scene, mask_a, "c1 mask", "vtkMRMLLabelMapVolumeNode")
    m10 = add_volume(scene, mask_a, "c10-label", "vtkMRMLLabelMapVolumeNode")
    assert pair_masks([c1, c10], [m10, m1]) == [m1, m10]
    with pytest.raises(CeVAEError, match="grid of several of .* name each mask after its volume, e.g. 'c1 mask'"):
        pair_masks([c1, c10], [ma])
    # a volume moved by a transform, its mask not: the grid is the volume's, the transform is what differs
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "5 mm")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    moved.SetMatrixTransformToParent(shift)
    a.SetAndObserveTransformNodeID(moved.GetID())
    assert pair_masks([a], [ma]) == [ma]  # used where it lies in world space, as detection uses it (mask_image)


def test_healthy_masks_under_another_transform_than_their_volume_are_paired_as_detection_uses_them(scene):
    """A site's scans registered (under a transform) after their masks were made (under none): a mask on its
    volume's grid was refused as "under another transform; harden the transforms", though detection uses such a mask
    where it lies in world space, with a warning. It is now paired by its grid whatever its transform; among volumes
    sharing that grid, the one its name leads, else the one under its own transform. No node is changed."""
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    image, brain = make_head()
    reg = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reg")
    c1, c10 = add_volume(scene, image, "c1"), add_volume(scene, image, "c10")
    c1.SetAndObserveTransformNodeID(reg.GetID())
    m1 = add_volume(scene, brain, "c1 mask", "vtkMRMLLabelMapVolumeNode")  # under none, as c10: its name says c1
    m10 = add_volume(scene, brain, "c10 mask", "vtkMRMLLabelMapVolumeNode")
    assert pair_masks([c1, c10], [m10, m1]) == [m1, m10]
    plain = add_volume(scene, brain, "brain", "vtkMRMLLabelMapVolumeNode")  # no name leads: its transform's volume
    assert pair_masks([c1, c10], [plain]) == [None, plain]
    plain.SetAndObserveTransformNodeID(reg.GetID())
    assert pair_masks([c1, c10], [plain]) == [plain, None]
    other = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "other")
    plain.SetAndObserveTransformNodeID(other.GetID())  # neither's transform, no name: which scan's is not known
    with pytest.raises(CeVAEError, match="grid of several of"):
        pair_masks([c1, c10], [plain])
    assert [n.GetTransformNodeID() for n in (c1, c10, m1, m10)] == [reg.GetID(), None, None, None]


def test_healthy_masks_on_another_grid_than_their_volume_are_paired_by_name(scene):
    """A site's brain masks made at 2 mm for its 1 mm scans, or cropped: detection resamples such a mask onto its
    scan's grid (nearest neighbour, with a warning), but Calibrate and Adapt refused it ("on the grid of none of the
    chosen healthy volumes"). A mask on no chosen volume's grid now goes to the volume whose name leads its own, or to
    the only volume chosen; where no name says whose it is, the refusal says to name it after its volume. A mask on a
    volume's grid still goes to that volume, and no node is changed."""
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    image, brain = make_head()
    other, other_brain = make_head(size=(36, 40, 30), seed=3)
    c1, c10, c2 = add_volume(scene, image, "c1"), add_volume(scene, image, "c10"), add_volume(scene, other, "c2")
    coarse = add_volume(scene, brain[::2, ::2, ::2], "c1 mask 2mm", "vtkMRMLLabelMapVolumeNode")
    cropped = add_volume(scene, brain[4:-4, 2:, :], "c10-label", "vtkMRMLLabelMapVolumeNode")
    on_grid = add_volume(scene, other_brain, "brain", "vtkMRMLLabelMapVolumeNode")  # on c2's grid: c2's by its grid
    assert pair_masks([c1, c10, c2], [cropped, on_grid, coarse]) == [coarse, cropped, on_grid]
    assert pair_masks([c10], [coarse]) == [coarse]  # the only volume: its mask, whatever its name
    unnamed = add_volume(scene, brain[::2, ::2, ::2], "brain 2mm", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match=r"^The brain mask 'brain 2mm' is on the grid of none of the chosen healthy "
                                         r"volumes, and its name does not say whose it is: name it after its volume, "
                                         r"e.g. 'c1 mask' \(a mask on another grid is resampled onto its volume's\)"):
        pair_masks([c1, c2], [unnamed])
    with pytest.raises(CeVAEError, match="'c1' has two brain masks chosen"):
        pair_masks([c1, c2], [coarse, add_volume(scene, brain, "c1 brain", "vtkMRMLLabelMapVolumeNode")])
    twin = add_volume(scene, other, "c1")  # two volumes called 'c1': the name tells them apart no more
    with pytest.raises(CeVAEError, match="rename the volumes apart"):
        pair_masks([c1, twin], [coarse])
    assert coarse.GetImageData().GetDimensions() == (20, 22, 18) and coarse.GetSpacing() == (2.4, 2.0, 3.0)


def test_masks_of_healthy_volumes_that_share_a_grid_and_a_name_say_to_rename_the_volumes(scene):
    """Two healthy scans in one template space with one series name (e.g. 't1_mprage_sag' of two persons): each mask
    fits both, and the refusal said to name each mask after its volume, e.g. 't1_mprage_sag mask', which the masks
    were already called; no naming of the masks could tell the volumes apart. It says to rename the volumes first."""
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    image, mask = make_head()
    volumes = [add_volume(scene, image, "t1_mprage_sag") for _ in range(2)]
    masks = [add_volume(scene, mask, f"t1_mprage_sag mask{n}", "vtkMRMLLabelMapVolumeNode") for n in ("", " 2")]
    with pytest.raises(CeVAEError, match="they share one grid and the name 't1_mprage_sag': rename the volumes apart "
                                         r"\(Data module\), then name each mask after its volume"):
        pair_masks(volumes, masks)
    volumes[1].SetName("t1_mprage_sag 2")
    masks[1].SetName("t1_mprage_sag 2 mask")
    assert pair_masks(volumes, masks) == masks


def test_the_modules_own_volumes_are_kept_out_of_the_input_selectors(scene):
    """A score volume, labelmap or anomaly segmentation of this module is not offered as an input, brain mask or
    healthy volume (the brain-mask selector takes segmentations too)."""
    image, mask = make_head()
    labelmap_input = add_volume(scene, mask, "brain", "vtkMRMLLabelMapVolumeNode")
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "a colour series")  # the selector cannot show it
    volume = add_volume(scene, image, "head")
    assert nodes.first_input_volume(scene) is volume and nodes.module_volume_ids(scene) == []
    assert colour.GetID() not in nodes.module_volume_ids(scene)
    out = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    assert sorted(nodes.module_volume_ids(scene)) == sorted([out.score.GetID(), out.labelmap.GetID(),
                                                             out.segmentation.GetID()])
    assert labelmap_input.GetID() not in nodes.module_volume_ids(scene)
    scene.RemoveNode(volume)  # the score volume is now the first scalar volume: not the default input
    assert nodes.first_input_volume(scene) is None
    other = add_volume(scene, image, "another head")
    assert nodes.first_input_volume(scene) is other


@pytest.mark.parametrize("show_3d", [False, True], ids=["2D", "3D"])
def test_only_the_modules_segment_changes_its_look(scene, show_3d):
    """Outline without fill (and 3D or not) is set on the "Anomaly" segment, not on the user's others."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    labels = add_volume(scene, mask, "brain", "vtkMRMLLabelMapVolumeNode")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, mine)
    mine.CreateDefaultDisplayNodes()
    display = mine.GetDisplayNode()
    brain = mine.GetSegmentation().GetNthSegmentID(0)
    display.SetSegmentVisibility3D(brain, not show_3d)
    before = (display.GetVisibility2DFill(), display.GetVisibility2DOutline(), display.GetVisibility3D())
    mrml.publish(scene, volume, fake_detection(image, mask), mrml.OutputNodes(segmentation=mine), show_3d=show_3d)
    anomaly = nodes.anomaly_segment_id(mine)
    assert (display.GetVisibility2DFill(), display.GetVisibility2DOutline(), display.GetVisibility3D()) == before
    assert display.GetSegmentVisibility2DFill(brain) and display.GetSegmentVisibility3D(brain) is not show_3d
    assert not display.GetSegmentVisibility2DFill(anomaly) and display.GetSegmentVisibility2DOutline(anomaly)
    assert display.GetSegmentVisibility3D(anomaly) is show_3d


def test_a_volume_whose_voxels_start_at_another_index_is_read_where_it_lies(scene):
    """Image data whose extent starts at (10, 0, 3) instead of 0: the first voxel lies at IJK (10, 0, 3); the
    image (and so every output made from it) keeps it there in the world."""
    image, _ = make_head(**GEOMETRIES["oblique"])
    node = add_volume(scene, image)
    data = vtk.vtkImageData()
    data.DeepCopy(node.GetImageData())
    size = image.GetSize()
    data.SetExtent(10, 10 + size[0] - 1, 0, size[1] - 1, 3, 3 + size[2] - 1)
    node.SetAndObserveImageData(data)
    back = mrml.image_from_volume(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras = nodes.to_numpy(matrix) @ np.array([10.0, 0.0, 3.0, 1.0])
    np.testing.assert_allclose(nodes.ijk_to_ras(node) @ np.array([0.0, 0.0, 0.0, 1.0]), ras, atol=1e-9)
    np.testing.assert_allclose(back.TransformIndexToPhysicalPoint((0, 0, 0)), ras[:3] * [-1, -1, 1], atol=1e-9)
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    mrml.update_volume_from_image(out, back)
    np.testing.assert_allclose(nodes.ijk_to_ras(out) @ np.array([0.0, 0.0, 0.0, 1.0]), ras, atol=1e-9)
    # slice k of the results is the data's k-th slice: the jump without components goes to its highest score
    result = fake_detection(back, sitk.Cast(back > 0, sitk.sitkUInt8), threshold=1e6)
    top = result.top_slice
    published = mrml.publish(scene, node, result)
    i, j, k = nodes.slice_peak_ijk(sitk.GetArrayViewFromImage(result.score), 2, top.index)
    assert k == top.index
    assert nodes.stored_result(published.score).jump_ras == pytest.approx(
        (nodes.to_numpy(matrix) @ [i + 10.0, j, k + 3.0, 1.0])[:3])


def test_display_window_of_an_infinite_threshold_is_finite():
    image, mask = make_head()
    score = sitk.Cast(image, sitk.sitkFloat32) / 100.0
    lower, upper = mrml.display_range(float("inf"), score, mask)
    assert np.isfinite(lower) and np.isfinite(upper) and upper > lower


def test_table_columns_use_the_header_setting_slicer_5_6_0_has():
    """Slicer 5.6.0's table node has only SetUseColumnNameAsColumnHeader (5.6.1 renamed it): the columns are
    written there too, with their names as headers."""

    class Table560(slicer.vtkMRMLTableNode):
        def __getattribute__(self, name):
            if "UseColumnTitleAsColumnHeader" in name:
                raise AttributeError(name)
            return super().__getattribute__(name)

    table = Table560()
    mrml._set_columns(table, [("Slice", mrml._array(vtk.vtkIntArray, [4, 7]), "")])
    assert table.GetNumberOfRows() == 2 and table.GetColumnName(0) == "Slice"
    assert slicer.vtkMRMLTableNode.GetUseColumnTitleAsColumnHeader(table)


def test_a_transaction_keeps_no_copy_of_a_node_once_it_ends(scene):
    """The copies Undo.keep makes come from CreateNodeInstance, whose reference the caller owns (Slicer's own
    scripts UnRegister it): once the transaction ends nothing holds them, so a rerun frees the voxels the reused
    score volume and labelmap held before instead of keeping every earlier run's in memory."""
    import gc

    _, mask = make_head()
    node = add_volume(scene, mask, "labelmap", "vtkMRMLLabelMapVolumeNode")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    table.AddColumn(mrml._array(vtk.vtkIntArray, [1, 2]))
    before = node.GetImageData()
    with mrml.transaction(scene) as undo:
        undo.keep(node)
        undo.keep(table)
        mrml.update_volume_from_image(node, mask)
    del undo
    gc.collect()
    assert node.GetImageData() is not before
    assert before.GetReferenceCount() == 1  # this test's own reference only


def test_the_slice_plot_puts_each_slice_at_its_index(scene):
    """The slice table's rows start at the first slice with brain, not at 0. A line series plots against the row
    number (Slicer's plot view reads the X column only where IsXColumnRequired, scatter types): the series must be a
    scatter series so that the chart's "Slice index" axis shows the slice indices."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    result = fake_detection(image, mask)
    result.slices = result.slices[3:]  # as a detection's: the slices without brain have no row
    out = mrml.publish(scene, volume, result)
    series = out.slice_chart.GetNthPlotSeriesNode(0)
    assert nodes.table_column(out.slice_table, "Slice")[0] == 3
    assert series.GetXColumnName() == "Slice" and series.IsXColumnRequired()
    assert series.GetLineStyle() != series.LineStyleNone and series.GetMarkerStyle() == series.MarkerStyleNone


def recorded(detection: DetectionResult, model: str, threshold: float = 1.1) -> DetectionResult:
    """``detection`` with a record naming ``model`` (its sha256: the name's digest) and the ``threshold``."""
    import dataclasses
    import hashlib

    from CeVAEAnomalyLib.io.checksum import image_voxel_sha256
    from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions
    from CeVAEAnomalyLib.result import DetectionRecord, ModelRecord

    sha256 = hashlib.sha256(model.encode()).hexdigest()  # (the images' digests: any 64 hex digits)
    record = DetectionRecord("cevae-anomaly", "9.9", ModelRecord(model, "T1", f"/m/{model}.cevae", sha256, None),
                             threshold, "absolute", ScoreOptions(score_type="rec").to_dict(),
                             PostprocessOptions(rim_mm=2.0).to_dict(), "cpu", False, 64, "given", {"torch": "2.0"}, (),
                             "2025-01-02T03:04:05Z", image_voxels_sha256=image_voxel_sha256(detection.score),
                             mask_voxels_sha256=image_voxel_sha256(detection.brain_mask))
    return dataclasses.replace(detection, record=record)


def test_the_outputs_say_how_they_were_made_and_keep_it_in_a_saved_scene(scene, monkeypatch, tmp_path):
    """Every output node of a run carries its model's name and sha256, the threshold and its source, the tool's version,
    the options as compact JSON (with the batch size, the mask given or computed and the libraries' versions) and the
    digests of the image and of the mask given (none for an automatic one). A
    rerun with another model replaces them, a failed one leaves the earlier run's (and a failed first run leaves no
    node with them), a result without a record leaves none; a saved scene keeps them."""
    import dataclasses
    import hashlib
    import json

    image, mask = make_head()
    volume = add_volume(scene, image)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    def marks(out):
        nodes_of_run = [out.score, out.labelmap, out.segmentation, out.components, out.slice_table, out.slice_chart,
                        out.slice_chart.GetNthPlotSeriesNode(0)]
        return [{name: node.GetAttribute(name) for name in nodes.PROVENANCE_ATTRIBUTES} for node in nodes_of_run]

    with monkeypatch.context() as patch:
        patch.setattr(mrml, "stamp_run", broken)  # the last step, after the marks
        with pytest.raises(RuntimeError, match="disk full"):
            mrml.publish(scene, volume, recorded(fake_detection(image, mask), "default"), create_labelmap=True)
    assert not any(scene.GetNthNode(i).GetAttribute(nodes.MODEL_ATTRIBUTE) for i in range(scene.GetNumberOfNodes()))
    first = mrml.publish(scene, volume, recorded(fake_detection(image, mask), "default"), create_labelmap=True)
    record = recorded(fake_detection(image, mask), "default").record
    expected = {nodes.MODEL_ATTRIBUTE: "default", nodes.MODEL_SHA256_ATTRIBUTE: hashlib.sha256(b"default").hexdigest(),
                nodes.THRESHOLD_ATTRIBUTE: "1.1", nodes.THRESHOLD_SOURCE_ATTRIBUTE: "absolute",
                nodes.VERSION_ATTRIBUTE: "cevae-anomaly 9.9", nodes.OPTIONS_ATTRIBUTE: mrml.provenance_attributes(
                    record)[nodes.OPTIONS_ATTRIBUTE], nodes.IMAGE_SHA256_ATTRIBUTE: record.image_voxels_sha256,
                nodes.MASK_SHA256_ATTRIBUTE: record.mask_voxels_sha256}
    assert marks(first) == [expected] * 7
    assert all(len(expected[n]) == 64 for n in (nodes.IMAGE_SHA256_ATTRIBUTE, nodes.MASK_SHA256_ATTRIBUTE))
    options = json.loads(expected[nodes.OPTIONS_ATTRIBUTE])
    assert options["score"]["score_type"] == "rec" and options["post"]["rim_mm"] == 2.0
    # as the record says them: the slices per pass (sampled scores depend on it), the mask given or computed, the
    # libraries' versions (a scene saved without them could not tell maps made otherwise apart)
    assert (options["batch_size"], options["mask"], options["software"]) == (64, "given", {"torch": "2.0"})
    assert " " not in expected[nodes.OPTIONS_ATTRIBUTE]  # compact

    with monkeypatch.context() as patch:
        patch.setattr(mrml, "stamp_run", broken)  # the last step, after the marks
        with pytest.raises(RuntimeError, match="disk full"):
            mrml.publish(scene, volume, recorded(fake_detection(image, mask), "site", float("inf")))
    assert marks(first) == [expected] * 7
    second = mrml.publish(scene, volume, recorded(fake_detection(image, mask), "site", float("inf")))
    assert second.score is first.score and second.labelmap is first.labelmap
    site = marks(second)
    assert {m[nodes.MODEL_ATTRIBUTE] for m in site} == {"site"} and {m[nodes.THRESHOLD_ATTRIBUTE] for m in site} == {
        "inf"}

    reloaded, source = saved_and_reloaded(scene, tmp_path)
    score = mrml.find_output(reloaded, "vtkMRMLScalarVolumeNode", "score", source)
    assert {name: score.GetAttribute(name) for name in nodes.PROVENANCE_ATTRIBUTES} == site[0]

    automatic = recorded(fake_detection(image, mask), "site")  # a record of a run with the automatic mask
    automatic.record = dataclasses.replace(automatic.record, mask="automatic", mask_voxels_sha256=None)
    rerun = mrml.publish(scene, volume, automatic)
    assert [m[nodes.MASK_SHA256_ATTRIBUTE] for m in marks(rerun)] == [None] * 7  # (the earlier run's removed)

    third = mrml.publish(scene, volume, fake_detection(image, mask))  # made without a record: claims nothing
    assert marks(third) == [dict.fromkeys(nodes.PROVENANCE_ATTRIBUTES)] * 7


def test_showing_a_deleted_score_volume_names_the_score_volume(scene):
    """showResults and setOverlayOpacity (console calls) with a score volume removed from the scene called it "the
    input volume", the node the user had not touched."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    image, mask = make_head()
    volume = add_volume(scene, image, "T1")
    out = mrml.publish(scene, volume, fake_detection(image, mask))
    scene.RemoveNode(out.score)
    logic, name = CeVAEAnomalyLogic(), re.escape(out.score.GetName())
    with pytest.raises(CeVAEError, match=f"^The score volume '{name}' is not in an MRML scene"):
        logic.showResults(out.score, volume)
    with pytest.raises(CeVAEError, match=f"^The score volume '{name}' is not in an MRML scene"):
        logic.setOverlayOpacity(out.score, 0.3)


def data_module_hierarchy(scene):
    """The scene's subject hierarchy (Data module), which gives every data node added an item at its top, as the
    application's subject hierarchy plugins do (slicer-core has no plugins: without this, nodes get no item)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def added(caller, event, node) -> None:
        if not scene.IsImporting() and not node.GetHideFromEditors() and not node.IsA("vtkMRMLSubjectHierarchyNode"):
            hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)

    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, added)
    return hierarchy


def test_new_outputs_go_where_the_reader_keeps_the_scans_results(scene):
    """New output nodes (a scan's first run, a run sent to nodes of its own, a sequence frame's first run) landed at
    the top of the Data module's tree, away from the scan's patient and study and from the folder the reader had moved
    its earlier results into. They now go beside the scan's earlier outputs, or beside the scan itself."""
    hierarchy = data_module_hierarchy(scene)
    image, mask = make_head()
    volume = add_volume(scene, image)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "MR brain")
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(volume), study)

    def parents(out) -> set:
        made = [*vars(out).values(), out.slice_chart.GetNthPlotSeriesNode(0)]
        return {hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) for node in made if node is not None}

    first = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    assert parents(first) == {study}  # beside the scan, in its study
    folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "anomaly results")
    for node in (*vars(first).values(), first.slice_chart.GetNthPlotSeriesNode(0)):
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(node), folder)
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05), create_labelmap=True, new_nodes=True)
    assert second.score is not first.score and parents(second) == {folder}
    other = add_volume(scene, make_head(seed=2)[0], "other")  # another scan at the top: its outputs stay beside it
    assert parents(mrml.publish(scene, other, fake_detection(mrml.image_from_volume(other), mask))) == {
        hierarchy.GetSceneItemID()}


def test_the_labelmap_made_beside_an_edited_one_goes_where_the_edited_one_is(scene):
    """A labelmap the reader edited is kept as "... (edited)" and the run writes a new one, which went beside the
    scan's other results (the general rule: the edited one is no output any more) rather than where the labelmap it
    stands in for was: a reader who keeps labelmaps in a folder of their own found it outside. It goes beside the
    edited one now."""
    hierarchy = data_module_hierarchy(scene)
    image, mask = make_head()
    volume = add_volume(scene, image)
    first = mrml.publish(scene, volume, fake_detection(image, mask), create_labelmap=True)
    folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "corrected labelmaps")
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(first.labelmap), folder)
    painted = slicer.util.arrayFromVolume(first.labelmap)
    painted[2:4, 2:4, 2:4] = 1
    slicer.util.arrayFromVolumeModified(first.labelmap)
    second = mrml.publish(scene, volume, fake_detection(image, mask, 1.05))
    assert second.labelmap is not first.labelmap and first.labelmap.GetName().endswith(" (edited)")
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(second.labelmap)) == folder
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(second.score)) == hierarchy.GetSceneItemID()


def test_a_segmentation_drawn_on_another_scan_never_takes_this_scans_anomalies(scene, caplog):
    """A segmentation of the user's drawn on B (B's brain mask, B's tumour outline) and chosen as A's output: A's
    anomaly segment went into it (on B's grid), and the panel's output field kept it for A. It is B's node: A's
    results go to a node of their own, the panel offers A's own, and the segmentation keeps its segments only."""
    image_a, mask_a = make_head(seed=1)
    image_b, mask_b = make_head(seed=2, size=(36, 40, 30), origin=(-5.0, 0.0, 0.0))
    a, b = add_volume(scene, image_a, "A"), add_volume(scene, image_b, "B")
    brain_b = add_volume(scene, mask_b, "B brain", "vtkMRMLLabelMapVolumeNode")
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "B tumour")
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(b)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(brain_b, drawn)
    assert drawn.GetNodeReference(drawn.GetReferenceImageGeometryReferenceRole()) is b
    segments = nodes.segment_ids(drawn)
    panel = nodes.outputs_for_input(scene, a, {"anomalySegmentation": drawn})
    assert panel["anomalySegmentation"] is None  # (none of A's yet: made on Apply)
    with caplog.at_level(logging.WARNING, logger=mrml.log.name):
        out = mrml.publish(scene, a, fake_detection(image_a, mask_a), mrml.OutputNodes(segmentation=drawn))
    assert out.segmentation is not drawn and nodes.anomaly_segment_id(out.segmentation) is not None
    assert nodes.segment_ids(drawn) == segments and drawn.GetAttributeNames() == ()
    assert "'B tumour' holds other results" in caplog.text
    assert nodes.outputs_for_input(scene, a, {"anomalySegmentation": drawn})["anomalySegmentation"] is \
        out.segmentation
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on A")  # one drawn on A itself is A's to fill
    mine.SetReferenceImageGeometryParameterFromVolumeNode(a)
    assert nodes.outputs_for_input(scene, a, {"anomalySegmentation": mine})["anomalySegmentation"] is mine
    assert mrml.publish(scene, a, fake_detection(image_a, mask_a), mrml.OutputNodes(segmentation=mine)).segmentation \
        is mine


def test_a_segmentation_another_scans_run_used_as_its_brain_mask_never_takes_this_scans_anomalies(tiny_bundle):
    """B's brain mask as a segmentation drawn on no volume (made from a labelmap), used by B's run, then chosen as A's
    output: A's anomaly segment went into B's mask, and the panel kept it in A's output field. It is B's: A's results
    go to a segmentation of their own, and B's mask keeps its segment alone."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    scene = slicer.vtkMRMLScene()
    image_a, mask_a = make_head(seed=1)
    image_b, mask_b = make_head(seed=2)
    a, b = add_volume(scene, image_a, "A"), add_volume(scene, image_b, "B")
    brain_b = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "B brain")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        add_volume(scene, mask_b, "B brain labels", "vtkMRMLLabelMapVolumeNode"), brain_b)
    assert brain_b.GetNodeReferenceID(brain_b.GetReferenceImageGeometryReferenceRole()) is None
    CeVAEAnomalyLogic().process(b, brain_b, modelPath=tiny_bundle, device="cpu")
    segments = nodes.segment_ids(brain_b)
    assert nodes.outputs_for_input(scene, a, {"anomalySegmentation": brain_b})["anomalySegmentation"] is None
    out = mrml.publish(scene, a, fake_detection(image_a, mask_a), mrml.OutputNodes(segmentation=brain_b))
    assert out.segmentation is not brain_b and nodes.segment_ids(brain_b) == segments


def test_showing_what_is_not_a_score_volume_is_refused_in_one_line(scene):
    """showResults and setOverlayOpacity (console calls) given the run's whole result, None or a name raised
    AttributeError ('... has no attribute GetScene'); an opacity that is no number in [0, 1] was taken (in Slicer:
    a ValueError from float(), or an overlay more than opaque)."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic, CeVAEAnomalyResult

    image, mask = make_head()
    volume = add_volume(scene, image, "T1")
    detection = fake_detection(image, mask)
    out = mrml.publish(scene, volume, detection)
    result, logic = CeVAEAnomalyResult(volume, out, detection), CeVAEAnomalyLogic()
    for wrong, said in [(result, "not a CeVAEAnomalyResult; give its .nodes.score"), (None, "not None"),
                        ("T1_score", "not a str"), (out.segmentation, "not vtkMRMLSegmentationNode '")]:
        with pytest.raises(CeVAEError, match=f"^The score volume must be a scalar volume node.*{re.escape(said)}"):
            logic.showResults(wrong, volume)
        with pytest.raises(CeVAEError, match=f"^The score volume must be a scalar volume node.*{re.escape(said)}"):
            logic.setOverlayOpacity(wrong, 0.5)
    for wrong in ("T1", None, out.segmentation):
        with pytest.raises(CeVAEError, match="^The input volume must be a volume node"):
            logic.showResults(out.score, wrong)
    for opacity in ("x", 2.0, -0.1, float("nan"), None):
        with pytest.raises(CeVAEError, match=r"^opacity must be a number from 0 to 1"):
            logic.setOverlayOpacity(out.score, opacity)
        with pytest.raises(CeVAEError, match=r"^opacity must be a number from 0 to 1"):
            logic.showResults(out.score, volume, opacity)
    logic.showResults(out.score, volume, 0.3)
    assert logic.setOverlayOpacity(out.score, 1) == 0  # no slice views in a scene without the application


def test_a_remade_output_takes_its_free_name_not_a_numbered_one(scene):
    """vtkMRMLScene::GenerateUniqueName counts on from the last name it gave, even where the plain name is free again:
    a score volume deleted and made again by the next run was named "head anomaly score_1", and outputs following an
    input renamed back "head anomaly score_2". A free name is taken as it is; a taken one still gets "_N"."""
    image, mask = make_head()
    volume = add_volume(scene, image, "head")
    first = mrml.publish(scene, volume, fake_detection(image, mask))
    scene.RemoveNode(first.score)
    again = mrml.publish(scene, volume, fake_detection(image, mask))
    assert again.score.GetName() == "head anomaly score"
    volume.SetName("T1")
    mrml.publish(scene, volume, fake_detection(image, mask))
    volume.SetName("head")
    back = mrml.publish(scene, volume, fake_detection(image, mask))
    assert (back.score.GetName(), back.segmentation.GetName()) == ("head anomaly score", "head anomaly segmentation")
    other = mrml.publish(scene, volume, fake_detection(image, mask), new_nodes=True)  # the name is taken
    assert other.score.GetName() == "head anomaly score_1"


def test_a_mask_named_after_an_unticked_volume_is_not_paired_with_one_whose_name_is_a_prefix(scene):
    """'c10 mask' (the mask of c10, not ticked) was paired with c1, whose name is a prefix of it, and resampled onto
    c1's grid (another person's brain as c1's); the volume's name must end at a word's end in the mask's name."""
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    image, brain = make_head()
    other, _ = make_head(size=(36, 40, 30), seed=3)
    c1, c2 = add_volume(scene, image, "c1"), add_volume(scene, other, "c2")
    stray = add_volume(scene, brain[::2, ::2, ::2], "c10 mask 2mm", "vtkMRMLLabelMapVolumeNode")  # on no grid
    with pytest.raises(CeVAEError, match="its name does not say whose it is"):
        pair_masks([c1, c2], [stray])
    shared = add_volume(scene, image, "c3")  # c1 and c3 share a grid: "c10 mask" on it is neither's by its name
    on_grid = add_volume(scene, brain, "c10 mask", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match="grid of several of"):
        pair_masks([c1, shared], [on_grid])
    named = add_volume(scene, brain[::2, ::2, ::2], "c1_mask 2mm", "vtkMRMLLabelMapVolumeNode")
    assert pair_masks([c1, c2], [named]) == [named, None]


def test_a_mask_named_after_an_unticked_volume_named_apart_by_slicer_is_not_paired_with_the_ticked_one(scene):
    """Slicer names a second scan of a taken name 'c1_1'. With only c1 ticked, 'c1_1 mask' (on no ticked volume's grid)
    was led by 'c1' as a word and paired with c1, resampled onto its grid as its brain, though it is the mask of the
    unticked c1_1. It is now refused, naming the volume whose mask it seems to be; masks named after c1 as before."""
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    image, brain = make_head()
    other, other_brain = make_head(size=(36, 40, 30), seed=3)
    c1, c2 = add_volume(scene, image, "c1"), add_volume(scene, other, "c2")
    second = add_volume(scene, other, scene.GenerateUniqueName("c1"))  # another scan loaded as 'c1', not ticked
    assert second.GetName() == "c1_1"
    stray = add_volume(scene, other_brain[::2, ::2, ::2], "c1_1 mask 2mm", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match=r"^The brain mask 'c1_1 mask 2mm' seems to be that of the volume 'c1_1' "
                                         r"\(its name leads the mask's\), which is not among the chosen healthy "
                                         r"volumes: tick 'c1_1' too, or untick the mask\.$"):
        pair_masks([c1, c2], [stray])
    assert pair_masks([c1, c2, second], [stray]) == [None, None, stray]  # ticked: its own
    shared = add_volume(scene, image, "c3")  # c1 and c3 share a grid; c1_1 lies on it too now
    mrml.update_volume_from_image(second, image)
    on_grid = add_volume(scene, brain, "c1_1 mask", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match="seems to be that of the volume 'c1_1'"):
        pair_masks([c1, shared], [on_grid])
    named = add_volume(scene, brain[::2, ::2, ::2], "c1 mask 2mm", "vtkMRMLLabelMapVolumeNode")
    assert pair_masks([c1, c2], [named]) == [named, None]
    mine = add_volume(scene, brain, "c1 mask", "vtkMRMLLabelMapVolumeNode")
    assert pair_masks([c1, shared], [mine]) == [mine, None]


def test_the_status_line_summary_shows_a_tiny_flagged_volume_as_the_table_does(scene):
    """Slicer's summary said "0.00 ml flagged" of a 0.003 ml component, which its table lists as 0.003 ml."""
    from CeVAEAnomalyLib.engine.postprocess import components
    from CeVAEAnomalyLib.result import DetectionResult, SliceScoreRow
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    image, mask = make_head(spacing=(1.0, 1.0, 1.0))
    flagged = np.zeros(image.GetSize()[::-1], np.uint8)
    flagged[18, 20, 19:22] = 1
    score, labelmap = sitk.GetImageFromArray(flagged * np.float32(3.0)), sitk.GetImageFromArray(flagged)
    for im in (score, labelmap):
        im.CopyInformation(image)
    rows = [SliceScoreRow(2, k, 1.0, 1.0, 1.0) for k in range(image.GetSize()[2])]
    detection = DetectionResult(score, labelmap, mask, 1.0, "absolute", rows, components(labelmap, score, "summed"))
    result = CeVAEAnomalyLogic(scene).publish(add_volume(scene, image), detection)
    assert result.summary.startswith("1 component(s), 0.003 ml flagged;")


# The entry in Slicer's 7-part form, spelled out here (not read from mrml) so that a wrong constant fails.
ANOMALY_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                       "~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^"
                       "~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")


def terminology(segment) -> str:
    entry = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    return str(entry)


def test_the_anomaly_segment_carries_a_standard_terminology_kept_by_reruns_and_a_save(scene, tmp_path):
    """The segment carried only a name and colour, and so vtkSegment's default terminology "Tissue / Tissue": what
    Slicer's Terminology selector showed and a DICOM SEG export wrote as its coded meaning. It is a morphologically
    altered structure in the brain now, on every run (an empty segment too), in a .seg.nrrd read back; a user's own
    segment in the same segmentation keeps the terminology the user gave it."""
    image, mask = make_head()
    volume = add_volume(scene, image)
    brain = add_volume(scene, mask, "brain", "vtkMRMLLabelMapVolumeNode")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my findings")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(brain, mine)
    own = mine.GetSegmentation().GetSegment(nodes.user_segment_ids(mine)[0])
    users = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered "
             "Structure~SCT^50960005^Hemorrhage~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")
    own.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), users)
    for threshold in (1.1, 1.05, 1e9):  # a first run, a rerun replacing the segment, a run that finds nothing
        out = mrml.publish(scene, volume, fake_detection(image, mask, threshold), mrml.OutputNodes(segmentation=mine))
        anomaly = mine.GetSegmentation().GetSegment(nodes.anomaly_segment_id(out.segmentation))
        assert terminology(anomaly) == ANOMALY_TERMINOLOGY, threshold
        assert terminology(own) == users
    assert mine.GetSegmentation().GetNumberOfSegments() == 2
    path = tmp_path / "findings.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(mine)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    read = {loaded.GetSegmentation().GetNthSegment(i).GetName(): terminology(loaded.GetSegmentation().GetNthSegment(i))
            for i in range(loaded.GetSegmentation().GetNumberOfSegments())}
    assert read == {mrml.SEGMENT_NAME: ANOMALY_TERMINOLOGY, own.GetName(): users}
