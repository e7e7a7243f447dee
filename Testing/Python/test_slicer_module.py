"""The Slicer module: its logic on a real MRML scene (slicer-core), and static checks of the
module file, the .ui, the CMake lists and the .s4ext that need no Slicer application."""
from __future__ import annotations

import ast
import csv
import io
import math
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, add_volume, make_head, oblique_direction, write_heads

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.slicer import mrml, nodes, settings  # noqa: E402
from CeVAEAnomalyLib.engine.bundle import load_bundle  # noqa: E402
from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap  # noqa: E402
from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402
from CeVAEAnomalyLib.progress import Cancelled  # noqa: E402

MODULE_DIR = REPO / "CeVAEAnomaly"
MODULE_FILE = MODULE_DIR / "CeVAEAnomaly.py"
UI_FILE = REPO / "Resources" / "UI" / "CeVAEAnomaly.ui"
GEOMETRIES = {"axis-aligned": None, "oblique": oblique_direction()}


@pytest.fixture
def scene_with_head():
    """(scene, volume node, mask labelmap node, image, mask) for a synthetic head."""
    def make(direction=None):
        scene = slicer.vtkMRMLScene()
        image, mask = make_head(direction=direction, seed=7)
        return scene, add_volume(scene, image, "head"), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode"), \
            image, mask
    return make


# --- the logic on a real scene -----------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
def test_process_makes_outputs_on_the_input_grid(scene_with_head, tiny_bundle, geometry):
    scene, volume, mask, _, mask_image = scene_with_head(GEOMETRIES[geometry])
    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3,
                                         createLabelmap=True)
    out = result.nodes
    for node in (out.score, out.labelmap):
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        assert np.array_equal(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume))
    score = sitk.GetArrayFromImage(mrml.image_from_volume(out.score))
    labels = sitk.GetArrayFromImage(mrml.image_from_volume(out.labelmap))
    brain = sitk.GetArrayFromImage(mask_image) > 0
    assert np.isfinite(score).all() and not score[~brain].any()
    # the score above the threshold, without the components the model's post-processing drops as too small
    post = load_bundle(tiny_bundle).header.postprocess
    kept = threshold_labelmap(score, mask_image.GetSpacing(), 0.3, post.min_volume_mm3, post.hysteresis)
    assert np.array_equal(labels > 0, kept > 0) and labels.any()

    segmentation = out.segmentation.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["Anomaly"]
    exported = mrml.mask_image(out.segmentation, volume, segmentation.GetNthSegmentID(0))
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, labels > 0)

    assert out.components.GetNumberOfRows() == len(result.detection.components) > 0
    np.testing.assert_allclose(nodes.table_column(out.components, "Volume"),
                               [c.volume_ml for c in result.detection.components])
    # the columns of the command line's component table, under the same names in words
    from CeVAEAnomalyLib.result import components_csv

    rows = list(csv.DictReader(io.StringIO(components_csv(result.detection))))
    for column, field in (("Component", "component"), ("Voxels", "voxels"), ("Summed score", "summed_score"),
                          ("Max score", "max_score"), ("R", "r"), ("A", "a"), ("S", "s")):
        np.testing.assert_allclose(nodes.table_column(out.components, column), [float(r[field]) for r in rows],
                                   rtol=1e-5, atol=0.006, err_msg=column)
    assert out.slice_table.GetNumberOfRows() == len(result.detection.slices)
    # with components, the jump goes to the top component's highest-scoring voxel, where its row goes
    assert result.topSliceRas == pytest.approx(nodes.component_position(out.components, 0))
    ijk = np.round(np.linalg.inv(nodes.ijk_to_ras(volume)) @ [*result.topSliceRas, 1.0])[:3].astype(int)
    assert labels[tuple(ijk[::-1])] > 0  # a voxel of the finding
    ranked = [c.summed_score for c in result.detection.components]
    assert ranked == sorted(ranked, reverse=True)
    assert [c.label for c in result.detection.components] == list(range(1, len(ranked) + 1))


def test_logic_and_command_line_share_one_detection(scene_with_head, tiny_bundle, tmp_path):
    """The node path gives the same scores as the core called on the image file."""
    from CeVAEAnomalyLib.engine.detector import detect

    scene, volume, mask, image, mask_image = scene_with_head()
    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu")
    sitk.WriteImage(image, str(tmp_path / "head.nrrd"))
    bundle = load_bundle(tiny_bundle)
    direct = detect(sitk.ReadImage(str(tmp_path / "head.nrrd")), bundle, mask_image, score_type="combi")
    np.testing.assert_allclose(sitk.GetArrayFromImage(mrml.image_from_volume(result.nodes.score)),
                               sitk.GetArrayFromImage(direct.score), rtol=1e-5, atol=1e-6)
    assert result.detection.threshold == pytest.approx(direct.threshold)


def test_second_run_updates_the_same_nodes(scene_with_head, tiny_bundle):
    scene, volume, mask, _, _ = scene_with_head()
    logic = CeVAEAnomalyLogic(scene)
    first = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu")
    ids = mrml.node_ids(scene)
    second = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", score_type="rec", threshold=0.2)
    assert mrml.node_ids(scene) == ids
    assert second.nodes.score is first.nodes.score
    assert logic.loadModel(tiny_bundle, "cpu") is logic.loadModel(tiny_bundle, "cpu")  # cached


def test_a_request_its_dict_form_and_options_by_name_ask_for_the_same(scene_with_head, tiny_bundle):
    from CeVAEAnomalyLib.options import DetectionRequest

    scene, volume, mask, _, _ = scene_with_head()
    logic = CeVAEAnomalyLogic(scene)
    request = DetectionRequest.of(score_type="rec", threshold=0.2, device="cpu")
    runs = [logic.process(volume, mask, modelPath=tiny_bundle, score_type="rec", threshold=0.2, device="cpu"),
            logic.process(volume, mask, request, modelPath=tiny_bundle),
            logic.process(volume, mask, request.to_dict(), modelPath=tiny_bundle)]
    scores = [sitk.GetArrayFromImage(mrml.image_from_volume(r.nodes.score)) for r in runs]
    for run, score in zip(runs[1:], scores[1:]):
        np.testing.assert_array_equal(score, scores[0])
        assert run.detection.threshold == runs[0].detection.threshold == 0.2


