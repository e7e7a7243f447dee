"""Finding, linking and steering the module's MRML nodes (no image conversion, no SimpleITK).

Outputs are linked to their input volume by a node reference (role :data:`SOURCE_REFERENCE`),
which a scene import keeps valid when it renames clashing node IDs; the kind of output is a plain
attribute (:data:`ROLE_ATTRIBUTE`); the nodes one run filled share a run stamp (:data:`RUN_ATTRIBUTE`).
Light enough to import while the module panel is set up.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import CeVAEError
from ..io.naming import PANEL_RESULT, RESULT_TAGS
from .widget_state import with_warnings

ROLE_ATTRIBUTE = "CeVAEAnomaly.Role"
SOURCE_REFERENCE = "CeVAEAnomalySource"
PANEL_MASKS = (slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode)  # what the mask field holds
MASK_REFERENCE = "CeVAEAnomalyBrainMask"  # on a score volume: the brain mask its run used (none: the automatic one)
SLICE_AXIS_ATTRIBUTE = "CeVAEAnomaly.SliceAxis"
COORDINATES_ATTRIBUTE = "CeVAEAnomaly.Coordinates"  # "local": a component table's R, A, S are the input's own RAS
NAME_ATTRIBUTE = "CeVAEAnomaly.Name"  # the name the module gave an output: while it has it, it follows its input's
RUN_ATTRIBUTE = "CeVAEAnomaly.Run"  # when the run that filled the node published it (ns since the epoch)
# On a run's score volume: its one-line summary and its warnings (a JSON list), which the status line says of its
# results whenever the panel shows them again (another frame's shown meanwhile, a scene loaded); see run_message.
SUMMARY_ATTRIBUTE = "CeVAEAnomaly.Summary"
WARNINGS_ATTRIBUTE = "CeVAEAnomaly.Warnings"
# The slice table's grid: the input's IJK-to-RAS (16 numbers) when its indices were written. A scene save stores a
# left-handed volume with its slice axis reversed, so the indices are read back through this matrix.
SLICE_GRID_ATTRIBUTE = "CeVAEAnomaly.SliceGrid"
SEGMENT_TAG = "CeVAEAnomaly.Role"  # tag of this module's segment: only it is replaced on a new run
# On a labelmap (attribute) and on the module's segment (tag): what the run wrote (content_signature), so that a
# later run can tell a labelmap or segment the user has edited since, and keep it.
WRITTEN_KEY = "CeVAEAnomaly.Written"
# On every output node of a run: how it was made (the essentials of its detection's record, result.DetectionRecord),
# kept by a scene save. Threshold: repr of the number ("inf" for none labelled); Options: compact JSON of the scoring
# ("score") and post-processing ("post") options used, the slices per network pass ("batch_size"), the brain mask
# "given" or "automatic" ("mask") and the libraries' versions ("software"); ModelSHA256: "" for a model not loaded
# from a file; ImageVoxelsSHA256 and MaskVoxelsSHA256: the digests of the image scored and of the brain mask given
# (io.checksum.image_voxel_sha256: its voxels and grid, as the record's), absent where the record does not say (the
# mask: computed automatically).
MODEL_ATTRIBUTE = "CeVAEAnomaly.Model"
MODEL_SHA256_ATTRIBUTE = "CeVAEAnomaly.ModelSHA256"
THRESHOLD_ATTRIBUTE = "CeVAEAnomaly.Threshold"
THRESHOLD_SOURCE_ATTRIBUTE = "CeVAEAnomaly.ThresholdSource"
VERSION_ATTRIBUTE = "CeVAEAnomaly.Version"  # the tool and its version, e.g. "cevae-anomaly 0.3.0"
OPTIONS_ATTRIBUTE = "CeVAEAnomaly.Options"
IMAGE_SHA256_ATTRIBUTE = "CeVAEAnomaly.ImageVoxelsSHA256"
MASK_SHA256_ATTRIBUTE = "CeVAEAnomaly.MaskVoxelsSHA256"
PROVENANCE_ATTRIBUTES = (MODEL_ATTRIBUTE, MODEL_SHA256_ATTRIBUTE, THRESHOLD_ATTRIBUTE, THRESHOLD_SOURCE_ATTRIBUTE,
                         VERSION_ATTRIBUTE, OPTIONS_ATTRIBUTE, IMAGE_SHA256_ATTRIBUTE, MASK_SHA256_ATTRIBUTE)
# On every output of a run on a volume that a sequence browser drives (the proxy node of a sequence, Sequences
# module): the browser (reference), the item it scored (0-based, as the browser counted then), that item's index value
# in words and as the sequence holds it (by which the frame is found again after frames were added or removed before
# it; a run of a scene saved before it was recorded is found by its item). Showing another item changes the input's
# voxels under the heat map.
SEQUENCE_REFERENCE = "CeVAEAnomalySequenceBrowser"
FRAME_ATTRIBUTE = "CeVAEAnomaly.SequenceItem"
FRAME_INDEX_ATTRIBUTE = "CeVAEAnomaly.SequenceIndex"
FRAME_VALUE_ATTRIBUTE = "CeVAEAnomaly.SequenceIndexValue"
SCORE_ROLE = "score"
SEGMENTATION_ROLE = "segmentation"
LABELMAP_ROLE = "labelmap"
SLICE_TABLE_ROLE = "slice scores"
SLICE_CHART_ROLE = "slice chart"
COMPONENT_TABLE_ROLE = "components"
# The outputs the panel shows: parameter-node field -> (node class, role)
PANEL_OUTPUTS = {
    "scoreVolume": ("vtkMRMLScalarVolumeNode", SCORE_ROLE),
    "anomalySegmentation": ("vtkMRMLSegmentationNode", SEGMENTATION_ROLE),
    "anomalyLabelmap": ("vtkMRMLLabelMapVolumeNode", LABELMAP_ROLE),
    "componentTable": ("vtkMRMLTableNode", COMPONENT_TABLE_ROLE),
}


def node_ids(scene: slicer.vtkMRMLScene) -> List[str]:
    """IDs of all nodes in the scene, in scene order."""
    nodes = scene.GetNodes()
    return [nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())]


def to_numpy(matrix: vtk.vtkMatrix4x4, n: int = 4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(n)] for r in range(n)])


def ijk_to_ras(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The 4x4 matrix from an index into the node's voxel array to local RAS (before any parent transform):
    the node's IJK-to-RAS matrix, shifted where the image data's extent does not start at index 0."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    grid = to_numpy(matrix)
    data = volume_node.GetImageData()
    if data is not None:
        grid[:3, 3] = (grid @ np.array([*data.GetExtent()[::2], 1.0]))[:3]
    return grid


def to_world(node: slicer.vtkMRMLTransformableNode, point: Sequence[float]) -> Tuple[float, float, float]:
    """A point in the node's local RAS, mapped through its parent transforms to world RAS."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return tuple(float(v) for v in point)
    transform = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(transform)
    return tuple(float(v) for v in transform.TransformPoint([float(v) for v in point]))


