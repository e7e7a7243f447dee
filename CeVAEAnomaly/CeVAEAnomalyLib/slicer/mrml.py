"""MRML adapter: the only module that touches a Slicer scene. Never imports torch.

Every function takes the scene (or nodes that live in one) explicitly, so the same code runs
inside Slicer and on ``slicer-core`` (the Qt-free MRML library from PyPI).

Geometry: a volume node's IJK-to-RAS matrix maps voxel indices to RAS; SimpleITK images are
LPS. The conversion flips the first two rows of the direction matrix and of the origin, so
spacing, direction and origin round-trip exactly.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import CeVAEError
from ..io.images import same_grid
from ..io.naming import PANEL_OUTPUT_NAMES
from .nodes import (
    COMPONENT_TABLE_ROLE,
    COORDINATES_ATTRIBUTE,
    LABELMAP_ROLE,
    MASK_REFERENCE,
    MODEL_ATTRIBUTE,
    MODEL_SHA256_ATTRIBUTE,
    NAME_ATTRIBUTE,
    OPTIONS_ATTRIBUTE,
    IMAGE_SHA256_ATTRIBUTE,
    MASK_SHA256_ATTRIBUTE,
    PEAK_COLUMNS,
    SIDE_COLUMN,
    PROVENANCE_ATTRIBUTES,
    ROLE_ATTRIBUTE,
    RUN_ATTRIBUTE,
    SCORE_ROLE,
    FRAME_ATTRIBUTE,
    FRAME_INDEX_ATTRIBUTE,
    FRAME_VALUE_ATTRIBUTE,
    SEGMENT_TAG,
    SEGMENTATION_ROLE,
    SEQUENCE_REFERENCE,
    SLICE_AXIS_ATTRIBUTE,
    SLICE_CHART_ROLE,
    SLICE_GRID_ATTRIBUTE,
    SLICE_TABLE_ROLE,
    SOURCE_REFERENCE,
    THRESHOLD_ATTRIBUTE,
    THRESHOLD_SOURCE_ATTRIBUTE,
    VERSION_ATTRIBUTE,
    WRITTEN_KEY,
    SequenceFrame,
    anomaly_segment_id,
    belongs_to,
    edited_since_written,
    find_output,
    frame_run,
    holds_data,
    ijk_to_ras,
    labelmap_signature,
    link_output,
    node_ids,
    outputs_newest_first,
    read_frame_node,
    segment_ids,
    scored_frame,
    segment_signature,
    source_volume,
    stamp_run,
    table_signature,
    to_numpy,
    user_segment_ids,
)

if TYPE_CHECKING:  # the detection result type lives in the detector, which imports torch
    from ..result import DetectionRecord, DetectionResult

log = logging.getLogger(__name__)

SEGMENT_NAME = "Anomaly"
DISPLAY_PERCENTILE = 99.0  # the colour map saturates at this percentile of the brain's scores
# Where the heat map's colours start on the Inferno map: the weakest shown voxels (at the threshold) are dark magenta,
# not the map's black (which reads as a hole in the scan beneath).
THRESHOLD_COLOUR = 0.35
SEGMENT_COLOR = (0.0, 0.85, 1.0)  # cyan: stands out against the warm heat map
# The anomaly segment's standard terminology: Slicer's terminology tag, which a DICOM SEG export (QuantitativeReporting,
# dcmqi) writes as the segment's coded meaning. The type is SNOMED CT's "Lesion", which says
# no more than the detector knows (an anomaly of unknown kind); Slicer's default lists' types of this category (mass,
# cyst, oedema, neoplasm, ...) each name a kind, so this one code is not in them. Stored, as Slicer
# 5.6-5.10 do, in the segment's tag vtkSegment.GetTerminologyEntryTagName(): 7 parts joined by "~", each code as
# scheme^value^meaning ("^^": none).
SEGMENT_TERMINOLOGY = "~".join((
    "Segmentation category and type - 3D Slicer General Anatomy list",  # terminology context: Slicer's default list
    "SCT^49755003^Morphologically Altered Structure",  # category
    "SCT^52988006^Lesion",  # type (SNOMED CT: lesion, a morphologic abnormality)
    "^^",  # type modifier
    "Anatomic codes - DICOM master list",  # anatomic context
    "SCT^12738006^Brain",  # anatomic region
    "^^",  # anatomic region modifier
))
HEAT_COLOR_NAME = "CeVAEAnomaly heat"
# Samples of the Inferno colour map at 0, 1/8, ..., 1.
_INFERNO_ANCHORS = np.array([
    [0.0015, 0.0005, 0.0139], [0.1293, 0.0473, 0.2908], [0.3415, 0.0623, 0.4294],
    [0.5409, 0.1347, 0.4151], [0.7357, 0.2159, 0.3302], [0.8943, 0.3534, 0.1936],
    [0.9784, 0.5579, 0.0349], [0.9746, 0.7977, 0.2063], [0.9884, 0.9984, 0.6449],
])
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class OutputNodes:
    """The nodes one detection fills; ``None`` entries are created (or found) by :func:`publish`."""

    score: Optional[slicer.vtkMRMLScalarVolumeNode] = None
    segmentation: Optional[slicer.vtkMRMLSegmentationNode] = None
    labelmap: Optional[slicer.vtkMRMLLabelMapVolumeNode] = None
    components: Optional[slicer.vtkMRMLTableNode] = None
    slice_table: Optional[slicer.vtkMRMLTableNode] = None
    slice_chart: Optional[slicer.vtkMRMLPlotChartNode] = None


# --- scene bookkeeping -------------------------------------------------------------------------


def _remove_nodes_not_in(scene: slicer.vtkMRMLScene, keep: Set[str]) -> None:
    for node_id in reversed(node_ids(scene)):
        node = scene.GetNodeByID(node_id)
        if node_id not in keep and node is not None:
            scene.RemoveNode(node)


class Undo:
    """How to give the existing nodes a transaction changes their earlier content (see :func:`transaction`)."""

    def __init__(self) -> None:
        self._steps: List[Callable[[], None]] = []
        self._kept: Set[str] = set()

    def keep(self, node: Optional[slicer.vtkMRMLNode]) -> None:
        """Remember ``node``'s content (voxels, table, display properties), attributes and link to an input before
        they change. A segmentation's segments are not copied (a segment copy needs converters only the application
        has): the step that changes them says how to undo it (:meth:`on_failure`)."""
        if node is None or node.GetID() in self._kept:
            return
        self._kept.add(node.GetID())
        attributes = {name: node.GetAttribute(name) for name in node.GetAttributeNames()}
        source = node.GetNodeReferenceID(SOURCE_REFERENCE)
        self.on_failure(lambda: _restore_marks(node, attributes, source))
        if isinstance(node, slicer.vtkMRMLTransformableNode):  # a reference: not part of the content
            transform = node.GetTransformNodeID()
            self.on_failure(lambda: node.SetAndObserveTransformNodeID(transform))
        if isinstance(node, slicer.vtkMRMLSegmentationNode):
            name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
            geometry = node.GetSegmentation().GetConversionParameter(name)
            role = node.GetReferenceImageGeometryReferenceRole()  # the volume it was drawn on
            drawn_on = node.GetNodeReferenceID(role)
            colours = conversion_colour_table_id(node)  # a labelmap import sets it to the labelmap's
            self.on_failure(lambda: (node.GetSegmentation().SetConversionParameter(name, geometry),
                                     node.SetNodeReferenceID(role, drawn_on),
                                     node.SetLabelmapConversionColorTableNodeID(colours)))
            return
        # A volume's voxels are replaced, never changed in place (update_volume_from_image): the copy shares them.
        deep = not isinstance(node, slicer.vtkMRMLVolumeNode)
        copy = node.CreateNodeInstance()
        copy.UnRegister(None)  # the caller owns the new node: without this it (and a volume's voxels) never goes
        copy.CopyContent(node, deep)
        self.on_failure(lambda: node.CopyContent(copy, deep))

    def on_failure(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def restore(self) -> None:
        for step in reversed(self._steps):
            step()


def conversion_colour_table_id(node: slicer.vtkMRMLSegmentationNode) -> Optional[str]:
    """The ID of ``node``'s labelmap conversion colour table, None for none: its node reference, read as Slicer 5.10's
    GetLabelmapConversionColorTableNodeID reads it (Slicer 5.6 and 5.8 lack that getter; the role's getter is
    protected, its value the same from 5.6 on)."""
    return node.GetNodeReferenceID("labelmapConversionColorTableNode")


def _restore_marks(node: slicer.vtkMRMLNode, attributes: Dict[str, str], source: Optional[str]) -> None:
    """Give ``node`` back exactly these attributes and this input (``source``: its ID, None for none)."""
    for name in node.GetAttributeNames():
        if name not in attributes:
            node.RemoveAttribute(name)
    for name, value in attributes.items():
        node.SetAttribute(name, value)
    node.SetNodeReferenceID(SOURCE_REFERENCE, source)


@contextmanager
def transaction(scene: slicer.vtkMRMLScene) -> Iterator[Undo]:
    """All or nothing: if the block raises, every node it added to the scene is removed and every node it
    passed to the yielded :class:`Undo` gets its earlier content back."""
    before = set(node_ids(scene))
    undo = Undo()
    try:
        yield undo
    except BaseException:
        _remove_nodes_not_in(scene, before)
        undo.restore()
        raise


@contextmanager
def scratch_nodes(scene: slicer.vtkMRMLScene) -> Iterator[None]:
    """Nodes added inside the block are removed when it ends, whatever happens."""
    before = set(node_ids(scene))
    try:
        yield
    finally:
        _remove_nodes_not_in(scene, before)


# --- geometry and voxels -----------------------------------------------------------------------


def _to_vtk(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(array.shape[0]):
        for c in range(array.shape[1]):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def image_from_volume(volume_node: slicer.vtkMRMLVolumeNode, what: str = "volume",
                      shown: Optional[str] = None) -> sitk.Image:
    """A SimpleITK copy of a scalar volume node: same voxels, spacing, origin and direction. Refusals name it
    ``shown`` (as the panel shows it; default: its node's name)."""
    data = volume_node.GetImageData() if volume_node is not None else None
    name = shown if shown is not None else volume_node.GetName() if volume_node is not None else "(none)"
    if data is None or data.GetNumberOfPoints() == 0:
        raise CeVAEError(f"The {what} '{name}' holds no image data; load or select a volume first.")
    scalars = data.GetPointData().GetScalars()
    if scalars is None:  # a diffusion tensor volume keeps its voxels as tensors
        raise CeVAEError(f"The {what} '{name}' holds no scalar voxels (a tensor volume?); a "
                         "single-channel MRI volume is needed.")
    if scalars.GetNumberOfComponents() != 1:
        raise CeVAEError(
            f"The {what} '{name}' has {scalars.GetNumberOfComponents()} components per "
            "voxel (colour or vector image); a single-channel MRI volume is needed."
        )
    dims = data.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])
    image = sitk.GetImageFromArray(voxels)  # copies
    spacing, origin, direction = _lps_geometry(volume_node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _lps_geometry(volume_node: slicer.vtkMRMLVolumeNode) -> Tuple[Tuple[float, ...], ...]:
    """(spacing, origin, direction) of the node's voxel array as SimpleITK gives them (LPS; the origin is the array's
    first voxel, also where the image data's extent does not start at 0)."""
    directions = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(directions)
    return (tuple(volume_node.GetSpacing()), tuple(_RAS_FROM_LPS @ ijk_to_ras(volume_node)[:3, 3]),
            tuple((_RAS_FROM_LPS @ to_numpy(directions, 3)).ravel()))


def update_volume_from_image(volume_node: slicer.vtkMRMLVolumeNode, image: sitk.Image,
                             geometry: Optional[Tuple[Tuple[float, ...], ...]] = None) -> None:
    """Replace the node's voxels and geometry with the image's (exact inverse of image_from_volume), or with
    ``geometry`` ((spacing, origin, direction) in LPS, as :func:`_lps_geometry` gives them) instead of the image's."""
    spacing, origin, direction = geometry or (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    data = vtk.vtkImageData()
    data.SetDimensions(*image.GetSize())
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True))
    directions = _RAS_FROM_LPS @ np.asarray(direction, float).reshape(3, 3)
    wasModifying = volume_node.StartModify()
    volume_node.SetSpacing(spacing)
    volume_node.SetOrigin(tuple(_RAS_FROM_LPS @ np.asarray(origin, float)))
    volume_node.SetIJKToRASDirectionMatrix(_to_vtk(directions))
    volume_node.SetAndObserveImageData(data)
    volume_node.EndModify(wasModifying)