def test_mask_can_be_a_segment(scene_with_head, tiny_bundle):
    scene, volume, mask, _, _ = scene_with_head()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, segmentation)
    by_labelmap = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu")
    score_by_labelmap = sitk.GetArrayFromImage(mrml.image_from_volume(by_labelmap.nodes.score))
    by_segment = CeVAEAnomalyLogic().process(volume, segmentation, modelPath=tiny_bundle, device="cpu",
                                             maskSegmentId=segmentation.GetSegmentation().GetNthSegmentID(0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(mrml.image_from_volume(by_segment.nodes.score)),
                               score_by_labelmap, rtol=1e-5, atol=1e-6)



def moved(scene, name: str, degrees: float, shift, axis=(0.2, 0.3, 0.9)):
    """A linear transform node: a rotation of ``degrees`` about ``axis``, then a shift (mm)."""
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(*shift)
    transform.RotateWXYZ(degrees, *axis)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


@pytest.mark.parametrize("mask_under", [None, "old"], ids=["mask-under-none", "mask-under-another"])
def test_a_labelmap_mask_under_another_transform_is_used_where_it_lies_as_if_both_were_hardened(
        scene_with_head, tiny_bundle, mask_under):
    """A scan registered (a linear transform on it, not hardened) with the labelmap mask made before it: the run was
    refused ("under different transforms"), while a segmentation mask was used where it lies in world space. The
    labelmap now is too, with the segmentation's warning: the results are those of the run with both hardened, and
    the mask node is left as it was. (Without the asymmetry fusion: its mid-plane is searched in the scan's physical
    space, which a rotation hardened into the scan turns.)"""
    runs = []
    for harden in (False, True):
        scene, volume, mask, _, _ = scene_with_head()
        volume.SetAndObserveTransformNodeID(moved(scene, "reg", 9.0, (3.3, -2.1, 1.7)).GetID())
        if mask_under:
            mask.SetAndObserveTransformNodeID(moved(scene, mask_under, -6.0, (-1.2, 0.8, 2.4), (1, 0, 0.2)).GetID())
        if harden:
            volume.HardenTransform()
            mask.HardenTransform()
        kept = (sitk.GetArrayFromImage(mrml.image_from_volume(mask)), nodes.ijk_to_ras(mask), mask.GetTransformNodeID())
        runs.append(CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3,
                                                asymmetry_mm=0.0, createLabelmap=True))
        assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(mask)), kept[0])
        assert np.array_equal(nodes.ijk_to_ras(mask), kept[1]) and mask.GetTransformNodeID() == kept[2]
    transformed, hardened = runs
    for role in ("score", "labelmap"):
        a, b = (sitk.GetArrayFromImage(mrml.image_from_volume(getattr(r.nodes, role))) for r in runs)
        assert np.array_equal(a, b), role
    a, b = (sitk.GetArrayFromImage(r.detection.brain_mask) for r in runs)
    assert np.array_equal(a, b) and a.any() and not a.all()
    assert transformed.detection.threshold == hardened.detection.threshold
    assert [c.voxels for c in transformed.detection.components] == [c.voxels for c in hardened.detection.components]
    assert (f"The brain mask 'mask' (under {repr(mask_under) if mask_under else 'no transform'}) and the volume 'head' "
            "(under 'reg') are under different transforms: the labelmap is used where it lies in world space, "
            "resampled onto the volume's grid (nearest neighbour). If it was made on this scan before the scan was "
            "registered, put it under the volume's transform.") in transformed.warnings, transformed.warnings

def empty_mask(scene, volume, mask):
    node = add_volume(scene, sitk.Image(mrml.image_from_volume(mask).GetSize(), sitk.sitkUInt8), "empty",
                      "vtkMRMLLabelMapVolumeNode")
    node.CopyOrientation(mask)
    return dict(maskNode=node)


FAILURES = {
    "empty mask": (empty_mask, "brain mask is empty"),
    "missing model": (lambda scene, volume, mask: dict(maskNode=mask, modelPath="/nonexistent/model.cevae"),
                      "does not exist"),
    "output is input": (lambda scene, volume, mask: dict(maskNode=mask, outputs=mrml.OutputNodes(score=volume)),
                        "also an input"),
    "unknown score type": (lambda scene, volume, mask: dict(maskNode=mask, score_type="best"), "Unknown score type"),
    "the input as its own mask": (lambda scene, volume, mask: dict(maskNode=volume),
                                  "brain mask 'head' is the input volume itself"),
    # a console user's slips: each named, not an AttributeError or a wrong reason
    "a mask given by name": (lambda scene, volume, mask: dict(maskNode="mask"),
                             "brain mask must be a labelmap volume or segmentation node, not a str"),
    "a copy of the scan as its mask": (lambda scene, volume, mask: dict(maskNode=add_volume(
        scene, mrml.image_from_volume(volume, "input"), "copy of head")), "is the image itself"),
    "options as a flat dict": (lambda scene, volume, mask: dict(maskNode=mask, request={"fpr": 0.01}),
                               r"request dict holds option names \(fpr\): give them by name"),
    "a request of another type": (lambda scene, volume, mask: dict(maskNode=mask, request="rec"),
                                  "request must be a DetectionRequest or its dict form, not a str"),
    "outputs as a dict": (lambda scene, volume, mask: dict(maskNode=mask, outputs={"score": None}),
                          "outputs must be an OutputNodes"),
    "a yes/no flag given as a word": (lambda scene, volume, mask: dict(maskNode=mask, createLabelmap="no"),
                                     "createLabelmap must be True or False, not a str"),
    "a segment ID with a labelmap mask": (lambda scene, volume, mask: dict(maskNode=mask, maskSegmentId="Segment_1"),
                                          "is a volume, which has no segment 'Segment_1'"),
    "a folder as the model": (lambda scene, volume, mask: dict(maskNode=mask, modelPath=str(REPO)), "is a folder"),
    "an output of another scene": (lambda scene, volume, mask: dict(maskNode=mask, outputs=mrml.OutputNodes(
        score=foreign_volume())), "is in another scene than the input volume"),
}


_KEEP_SCENES = []  # scenes of the foreign nodes, alive until the test ends


def foreign_volume():
    """A volume node of another scene, whose ID (the first volume's) equals the input's in its own scene."""
    other = slicer.vtkMRMLScene()
    _KEEP_SCENES.append(other)
    return other.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "foreign")



def test_a_volume_that_is_no_node_is_refused_saying_what_to_pass(tiny_bundle):
    """process(sitk_image), process(array) and process("head") were answered "Select a scalar input volume (got a
    Image)": the panel's words, which neither named the argument's kind nor what to pass instead."""
    image, _ = make_head()
    logic = CeVAEAnomalyLogic()
    for given, described, detect in ((image, "an Image", True), (sitk.GetArrayFromImage(image), "a ndarray", True),
                                     ("head", "a str", False)):
        with pytest.raises(CeVAEError) as err:
            logic.process(given, modelPath=tiny_bundle, device="cpu")
        hint = "; an image in memory is scored by CeVAEAnomalyLib.engine.detector.detect" if detect else ""
        assert str(err.value) == ("The input volume must be a scalar volume node (by name: slicer.util.getNode(name)), "
                                  f"not {described}{hint}.")
    with pytest.raises(CeVAEError, match=r"^Select a scalar input volume \(got None\)\.$"):  # the panel's
        logic.process(None, modelPath=tiny_bundle, device="cpu")


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_a_failing_run_leaves_the_scene_unchanged(scene_with_head, tiny_bundle, case):
    scene, volume, mask, _, _ = scene_with_head()
    make_arguments, message = FAILURES[case]
    arguments = dict(dict(modelPath=tiny_bundle, device="cpu"), **make_arguments(scene, volume, mask))
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=message):
        CeVAEAnomalyLogic().process(volume, **arguments)
    assert mrml.node_ids(scene) == before