def slice_center_ras(volume_node: slicer.vtkMRMLVolumeNode, axis: int, index: int,
                     grid: Optional[np.ndarray] = None) -> Tuple[float, float, float]:
    """World RAS of the centre of slice ``index`` along IJK axis ``axis`` of the volume, its indices read on
    ``grid`` (an IJK-to-RAS matrix of the same voxels; default: the volume's own)."""
    dims = volume_node.GetImageData().GetDimensions()
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[axis] = float(index)
    local = (ijk_to_ras(volume_node) if grid is None else grid) @ np.array([*ijk, 1.0])
    return to_world(volume_node, local[:3])


def slice_peak_ijk(scores: np.ndarray, axis: int, index: int) -> Optional[Tuple[int, int, int]]:
    """(i, j, k) of the highest score (the first of equal ones) in slice ``index`` along IJK axis ``axis`` of a score
    array (axes k, j, i); None where the array has no such slice or the slice scores nothing above 0."""
    if not 0 <= index < scores.shape[2 - axis]:
        return None
    plane = np.take(scores, index, axis=2 - axis)
    plane = np.where(np.isnan(plane), -np.inf, plane)
    if plane.size == 0 or not plane.max() > 0:
        return None
    at = [int(v) for v in np.unravel_index(int(np.argmax(plane)), plane.shape)]
    at.insert(2 - axis, int(index))
    return at[2], at[1], at[0]


def _slice_peak_ras(score_node: slicer.vtkMRMLVolumeNode, axis: int, index: int,
                    grid: Optional[np.ndarray]) -> Optional[Tuple[float, float, float]]:
    """World RAS of the score volume's highest-scoring voxel in slice ``index`` along IJK axis ``axis`` of ``grid``
    (an IJK-to-RAS matrix of its voxels, perhaps with an axis reversed: a saved scene's; None: its own); None where it
    scores nothing there."""
    now = ijk_to_ras(score_node)
    to_grid = np.linalg.inv(now if grid is None else grid) @ now  # an index of the volume -> one of ``grid``
    row = to_grid[axis, :3]
    own = int(np.argmax(np.abs(row)))
    there = (index - to_grid[axis, 3]) / row[own]
    if np.delete(np.abs(row), own).max() > 1e-6 or abs(there - round(there)) > 1e-3:
        return None  # not a slice of its voxels
    data = score_node.GetImageData()
    scores = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1])
    peak = slice_peak_ijk(scores, own, int(round(there)))
    return None if peak is None else to_world(score_node, (now @ np.array([*peak, 1.0]))[:3])


def slice_grid(table_node: slicer.vtkMRMLTableNode) -> Optional[np.ndarray]:
    """The IJK-to-RAS matrix a slice table's indices were written on (None: written before it was recorded)."""
    value = table_node.GetAttribute(SLICE_GRID_ATTRIBUTE)
    try:
        numbers = [float(v) for v in value.split()] if value else []
    except ValueError:
        numbers = []
    return np.array(numbers).reshape(4, 4) if len(numbers) == 16 else None


# --- outputs and their source ------------------------------------------------------------------


def link_output(node: slicer.vtkMRMLNode, role: str, source: slicer.vtkMRMLNode) -> None:
    """Mark ``node`` as this module's ``role`` output for the input volume ``source``."""
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(SOURCE_REFERENCE, source.GetID())


def belongs_to(node: slicer.vtkMRMLNode, source: slicer.vtkMRMLNode, role: str) -> bool:
    """Whether ``node`` may hold the ``role`` results of ``source``: it is this module's ``role`` output
    of ``source``, or a node that is not a module output, holds none of the user's data (:func:`holds_data`),
    is not an input with results of its own and, a segmentation, was drawn on ``source`` or on no volume and is no
    other input's brain mask (one drawn on another scan, or used as its mask by its run, is that scan's).

    An output whose input was deleted (MRML drops the reference, the role stays) belongs to no one: it
    holds that input's results, not the next one's.
    """
    own_role = node.GetAttribute(ROLE_ATTRIBUTE)
    if own_role:
        return own_role == role and node.GetNodeReferenceID(SOURCE_REFERENCE) == source.GetID()
    if isinstance(node, slicer.vtkMRMLSegmentationNode) and (
            node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) not in (None, source.GetID())
            or _used_for_another(node, source)):
        return False
    return not holds_data(node) and not has_outputs(node)


def holds_data(node: slicer.vtkMRMLNode) -> bool:
    """Whether ``node``, not made by this module, holds data that results written into it would replace: a
    volume with voxels (another scan, its mask) or a table with rows. (A segmentation keeps its segments: the
    module only adds its own.)"""
    if isinstance(node, slicer.vtkMRMLVolumeNode):
        data = node.GetImageData()
        return data is not None and data.GetNumberOfPoints() > 0
    if isinstance(node, slicer.vtkMRMLTableNode):
        return node.GetNumberOfRows() > 0
    return False


def has_outputs(node: slicer.vtkMRMLNode) -> bool:
    """Whether any node of ``node``'s scene is this module's output of it (``node`` is a processed input)."""
    scene = node.GetScene()
    if scene is None:
        return False
    for i in range(scene.GetNumberOfNodes()):
        other = scene.GetNthNode(i)
        if other.GetAttribute(ROLE_ATTRIBUTE) and other.GetNodeReferenceID(SOURCE_REFERENCE) == node.GetID():
            return True
    return False


def stamp_run(nodes: Iterable[Optional[slicer.vtkMRMLNode]]) -> None:
    """Mark ``nodes`` as the outputs of one run, newer than every earlier run's (see :func:`find_output`)."""
    run = str(time.time_ns())
    for node in nodes:
        if node is not None:
            node.SetAttribute(RUN_ATTRIBUTE, run)


def record_run_message(score: slicer.vtkMRMLNode, summary: str, warnings: Sequence[str]) -> None:
    """Record on a run's score volume its summary and warnings (:func:`run_message`), replacing an earlier run's."""
    score.SetAttribute(SUMMARY_ATTRIBUTE, summary)
    score.SetAttribute(WARNINGS_ATTRIBUTE, json.dumps(list(warnings)))


def run_message(score: Optional[slicer.vtkMRMLNode]) -> str:
    """What the status line says of the run whose score volume is ``score``: its summary, then its warnings, as
    :func:`record_run_message` recorded them; "" where none was recorded."""
    summary = score.GetAttribute(SUMMARY_ATTRIBUTE) if score is not None else None
    if not summary:
        return ""
    try:
        warnings = json.loads(score.GetAttribute(WARNINGS_ATTRIBUTE) or "[]")
    except (ValueError, RecursionError):
        warnings = []
    texts = [str(w) for w in warnings] if isinstance(warnings, list) else []
    return with_warnings(summary, texts)