# --- inputs ------------------------------------------------------------------------------------


def mask_image(
    mask_node: slicer.vtkMRMLNode, volume_node: slicer.vtkMRMLVolumeNode, segment_id: Optional[str] = None,
    shown: Optional[str] = None
) -> sitk.Image:
    """Brain mask (>0 is brain) from a labelmap/scalar volume or a segmentation (one or all segments). One under
    another transform than the volume is used where it lies in world space (as the Segment Editor draws on a moved
    volume), resampled onto the volume's grid, with a warning naming both transforms; a labelmap is resampled only
    through linear transforms. Warnings and refusals name the volume ``shown`` (as the panel shows it; default: its
    node's name)."""
    volume_name = volume_node.GetName() if shown is None else shown
    if isinstance(mask_node, slicer.vtkMRMLSegmentationNode):
        if mask_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
            _warn_moved(mask_node, volume_node, volume_name, "segmentation", "")
        return _mask_from_segmentation(mask_node, volume_node, segment_id)
    if isinstance(mask_node, slicer.vtkMRMLScalarVolumeNode):
        if segment_id:
            raise CeVAEError(f"The brain mask '{mask_node.GetName()}' is a volume, which has no segment "
                             f"'{segment_id}'; give a segment ID only with a segmentation.")
        mask = image_from_volume(mask_node, "brain mask")
        if mask_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
            mask = _moved_mask(mask, mask_node, volume_node, volume_name)
            _warn_moved(mask_node, volume_node, volume_name, "labelmap", " (nearest neighbour)")
        return mask
    raise CeVAEError("The brain mask must be a labelmap volume or a segmentation.")