PUBLISH_SLIPS = {  # publish(volume, detection, ...) of a console user: each named in one line, before any node is made
    "the whole result of a run": (lambda volume, run: ((volume, run), {}),
                                  r"^detection must be a DetectionResult \(CeVAEAnomalyLib.result\), not a "
                                  r"CeVAEAnomalyResult; give its \.detection\.$"),
    "a yes/no flag given as a word": (lambda volume, run: ((volume, run.detection), dict(createLabelmap="yes")),
                                      r"^createLabelmap must be True or False, not a str\.$"),
    "newNodes given as a word": (lambda volume, run: ((volume, run.detection), dict(newNodes="no")),
                                 r"^newNodes must be True or False, not a str\.$"),
    "an earlier run's score volume as the input": (lambda volume, run: ((run.nodes.score, run.detection), {}),
                                                   r"holds results of this module \(score\), not a scan; it cannot "
                                                   r"be an input\.$"),
    "no input": (lambda volume, run: ((None, run.detection), {}), r"^Select a scalar input volume \(got None\)\.$"),
    "a frame given as its number": (lambda volume, run: ((volume, run.detection), dict(frame=3)),
                                    r"^frame must be a SequenceFrame \(CeVAEAnomalyLib\.slicer\.nodes\."
                                    r"sequence_frame of the input\) or None, not an int\.$"),
}


@pytest.mark.parametrize("slip", PUBLISH_SLIPS, ids=list(PUBLISH_SLIPS))
def test_publish_refuses_what_process_refuses_in_one_line(scene_with_head, slip):
    """publish() skipped process()'s checks: a CeVAEAnomalyResult as the detection gave an AttributeError,
    createLabelmap="yes" and a score map of an earlier run as the input volume were taken."""
    from test_mrml import fake_detection

    scene, volume, _, image, mask = scene_with_head()
    logic = CeVAEAnomalyLogic()
    run = logic.publish(volume, fake_detection(image, mask))
    before = mrml.node_ids(scene)
    arguments, options = PUBLISH_SLIPS[slip][0](volume, run)
    with pytest.raises(CeVAEError, match=PUBLISH_SLIPS[slip][1]):
        logic.publish(*arguments, **options)
    assert mrml.node_ids(scene) == before


@pytest.mark.parametrize("start", ["process", "startDetection"])
def test_a_segment_id_without_a_brain_mask_is_refused_not_ignored(scene_with_head, tiny_bundle, start):
    """process(volume, maskSegmentId="Brain") with the segmentation left out ran with the automatic brain mask and
    said nothing: the results were not those of the segment the user chose. It is refused before anything is read."""
    scene, volume, _, _, _ = scene_with_head()
    before = mrml.node_ids(scene)
    logic = CeVAEAnomalyLogic()
    with pytest.raises(CeVAEError, match=r"^maskSegmentId 'Brain' picks a segment of a brain mask segmentation, but "
                                         r"no brain mask \(maskNode\) was given"):
        started = getattr(logic, start)(volume, maskSegmentId="Brain", modelPath=tiny_bundle, device="cpu")
        if start == "startDetection":
            logic.discardJob(started)  # (the defect: a worker started)
    assert mrml.node_ids(scene) == before


def test_outputs_of_which_one_was_deleted_are_used_and_the_deleted_one_is_made_again(scene_with_head, tiny_bundle):
    """As the panel passes its selected nodes: one deleted from the scene since (the Data module) is not an
    error."""
    scene, volume, mask, _, _ = scene_with_head()
    logic = CeVAEAnomalyLogic()
    first = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu")
    scene.RemoveNode(first.nodes.score)
    second = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", outputs=first.nodes)
    assert second.nodes.score.GetScene() is scene and second.nodes.segmentation is first.nodes.segmentation


def test_another_scan_and_its_mask_picked_as_outputs_are_never_written_into(scene_with_head, tiny_bundle):
    """Patient B's scan as the score volume and B's brain mask as the labelmap (the panel's selectors offer them):
    the results go to nodes of their own, B keeps its voxels and stays an input, and the panel does not keep
    them in A's output fields."""
    scene, volume, mask, _, _ = scene_with_head()
    other, other_mask = make_head(seed=11)
    scan_b = add_volume(scene, other, "patient B")
    mask_b = add_volume(scene, other_mask, "patient B mask", "vtkMRMLLabelMapVolumeNode")
    before = [sitk.GetArrayFromImage(mrml.image_from_volume(n)) for n in (scan_b, mask_b)]
    picked = mrml.OutputNodes(score=scan_b, labelmap=mask_b)
    assert nodes.outputs_for_input(scene, volume, {"scoreVolume": scan_b, "anomalyLabelmap": mask_b}) == {
        "scoreVolume": None, "anomalySegmentation": None, "anomalyLabelmap": None, "componentTable": None}
    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", outputs=picked)
    assert result.nodes.score not in (scan_b, mask_b) and result.nodes.labelmap not in (scan_b, mask_b)
    for node, voxels in zip((scan_b, mask_b), before):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.image_from_volume(node)), voxels)
        assert not nodes.is_module_output(node)
    CeVAEAnomalyLogic().process(scan_b, mask_b, modelPath=tiny_bundle, device="cpu")  # still an input


def test_a_progress_callback_failing_at_the_end_does_not_fail_a_run_whose_results_are_in_the_scene(
        scene_with_head, tiny_bundle, caplog):
    scene, volume, mask, _, _ = scene_with_head()

    def buggy(fraction, message):
        if fraction >= 1.0:
            raise ValueError("a bug in the caller's callback")

    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", progress=buggy)
    assert result.nodes.score.GetScene() is scene
    assert repr(result) == f"<CeVAEAnomalyResult of 'head': {result.summary}>"  # one line at the console
    assert "the progress callback failed at the end; the results are in the scene" in caplog.text


@pytest.mark.parametrize("at", [0.0, 0.5, 0.95], ids=["start", "network", "before node creation"])
def test_a_cancelled_run_leaves_the_scene_unchanged(scene_with_head, tiny_bundle, at):
    scene, volume, mask, _, _ = scene_with_head()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")  # mask export uses scratch nodes
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, segmentation)
    before = mrml.node_ids(scene)
    seen = []

    def cancel(fraction, message):
        seen.append(fraction)
        if fraction >= at:
            raise Cancelled("Cancelled by the user.")

    with pytest.raises(Cancelled):
        CeVAEAnomalyLogic().process(volume, segmentation, modelPath=tiny_bundle, device="cpu", progress=cancel)
    assert seen[-1] >= at and mrml.node_ids(scene) == before


def test_the_modules_own_results_are_refused_as_scans(scene_with_head, tiny_bundle, tmp_path):
    scene, volume, mask, _, _ = scene_with_head()
    logic = CeVAEAnomalyLogic()
    result = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu")
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=r"holds results of this module \(score\), not a scan; it cannot be an input"):
        logic.process(result.nodes.score, mask, modelPath=tiny_bundle, device="cpu")
    with pytest.raises(CeVAEError, match=r"anomaly score' holds results of this module \(score\), not a scan"):
        logic.startAdaptation([volume, result.nodes.score], [None, None], tmp_path / "site.cevae",
                              modelPath=tiny_bundle, device="cpu")
    with pytest.raises(CeVAEError, match=r"it cannot be a healthy scan or its mask"):
        logic.startCalibration([volume], [result.nodes.labelmap or result.nodes.score], tmp_path / "cal.cevae",
                               modelPath=tiny_bundle, device="cpu")
    assert mrml.node_ids(scene) == before and list(tmp_path.iterdir()) == []