def _run_of(node: slicer.vtkMRMLNode) -> int:
    value = node.GetAttribute(RUN_ATTRIBUTE)
    return int(value) if value and value.isascii() and value.isdigit() else 0


def find_output(scene: slicer.vtkMRMLScene, class_name: str, role: str, source: slicer.vtkMRMLNode,
                run: Optional[str] = None, exact: bool = False):
    """The node made for ``role`` of the source volume by the run ``run`` if there is one, else (unless
    ``exact``) by its latest run (a user may have sent a later run to new nodes: the earlier ones keep their
    link), or None."""
    found = _outputs_of(scene, class_name, role, source)
    same_run = [node for node in found if run and node.GetAttribute(RUN_ATTRIBUTE) == run]
    if exact:
        return same_run[-1] if same_run else None
    return (same_run or sorted(found, key=_run_of) or [None])[-1]


def _outputs_of(scene: slicer.vtkMRMLScene, class_name: str, role: str, source: slicer.vtkMRMLNode) -> List:
    """The nodes of ``class_name`` made for ``role`` of the source volume, in scene order."""
    found = []
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetNodeReferenceID(SOURCE_REFERENCE) == source.GetID():
            found.append(node)
    return found


def outputs_newest_first(scene: slicer.vtkMRMLScene, source: slicer.vtkMRMLNode) -> List[slicer.vtkMRMLNode]:
    """Every node of the scene that is this module's output of ``source`` (any role), the latest run's first (a run's
    nodes before :func:`stamp_run` marks them: last)."""
    found = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    found = [node for node in found if node.GetAttribute(ROLE_ATTRIBUTE)
             and node.GetNodeReferenceID(SOURCE_REFERENCE) == source.GetID()]
    return sorted(found, key=_run_of, reverse=True)


def anomaly_segment_id(node: slicer.vtkMRMLSegmentationNode) -> Optional[str]:
    """ID of this module's segment in a segmentation, or None."""
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        value = vtk.reference("")
        if segmentation.GetNthSegment(i).GetTag(SEGMENT_TAG, value) and str(value) == "anomaly":
            return segmentation.GetNthSegmentID(i)
    return None


def content_signature(ijk: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> str:
    """The number of labelled voxels (``ijk``: their indices, [N, 3]) and their centroid in local RAS to 0.1 mm:
    a voxel painted or erased changes the count, a component moved changes the centroid; how a scene save stores the
    voxels (extent, axis order) changes at most its last digit (see :func:`edited_since_written`)."""
    if len(ijk) == 0:
        return "0"
    centre = ijk_to_ras_matrix[:3, :3] @ ijk.mean(axis=0) + ijk_to_ras_matrix[:3, 3]
    return f"{len(ijk)}:" + ",".join(f"{v:.1f}" for v in centre + 0.0)  # (+ 0.0: no "-0.0")


def labelmap_signature(node: slicer.vtkMRMLVolumeNode) -> str:
    """:func:`content_signature` of a labelmap volume's non-zero voxels."""
    data = node.GetImageData()
    if data is None or data.GetPointData().GetScalars() is None:
        return "0"
    voxels = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1])
    return content_signature(np.argwhere(voxels)[:, ::-1], ijk_to_ras(node))


def segment_signature(segment: slicer.vtkSegment) -> str:
    """:func:`content_signature` of a segment's binary labelmap (its own label in a shared one)."""
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None or image.GetPointData().GetScalars() is None:
        return "0"
    extent = image.GetExtent()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ijk = np.argwhere(voxels == segment.GetLabelValue())[:, ::-1] + np.array(extent[::2])
    return content_signature(ijk, to_numpy(matrix))


def table_signature(node: slicer.vtkMRMLTableNode) -> str:
    """A digest of a table's column names and cells as text (6 significant digits, as a scene save keeps them): an
    edit in the Tables module changes it, a save and reload does not."""
    table = node.GetTable()
    columns = range(table.GetNumberOfColumns())
    cells = [table.GetColumnName(c) for c in columns]
    cells += [table.GetValue(r, c).ToString() for r in range(table.GetNumberOfRows()) for c in columns]
    return hashlib.sha256("\t".join(cells).encode("utf-8")).hexdigest()


# content_signature's text: the number of voxels, then (any voxels) the centroid's R, A, S to one decimal (0.1 mm).
_CONTENT_SIGNATURE = re.compile(r"(\d+)(?::(-?\d+\.\d),(-?\d+\.\d),(-?\d+\.\d))?")


def edited_since_written(written: Optional[str], now: str) -> bool:
    """Whether content the run recorded as ``written`` (None: recorded by no run) is ``now`` something else. Two
    :func:`content_signature` texts differ when their voxel counts do or their centroids do by more than one rounding
    step (0.1 mm) on an axis: the same voxels read through another matrix (a scene save stores a left-handed volume
    with its slice axis reversed) can round to either side of a step. Any other text (a table's digest) must match."""
    if not written or written == now:
        return False
    old, new = _CONTENT_SIGNATURE.fullmatch(written), _CONTENT_SIGNATURE.fullmatch(now)
    if old is None or new is None or old.group(1) != new.group(1) or (old.group(2) is None) != (new.group(2) is None):
        return True
    steps = zip(old.groups()[1:], new.groups()[1:])  # 0.15: more than one step of 0.1, less than two
    return any(abs(float(a) - float(b)) > 0.15 for a, b in steps if a is not None)


def segment_ids(node: slicer.vtkMRMLSegmentationNode) -> List[str]:
    """IDs of a segmentation's segments, in order."""
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def user_segment_ids(node: slicer.vtkMRMLSegmentationNode) -> List[str]:
    """IDs of a segmentation's segments that are not this module's anomaly segment."""
    anomaly = anomaly_segment_id(node)
    return [i for i in segment_ids(node) if i != anomaly]


def is_module_output(node: slicer.vtkMRMLNode) -> bool:
    """Whether ``node`` holds only this module's results: a score volume, an anomaly labelmap, or an anomaly
    segmentation without segments of a user's own (a user's segmentation that also receives the anomaly
    segment stays theirs, e.g. as a brain mask). A segmentation holding only the anomaly segment is one without
    the node attributes too: saved to a file (DetectVolume.py's NAME_segmentation.seg.nrrd) and loaded back, its
    segment keeps the module's tag."""
    if isinstance(node, slicer.vtkMRMLSegmentationNode):
        own = node.GetAttribute(ROLE_ATTRIBUTE) or anomaly_segment_id(node) is not None
        return bool(own) and not user_segment_ids(node)
    return bool(node.GetAttribute(ROLE_ATTRIBUTE))


def module_volume_ids(scene: slicer.vtkMRMLScene) -> List[str]:
    """IDs of the volumes and segmentations that hold only this module's results (:func:`is_module_output`): the
    selectors of inputs, masks and healthy volumes hide them."""
    found = []
    for class_name in ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode"):
        for i in range(scene.GetNumberOfNodesByClass(class_name)):
            node = scene.GetNthNodeByClass(i, class_name)
            if is_module_output(node):
                found.append(node.GetID())
    return found