def _warn_moved(mask_node: slicer.vtkMRMLNode, volume_node: slicer.vtkMRMLVolumeNode, volume_name: str, kind: str,
                how: str) -> None:
    """Say that the mask (a ``kind``), under another transform than the volume (called ``volume_name``), is used
    where it lies in world space (resampled ``how``)."""
    log.warning("The brain mask '%s' (%s) and the volume '%s' (%s) are under different transforms: the %s is used "
                "where it lies in world space, resampled onto the volume's grid%s. If it %s on this scan before the "
                "scan was registered, put it under the volume's transform.", mask_node.GetName(), _under(mask_node),
                volume_name, _under(volume_node), kind, how,
                "was drawn" if kind == "segmentation" else "was made")


def _moved_mask(mask: sitk.Image, mask_node: slicer.vtkMRMLVolumeNode, volume_node: slicer.vtkMRMLVolumeNode,
                volume_name: str) -> sitk.Image:
    """``mask`` (the voxels of ``mask_node``) resampled (nearest neighbour) onto the grid of ``volume_node`` (called
    ``volume_name`` in refusals) where both lie in world space, through their parent transforms (linear ones only), as
    the engine resamples a mask of another grid: a run gets what it would with both transforms hardened."""
    source, target = mask_node.GetParentTransformNode(), volume_node.GetParentTransformNode()
    between = vtk.vtkMatrix4x4()
    linear = source.IsTransformToNodeLinear(target) if source is not None else target.IsTransformToNodeLinear(None)
    if not linear or not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, between):
        raise CeVAEError(f"The brain mask '{mask_node.GetName()}' ({_under(mask_node)}) and the volume "
                         f"'{volume_name}' ({_under(volume_node)}) are under different transforms, and a "
                         "non-linear one lies between them, which a labelmap mask is not resampled through: harden "
                         "the transforms (Transforms module) or put the mask under the volume's transform.")
    grid = _RAS_FROM_LPS @ (to_numpy(between) @ ijk_to_ras(mask_node))[:3]  # mask index -> volume's local LPS
    spacing = np.linalg.norm(grid[:, :3], axis=0)
    mask.SetSpacing(tuple(float(v) for v in spacing))
    mask.SetOrigin(tuple(float(v) for v in grid[:, 3]))
    mask.SetDirection(tuple(float(v) for v in (grid[:, :3] / spacing).ravel()))
    reference = sitk.Image(volume_node.GetImageData().GetDimensions(), sitk.sitkUInt8)
    spacing, origin, direction = _lps_geometry(volume_node)
    reference.SetSpacing(spacing)
    reference.SetOrigin(origin)
    reference.SetDirection(direction)
    resampled, lost = _nearest_onto(mask, reference)
    if lost:
        raise CeVAEError(f"The brain mask '{mask_node.GetName()}' ({_under(mask_node)}) does not overlap the volume "
                         f"'{volume_name}' ({_under(volume_node)}) where they lie in world space: check "
                         "that the mask belongs to this scan, or put it under the volume's transform if it was made "
                         "on this scan before the scan was registered.")
    return resampled


def refuse_mask_elsewhere(mask: sitk.Image, image: sitk.Image, mask_node: slicer.vtkMRMLNode,
                          volume_node: slicer.vtkMRMLVolumeNode, what: str = "volume",
                          shown: Optional[str] = None) -> None:
    """Refuse ``mask`` (read from ``mask_node`` by :func:`mask_image`) where it is on another grid than ``image``
    (the voxels of ``volume_node``, a ``what``, named ``shown`` as the panel shows it; default: its node's name) and,
    resampled onto it as the engine resamples such a mask (engine.preprocess.mask_array: nearest neighbour, where both
    lie in world space), holds no brain voxel: what the engine refuses, said before anything runs. Neither node is
    changed."""
    if same_grid(mask, image):  # (as the engine tells a mask on another grid)
        return
    if _nearest_onto(mask, image)[1]:
        raise CeVAEError(f"The brain mask '{mask_node.GetName()}' does not overlap the {what} "
                         f"'{volume_node.GetName() if shown is None else shown}' where they lie in world space (it "
                         "is on another grid, and no voxel of it lies on the volume's): check that the mask belongs "
                         "to this scan.")


def _nearest_onto(mask: sitk.Image, reference: sitk.Image) -> Tuple[sitk.Image, bool]:
    """``mask`` resampled (nearest neighbour) onto ``reference``'s grid where both lie in world space, and whether
    that lost all its brain (it had some, and none lies on the reference's grid)."""
    resampled = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    lost = bool((sitk.GetArrayViewFromImage(mask) > 0).any()) and not (sitk.GetArrayViewFromImage(resampled) > 0).any()
    return resampled, lost


def _under(node: slicer.vtkMRMLNode) -> str:
    """The transform a node lies under, in words."""
    transform = node.GetParentTransformNode()
    return f"under '{transform.GetName()}'" if transform is not None else "under no transform"


def _mask_from_segmentation(
    segmentation_node: slicer.vtkMRMLSegmentationNode, volume_node: slicer.vtkMRMLVolumeNode, segment_id: Optional[str]
) -> sitk.Image:
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    if segment_id:
        if segmentation.GetSegment(segment_id) is None:
            raise CeVAEError(f"The segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'.")
        ids.InsertNextValue(segment_id)
    else:  # every segment but this module's anomaly segment
        for user_segment in user_segment_ids(segmentation_node):
            ids.InsertNextValue(user_segment)
    if ids.GetNumberOfValues() == 0:
        raise CeVAEError(f"The brain mask segmentation '{segmentation_node.GetName()}' has no segments"
                         f"{' but the anomalies' if anomaly_segment_id(segmentation_node) else ''}.")
    scene = segmentation_node.GetScene()
    with scratch_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CeVAEAnomaly brain mask (temporary)")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node
        ):
            raise CeVAEError(f"The segmentation '{segmentation_node.GetName()}' could not be exported as a mask.")
        return image_from_volume(labelmap, "brain mask")


# --- outputs -----------------------------------------------------------------------------------


NEWEST = "newest"  # _output's ``group``: reuse the source's latest node of the role


def _output(scene, undo: Undo, existing, class_name: str, role: str, source, suffix: str,
            group: Optional[str] = NEWEST, link: bool = True, beside: Optional[slicer.vtkMRMLNode] = None):
    """``existing`` if it may hold these results, else the node of the same role and source to reuse: of the run
    ``group`` (the run whose nodes this one updates), of the latest run (:data:`NEWEST`), or none (None: new);
    marked as ``source``'s ``role`` output unless ``link`` is False. A node reused is kept in ``undo``; a new one goes
    beside ``beside`` (the node it stands in for) if given, else where :func:`_place_in_hierarchy` says."""
    if existing is not None and not belongs_to(existing, source, role):
        log.warning("'%s' holds other results, a processed input or data of yours, which are kept; the results of "
                    "'%s' go to a node of their own.", existing.GetName(), source.GetName())
        existing = None
    stamp = None if existing is None else existing.GetAttribute(RUN_ATTRIBUTE)
    if existing is not None and ((group is None and existing.GetAttribute(ROLE_ATTRIBUTE))
                                 or (group not in (None, NEWEST) and stamp and stamp != group)):
        log.info("'%s' keeps the results of another run of '%s'; this run's go with its score volume.",
                 existing.GetName(), source.GetName())
        existing = None
    if existing is None:
        existing = _of_group(scene, class_name, role, source, group)
    undo.keep(existing)
    name = f"{source.GetName()} {suffix}"
    if existing is None:
        node = scene.AddNewNodeByClass(class_name, _free_name(scene, name))
        node.SetAttribute(NAME_ATTRIBUTE, node.GetName())
        _place_in_hierarchy(scene, node, role, source, beside)
    else:
        node = existing
        given = node.GetName()
        if node.GetAttribute(NAME_ATTRIBUTE) == given and not given.startswith(name):  # the input was renamed
            node.SetName(_free_name(scene, name))  # (a name the user gave the output stays)
            node.SetAttribute(NAME_ATTRIBUTE, node.GetName())
            undo.on_failure(lambda: (node.SetName(given), node.SetAttribute(NAME_ATTRIBUTE, given)))
    if link:
        link_output(node, role, source)
    return node