def test_a_saved_anomaly_segmentation_loaded_back_is_told_by_its_segment(scene_with_head, tiny_bundle, tmp_path):
    """A segmentation saved as DetectVolume.py saves it (head_segmentation.seg.nrrd) and loaded back has none of the
    module's node attributes, and its name is no proof (a user's own mask may be so named); its segment keeps the
    module's tag, which tells it. It was offered as a brain mask and, chosen, refused only as having 'no segments but
    the anomalies'; it is hidden from the selectors and refused as a result now. A user's 'head_segmentation' is not."""
    scene, volume, mask, _, _ = scene_with_head()
    logic = CeVAEAnomalyLogic()
    result = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu")
    path = tmp_path / "head_segmentation.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(result.nodes.segmentation)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "head_segmentation")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded) and loaded.GetAttribute(nodes.ROLE_ATTRIBUTE) is None
    assert loaded.GetID() in nodes.module_volume_ids(scene)
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=r"'head_segmentation' holds results of this module \(anomaly segment\), "
                                         r"not a scan; it cannot be an input"):
        logic.process(volume, loaded, modelPath=tiny_bundle, device="cpu")
    assert mrml.node_ids(scene) == before
    users = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "head_segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, users)
    assert users.GetID() not in nodes.module_volume_ids(scene)
    assert sitk.GetArrayFromImage(mrml.mask_image(users, volume)).any()


def test_a_labelmap_volume_is_refused_as_the_input(scene_with_head, tiny_bundle):
    """As the panel's input selector: an MRI loaded as a labelmap by mistake is named, not scored."""
    scene, volume, _, image, _ = scene_with_head()
    loaded_as_labels = add_volume(scene, sitk.Cast(image, sitk.sitkInt16), "scan", "vtkMRMLLabelMapVolumeNode")
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match="'scan' is a labelmap volume .*Convert to scalar volume"):
        CeVAEAnomalyLogic().process(loaded_as_labels, modelPath=tiny_bundle, device="cpu")
    assert mrml.node_ids(scene) == before


def test_a_diffusion_tensor_volume_is_refused_in_one_line_as_the_input_or_the_mask(scene_with_head, tiny_bundle):
    """A tensor volume is a scalar volume node by class, but its voxels are tensors and it holds no scalars."""
    import vtk

    scene, volume, _, _, _ = scene_with_head()
    tensors = vtk.vtkFloatArray()
    tensors.SetNumberOfComponents(9)
    tensors.SetNumberOfTuples(8 * 8 * 8)
    tensors.Fill(0.0)
    data = vtk.vtkImageData()
    data.SetDimensions(8, 8, 8)
    data.GetPointData().SetTensors(tensors)
    dti = scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "dti")
    dti.SetAndObserveImageData(data)
    before = mrml.node_ids(scene)
    for node, mask in ((dti, None), (volume, dti)):
        with pytest.raises(CeVAEError, match="'dti' holds no scalar voxels"):
            CeVAEAnomalyLogic().process(node, mask, modelPath=tiny_bundle, device="cpu")
    assert mrml.node_ids(scene) == before