def named_as_result(node: slicer.vtkMRMLNode) -> Optional[Tuple[str, str, str]]:
    """(NAME, what follows it, how) where ``node``'s name says it holds results of this module for a volume NAME, not
    a scan, though it has none of the module's attributes: named as the panel names them
    (:data:`~..io.naming.PANEL_RESULT`: saved from the panel and loaded alone), or as the command line names its
    files (:data:`~..io.naming.RESULT_TAGS`: NAME_score, ...) with a volume NAME in its scene, as batch leaves such
    a file out beside its scan; either with the "_N" Slicer adds to a name that is taken (a file loaded twice). A
    name alone of the command line's is no proof (a scan could be so named), and the voxels of a score map are no
    different from a skull-stripped scan's. None otherwise."""
    name = node.GetName() or ""
    panel = PANEL_RESULT.match(name)
    if panel is not None:
        return panel.group(1), panel.group(2), "saved from its panel and loaded again"
    scene = node.GetScene()
    stem = _UNIQUE_SUFFIX.sub("", name)
    for tag in RESULT_TAGS:
        scan = stem[: -len(tag)]
        if stem.endswith(tag) and scan and scene is not None and _has_volume_named(scene, scan):
            return scan, name[len(scan):], f"as the command line names its files, and '{scan}' is in this scene"
    return None


_UNIQUE_SUFFIX = re.compile(r"(?:_\d+)+$")  # what vtkMRMLScene::GenerateUniqueName adds to a taken name: "NAME_1",
# "NAME_1_1" for "NAME_1" taken


def _has_volume_named(scene: slicer.vtkMRMLScene, name: str) -> bool:
    """Whether ``scene`` holds a volume named ``name``."""
    return scene.GetNodesByClassByName("vtkMRMLVolumeNode", name).GetNumberOfItems() > 0


def first_input_volume(scene: slicer.vtkMRMLScene) -> Optional[slicer.vtkMRMLScalarVolumeNode]:
    """The first plain scalar volume not made by this module (the panel's default input): not a labelmap, nor a
    colour, vector or diffusion volume, which the input selector (exact class) could not even show, nor one
    :func:`named_as_result` (Apply refuses it; it stays selectable only for a scan so named, to be renamed)."""
    own = set(module_volume_ids(scene))
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.GetClassName() == "vtkMRMLScalarVolumeNode" and node.GetID() not in own and not named_as_result(node):
            return node
    return None


def outputs_for_input(scene: slicer.vtkMRMLScene, volume: slicer.vtkMRMLScalarVolumeNode,
                      chosen: Dict[str, Optional[slicer.vtkMRMLNode]]) -> Dict[str, Optional[slicer.vtkMRMLNode]]:
    """The output nodes the panel shows for the input ``volume`` (keys of :data:`PANEL_OUTPUTS`): a
    chosen node that belongs to it (or to no input yet), else its own earlier output (of the score volume's run where
    that scored a sequence frame: never another frame's), else None (made on Apply). So another input's results are
    never offered as this one's outputs."""
    shown: Dict[str, Optional[slicer.vtkMRMLNode]] = {}
    for field, (class_name, role) in PANEL_OUTPUTS.items():  # the score volume first
        node = chosen.get(field)
        if node is None or node.GetScene() is not scene or not belongs_to(node, volume, role):
            frame_score = shown.get("scoreVolume")
            run = frame_score.GetAttribute(RUN_ATTRIBUTE) if _scored_item(frame_score)[0] is not None else None
            node = find_output(scene, class_name, role, volume, run, exact=run is not None)
        shown[field] = node
    return shown


def mask_for_input(volume: slicer.vtkMRMLScalarVolumeNode, current: Optional[slicer.vtkMRMLNode]
                   ) -> Optional[slicer.vtkMRMLNode]:
    """The brain mask the panel shows when ``volume`` becomes the input (a labelmap or segmentation: the panel's
    mask field holds no other kind): the one its latest run used (still in the scene), else ``current`` if it can
    be this volume's, else None (the automatic mask). ``current`` cannot be when another input's run used it; a
    labelmap can be when it lies on the volume's grid, a segmentation when the volume it was drawn on (if any)
    does. So another scan's mask is not carried over to this one."""
    scene = volume.GetScene()
    score = find_output(scene, "vtkMRMLScalarVolumeNode", SCORE_ROLE, volume) if scene is not None else None
    used = score.GetNodeReference(MASK_REFERENCE) if score is not None else None
    if used is not None and used.GetScene() is scene and isinstance(used, PANEL_MASKS):
        return used
    if (current is None or current.GetScene() is not scene or not isinstance(current, PANEL_MASKS)
            or _used_for_another(current, volume)):
        return None
    return current if _may_be_mask_of(current, volume) else None


def _may_be_mask_of(mask: slicer.vtkMRMLNode, volume: slicer.vtkMRMLScalarVolumeNode) -> bool:
    """Whether ``mask`` can be ``volume``'s brain mask: a volume on its grid, a segmentation drawn on it or on none."""
    if isinstance(mask, slicer.vtkMRMLSegmentationNode):
        drawn_on = mask.GetNodeReference(mask.GetReferenceImageGeometryReferenceRole())
        return drawn_on is None or same_grid(drawn_on, volume)
    return same_grid(mask, volume)


@dataclass(frozen=True)
class SequenceFrame:
    """The item of a sequence a browser shows in its proxy volume: ``item`` (0-based) of ``count``, ``index`` its
    index value in words (e.g. "time = 2 s"), ``value`` as the sequence holds it (e.g. "2")."""

    browser: slicer.vtkMRMLNode
    item: int
    count: int
    index: str
    value: str

    @property
    def label(self) -> str:
        """E.g. "frame 3 of 10 (time = 2 s) of 'cine'", 1-based as the Sequences module's item slider shows it."""
        return f"frame {self.item + 1} of {self.count} ({self.index}) of '{self.browser.GetName()}'"


def sequence_frame(volume: slicer.vtkMRMLNode) -> Optional[SequenceFrame]:
    """The frame ``volume`` shows now if a sequence browser drives it (it is a proxy node), else None."""
    scene = volume.GetScene()
    if scene is None:
        return None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        master = browser.GetMasterSequenceNode()
        if browser.GetSequenceNode(volume) is None or master is None:
            continue
        item = browser.GetSelectedItemNumber()
        unit, value = master.GetIndexUnit(), master.GetNthIndexValue(item)
        index = f"{master.GetIndexName()} = {value}{' ' + unit if unit else ''}"
        return SequenceFrame(browser, item, browser.GetNumberOfItems(), index, value)
    return None