def _free_name(scene: slicer.vtkMRMLScene, name: str) -> str:
    """``name`` where no node has it, else a free "name_N" (vtkMRMLScene::GenerateUniqueName alone counts on from the
    last name it gave, even where ``name`` is free again: a remade output was "NAME_1")."""
    return name if scene.GetFirstNodeByName(name) is None else scene.GenerateUniqueName(name)


def _place_in_hierarchy(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLNode, role: str, source,
                        beside: Optional[slicer.vtkMRMLNode] = None) -> None:
    """Put a new output node where the reader keeps ``source``'s results in the subject hierarchy (Data module): beside
    ``beside`` if given (a node it takes the place of: an edited labelmap handed over), else its latest output of
    ``role``, else of any role (the folder the reader moved them into), else beside ``source`` itself (under its study
    or subject), as Slicer's modules place derived nodes. The application gives each new node an item at the top of
    the tree; a node without one (slicer-core: no subject hierarchy plugins) is left so."""
    if scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") is None:
        return
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        return
    earlier = [other for other in outputs_newest_first(scene, source) if other is not node]
    neighbours = [other for other in earlier if other.GetAttribute(ROLE_ATTRIBUTE) == role]
    for neighbour in (*([beside] if beside is not None else []), *neighbours, *earlier, source):
        there = hierarchy.GetItemByDataNode(neighbour)
        if there:
            hierarchy.SetItemParent(item, hierarchy.GetItemParent(there))
            return


def _of_group(scene, class_name: str, role: str, source, group: Optional[str]):
    """The ``role`` node of ``source`` that the run ``group`` filled (see :func:`_output`), or None."""
    if group is None:
        return None
    return (find_output(scene, class_name, role, source) if group == NEWEST
            else find_output(scene, class_name, role, source, group, exact=True))


def _run_to_update(scene, source, chosen: Optional[slicer.vtkMRMLNode],
                   frame: Optional[SequenceFrame]) -> Optional[str]:
    """Which earlier run's nodes a run on ``source`` updates: its latest (:data:`NEWEST`); on a sequence's ``frame``,
    the run of the ``chosen`` score volume if it scored this frame, else the latest run on this frame, else none
    (None: nodes of its own), never a run on another frame, whose results stay to compare with."""
    if frame is None:
        return NEWEST
    if chosen is not None and chosen.GetAttribute(RUN_ATTRIBUTE) and scored_frame(chosen, frame):
        return chosen.GetAttribute(RUN_ATTRIBUTE)
    return frame_run(scene, source, frame)


def _group_of(score: slicer.vtkMRMLNode, source, chose: bool) -> Optional[str]:
    """Which earlier nodes a run into the score volume ``score`` (not yet linked to ``source``) updates: those of
    the run that last filled it (its run stamp), :data:`NEWEST` for one filled before runs were stamped or made
    because ``source`` had none (its score volume was deleted: the rest of its results are updated, not
    doubled), none (None) when the caller ``chose`` a score volume that was never one of ``source``'s (new, or one
    that holds other data and was replaced by a new node), so that a run sent to another score volume leaves the
    earlier run's results as they were."""
    run = score.GetAttribute(RUN_ATTRIBUTE)
    if run:
        return run
    if score.GetAttribute(ROLE_ATTRIBUTE) == SCORE_ROLE and source_volume(score) is source:
        return NEWEST
    return None if chose else NEWEST


_OUTPUT_CLASSES = {"score": "vtkMRMLScalarVolumeNode", "segmentation": "vtkMRMLSegmentationNode",
                   "labelmap": "vtkMRMLLabelMapVolumeNode", "components": "vtkMRMLTableNode",
                   "slice_table": "vtkMRMLTableNode", "slice_chart": "vtkMRMLPlotChartNode"}


def check_output_classes(targets: OutputNodes) -> None:
    """Refuse, before anything is written, an output node of the wrong kind (a labelmap as the score volume)."""
    for name, node in vars(targets).items():
        wrong = node is not None and (node.GetClassName() != _OUTPUT_CLASSES[name] if name == "score"
                                      else not node.IsA(_OUTPUT_CLASSES[name]))  # score: no labelmap, vector, DWI
        if wrong:
            raise CeVAEError(f"The node '{node.GetName()}' ({node.GetClassName()}) cannot be the "
                             f"{name.replace('_', ' ')} output; choose a {_OUTPUT_CLASSES[name][7:-4]} node.")


def _in_scene(scene: slicer.vtkMRMLScene, targets: OutputNodes, create_labelmap: bool) -> OutputNodes:
    """The targets that are still nodes of ``scene``: one deleted during a run is made again, but a labelmap only where
    the run asks for one (``create_labelmap``; the panel asks for none, it only keeps an earlier one current)."""
    kept = {}
    for name, node in vars(targets).items():
        if node is not None and node.GetScene() is not scene:
            again = "no labelmap is made (none was asked for)" if name == "labelmap" and not create_labelmap \
                else "a new node is made"
            log.warning("The output '%s' was deleted from the scene during the run; %s.", node.GetName(), again)
            node = None
        kept[name] = node
    return OutputNodes(**kept)