def test_a_users_segmentation_that_received_the_anomalies_stays_a_brain_mask(scene_with_head, tiny_bundle):
    scene, volume, mask, _, mask_image = scene_with_head()
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, mine)
    logic = CeVAEAnomalyLogic()
    logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3,
                  outputs=mrml.OutputNodes(segmentation=mine))
    assert nodes.anomaly_segment_id(mine) is not None and mine.GetID() not in nodes.module_volume_ids(scene)
    brain = sitk.GetArrayFromImage(mrml.mask_image(mine, volume)) > 0  # its own segments, not the anomalies
    assert np.array_equal(brain, sitk.GetArrayFromImage(mask_image) > 0)
    again = logic.process(volume, mine, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    assert np.array_equal(sitk.GetArrayFromImage(again.detection.brain_mask) > 0, brain)


def test_logic_needs_a_scene():
    volume = slicer.vtkMRMLScalarVolumeNode()
    with pytest.raises(CeVAEError, match="not in an MRML scene"):
        CeVAEAnomalyLogic().process(volume)
    with pytest.raises(CeVAEError, match="scalar input volume"):
        CeVAEAnomalyLogic().process(None)


def test_importing_the_modules_library_imports_is_light():
    """Slicer imports every module at start-up: no torch, SimpleITK or safetensors at module load."""
    tree = ast.parse(MODULE_FILE.read_text())
    lib_modules = sorted({node.module for node in tree.body if isinstance(node, ast.ImportFrom)
                          and node.module and node.module.startswith("CeVAEAnomalyLib")})
    assert {"CeVAEAnomalyLib.slicer.logic", "CeVAEAnomalyLib.slicer.settings",
            "CeVAEAnomalyLib.slicer.widget_state"} <= set(lib_modules)
    code = "import sys\n" + "".join(f"import {m}\n" for m in lib_modules) + \
        "print(sorted(m for m in ('torch', 'SimpleITK', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- static checks of the module that only Slicer can run -------------------------------------


def ui_object_names():
    import xml.etree.ElementTree as ET

    names = [w.get("name") for w in ET.parse(UI_FILE).iter("widget")]
    assert len(names) == len(set(names))  # childWidgetVariables needs unique object names
    return set(names)


def test_every_ui_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert len(used) > 10  # the pattern finds the uses
    assert used - ui_object_names() == set()


def parameter_fields():
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


HAND_BOUND = {"modelPath", "calibratedModelPath", "adaptedModelPath", "brainMaskSegmentId", "scoreType", "sensitivity", "device"}


def test_ui_parameter_bindings_match_the_parameter_node():
    import xml.etree.ElementTree as ET

    bound = {}
    for widget in ET.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    fields = parameter_fields()
    assert set(bound) <= fields
    # Bound by hand: ctkPathLineEdit takes only pathlib types, the segment selector has no binding,
    # and Choice values would be shown as untranslated combo-box texts.
    assert fields - set(bound) == HAND_BOUND
    text = MODULE_FILE.read_text()
    assert all(f'"{name}"' in text or f"p.{name}" in text for name in HAND_BOUND)
    assert bound["inputVolume"] == "qMRMLNodeComboBox" and bound["overlayOpacity"] == "ctkSliderWidget"


def display_names(function: str):
    """The option values a display-name function of the module file maps (its dict literal's keys)."""
    tree = ast.parse(MODULE_FILE.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    mapping = next(n for n in ast.walk(fn) if isinstance(n, ast.Dict))
    keys = []
    for key in mapping.keys:
        keys.append(key.value if isinstance(key, ast.Constant) else getattr(settings, key.id))
    values_translated = all(isinstance(v, ast.Call) and v.func.id == "_" for v in mapping.values)
    return keys, values_translated


@pytest.mark.parametrize("function, values", [("scoreTypeNames", "SCORE_TYPE_CHOICES"), ("deviceNames", "DEVICES"),
                                              ("sensitivityNames", "SENSITIVITIES")])
def test_combo_boxes_show_translatable_names_for_every_option_value(function, values):
    keys, translated = display_names(function)
    assert tuple(keys) == getattr(settings, values) and translated


def test_module_annotations_evaluate_on_python_3_9():
    """parameterNodeWrapper evaluates annotations: no 'X | Y' unions, no postponed evaluation."""
    tree = ast.parse(MODULE_FILE.read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]
    assert annotations and not any(isinstance(b, ast.BinOp) for a in annotations for b in ast.walk(a))


def test_threshold_has_a_finite_maximum():
    text = MODULE_FILE.read_text()
    assert "Minimum(" not in text  # parameterNodeWrapper's Minimum sets the spin box maximum to infinity
    assert "threshold: Annotated[float, WithinRange(*THRESHOLD_RANGE)]" in text
    import xml.etree.ElementTree as ET

    spin = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "thresholdSpinBox")
    limits = {p.get("name"): float(p.findtext("double")) for p in spin.findall("property")
              if p.get("name") in ("minimum", "maximum")}
    assert (limits["minimum"], limits["maximum"]) == settings.THRESHOLD_RANGE and math.isfinite(limits["maximum"])


def test_the_panels_rate_and_threshold_bounds_are_written_once():
    """The rate's default and range and the threshold's range come from their one definition (the engine's
    DEFAULT_FPR, the fpr option, settings.THRESHOLD_RANGE), not from numbers written again in the module file."""
    from CeVAEAnomalyLib.engine.calibration import DEFAULT_FPR, FPR_GRID
    from CeVAEAnomalyLib.options import ThresholdPolicy, option_range

    assert option_range(ThresholdPolicy, "fpr") == (float(FPR_GRID[0]), float(FPR_GRID[-1]))
    node = module_classes()["CeVAEAnomalyParameterNode"]
    declared = {n.target.id: n for n in node.body if isinstance(n, ast.AnnAssign)}
    for name in ("falsePositiveRate", "threshold"):
        within = next(c for c in ast.walk(declared[name].annotation)
                      if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "WithinRange")
        assert not any(isinstance(a, ast.Constant) and isinstance(a.value, float) for a in ast.walk(within)), name
    assert ast.unparse(declared["falsePositiveRate"].value) == "DEFAULT_FPR" and DEFAULT_FPR == 0.001
    numbers = {n.value for n in ast.walk(ast.parse(MODULE_FILE.read_text())) if isinstance(n, ast.Constant)}
    assert not numbers & {1e-6, 1000.0, DEFAULT_FPR}  # (0.5 is also the overlay's opacity)


@pytest.mark.parametrize("parameter, owner, field", [
    ("rimMm", "PostprocessOptions", "rim_mm"), ("medianRadius", "PostprocessOptions", "median_radius"),
    ("minVolumeMm3", "PostprocessOptions", "min_volume_mm3"), ("minPeak", "PostprocessOptions", "min_peak"),
    ("batchSize", "RunOptions", "batch_size"), ("falsePositiveRate", "ThresholdPolicy", "fpr")])
def test_ui_spin_box_ranges_are_the_declared_option_ranges(parameter, owner, field):
    """The .ui's minimum and maximum of a bound spin box agree with the option's declared range."""
    import xml.etree.ElementTree as ET

    from CeVAEAnomalyLib import options

    spin = next(w for w in ET.parse(UI_FILE).iter("widget")
                if any(p.get("name") == "SlicerParameterName" and p.findtext("string") == parameter
                       for p in w.findall("property")))
    limits = {p.get("name"): float(p.findtext("double") or p.findtext("number"))
              for p in spin.findall("property") if p.get("name") in ("minimum", "maximum")}
    assert (limits["minimum"], limits["maximum"]) == options.option_range(getattr(options, owner), field)
    assert f"{parameter}: Annotated[" in MODULE_FILE.read_text()


def module_classes():
    return {n.name: n for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ClassDef)}


def test_module_file_has_what_slicer_loads():
    """Slicer instantiates the class named after the file and finds the widget and the self-test by
    name; its module list shows what the module class sets on its parent. torch is imported lazily."""
    classes = module_classes()
    bases = {name: [ast.unparse(b) for b in c.bases] for name, c in classes.items()}
    assert bases["CeVAEAnomaly"] == ["ScriptedLoadableModule"]
    assert bases["CeVAEAnomalyWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["CeVAEAnomalyTest"] == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in classes["CeVAEAnomalyParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    assert module_description_fields().keys() >= {"title", "categories", "contributors", "helpText", "acknowledgementText"}
    top_level_imports = {a.name.split(".")[0] for n in ast.parse(MODULE_FILE.read_text()).body
                         if isinstance(n, ast.Import) for a in n.names}
    top_level_imports |= {n.module.split(".")[0] for n in ast.parse(MODULE_FILE.read_text()).body
                          if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in top_level_imports


def test_widget_does_long_work_the_slicer_way():
    """A worker process (started in Slicer's start-up environment like launchConsoleProcess does, but in
    its own process group) polled by a QTimer (no processEvents in the widget), dependencies
    installed through the logic, no prompt in testing mode, a documentation link, model-path history."""
    widget = module_classes()["CeVAEAnomalyWidget"]
    uses = {ast.unparse(n) for n in ast.walk(widget) if isinstance(n, ast.Attribute)}
    assert {"slicer.util.startupEnvironment", "qt.QTimer", "self.logic.installDependencies",
            "slicer.app.testingEnabled", "self.ui.modelPathLineEdit.addCurrentPathToHistory"} <= uses
    assert "slicer.app.processEvents" not in uses
    help_text = module_description_fields()["helpText"]
    assert "<a href=" in ast.unparse(help_text) and "DOCUMENTATION_URL" in ast.unparse(help_text)
    logic = ast.parse((MODULE_DIR / "CeVAEAnomalyLib" / "slicer" / "logic.py").read_text())
    assert "slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode" in {
        ast.unparse(n) for n in ast.walk(logic) if isinstance(n, ast.Attribute)}


def module_description_fields():
    """{field: value node} of the ``self.parent.<field> = ...`` assignments of the module class."""
    return {t.attr: n.value for n in ast.walk(module_classes()["CeVAEAnomaly"]) if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self.parent"}


def cmake_list(text: str, name: str):
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert match, name
    return [item.replace("${MODULE_NAME}", "CeVAEAnomaly") for item in match.group(1).split()]


def test_only_the_module_file_is_at_the_top_of_the_module_folder():
    """Slicer loads every .py file at the top of a module folder as a module (no recursion)."""
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["CeVAEAnomaly.py"]
    assert (MODULE_DIR / "Scripts" / "DetectVolume.py").is_file()


def test_cmake_lists_every_module_script():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    scripts = [MODULE_FILE, *(MODULE_DIR / "CeVAEAnomalyLib").rglob("*.py")]
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in scripts}
    assert listed == on_disk
    assert cmake_list(text, "MODULE_SCRIPTS") == [p.relative_to(MODULE_DIR).as_posix()
                                                  for p in sorted((MODULE_DIR / "Scripts").glob("*.py"))]


def test_cmake_resources_match_the_files_on_disk():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    explicit = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert {"Resources/UI/CeVAEAnomaly.ui", "Resources/Icons/CeVAEAnomaly.png"} <= set(explicit)
    assert all((REPO / item).is_file() for item in explicit)
    data = cmake_list(text, "MODULE_PYTHON_LIBRARY_DATA")
    packaged = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "CeVAEAnomalyLib" / "data").iterdir()
                if p.is_file() and p.suffix != ".py"}
    assert set(data) == packaged and "CeVAEAnomalyLib/data/cevae_t1_default.cevae" in data