def read_frame_node(volume: slicer.vtkMRMLNode, frame: Optional[SequenceFrame]) -> slicer.vtkMRMLNode:
    """The node that holds the voxels a run read of ``volume`` on ``frame`` (:func:`sequence_frame` at its start): the
    volume itself, or, where its browser shows another item now, the data node of the item read (by its index value)
    in the volume's sequence (which keeps that frame's voxels while the proxy shows another's); the volume where there
    is none."""
    master = frame.browser.GetMasterSequenceNode() if frame is not None else None
    if master is None or master.GetNthIndexValue(frame.browser.GetSelectedItemNumber()) == frame.value:
        return volume
    sequence = frame.browser.GetSequenceNode(volume)
    return (None if sequence is None else sequence.GetDataNodeAtValue(frame.value, False)) or volume


def _scored_item(output: Optional[slicer.vtkMRMLNode]) -> Tuple[Optional[slicer.vtkMRMLNode], Optional[int]]:
    """The browser and the item the run of ``output`` (one of its nodes) scored, as the browser counts items now (the
    frame found by its index value); (browser, None) where that frame was removed from the sequence since; (None, None)
    where the run scored no sequence's frame."""
    item = output.GetAttribute(FRAME_ATTRIBUTE) if output is not None else None
    browser = output.GetNodeReference(SEQUENCE_REFERENCE) if item is not None else None
    if browser is None or not item.isdigit():
        return None, None
    value, master = output.GetAttribute(FRAME_VALUE_ATTRIBUTE), browser.GetMasterSequenceNode()
    if value is None or master is None:  # (recorded before the index value was)
        return browser, int(item)
    found = master.GetItemNumberFromIndexValue(value)
    return browser, found if found >= 0 else None


def scored_frame(output: Optional[slicer.vtkMRMLNode], frame: SequenceFrame) -> bool:
    """Whether the run of ``output`` (one of its nodes) scored ``frame`` (its browser's item, by its index value)."""
    browser, item = _scored_item(output)
    value = output.GetAttribute(FRAME_VALUE_ATTRIBUTE) if browser is not None else None
    return browser is not None and browser.GetID() == frame.browser.GetID() and (
        item == frame.item if value is None else value == frame.value)


def frame_run(scene: slicer.vtkMRMLScene, source: slicer.vtkMRMLNode, frame: SequenceFrame) -> Optional[str]:
    """The run stamp of the latest run on ``source`` that scored ``frame``, or None: each frame of a sequence has
    results of its own, so that a run on another frame leaves the first one's to compare with."""
    runs = [score for score in _outputs_of(scene, "vtkMRMLScalarVolumeNode", SCORE_ROLE, source)
            if scored_frame(score, frame)]
    return sorted(runs, key=_run_of)[-1].GetAttribute(RUN_ATTRIBUTE) if runs else None


@dataclass(frozen=True)
class _FrameMove:
    """The browser of a run's frame shows another item than the one it scored (:func:`_moved_from`)."""

    browser: slicer.vtkMRMLNode
    scored: Optional[int]  # the item the run scored (None: removed from the sequence since)
    frame: Optional[SequenceFrame]  # the frame shown, where the run's input is still that browser's proxy
    run: Optional[str]  # the stamp of the latest run on that frame (None: it has no results of its own)


def _moved_from(output: Optional[slicer.vtkMRMLNode]) -> Optional[_FrameMove]:
    """Where the run of ``output`` (one of its nodes) scored a sequence's frame and its browser shows another now: which
    one, and that frame's own results; None where it shows the frame scored, or the run scored no sequence's frame."""
    browser, item = _scored_item(output)
    if browser is None or browser.GetSelectedItemNumber() == item:
        return None
    source = source_volume(output)
    frame = sequence_frame(source) if source is not None else None
    if frame is None or frame.browser.GetID() != browser.GetID():
        return _FrameMove(browser, item, None, None)
    return _FrameMove(browser, item, frame, frame_run(output.GetScene(), source, frame))


def off_scored_frame(output: Optional[slicer.vtkMRMLNode]) -> bool:
    """Whether the run of ``output`` scored a sequence's frame and its browser shows another now: its heat map would lie
    over another frame's voxels, and a jump to its results brings the browser back (:func:`show_scored_frame`)."""
    return _moved_from(output) is not None


def frame_note(output: Optional[slicer.vtkMRMLNode]) -> str:
    """What to say when the run of ``output`` scored a sequence's frame and its browser shows another now (the heat
    map lies over the voxels of another frame); "" otherwise."""
    moved = _moved_from(output)
    if moved is None:
        return ""
    own = None if moved.run is None else find_output(output.GetScene(), "vtkMRMLScalarVolumeNode", SCORE_ROLE,
                                                     source_volume(output), moved.run, exact=True)
    views = f"The views show frame {moved.browser.GetSelectedItemNumber() + 1} of '{moved.browser.GetName()}'"
    if moved.scored is None:
        again = f"this frame's are in '{own.GetName()}'" if own is not None else "run the detection again on this frame"
        return (f"{views}, but the anomaly results are of a frame removed from the sequence since "
                f"({output.GetAttribute(FRAME_INDEX_ATTRIBUTE)}); {again}.")
    instead = (f"; this frame's are in '{own.GetName()}'" if own is not None
               else ", or run the detection again on this frame")
    return (f"{views}, but the anomaly results are of frame {moved.scored + 1}: go back to frame {moved.scored + 1} to "
            f"read them{instead}.")


def run_end_message(score: slicer.vtkMRMLNode, summary: str, warnings: Sequence[str]) -> str:
    """The status line when a detection whose score volume is ``score`` has loaded: its ``summary``; where the reader
    moved the sequence browser to another frame while it ran, which frame the views show and where the results of each
    are (:func:`frame_note`: the views are left there, not brought back); then its ``warnings``."""
    note = frame_note(score)
    return with_warnings(f"{summary} {note}" if note else summary, warnings)


@dataclass(frozen=True)
class FrameResults:
    """The results of the frame a sequence browser moved to, which the panel shows in place of another frame's."""

    fields: Dict[str, Optional[slicer.vtkMRMLNode]]  # the panel's output fields (PANEL_OUTPUTS): that run's nodes
    overlay: bool  # the views showed the other frame's heat map over the scan: they show this frame's now
    message: str  # the status line


def shown_frame_results(score: Optional[slicer.vtkMRMLNode]) -> Optional[FrameResults]:
    """When the panel shows ``score``, a run's score volume on a sequence frame, and the browser has moved to another
    frame that has results of its own: those results, which a reader expects the panel and the heat map to switch
    to (the heat map of one frame over another's voxels misleads). None where the browser shows the frame scored, or a
    frame without results (:func:`frame_note` says so)."""
    moved = _moved_from(score)
    if moved is None or moved.run is None:
        return None
    frame, run = moved.frame, moved.run
    scene, source = score.GetScene(), source_volume(score)
    fields = {field: find_output(scene, class_name, role, source, run, exact=True)
              for field, (class_name, role) in PANEL_OUTPUTS.items()}
    table, said = fields["componentTable"], run_message(fields["scoreVolume"])
    count = f" ({table.GetNumberOfRows()} component(s))" if table is not None else ""
    shows = f"The views show {frame.label}: the panel shows its results, '{fields['scoreVolume'].GetName()}'"
    return FrameResults(fields, shows_result(scene, score, source),
                        f"{shows}. {said}" if said else f"{shows}{count}.")  # (a run of a scene saved before it said)