def publish(
    scene: slicer.vtkMRMLScene,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    result: "DetectionResult",
    targets: Optional[OutputNodes] = None,
    create_labelmap: bool = False,
    show_3d: bool = False,
    mask_node: Optional[slicer.vtkMRMLNode] = None,
    new_nodes: bool = False,
    frame: Optional[SequenceFrame] = None,
) -> OutputNodes:
    """Create or update the score volume, segmentation, optional labelmap and the tables; the score volume
    remembers the brain mask node the run used (``mask_node``; None: the automatic one).

    Nodes in ``targets`` are updated if they belong to ``volume_node`` or to no input yet; missing
    ones, ones deleted from the scene meanwhile and ones holding another volume's results (never
    replaced) are found again (same role and source volume) or created. A score volume of the user's that
    holds data (another scan) is never written into either: the run goes to a new score volume with nodes of
    its own, as it does with ``new_nodes`` and no score volume in ``targets`` (instead of updating the latest
    run's). ``frame``: the sequence frame the input showed when it was read (:func:`~.nodes.sequence_frame`), recorded
    on every output and in their names. Transactional: on any error the nodes this call added are removed again.
    """
    at = f" (frame {frame.item + 1})" if frame is not None else ""  # in the names of a sequence frame's outputs
    chosen = targets.score if targets is not None else None
    targets = _in_scene(scene, targets or OutputNodes(), create_labelmap)
    gone = chosen is not None and targets.score is None  # the score volume chosen was deleted meanwhile
    # a new score volume chosen for this run and deleted meanwhile: the run still gets nodes of its own
    new_nodes = new_nodes or (gone and not chosen.GetAttribute(ROLE_ATTRIBUTE))
    # an earlier run's score volume deleted meanwhile: a new one, and the rest of that run's nodes are updated (not
    # those of the input's latest run left, which another run sent to new nodes to keep)
    deleted_run = chosen.GetAttribute(RUN_ATTRIBUTE) if gone and chosen.GetAttribute(ROLE_ATTRIBUTE) \
        and (frame is None or scored_frame(chosen, frame)) else None
    check_output_classes(targets)
    if volume_node.GetImageData() is None:
        raise CeVAEError(f"The input volume '{volume_node.GetName()}' no longer holds image data; the results "
                         "are not loaded.")
    grid = _frame_grid(volume_node, frame)
    _refuse_another_grid(grid, result)
    with transaction(scene) as undo:
        out = OutputNodes()
        users = (targets.score is not None and not targets.score.GetAttribute(ROLE_ATTRIBUTE)
                 and holds_data(targets.score))  # a volume of the user's: kept, and this run gets nodes of its own
        out.score = _output(scene, undo, targets.score, "vtkMRMLScalarVolumeNode", SCORE_ROLE, volume_node,
                            PANEL_OUTPUT_NAMES["score"] + at, link=False,
                            group=deleted_run or (None if users or new_nodes else _run_to_update(scene, volume_node,
                                                                                                targets.score, frame)))
        group = deleted_run or _group_of(out.score, volume_node,
                                         chose=targets.score is not None or new_nodes or frame is not None)
        link_output(out.score, SCORE_ROLE, volume_node)
        used = out.score.GetNodeReferenceID(MASK_REFERENCE)
        undo.on_failure(lambda: out.score.SetNodeReferenceID(MASK_REFERENCE, used))
        out.score.SetNodeReferenceID(MASK_REFERENCE, mask_node.GetID() if mask_node is not None
                                     and mask_node.GetScene() is scene else None)
        _fill_volume(out.score, grid, result.score)
        _show_scores(scene, undo, out.score, result.threshold, result.score, result.brain_mask)
        # A labelmap of the run this one updates is kept current even when none is asked for (not stale beside
        # the new score volume).
        earlier_labelmap = _of_group(scene, "vtkMRMLLabelMapVolumeNode", LABELMAP_ROLE, volume_node, group)
        if targets.labelmap is not None or create_labelmap or earlier_labelmap is not None:
            out.labelmap = _output(scene, undo, targets.labelmap, "vtkMRMLLabelMapVolumeNode", LABELMAP_ROLE,
                                   volume_node, PANEL_OUTPUT_NAMES["labelmap"] + at, group)
            out.labelmap = _unless_edited(scene, undo, out.labelmap, labelmap_signature, "labelmap", LABELMAP_ROLE,
                                          volume_node, PANEL_OUTPUT_NAMES["labelmap"] + at, group)
            _fill_volume(out.labelmap, grid, result.labelmap)
            out.labelmap.SetAttribute(WRITTEN_KEY, labelmap_signature(out.labelmap))
            shown = out.labelmap.GetDisplayNode() is not None  # an earlier run's: its colours may be the user's
            out.labelmap.CreateDefaultDisplayNodes()
            undo.keep(out.labelmap.GetDisplayNode())
            if not shown or not out.labelmap.GetDisplayNode().GetColorNodeID():
                out.labelmap.GetDisplayNode().SetAndObserveColorNodeID(label_color_node_id(scene))
        out.segmentation = _output(scene, undo, targets.segmentation, "vtkMRMLSegmentationNode", SEGMENTATION_ROLE,
                                   volume_node, PANEL_OUTPUT_NAMES["segmentation"] + at, group)
        _fill_segmentation(scene, undo, out.segmentation, volume_node, grid, result.labelmap, out.labelmap, show_3d)
        out.components = _output(scene, undo, targets.components, "vtkMRMLTableNode", COMPONENT_TABLE_ROLE,
                                 volume_node, PANEL_OUTPUT_NAMES["components"] + at, group)
        out.components = _unless_edited(scene, undo, out.components, table_signature, "component table",
                                        COMPONENT_TABLE_ROLE, volume_node, PANEL_OUTPUT_NAMES["components"] + at, group)
        _fill_components(out.components, grid, result)
        out.slice_table = _output(scene, undo, targets.slice_table, "vtkMRMLTableNode", SLICE_TABLE_ROLE, volume_node,
                                  "slice scores" + at, group)
        out.slice_table = _unless_edited(scene, undo, out.slice_table, table_signature, "slice table",
                                         SLICE_TABLE_ROLE, volume_node, "slice scores" + at, group)
        _fill_slices(out.slice_table, grid, result.slices)
        out.slice_chart = _slice_chart(scene, undo, out.slice_table, volume_node, targets.slice_chart, group)
        run = [*vars(out).values(), out.slice_chart.GetNthPlotSeriesNode(0)]  # the chart's series too
        mark_provenance(run, result.record)
        _mark_frame(undo, run, frame)
        stamp_run(run)
    return out


def _frame_grid(volume_node: slicer.vtkMRMLScalarVolumeNode,
                frame: Optional[SequenceFrame]) -> slicer.vtkMRMLScalarVolumeNode:
    """The node whose voxel grid a run's outputs take: the input ``volume_node``, or where a sequence browser drives it
    and shows another frame now than ``frame``, the one read (whose grid may differ: scans put into one browser), a
    stand-in in no scene with that frame's grid and voxels (:func:`~.nodes.read_frame_node`), its name and transform
    the input's."""
    read = read_frame_node(volume_node, frame)
    if read is volume_node:
        return volume_node
    grid = slicer.vtkMRMLScalarVolumeNode()
    grid.CopyOrientation(read)
    grid.SetAndObserveImageData(read.GetImageData())
    grid.SetName(volume_node.GetName())
    grid.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return grid


def _mark_frame(undo: Undo, outputs: Sequence[Optional[slicer.vtkMRMLNode]], frame: Optional[SequenceFrame]) -> None:
    """Record on a run's ``outputs`` which sequence frame it scored (:data:`~.nodes.FRAME_ATTRIBUTE`), or remove an
    earlier run's record (``frame`` None: the input is no sequence's proxy). The attributes of reused nodes are
    restored by ``undo``; their browser reference here."""
    for node in outputs:
        if node is None:
            continue
        browser = node.GetNodeReferenceID(SEQUENCE_REFERENCE)
        undo.on_failure(lambda node=node, browser=browser: node.SetNodeReferenceID(SEQUENCE_REFERENCE, browser))
        node.SetNodeReferenceID(SEQUENCE_REFERENCE, frame.browser.GetID() if frame is not None else None)
        if frame is None:
            node.RemoveAttribute(FRAME_ATTRIBUTE)
            node.RemoveAttribute(FRAME_INDEX_ATTRIBUTE)
            node.RemoveAttribute(FRAME_VALUE_ATTRIBUTE)
        else:
            node.SetAttribute(FRAME_ATTRIBUTE, str(frame.item))
            node.SetAttribute(FRAME_INDEX_ATTRIBUTE, frame.index)
            node.SetAttribute(FRAME_VALUE_ATTRIBUTE, frame.value)