def test_icon_is_a_128_pixel_png():
    data = (REPO / "Resources" / "Icons" / "CeVAEAnomaly.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def s4ext_fields():
    fields = {}
    for line in (REPO / "CeVAEAnomaly.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def cmake_value(name: str) -> str:
    return re.search(rf'set\({name} "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)


def test_s4ext_has_every_field_and_agrees_with_cmake():
    fields = s4ext_fields()
    required = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "description", "screenshoturls", "enabled", "status")
    assert [k for k in required if not fields.get(k)] == []
    for key, var in (("category", "EXTENSION_CATEGORY"), ("depends", "EXTENSION_DEPENDS"),
                     ("homepage", "EXTENSION_HOMEPAGE"), ("contributors", "EXTENSION_CONTRIBUTORS"),
                     ("iconurl", "EXTENSION_ICONURL"), ("screenshoturls", "EXTENSION_SCREENSHOTURLS"),
                     ("description", "EXTENSION_DESCRIPTION"), ("keywords", "EXTENSION_KEYWORDS")):
        assert fields[key] == cmake_value(var), key
    assert "recommends" not in fields and "EXTENSION_RECOMMENDS" not in (REPO / "CMakeLists.txt").read_text()
    description = module_description_fields()
    constants = {key: {n.value for n in ast.walk(description[key]) if isinstance(n, ast.Constant)}
                 for key in ("categories", "contributors")}
    assert fields["category"] in constants["categories"] and fields["contributors"] in constants["contributors"]
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.findall(r"add_subdirectory\((\w+)\)", cmake) == ["CeVAEAnomaly"]
    assert "," not in fields["keywords"]  # a space-separated list
    for kind, name in (("LICENSE", "LICENSE"), ("README", "README.md")):  # ours, not Slicer's (its default)
        assert f"set(EXTENSION_{kind}_FILE ${{CMAKE_CURRENT_SOURCE_DIR}}/{name})" in cmake and (REPO / name).is_file()
    assert (MODULE_DIR / "CMakeLists.txt").is_file()


RAW_PREFIX = "https://raw.githubusercontent.com/CeVAEAnomaly/SlicerCeVAEAnomaly/main/"


def test_extension_index_checks():
    """The checks the Extensions Index runs: literal https icon and screenshot URLs naming committed
    files, a licence at the root, PyTorch as a dependency."""
    for var in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake_value(var).split():
            assert url.startswith(RAW_PREFIX) and "${" not in url, url
            assert (REPO / url[len(RAW_PREFIX):]).is_file(), url
    screenshot = (REPO / "docs" / "screenshot.png").read_bytes()
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", screenshot[16:24])[0] >= 800
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License") and 'license = "BSD-3-Clause"' in \
        (REPO / "pyproject.toml").read_text()
    assert cmake_value("EXTENSION_DEPENDS") == "PyTorch"


def test_catalogue_entry_is_a_file_and_in_the_readme():
    import json

    entry = json.loads((REPO / "CeVAEAnomaly.json").read_text())
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    fields = s4ext_fields()
    assert entry["category"] == fields["category"] and entry["scm_url"] == fields["scmurl"]
    assert entry["scm_revision"] == fields["scmrevision"] and entry["build_dependencies"] == ["PyTorch"]
    blocks = re.findall(r"```json\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert entry in [json.loads(b) for b in blocks]


def test_the_input_selectors_hide_the_modules_own_volumes():
    """Node selectors' attribute filters only include, so the module hides its volumes by ID
    (qMRMLSortFilterProxyModel.hiddenNodeIDs) in every selector of an input."""
    text = MODULE_FILE.read_text()
    assign = next(n for n in ast.parse(text).body if isinstance(n, ast.Assign)
                  and ast.unparse(n.targets[0]) == "INPUT_SELECTORS")
    selectors = set(ast.literal_eval(assign.value))
    import xml.etree.ElementTree as ET

    outputs = {"scoreVolumeSelector", "segmentationSelector", "labelmapSelector", "componentTableSelector"}
    node_selectors = {w.get("name") for w in ET.parse(UI_FILE).iter("widget")
                      if w.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    assert {"adaptVolumesSelector", "adaptMasksSelector", "healthyVolumesSelector"} <= node_selectors
    assert selectors == node_selectors - outputs  # every selector of scans or masks, the adapt section's too
    widget = ast.unparse(module_classes()["CeVAEAnomalyWidget"])
    assert "sortFilterProxyModel().hiddenNodeIDs = hidden" in widget and "module_volume_ids(slicer.mrmlScene)" in widget
    assert "first_input_volume(slicer.mrmlScene)" in widget and "NodeAddedEvent, self._hideModuleVolumes" in widget


def test_the_panel_follows_the_input_with_its_outputs():
    """The output fields are re-chosen for the input on every panel update (nodes.outputs_for_input)
    for exactly the output fields of the parameter node."""
    from CeVAEAnomalyLib.slicer.nodes import PANEL_OUTPUTS

    widget = module_classes()["CeVAEAnomalyWidget"]
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "outputs_for_input(slicer.mrmlScene, p.inputVolume" in methods["_followInput"]
    assert "self._followInput()" in methods["_updateGui"]
    # the status line's result summary goes with its input (WidgetState.summary_is_stale)
    assert "self.state.summary_is_stale(" in methods["_followInput"]
    assert "self.state.summary_shown(result.volume.GetID())" in methods["_showResult"]
    # when the input changes, the mask field is re-chosen for it; the status line shows the run's warnings
    assert "shown['brainMask'] = mask_for_input(p.inputVolume, p.brainMask)" in methods["_followInput"]
    assert "self.ui.statusLabel.text = run_end_message(result.nodes.score, result.summary, result.warnings)" in methods[
        "_showResult"]
    assert "job.warnings" in methods["_useNewModel"]
    fields = {n.target.id: ast.unparse(n.annotation) for n in module_classes()["CeVAEAnomalyParameterNode"].body
              if isinstance(n, ast.AnnAssign)}
    assert {f: fields[f] for f in PANEL_OUTPUTS} == {f: c for f, (c, _) in PANEL_OUTPUTS.items()}


def test_the_maintainers_checklist_names_every_step_left_before_submission():
    """docs/SLICER.md holds one checklist of what only the maintainers can do, and says what was
    checked only against Slicer's source."""
    import json

    text = (REPO / "docs" / "SLICER.md").read_text()
    checklist = text[text.index("**Checklist for the maintainers before submitting**"):]
    checklist = checklist[:checklist.index("\n## ")]
    items = re.findall(r"(?sm)^- \[ \] (.*?)(?=^- \[ \]|\Z)", checklist)
    assert len(items) >= 4
    entry = json.loads((REPO / "CeVAEAnomaly.json").read_text())
    public = next(i for i in items if "Publish the repository" in i)
    assert entry["scm_url"].removesuffix(".git") in public and cmake_value("EXTENSION_HOMEPAGE") in public
    assert any("`3d-slicer-extension`" in i and "topic" in i for i in items)
    assert any("docs/screenshot.png" in i and "screen capture" in i for i in items)
    assert any("Firstname Lastname (Organisation)" in i and "CONTRIBUTORS.md" in i for i in items)
    assert "### Checked only against Slicer's source" in text


def test_every_entry_point_refuses_a_bad_option_with_one_message(scene_with_head, tiny_bundle, tmp_path, capsys):
    """The logic (in process and in a worker), the command line and the Slicer script build one request:
    batch_size=0 is refused by each in the same words, before anything runs or is written."""
    from CeVAEAnomalyLib.cli.main import main

    scene, volume, mask, image, _ = scene_with_head()
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError) as in_process:
        CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", batch_size=0)
    with pytest.raises(CeVAEError) as in_worker:
        CeVAEAnomalyLogic().startDetection(volume, mask, modelPath=tiny_bundle, device="cpu", batch_size=0)
    assert mrml.node_ids(scene) == before
    message = str(in_process.value)
    assert message == str(in_worker.value) == "batch_size (--batch-size) must be a whole number in [1, 4096], got 0."
    sitk.WriteImage(image, str(tmp_path / "head.nrrd"))
    out = tmp_path / "out"
    assert main(["detect", str(tmp_path / "head.nrrd"), "--score", str(out / "s.nrrd"), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    script = subprocess.run([sys.executable, str(REPO / "CeVAEAnomaly" / "Scripts" / "DetectVolume.py"), "--input",
                             str(tmp_path / "head.nrrd"), "--output-dir", str(out), "--batch-size", "0"],
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 2  # a bad argument, as the command line's
    assert script.stderr.strip().splitlines()[-1] == f"DetectVolume: error: {message} (see DetectVolume.py --usage)"
    assert not out.exists()


def test_the_widget_keeps_the_views_and_fields_where_the_user_left_them():
    """Read from the source (Qt runs only inside Slicer): qMRMLTableView.setMRMLTableNode emits selectionChanged
    even for the node it shows, so the jump follows a click instead, and the table is set only when it changes;
    a reset parameter node gets the model's values again; a missing bundled model leaves the panel usable."""
    widget = module_classes()["CeVAEAnomalyWidget"]
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "componentTableView.connect('clicked(QModelIndex)', self.onComponentClicked)" in methods["setup"]
    assert "selectionChanged()" not in "".join(methods.values())
    assert "!= (table.GetID() if table else None)" in methods["_updateResultsGui"]
    assert "COMPONENT_TABLE_ROLE" in methods["onComponentClicked"]
    assert methods["setParameterNode"].index("self._modelValuesShownFor = None") < \
        methods["setParameterNode"].index("self._binding.bind")
    assert "except CeVAEError" in methods["_currentModel"] and "default_model_path()" not in methods["_adaptChoice"]
    assert "slicer.util.confirmOkCancelDisplay" not in "".join(v for k, v in methods.items() if k != "_confirm")


def test_a_disabled_button_says_why():
    """The Qt-free reasons reach the tooltips: Calibrate's problem (adapt_panel.calibrate_problem, also its
    readiness), and another task running (View.busy_with) for Apply and Calibrate."""
    refresh = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                               if isinstance(n, ast.FunctionDef) and n.name == "_refresh"))
    assert "self.state.set_ready(CALIBRATE, calibrateProblem is None)" in refresh
    assert "calibrateProblem or calibrateWarning or _('Recalibrate" in refresh
    assert refresh.count("busy if view.busy_with else") == 3  # (Adapt: test_a_disabled_adapt_button_says_why...)


def test_declining_to_replace_an_earlier_runs_files_starts_nothing_and_reports_no_failure():
    """Cancel in "Replace it?" (Calibrate) or in the adapt prompts raised an error: an error box "Calibration
    failed." (with a traceback) for what the user chose. Now nothing starts and the status line says what to do;
    testing mode, which never asks, still refuses with an error."""
    methods = {n.name: n for n in module_classes()["CeVAEAnomalyWidget"].body if isinstance(n, ast.FunctionDef)}
    start = ast.unparse(methods["_start"])
    assert start.index("job = starts[task]()") < start.index("if job is None:") < start.index("self.state.started")
    for name, declines in (("_startCalibration", 1), ("_startAdaptation", 2)):
        body = ast.unparse(methods[name])
        assert body.count("self.ui.statusLabel.text = kept") == declines
        assert body.count("return None") == declines
        raises = [ast.unparse(n.exc) for n in ast.walk(methods[name]) if isinstance(n, ast.Raise)]
        assert "CeVAEError(kept)" in raises  # testing mode
        assert not any("refused" in r or "exists; choose another" in r for r in raises)


def test_the_device_tooltip_says_that_adapting_refuses_a_missing_gpu(tiny_bundle, tmp_path):
    """The tooltip promised that an unavailable device falls back to the CPU; adapting refuses a missing GPU instead,
    before it writes anything."""
    import xml.etree.ElementTree as ET

    torch = pytest.importorskip("torch")
    from CeVAEAnomalyLib.engine.devices import DeviceUnavailable
    from CeVAEAnomalyLib.training.adapt import adapt
    from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

    combo = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "deviceComboBox")
    tip = "".join(next(p for p in combo.iter("property") if p.get("name") == "toolTip").itertext())
    assert "adapting refuses it" in tip and "An unavailable device falls back to the CPU." not in tip
    mps = getattr(torch.backends, "mps", None)
    missing = "mps" if torch.cuda.is_available() else "cuda"  # (no machine has both)
    if missing == "mps" and mps is not None and mps.is_available():
        pytest.skip("needs a machine without CUDA or without MPS")
    out = tmp_path / "site.cevae"
    with pytest.raises(DeviceUnavailable):
        adapt(tiny_bundle, write_heads(tmp_path, size=(28, 28, 28)), out, AdaptOptions(device=missing))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h1.nii.gz", "h1_mask.nii.gz", "h2.nii.gz",
                                                           "h2_mask.nii.gz"]


def test_every_question_the_panel_asks_shows_the_normal_cursor():
    """A run starts under tryWithErrorDisplay's wait cursor, and the questions come up inside it (replace a file,
    resume an interrupted adaptation, install dependencies): each dialog the widget opens is inside a
    ``_normalCursor()`` block, which takes the wait cursor off the dialog and puts it back afterwards."""
    widget = module_classes()["CeVAEAnomalyWidget"]
    dialogs = {"slicer.util.messageBox", "slicer.util.confirmOkCancelDisplay", "slicer.util.confirmYesNoDisplay",
               "slicer.util.infoDisplay", "slicer.util.warningDisplay", "slicer.util.errorDisplay",
               "qt.QMessageBox.question", "qt.QFileDialog.getSaveFileName", "qt.QFileDialog.getOpenFileName"}
    guarded = set()
    for block in ast.walk(widget):
        if isinstance(block, ast.With) and any(ast.unparse(i.context_expr).endswith("._normalCursor()")
                                               for i in block.items):
            guarded |= {id(n) for n in ast.walk(block)}
    calls = [n for n in ast.walk(widget) if isinstance(n, ast.Call) and ast.unparse(n.func) in dialogs]
    assert len(calls) >= 2  # the pattern finds the questions
    assert [ast.unparse(n.func) for n in calls if id(n) not in guarded] == []


def test_cleanup_undoes_the_gui_binding():
    """Reload calls cleanup() and only hides the old panel's widgets (slicer.util.reloadScriptedModule): the old
    binding must be undone there (gui_binding.GuiBinding.release, which Slicer 5.10+ allows), not just the scene
    observers removed, or the hidden widgets keep following and writing the parameter node."""
    cleanup = next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                   if isinstance(n, ast.FunctionDef) and n.name == "cleanup")
    calls = {ast.unparse(n.func) for n in ast.walk(cleanup) if isinstance(n, ast.Call)}
    assert {"self.removeObservers", "self._binding.release"} <= calls


def test_a_typed_path_of_any_ending_is_taken_when_typing_ends():
    """ctkPathLineEdit puts a validator built from its name filter (*.cevae: the pattern '.*\\.cevae?$') on its text
    box; QLineEdit emits editingFinished (Enter, focus out) only for text its validator accepts. The panel takes a
    typed model path at the end of typing (gui_binding.takes_path_now) and says its problem: a path of another
    ending ('model', 'model.CEVAE', a folder) would be neither taken nor reported while the field shows it, and
    Apply would use the previous model. The box connected to editingFinished has no validator."""
    setup = next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                 if isinstance(n, ast.FunctionDef) and n.name == "setup")
    loop = next(n for n in ast.walk(setup) if isinstance(n, ast.For) and "editingFinished()" in ast.unparse(n))
    calls = [ast.unparse(n) for n in ast.walk(loop) if isinstance(n, ast.Call)]
    connected = next(c for c in calls if ".connect('editingFinished()'" in c).split(".connect(")[0]
    assert f"{connected}.setValidator(None)" in calls
    assert {"modelPath", "calibratedModelPath", "adaptedModelPath"} <= {
        n.value for n in ast.walk(loop.iter) if isinstance(n, ast.Constant)}