def show_scored_frame(output: Optional[slicer.vtkMRMLNode]) -> bool:
    """Bring the sequence browser back to the frame the run of ``output`` scored (before a jump into its results);
    whether it showed another."""
    browser, item = _scored_item(output)
    if browser is None or item is None or browser.GetSelectedItemNumber() == item or item >= browser.GetNumberOfItems():
        return False
    browser.SetSelectedItemNumber(item)
    return True


class FrameWatch:
    """Observes the sequence browser whose frame the panel's results scored: ``moved`` is called at each change of it
    (another frame shown), whichever way the results came into the panel (a run, a scene loaded, an input picked with
    earlier results). What ``moved`` returns is ignored (the widget's handler says whether the fields switched). While
    a detection runs it is held (:meth:`hold`): the panel's fields stay the nodes the run writes, and a move is kept
    for the run's end (:meth:`release`)."""

    def __init__(self, moved: Callable[[], object]) -> None:
        self._moved = moved
        self._browser: Optional[slicer.vtkMRMLNode] = None
        self._tag: Optional[int] = None
        self._held: Optional[Tuple[Optional[slicer.vtkMRMLNode], Optional[int]]] = None  # (browser, item) at hold()

    def hold(self) -> None:
        """Until :meth:`release`, a change of the browser is not passed on to ``moved``."""
        self._held = self._shown()

    def release(self) -> bool:
        """Pass changes on again; True if the browser (or the one observed) shows another frame than at :meth:`hold`
        (then what the views show is to be said anew), False if it shows the same one or nothing was held."""
        held, self._held = self._held, None
        return held is not None and held != self._shown()

    def _shown(self) -> Tuple[Optional[slicer.vtkMRMLNode], Optional[int]]:
        browser = self._browser
        return browser, None if browser is None else browser.GetSelectedItemNumber()

    def _changed(self) -> None:
        if self._held is None:
            self._moved()

    def follow(self, score: Optional[slicer.vtkMRMLNode]) -> bool:
        """Observe the browser of the panel's score volume ``score`` (None, or no sequence's: none); True if that is
        another browser than before (then what the views show is to be said anew)."""
        browser = _scored_item(score)[0]
        if browser is self._browser:
            return False
        if self._browser is not None:
            self._browser.RemoveObserver(self._tag)
        self._browser, self._tag = browser, None
        if browser is not None:
            self._tag = browser.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: self._changed())
        return True


ENGINE_RESAMPLED_MASK = "The brain mask is on another grid than the image"  # engine.preprocess.mask_array's words