def provenance_attributes(record: Optional["DetectionRecord"]) -> Dict[str, str]:
    """The node attributes (:data:`~.nodes.PROVENANCE_ATTRIBUTES`) that say how a result was made; none without a
    record."""
    if record is None:
        return {}
    options = json.dumps({"score": record.score_options, "post": record.postprocess, "batch_size": record.batch_size,
                          "mask": record.mask, "software": record.software}, sort_keys=True, separators=(",", ":"))
    marks = {MODEL_ATTRIBUTE: record.model.name, MODEL_SHA256_ATTRIBUTE: record.model.sha256 or "",
             THRESHOLD_ATTRIBUTE: repr(float(record.threshold)), THRESHOLD_SOURCE_ATTRIBUTE: record.threshold_source,
             VERSION_ATTRIBUTE: f"{record.tool} {record.version}", OPTIONS_ATTRIBUTE: options,
             IMAGE_SHA256_ATTRIBUTE: record.image_voxels_sha256, MASK_SHA256_ATTRIBUTE: record.mask_voxels_sha256}
    return {name: value for name, value in marks.items() if value is not None}


def mark_provenance(outputs: Sequence[Optional[slicer.vtkMRMLNode]], record: Optional["DetectionRecord"]) -> None:
    """Give a run's output nodes the attributes of its ``record``, replacing an earlier run's (removed where the
    result holds no record). Inside :func:`transaction`, after :meth:`Undo.keep` of each reused node: a failed run
    gives them their earlier attributes back."""
    marks = provenance_attributes(record)
    for node in outputs:
        if node is None:
            continue
        for name in PROVENANCE_ATTRIBUTES:
            if name in marks:
                node.SetAttribute(name, marks[name])
            else:
                node.RemoveAttribute(name)


def _refuse_another_grid(volume_node: slicer.vtkMRMLVolumeNode, result: "DetectionResult") -> None:
    """Refuse a result whose score map, labelmap or brain mask does not lie on the input's voxel grid (within the
    rounding of the worker's files): a detection of another scan, or parts put together from several grids. Its
    outputs take the input's exact grid (:func:`_fill_volume`)."""
    name = volume_node.GetName()
    differs = _grid_difference(volume_node, result.score)
    if differs == "size":
        raise CeVAEError(f"The score map does not match the grid of the input volume '{name}' (another number of "
                         "voxels); the results are not loaded.")
    if differs is not None:
        raise CeVAEError(f"This detection is not of '{name}': the score map lies on another grid than the input "
                         f"volume '{name}' ({differs} differs); the results are not loaded.")
    for part, image in (("labelmap", result.labelmap), ("brain mask", result.brain_mask)):
        differs = _grid_difference(volume_node, image)
        if differs is not None:
            what = "another number of voxels" if differs == "size" else f"{differs} differs"
            raise CeVAEError(f"The {part} of this detection lies on another grid than the input volume '{name}' "
                             f"and its score map ({what}); the results are not loaded.")


def _grid_difference(volume_node: slicer.vtkMRMLVolumeNode, image: sitk.Image) -> Optional[str]:
    """What of ``image``'s grid differs from the input's: "size", "spacing", "origin" or "direction"; None if
    nothing does (within the rounding of the worker's files)."""
    if tuple(image.GetSize()) != tuple(volume_node.GetImageData().GetDimensions()):
        return "size"
    for what, ours, given in zip(("spacing", "origin", "direction"), _lps_geometry(volume_node),
                                 (image.GetSpacing(), image.GetOrigin(), image.GetDirection())):
        if not np.allclose(ours, given, rtol=1e-5, atol=1e-4):
            return what
    return None


def _unless_edited(scene, undo: Undo, node: slicer.vtkMRMLNode, signature: Callable[[slicer.vtkMRMLNode], str],
                   what: str, role: str, volume_node, suffix: str, group: Optional[str]) -> slicer.vtkMRMLNode:
    """``node`` (an output this run reuses), or where the user edited it since its run wrote it (its ``signature``
    is no longer the one recorded), a new node beside it: ``node`` is handed over to the user (:func:`_hand_over`)."""
    if not edited_since_written(node.GetAttribute(WRITTEN_KEY), signature(node)):
        return node
    _hand_over(undo, node, what)
    return _output(scene, undo, None, node.GetClassName(), role, volume_node, suffix, group, beside=node)


def _hand_over(undo: Undo, node: slicer.vtkMRMLNode, what: str) -> None:
    """An output of this module's (a labelmap, a table: ``what``) that the user has edited since its run wrote it is
    theirs now: no longer an output of its input (so no run writes into it again), named "... (edited)", kept as it
    is."""
    name, source = node.GetName(), node.GetNodeReferenceID(SOURCE_REFERENCE)
    log.warning("'%s' was edited since the run that wrote it; it is kept as '%s (edited)', and this run's %s "
                "goes to a new node.", name, name, what)
    undo.keep(node)
    undo.on_failure(lambda: (node.SetName(name), node.SetNodeReferenceID(SOURCE_REFERENCE, source)))
    for key in (ROLE_ATTRIBUTE, RUN_ATTRIBUTE, WRITTEN_KEY, NAME_ATTRIBUTE):
        node.RemoveAttribute(key)
    node.RemoveNodeReferenceIDs(SOURCE_REFERENCE)
    node.SetName(f"{name} (edited)")


def _fill_volume(node: slicer.vtkMRMLVolumeNode, volume_node: slicer.vtkMRMLVolumeNode, image: sitk.Image) -> None:
    """``image``'s voxels in ``node`` on the input volume's exact grid (``image`` lies on it: publish checked, within
    the last bit that the worker's files may round an oblique direction to) and under its transform."""
    update_volume_from_image(node, image, _lps_geometry(volume_node))
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())


def score_color_node_id(scene: slicer.vtkMRMLScene) -> str:
    """The heat map's colour table, made once per scene: the Inferno colour map from :data:`THRESHOLD_COLOUR` to its
    end. The display window starts at the threshold, so the colour legend (which spans the window) shows the scores
    drawn, never one below the threshold or below 0, nor a colour the map does not draw."""
    positions = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    return _color_table(scene, "heat colors", HEAT_COLOR_NAME,
                        [("", *(np.interp(t, positions, _INFERNO_ANCHORS[:, c]) for c in range(3)), 1.0)
                         for t in np.linspace(THRESHOLD_COLOUR, 1.0, 256)])


def label_color_node_id(scene: slicer.vtkMRMLScene) -> str:
    """The anomaly labelmap's colours, made once per scene: label 1 is "Anomaly", in the segment's colour."""
    return _color_table(scene, "label colors", "CeVAEAnomaly labels",
                        [("Background", 0.0, 0.0, 0.0, 0.0), (SEGMENT_NAME, *SEGMENT_COLOR, 1.0)])