def test_every_tooltip_the_panel_sets_is_wrapped_and_shown_as_typed(tmp_path):
    """Qt word-wraps a tooltip only when it takes it for rich text (QTipLabel: setWordWrap(Qt::mightBeRichText)):
    Calibrate's tooltip, which says why the button is disabled, was set as plain text, one line of up to several
    hundred characters (the calibrated model's own output below: 357) that runs off the screen. Every tooltip the
    widget sets goes through settings.plain_tooltip: wrapped, its names and paths escaped."""
    from CeVAEAnomalyLib.slicer.adapt_panel import calibrate_problem

    model = tmp_path / "site_calibrated.cevae"
    model.write_bytes(b"x")
    assert len(calibrate_problem(2, str(model), model)) > 300  # a reason the tooltip carries
    widget = module_classes()["CeVAEAnomalyWidget"]
    values = [n.value for n in ast.walk(widget) if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Attribute) and t.attr == "toolTip"]
    assert len(values) >= 4  # the pattern finds them (Apply, Calibrate, Share, the model details)
    assert [ast.unparse(v) for v in values
            if not (isinstance(v, ast.Call) and ast.unparse(v.func) == "plain_tooltip")] == []


def test_the_uis_long_tooltips_are_wrapped():
    """The .ui's tooltips were plain text, which Qt shows on one line however long (QTipLabel word-wraps only what
    Qt::mightBeRichText takes for rich text): the false-positive rate's (323 characters), the thorough mode's and
    the score type's ran 1500 to 2000 pixels wide, past a laptop's screen. Each tooltip over 100 characters is a
    rich-text paragraph, its text escaped."""
    import html
    import xml.etree.ElementTree as ET

    tips = {w.get("name"): "".join(p.itertext()).strip() for w in ET.parse(UI_FILE).iter("widget")
            for p in w.findall("property") if p.get("name") == "toolTip"}
    long_tips = {name: tip for name, tip in tips.items() if len(html.unescape(re.sub(r"<[^>]+>", "", tip))) > 100}
    assert len(long_tips) >= 5  # the pattern finds them
    assert [name for name, tip in long_tips.items() if not re.fullmatch(r"<p>[^<]*</p>", tip)] == []