def mask_words(mask: Optional[slicer.vtkMRMLNode], volume: slicer.vtkMRMLScalarVolumeNode,
               what: str = "input volume", name: Optional[str] = None) -> Dict[str, str]:
    """What the engine's warnings of a brain mask on another grid become for a run on ``volume`` (a ``what``, called
    ``name``: by default its node's name) with the mask node ``mask`` (a volume: a segmentation is exported onto the
    volume's grid): they name both nodes, and the scan on whose grid the mask lies if one in the scene does, so that a
    mask chosen for the wrong scan is seen as such."""
    if not isinstance(mask, slicer.vtkMRMLVolumeNode) or mask.GetScene() is None:
        return {}
    scene = mask.GetScene()
    owners = (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
    owner = next((node for node in owners if node is not volume and node is not mask
                  and not isinstance(node, slicer.vtkMRMLLabelMapVolumeNode) and not is_module_output(node)
                  and same_grid(node, mask, transforms=False)), None)
    lies = f" (it lies on that of '{owner.GetName()}')" if owner is not None else ""
    return {ENGINE_RESAMPLED_MASK: f"The brain mask '{mask.GetName()}'{lies} is on another grid than the {what} "
                                   f"'{volume.GetName() if name is None else name}'"}


def _used_for_another(mask: slicer.vtkMRMLNode, volume: slicer.vtkMRMLScalarVolumeNode) -> bool:
    """Whether a run of an input other than ``volume`` used ``mask`` as that input's own brain mask: a run that
    resampled a mask of another grid (chosen by hand, and warned of) does not make it that input's."""
    scene = mask.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        score = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        source = score.GetNodeReference(SOURCE_REFERENCE)
        of_another = score.GetNodeReferenceID(SOURCE_REFERENCE) != volume.GetID()
        if of_another and score.GetAttribute(ROLE_ATTRIBUTE) == SCORE_ROLE \
                and score.GetNodeReferenceID(MASK_REFERENCE) == mask.GetID() \
                and (source is None or _may_be_mask_of(mask, source)):
            return True
    return False


def source_volume(output: Optional[slicer.vtkMRMLNode]) -> Optional[slicer.vtkMRMLScalarVolumeNode]:
    """The input volume an output was made from, or None."""
    return None if output is None else output.GetNodeReference(SOURCE_REFERENCE)


def result_elsewhere(panel_input: Optional[slicer.vtkMRMLNode], volume: slicer.vtkMRMLScalarVolumeNode,
                     score: slicer.vtkMRMLScalarVolumeNode) -> str:
    """What the status line adds when the results of a run on ``volume`` (its score volume: ``score``) were loaded
    while the panel's input became another scan (a scene added during the run brings its own choices; the Python
    console may set it): whose results they are and where; "" when the panel's input is still ``volume``. The panel's
    fields and the views are then left to the scan it shows."""
    if panel_input is not None and panel_input.GetID() == volume.GetID():
        return ""
    shows = ("has no input volume now" if panel_input is None else
             f"shows another volume named '{volume.GetName()}' now" if panel_input.GetName() == volume.GetName()
             else f"shows '{panel_input.GetName()}' now")  # (the same scene added again: two nodes of one name)
    return (f"These are the results of '{volume.GetName()}' ('{score.GetName()}'); the panel {shows} (its input "
            f"changed during the run): choose '{volume.GetName()}' as the input volume to see them.")


@dataclass
class StoredResult:
    """The nodes of a detection found in the scene (after a reload, without the in-memory result)."""

    volume: slicer.vtkMRMLScalarVolumeNode
    score: slicer.vtkMRMLScalarVolumeNode
    slice_table: Optional[slicer.vtkMRMLTableNode]
    slice_chart: Optional[slicer.vtkMRMLPlotChartNode]
    components: Optional[slicer.vtkMRMLTableNode] = None

    @property
    def jump_ras(self) -> Optional[Tuple[float, float, float]]:
        """Where "jump to the most anomalous" goes: the top component (first row of the component
        table, ranked by summed score) when there is one, else the most anomalous slice (:attr:`top_slice_ras`)."""
        if self.components is not None and self.components.GetNumberOfRows() > 0:
            return component_position(self.components, 0)
        return self.top_slice_ras

    @property
    def top_slice_ras(self) -> Optional[Tuple[float, float, float]]:
        """World RAS of the highest-scoring voxel of the most anomalous slice (a point on that slice and on what
        made it so: slice views of any orientation show it; the slice's centre where the score volume scores
        nothing there), the slices ranked as the result ranks them (``DetectionResult.ranked_slices``: slice
        anomaly, then highest score, then sample score, then the lower index; a column that tables written before it
        lack counts as equal)."""
        table = self.slice_table
        if table is None or table.GetNumberOfRows() == 0 or self.volume.GetImageData() is None:
            return None
        index = table_column(table, "Slice")

        def column(name: str) -> np.ndarray:
            present = table.GetTable().GetColumnByName(name) is not None
            return table_column(table, name) if present else np.zeros(len(index))

        row = int(np.lexsort((index, -column("Sample score"), -column("Highest score"), -column("Slice anomaly")))[0])
        axis = "IJK".index(table.GetAttribute(SLICE_AXIS_ATTRIBUTE) or "K")
        if self.score.GetImageData() is None:  # see run_frame
            return slice_center_ras(self.volume, axis, int(index[row]), slice_grid(table))
        return (_slice_peak_ras(self.score, axis, int(index[row]), slice_grid(table))
                or slice_center_ras(self.score, axis, int(index[row]), slice_grid(table)))


def stored_result(score: Optional[slicer.vtkMRMLScalarVolumeNode]) -> Optional[StoredResult]:
    """The detection whose score volume is ``score``, read from the scene; None if it is not one."""
    volume = source_volume(score)
    scene = None if score is None else score.GetScene()
    if volume is None or scene is None:
        return None
    run = score.GetAttribute(RUN_ATTRIBUTE)  # the tables of the run that filled this score volume
    return StoredResult(volume, score, find_output(scene, "vtkMRMLTableNode", SLICE_TABLE_ROLE, volume, run),
                        find_output(scene, "vtkMRMLPlotChartNode", SLICE_CHART_ROLE, volume, run),
                        find_output(scene, "vtkMRMLTableNode", COMPONENT_TABLE_ROLE, volume, run))


def shows_result(scene: slicer.vtkMRMLScene, score: slicer.vtkMRMLVolumeNode, volume: slicer.vtkMRMLVolumeNode) -> bool:
    """Whether a slice view shows the score volume ``score`` over its input ``volume`` (as a finished run puts them)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == score.GetID() and composite.GetBackgroundVolumeID() == volume.GetID():
            return True
    return False


def set_overlay_opacity(scene: slicer.vtkMRMLScene, score: slicer.vtkMRMLVolumeNode, opacity: float) -> int:
    """Foreground opacity of the slice views whose foreground is ``score`` (others untouched); how many."""
    changed = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if score is not None and composite.GetForegroundVolumeID() == score.GetID():
            composite.SetForegroundOpacity(float(opacity))
            changed += 1
    return changed


def show_only_run_segment(scene: slicer.vtkMRMLScene, score: slicer.vtkMRMLVolumeNode) -> None:
    """Show the "Anomaly" segment of the run whose score volume is ``score`` and hide every other run's, of this scan
    or of another one: they share the name and colour, so over this scan another scan's outline would pass for one
    of its findings. Segments of the user's own (also renamed or edited anomaly segments) are left as they are, and
    all are when ``score`` is no input's score volume."""
    volume = source_volume(score)
    if volume is None:
        return
    shown = find_output(scene, "vtkMRMLSegmentationNode", SEGMENTATION_ROLE, volume, score.GetAttribute(RUN_ATTRIBUTE),
                        exact=True)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        segment_id, display = anomaly_segment_id(node), node.GetDisplayNode()
        if segment_id is not None and display is not None:
            display.SetSegmentVisibility(segment_id, node is shown)


# --- tables ------------------------------------------------------------------------------------


def table_column(table_node: slicer.vtkMRMLTableNode, name: str) -> np.ndarray:
    """One column of a table node as a numpy array."""
    array = table_node.GetTable().GetColumnByName(name)
    if array is None:
        raise CeVAEError(f"The table '{table_node.GetName()}' has no column '{name}'.")
    return numpy_support.vtk_to_numpy(array).copy()


PEAK_COLUMNS = ("Peak R", "Peak A", "Peak S")  # a component's highest-scoring voxel, where its row jumps to
SIDE_COLUMN = "Side"  # the patient's side of the midline a component lies on: left, right, both ("": not known)


def component_position(table_node: slicer.vtkMRMLTableNode, row: int) -> Tuple[float, float, float]:
    """World RAS of the component in ``row`` of a component table, where the slice views go for it: its
    highest-scoring voxel (:data:`PEAK_COLUMNS`), a point in the component, which its centroid (R, A, S) need not be
    (a ring's lies in its hole); the centroid in a table written before the peak was. Both are the input volume's
    own RAS at the run, mapped to the world as the run's score volume lies now (:func:`run_frame`; a table written
    before they were local, in world RAS then, is read as it is)."""
    if not 0 <= row < table_node.GetNumberOfRows():
        raise CeVAEError(f"Row {row} is not in the component table.")
    peak = table_node.GetTable().GetColumnByName(PEAK_COLUMNS[0]) is not None
    point = tuple(float(table_column(table_node, axis)[row]) for axis in (PEAK_COLUMNS if peak else ("R", "A", "S")))
    frame = run_frame(table_node)
    local = table_node.GetAttribute(COORDINATES_ATTRIBUTE) == "local"
    return to_world(frame, point) if local and frame is not None else point


def run_frame(output: slicer.vtkMRMLNode) -> Optional[slicer.vtkMRMLVolumeNode]:
    """The node whose local RAS and transform a run's positions are read in: the run's score volume, which keeps
    the input's grid and transform of that run (a transform hardened into the input since changes the input's own
    RAS, not the score's) and is what the overlay shows; the input volume if the score volume is gone."""
    volume = source_volume(output)
    scene = output.GetScene()
    if volume is None or scene is None:
        return volume
    score = find_output(scene, "vtkMRMLScalarVolumeNode", SCORE_ROLE, volume, output.GetAttribute(RUN_ATTRIBUTE),
                        exact=True)
    return score if score is not None and score.GetImageData() is not None else volume


# --- calibration inputs ------------------------------------------------------------------------


def same_grid(a: slicer.vtkMRMLVolumeNode, b: slicer.vtkMRMLVolumeNode, transforms: bool = True) -> bool:
    """Whether two volumes share dimensions, IJK-to-RAS matrix and (``transforms``) parent transform."""
    da, db = a.GetImageData(), b.GetImageData()
    return (da is not None and db is not None and da.GetDimensions() == db.GetDimensions()
            and (not transforms or a.GetTransformNodeID() == b.GetTransformNodeID())
            and np.allclose(ijk_to_ras(a), ijk_to_ras(b), atol=1e-4))


def distinct_node_names(volumes: Sequence[slicer.vtkMRMLNode]) -> List[str]:
    """The name of each node of ``volumes``, told apart where different nodes share one (as
    io.manifest.distinct_names tells files apart): each such node numbered in order, "head (1)", "head (2)", past
    names already taken. A node given twice keeps one name (its repeat is the same scan)."""
    nodes = list(dict.fromkeys(volumes))
    counts = Counter(node.GetName() for node in nodes)
    taken, numbered = set(counts), Counter()
    names: Dict[slicer.vtkMRMLNode, str] = {}
    for node in nodes:
        name = node.GetName()
        if counts[name] > 1:
            numbered[name] += 1
            while f"{name} ({numbered[name]})" in taken:
                numbered[name] += 1
            name = f"{name} ({numbered[name]})"
            taken.add(name)
        names[node] = name
    return [names[node] for node in volumes]


def pair_masks(volumes: Sequence[slicer.vtkMRMLScalarVolumeNode],
               masks: Sequence[slicer.vtkMRMLLabelMapVolumeNode]) -> List[Optional[slicer.vtkMRMLLabelMapVolumeNode]]:
    """For each healthy volume, its brain mask (None: computed automatically).

    Every mask must be that of exactly one volume, whatever transform either lies under (a mask under another
    transform is used where it lies in world space, as detection uses it: mrml.mask_image): the volume on its grid;
    where several volumes share its grid (scans in one template space), the one whose name leads the mask's as a
    word ("c1" for "c1 mask", "c1-label", not "c10 mask": :func:`_named_after`) is it, else the one under the mask's
    transform. A mask on no volume's grid (made at another voxel size, or cropped; the worker resamples it onto its
    volume's grid, as detection's does) is that of the volume whose name so leads its own, or of the only volume
    given. A mask whose name a longer name of a volume not given also so leads ("c1_1 mask", c1_1 not ticked, c1 is)
    is refused (:func:`_refuse_named_after_unchosen`). A volume may have at most one mask (refused naming it as the
    job does, :func:`distinct_node_names`).
    """
    pairs: List[Optional[slicer.vtkMRMLLabelMapVolumeNode]] = [None] * len(volumes)
    for mask in masks:
        fits = [i for i, volume in enumerate(volumes) if same_grid(volume, mask, transforms=False)]
        on_grid = bool(fits)
        if len(fits) != 1:  # the longest volume name that leads the mask's ("c1" and "c10": "c10 mask" is c10's)
            named = [i for i in fits or range(len(volumes)) if _named_after(mask.GetName(), volumes[i].GetName())]
            longest = max((len(volumes[i].GetName()) for i in named), default=0)
            fits = [i for i in named if len(volumes[i].GetName()) == longest] or fits
            if named:
                _refuse_named_after_unchosen(mask, volumes, longest, on_grid)
        if len(fits) > 1 and on_grid:
            fits = [i for i in fits if volumes[i].GetTransformNodeID() == mask.GetTransformNodeID()] or fits
        if not fits and len(volumes) == 1:
            fits = [0]
        if len(fits) != 1:
            raise CeVAEError(_unpaired(mask, [volumes[i].GetName() for i in fits], on_grid,
                                       volumes[0].GetName() if volumes else "c1"))
        if pairs[fits[0]] is not None:
            raise CeVAEError(f"The healthy volume '{distinct_node_names(volumes)[fits[0]]}' has two brain masks chosen "
                             f"('{pairs[fits[0]].GetName()}' and '{mask.GetName()}'); keep one.")
        pairs[fits[0]] = mask
    return pairs


def _refuse_named_after_unchosen(mask: slicer.vtkMRMLLabelMapVolumeNode,
                                 volumes: Sequence[slicer.vtkMRMLScalarVolumeNode],
                                 longest: int, on_grid: bool) -> None:
    """Refuse ``mask``, paired by its name with a chosen volume whose name (``longest`` characters) leads it, where a
    longer name of a volume of the scene that is not chosen also leads it as a word ("c1_1 mask": the mask of c1_1,
    the second scan Slicer loaded as "c1", not of c1); ``on_grid``: only such a volume on the mask's grid counts."""
    scene = mask.GetScene()
    chosen = {volume.GetID() for volume in volumes}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") if scene is not None else 0):
        other = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        name = other.GetName() or ""
        if (other.GetID() not in chosen and not other.IsA("vtkMRMLLabelMapVolumeNode")
                and not other.GetAttribute(ROLE_ATTRIBUTE) and len(name) > longest
                and _named_after(mask.GetName(), name) and (not on_grid or same_grid(other, mask, transforms=False))):
            raise CeVAEError(f"The brain mask '{mask.GetName()}' seems to be that of the volume '{name}' (its name "
                             f"leads the mask's), which is not among the chosen healthy volumes: tick '{name}' too, "
                             "or untick the mask.")


def _named_after(mask: str, volume: str) -> bool:
    """Whether the mask name ``mask`` is led by the volume name ``volume`` as a whole word ("c1 mask", "c1-label",
    "c1_brain"; not "c10 mask", the mask of another volume, c10)."""
    rest = mask[len(volume) :]
    return mask.startswith(volume) and not (rest[:1].isalnum() and volume[-1:].isalnum())


def _unpaired(mask: slicer.vtkMRMLLabelMapVolumeNode, names: Sequence[str], on_grid: bool, example: str) -> str:
    """Why ``mask`` is the brain mask of no one healthy volume: it may be that of each volume of ``names`` (those on
    its grid if ``on_grid``, else those whose name leads its own), or of none (``names`` empty: on no volume's grid,
    and its name leads no volume's, ``example`` one)."""
    if not on_grid:
        if names:
            return (f"The brain mask '{mask.GetName()}' is on the grid of none of the chosen healthy volumes, and "
                    f"several are called '{names[0]}': rename the volumes apart (Data module), then name each mask "
                    "after its volume.")
        return (f"The brain mask '{mask.GetName()}' is on the grid of none of the chosen healthy volumes, and its name "
                f"does not say whose it is: name it after its volume, e.g. '{example} mask' (a mask on another grid "
                "is resampled onto its volume's), or choose masks that match one volume each.")
    return (f"The brain mask '{mask.GetName()}' is on the grid of several of the chosen healthy volumes"
            f"{_shared_grid_hint(list(names))}; choose masks that match one volume each.")


def _shared_grid_hint(names: Sequence[str]) -> str:
    """How to tell apart the healthy volumes (their ``names``) that share the grid of one brain mask: by naming each
    mask after its volume, once volumes of one name are renamed apart (no mask name tells those apart)."""
    twins = [name for name in names if names.count(name) > 1]
    if twins:
        return (f" (they share one grid and the name '{twins[0]}': rename the volumes apart (Data module), then name "
                "each mask after its volume)")
    return f" (they share one grid: name each mask after its volume, e.g. '{names[0]} mask')"
