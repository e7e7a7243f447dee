"""The module logic: MRML nodes in, detection through the core engine, MRML nodes out.

Runs inside Slicer (where it is the module's ``ScriptedLoadableModuleLogic``) and on
``slicer-core`` without Qt. Importing this file does not import torch; :meth:`process` does.

Console use::

    from CeVAEAnomaly import CeVAEAnomalyLogic
    result = CeVAEAnomalyLogic().process(slicer.util.getNode("MRHead"))
    print(result.detection.components)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import slicer

from . import mrml
from ..errors import CeVAEError
from ..io.images import check_volume
from ..progress import ProgressCallback, report, scaled

if TYPE_CHECKING:
    from ..engine.bundle import Bundle
    from ..engine.detector import DetectionResult

try:  # inside Slicer; slicer-core has no Qt and no ScriptedLoadableModule
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:
    _LogicBase = object

log = logging.getLogger(__name__)


@dataclass
class CeVAEAnomalyResult:
    """What :meth:`CeVAEAnomalyLogic.process` produced: the nodes and the raw detection."""

    volume: slicer.vtkMRMLScalarVolumeNode
    nodes: mrml.OutputNodes
    detection: "DetectionResult"

    @property
    def topSliceRas(self) -> Optional[Tuple[float, float, float]]:
        """World RAS of the centre of the most anomalous slice (highest sample score)."""
        top = self.detection.top_slice
        return None if top is None else mrml.slice_center_ras(self.volume, top.axis, top.index)

    @property
    def summary(self) -> str:
        d = self.detection
        return (f"{len(d.components)} component(s), {d.flagged_ml:.2f} ml above threshold "
                f"{d.threshold:.4g} ({d.threshold_source}).")


class CeVAEAnomalyLogic(_LogicBase):
    """Anomaly detection on volume nodes. ``scene``: defaults to the input node's scene."""

    def __init__(self, scene: Optional[slicer.vtkMRMLScene] = None) -> None:
        _LogicBase.__init__(self)
        self.scene = scene
        self._bundle: Optional["Bundle"] = None
        self._bundleKey: Optional[Tuple[str, int, str]] = None

    def _sceneFor(self, volumeNode) -> slicer.vtkMRMLScene:
        scene = self.scene if self.scene is not None else volumeNode.GetScene()
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise CeVAEError("The input volume is not in an MRML scene; add it to one or pass scene= to the logic.")
        return scene

    def loadModel(self, modelPath: Union[str, Path, None] = None, device: str = "auto") -> "Bundle":
        """Load a model bundle (the bundled default if no path), reusing the last one if unchanged."""
        from ..engine.bundle import load_bundle
        from ..engine.devices import resolve_device
        from ..data import default_model_path

        path = Path(modelPath) if modelPath else default_model_path()
        if not path.is_file():
            raise CeVAEError(f"The model bundle {path} does not exist; choose a .cevae file.")
        torchDevice = resolve_device(device)
        key = (str(path.resolve()), path.stat().st_mtime_ns, str(torchDevice))
        if key != self._bundleKey:
            self._bundle, self._bundleKey = load_bundle(path, torchDevice), key
        return self._bundle

    def process(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode,
        maskNode: Optional[slicer.vtkMRMLNode] = None,
        modelPath: Union[str, Path, None] = None,
        scoreType: Optional[str] = None,
        fpr: Optional[float] = None,
        threshold: Optional[float] = None,
        postprocess: Optional[Dict[str, Any]] = None,
        device: str = "auto",
        batchSize: int = 32,
        maskSegmentId: Optional[str] = None,
        outputs: Optional[mrml.OutputNodes] = None,
        createLabelmap: bool = False,
        show3D: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> CeVAEAnomalyResult:
        """Detect anomalies in ``volumeNode`` and create or update the result nodes.

        ``maskNode``: brain mask (labelmap, or segmentation with ``maskSegmentId`` or all its
        segments); computed automatically if None. ``fpr``: healthy false-positive rate for the
        model's calibrated threshold (default: the model's recommended rate, 0.001);
        ``threshold`` overrides it with an absolute score. ``postprocess``: overrides of the
        model's post-processing (rim_mm, median_radius, min_volume_mm3). ``outputs``: existing
        nodes to update. ``progress(fraction, message)``
        may raise :class:`~CeVAEAnomalyLib.progress.Cancelled`. On any error or cancel, the scene
        is left as it was.
        """
        from ..engine.detector import Detector, default_postprocess, default_score_options
        from ..options import ThresholdPolicy

        if volumeNode is None or not isinstance(volumeNode, slicer.vtkMRMLScalarVolumeNode):
            raise CeVAEError("Select a scalar input volume.")
        scene = self._sceneFor(volumeNode)
        inputIds = {node.GetID() for node in (volumeNode, maskNode) if node is not None}
        for node in vars(outputs or mrml.OutputNodes()).values():
            if node is not None and node.GetID() in inputIds:
                raise CeVAEError(f"The output '{node.GetName()}' is also an input; choose another output node.")
        report(progress, 0.0, "Reading the volume")
        image = check_volume(mrml.image_from_volume(volumeNode, "input volume"), f"volume '{volumeNode.GetName()}'")
        mask = mrml.mask_image(maskNode, volumeNode, maskSegmentId) if maskNode is not None else None
        report(progress, 0.02, "Loading the model")
        bundle = self.loadModel(modelPath, device)
        options = default_score_options(bundle).replace(score_type=scoreType)
        try:
            post = default_postprocess(bundle).replace(**(postprocess or {}))
        except TypeError as exc:
            raise CeVAEError(f"Invalid post-processing options: {exc}") from None
        detector = Detector(bundle, options, post, ThresholdPolicy(threshold, fpr), batch_size=batchSize)
        detection = detector(image, mask, progress=scaled(progress, 0.05, 0.95))
        report(progress, 0.95, "Creating the result nodes")
        nodes = mrml.publish(scene, volumeNode, detection, outputs, createLabelmap, show3D)
        result = CeVAEAnomalyResult(volumeNode, nodes, detection)
        log.info("CeVAEAnomaly: %s", result.summary)
        return result

    def showResults(self, result: CeVAEAnomalyResult, opacity: float = 0.5) -> None:
        """Show the heat map over the input in the slice views (only inside the Slicer application)."""
        if getattr(slicer, "app", None) is None:
            return
        slicer.util.setSliceViewerLayers(background=result.volume, foreground=result.nodes.score,
                                         foregroundOpacity=opacity)

    def jumpToSlice(self, ras: Tuple[float, float, float]) -> None:
        """Centre all slice views on a world RAS point (only inside the Slicer application)."""
        if getattr(slicer, "app", None) is None:
            return
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