def test_a_disabled_adapt_button_says_why_while_another_task_runs():
    """While a detection or a calibration ran, Adapt was disabled under its estimate ("Starting from X: about ...")
    with its idle tooltip, so nothing said why it could not be clicked (Apply and Calibrate say "Another task is
    running"); nor did its tooltip say that it stops the adaptation while it reads Cancel."""
    refresh = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                               if isinstance(n, ast.FunctionDef) and n.name == "_refresh"))
    tip = next(line for line in refresh.splitlines() if "adaptTip = " in line)
    assert "if view.adapt_cancels else busy if view.busy_with else" in tip and "Stop the adaptation." in tip
    assert "self.ui.adaptButton.toolTip = plain_tooltip(adaptTip)" in refresh


def test_cleanup_after_a_setup_that_failed_partway_stops_what_exists():
    """setup() made the poll timer and the frame watch only after loading the .ui: where it failed first (the Resources
    folder missing: resource_dir raises), Slicer's cleanup() on reload or exit failed with AttributeError on
    self._timer. Everything cleanup() (and the _interrupt it calls first) uses exists from __init__ on; a frame watch
    that never followed a browser lets go of nothing."""
    widget = module_classes()["CeVAEAnomalyWidget"]
    methods = {n.name: n for n in widget.body if isinstance(n, ast.FunctionDef)}
    made = {t.attr for n in ast.walk(methods["__init__"]) for t in (
        n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else [])
        if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"}
    used = {n.value.attr for name in ("cleanup", "_interrupt") for n in ast.walk(methods[name])
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and ast.unparse(n.value.value) == "self" and n.value.attr not in methods}
    assert {"_timer", "_frames", "_binding", "state"} <= used  # the pattern finds them
    assert sorted(used - made - {"ui"}) == []  # (ui: _interrupt asks hasattr first)
    assert "if hasattr(self, 'ui'):" in ast.unparse(methods["_interrupt"])
    assert nodes.FrameWatch(lambda: None).follow(None) is False


def test_the_panel_has_its_attributes_before_the_base_class_may_call_setup():
    """Without a parent (a panel made from the Python console), ScriptedLoadableModuleWidget.__init__ calls setup()
    itself (Slicer's ScriptedLoadableModule.py), which then met none of the panel's attributes (the poll timer, the
    binding, the state). The panel's own attributes and the observation mixin come first, the base class last."""
    widget = module_classes()["CeVAEAnomalyWidget"]
    init = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    calls = [ast.unparse(s.value) for s in init.body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    assert calls[0] == "VTKObservationMixin.__init__(self)", calls
    assert ast.unparse(init.body[-1]) == "ScriptedLoadableModuleWidget.__init__(self, parent)"