def _color_table(scene: slicer.vtkMRMLScene, role: str, name: str,
                 colors: Sequence[Tuple[str, float, float, float, float]]) -> str:
    """The ID of this module's colour table of ``role`` in the scene, made from ``colors`` (name, r, g, b, a per
    entry) if there is none yet."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node.GetID()
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetName(name)
    table.SetAttribute(ROLE_ATTRIBUTE, role)
    table.SetNumberOfColors(len(colors))
    for index, (label, *rgba) in enumerate(colors):
        if label:
            table.SetColor(index, label, *rgba)
        else:
            table.SetColor(index, *rgba)
    scene.AddNode(table)
    return table.GetID()


def display_range(threshold: float, score: sitk.Image, brain: sitk.Image) -> Tuple[float, float]:
    """(lower, upper) of the heat map: from the threshold (lower scores are transparent; it is shown in the first
    colour of :func:`score_color_node_id`) to the 99th percentile of the brain's scores, or the maximum score if that
    percentile is lower (there the colour map saturates)."""
    values = sitk.GetArrayViewFromImage(score)[sitk.GetArrayViewFromImage(brain) > 0]
    lower = max(float(threshold), 0.0)  # scores are >= 0: a threshold below 0 shows them all, from 0
    if not np.isfinite(lower):  # threshold inf (nothing flagged): the map still shows the brain's highest 1 %
        lower = float(np.percentile(values, DISPLAY_PERCENTILE)) if values.size else 0.0
    upper = float(np.percentile(values, DISPLAY_PERCENTILE)) if values.size else lower
    if upper <= lower and values.size:
        upper = float(values.max())
    if not upper > lower:  # nothing above the threshold: any sensible window
        upper = lower + max(abs(lower), 1e-3)
    return lower, upper


def _show_scores(scene, undo: Undo, node: slicer.vtkMRMLScalarVolumeNode, threshold: float, score: sitk.Image,
                 brain: sitk.Image) -> None:
    """The heat map's window and threshold from this run's; the module's colour table unless the node was shown in
    another (an earlier run's score volume the user gave colours of their own)."""
    display = node.GetVolumeDisplayNode()  # not the colour legend, which may come first
    made = display is None
    if made:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        node.AddAndObserveDisplayNodeID(display.GetID())
    undo.keep(display)
    for i in range(node.GetNumberOfDisplayNodes()):  # a legend of a display node deleted meanwhile shows this one
        legend = node.GetNthDisplayNode(i)
        if legend is not None and legend.IsA("vtkMRMLColorLegendDisplayNode") and \
                legend.GetPrimaryDisplayNode() is not display:
            legend.SetAndObservePrimaryDisplayNode(display)
    lower, upper = display_range(threshold, score, brain)
    wasModifying = display.StartModify()
    if made or not display.GetColorNodeID():
        display.SetAndObserveColorNodeID(score_color_node_id(scene))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lower, upper)
    display.AutoThresholdOff()
    # scores are >= 0 and exactly 0 outside the brain: at a threshold <= 0 the heat map still shows the brain only
    display.SetThreshold(max(lower, float(np.finfo(np.float32).tiny)), float(np.finfo(np.float32).max))
    display.ApplyThresholdOn()
    display.EndModify(wasModifying)


def _fill_segmentation(scene, undo: Undo, node, volume_node, grid, labelmap: sitk.Image, labelmap_node,
                       show_3d: bool) -> None:
    """Put the anomalies (on the grid of ``grid``: :func:`_frame_grid` of the input ``volume_node``) into ``node`` as
    this module's segment, replacing only its previous one, whose look (colour, fill, outline, opacities) it takes; a
    previous one the user renamed (e.g. corrected and named as a finding) is theirs now and kept."""
    look: Dict[str, object] = {}
    undo.keep(node.GetDisplayNode())  # first: putting a removed segment back resets its display properties
    segmentation = node.GetSegmentation()
    previous = anomaly_segment_id(node)
    old = None if previous is None else segmentation.GetSegment(previous)
    written = vtk.reference("")
    edited = old is not None and old.GetName() == SEGMENT_NAME and old.GetTag(WRITTEN_KEY, written) and \
        edited_since_written(str(written), segment_signature(old))
    if old is not None and (old.GetName() != SEGMENT_NAME or edited):
        old.RemoveTag(SEGMENT_TAG)
        undo.on_failure(lambda: old.SetTag(SEGMENT_TAG, "anomaly"))
        if edited:
            old.SetName(f"{SEGMENT_NAME} (edited)")
            undo.on_failure(lambda: old.SetName(SEGMENT_NAME))
            log.warning("The segment '%s' of '%s' was edited since the run that wrote it; it is kept as '%s (edited)', "
                        "and the new anomalies get a segment of their own.", SEGMENT_NAME, node.GetName(),
                        SEGMENT_NAME)
        else:
            log.info("The segment '%s' of '%s' was renamed; it is kept, and the new anomalies get a segment of their "
                     "own.", old.GetName(), node.GetName())
    elif old is not None:
        look = _segment_look(node, previous)  # the user's colour, fill and opacities go to the new segment
        ids = segment_ids(node)
        later = ids[ids.index(previous) + 1:]
        following = later[0] if later else ""  # where the segment goes back on failure
        segmentation.RemoveSegment(previous)
        undo.on_failure(lambda: segmentation.AddSegment(old, previous, following))
    if segmentation.GetNumberOfSegments() == 0:  # only then may the node take the input's geometry
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(grid)
        node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())  # (drawn on it)
    before = set(segment_ids(node))
    undo.on_failure(lambda: [segmentation.RemoveSegment(i) for i in segment_ids(node) if i not in before])
    # Import from a labelmap node in the scene, under the volume's transform like the segmentation,
    # so the import applies no transform (a static method: no logic instance or scene needed).
    importer = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode
    colours = conversion_colour_table_id(node)  # the import sets it to the labelmap's
    if labelmap_node is not None:
        imported = importer(labelmap_node, node)
    else:
        with scratch_nodes(scene):
            scratch = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CeVAEAnomaly labelmap (temporary)")
            _fill_volume(scratch, grid, labelmap)
            imported = importer(scratch, node)
    if not imported:
        raise CeVAEError(f"The anomaly labelmap could not be imported into '{node.GetName()}'.")
    added = [i for i in segment_ids(node) if i not in before]
    if not added:  # nothing above the threshold: keep an empty segment
        segmentation.AddSegment(_empty_segment(grid))
        added = [i for i in segment_ids(node) if i not in before]
    segment = segmentation.GetSegment(added[0])
    segment.SetName(SEGMENT_NAME)
    segment.SetColor(*SEGMENT_COLOR)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), SEGMENT_TERMINOLOGY)
    segment.SetTag(SEGMENT_TAG, "anomaly")
    segment.SetTag(WRITTEN_KEY, segment_signature(segment))
    _keep_conversion_colours(node, colours)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()  # per segment: the other segments of a user's segmentation keep their look
    display.SetSegmentVisibility(added[0], True)
    display.SetSegmentVisibility2DFill(added[0], False)
    display.SetSegmentVisibility2DOutline(added[0], True)
    display.SetSegmentVisibility3D(added[0], bool(show_3d))
    for name, value in look.items():
        if name == "Color":
            segment.SetColor(*value)
        else:
            getattr(display, f"SetSegment{name}")(added[0], value)
    if show_3d and not node.CreateClosedSurfaceRepresentation():
        log.warning("The 3D surface of '%s' could not be built; it is shown in the slice views only.",
                    node.GetName())


def _keep_conversion_colours(node: slicer.vtkMRMLSegmentationNode, colours: Optional[str]) -> None:
    """Give ``node`` back its labelmap conversion colour table (``colours``: its ID before the import, None for none),
    which the Segmentations module's export to a labelmap takes its label values from: only a segmentation holding
    nothing but the anomaly segment and no table of its own keeps the anomaly labelmap's colours, which the import
    gave it."""
    if colours or user_segment_ids(node):
        node.SetLabelmapConversionColorTableNodeID(colours)


_SEGMENT_LOOK = ("Visibility2DFill", "Visibility2DOutline", "Opacity2DFill", "Opacity2DOutline", "Opacity3D")


def _segment_look(node: slicer.vtkMRMLSegmentationNode, segment_id: str) -> Dict[str, object]:
    """How a segment is shown: its colour and its display properties (:data:`_SEGMENT_LOOK`; not whether it is
    shown, nor in 3D, which each run sets), as setter name -> value."""
    look: Dict[str, object] = {"Color": node.GetSegmentation().GetSegment(segment_id).GetColor()}
    display = node.GetDisplayNode()
    if display is not None:
        look.update((name, getattr(display, f"GetSegment{name}")(segment_id)) for name in _SEGMENT_LOOK)
    return look


def _empty_segment(volume_node: slicer.vtkMRMLVolumeNode) -> slicer.vtkSegment:
    """A segment with an empty binary labelmap (AddEmptySegment needs converter rules that
    only the Slicer application registers)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    empty = slicer.vtkOrientedImageData()
    empty.SetGeometryFromImageToWorldMatrix(matrix)
    empty.SetExtent(0, -1, 0, -1, 0, -1)
    empty.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    segment = slicer.vtkSegment()
    segment.SetName(SEGMENT_NAME)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), empty)
    return segment


def _set_columns(table_node: slicer.vtkMRMLTableNode, columns: Sequence[Tuple[str, vtk.vtkDataArray, str]]) -> None:
    """Replace the table's columns (name, values, unit) and lock it: Locked only stops edits in the user interface
    (the Tables module, the table view), so the reported values stay the run's while a rerun can still write them."""
    wasModifying = table_node.StartModify()
    table_node.RemoveAllColumns()
    for name, array, unit in columns:
        array.SetName(name)
        table_node.AddColumn(array)
        if unit:
            table_node.SetColumnUnitLabel(name, unit)
    # Slicer 5.6.0 has only the name that 5.6.1 deprecated
    header = getattr(table_node, "SetUseColumnTitleAsColumnHeader", None) or table_node.SetUseColumnNameAsColumnHeader
    header(True)
    table_node.SetLocked(True)
    table_node.SetAttribute(WRITTEN_KEY, table_signature(table_node))  # a rerun keeps a table edited since
    table_node.EndModify(wasModifying)


def _array(kind, values: Sequence[Union[float, str]]) -> vtk.vtkAbstractArray:
    array = kind()
    for v in values:
        array.InsertNextValue(v)
    return array


def peak_ras(volume_node: slicer.vtkMRMLVolumeNode, result: "DetectionResult") -> List[Tuple[float, float, float]]:
    """Each component's highest-scoring voxel (``Component.peak_lps``, recorded where the components were made) in the
    local RAS of ``volume_node`` (on the result's grid): its voxel of the score map through the node's IJK-to-RAS
    matrix; its centroid where the result records no peak (one saved before components did)."""
    matrix = ijk_to_ras(volume_node)
    return [c.centroid_ras if c.peak_lps is None else
            tuple(float(v) for v in (matrix @ [*result.score.TransformPhysicalPointToIndex(c.peak_lps), 1.0])[:3])
            for c in result.components]


def _fill_components(table_node, volume_node, result: "DetectionResult") -> None:
    """One row per component; its centroid in the input's own RAS, as the command line writes it, its
    highest-scoring voxel, where its row jumps to (nodes.component_position maps both through the transform the
    input is under then), and the patient's side of the midline it lies on."""
    components = result.components
    centroids = [c.centroid_ras for c in components]
    peaks = peak_ras(volume_node, result)
    table_node.SetAttribute(COORDINATES_ATTRIBUTE, "local")
    _set_columns(table_node, [
        ("Component", _array(vtk.vtkIntArray, [c.label for c in components]), ""),
        ("Voxels", _array(vtk.vtkIntArray, [c.voxels for c in components]), ""),
        ("Volume", _array(vtk.vtkDoubleArray, [c.volume_ml for c in components]), "ml"),
        ("Summed score", _array(vtk.vtkDoubleArray, [c.summed_score for c in components]), ""),
        ("Max score", _array(vtk.vtkDoubleArray, [c.max_score for c in components]), ""),
        ("Mean score", _array(vtk.vtkDoubleArray, [c.mean_score for c in components]), ""),
        ("R", _array(vtk.vtkDoubleArray, [p[0] for p in centroids]), "mm"),
        ("A", _array(vtk.vtkDoubleArray, [p[1] for p in centroids]), "mm"),
        ("S", _array(vtk.vtkDoubleArray, [p[2] for p in centroids]), "mm"),
        *((name, _array(vtk.vtkDoubleArray, [p[n] for p in peaks]), "mm") for n, name in enumerate(PEAK_COLUMNS)),
        (SIDE_COLUMN, _array(vtk.vtkStringArray, [c.side for c in components]), ""),
    ])


def _fill_slices(table_node, volume_node, rows) -> None:
    axis = "IJK"[rows[0].axis] if rows else "K"
    table_node.SetAttribute(SLICE_AXIS_ATTRIBUTE, axis)
    table_node.SetAttribute(SLICE_GRID_ATTRIBUTE, " ".join(repr(float(v)) for v in ijk_to_ras(volume_node).ravel()))
    _set_columns(table_node, [
        ("Slice", _array(vtk.vtkIntArray, [r.index for r in rows]), ""),
        ("KL", _array(vtk.vtkDoubleArray, [r.kl for r in rows]), ""),
        ("Reconstruction", _array(vtk.vtkDoubleArray, [r.rec for r in rows]), ""),
        ("Sample score", _array(vtk.vtkDoubleArray, [r.neg_elbo for r in rows]), ""),
        ("Slice anomaly", _array(vtk.vtkDoubleArray, [r.anomaly for r in rows]), ""),
        ("Highest score", _array(vtk.vtkDoubleArray, [r.map_max for r in rows]), ""),
        ("Flagged", _array(vtk.vtkIntArray, [int(r.flagged) for r in rows]), ""),
    ])


def _slice_chart(scene, undo: Undo, table_node, volume_node, existing,
                 group: Optional[str]) -> slicer.vtkMRMLPlotChartNode:
    series = _output(scene, undo, None, "vtkMRMLPlotSeriesNode", "slice series", volume_node, "slice score series",
                     group)
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName("Slice")
    series.SetYColumnName("Slice anomaly")
    # A scatter series joined by a line: a line series ignores its X column and plots against the row number, while
    # the rows start at the first slice with brain (qMRMLPlotView uses X only where IsXColumnRequired).
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    chart = _output(scene, undo, existing, "vtkMRMLPlotChartNode", SLICE_CHART_ROLE, volume_node,
                    "slice scores chart", group)
    chart.RemoveAllPlotSeriesNodeIDs()
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"{volume_node.GetName()}: anomaly per slice")
    chart.SetXAxisTitle(f"Slice index (axis {table_node.GetAttribute(SLICE_AXIS_ATTRIBUTE)})")
    chart.SetYAxisTitle("Slice anomaly (ranks of highest score and sample score)")
    chart.SetLegendVisibility(False)
    return chart
