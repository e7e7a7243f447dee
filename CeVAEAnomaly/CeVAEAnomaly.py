"""CeVAE Anomaly: unsupervised anomaly localisation in brain MRI (3D Slicer scripted module).

The computation lives in ``CeVAEAnomalyLib`` (the same engine as the ``cevae-anomaly`` command);
this file holds the Slicer module description, its parameter node, the widget and the self-test.
Loading the module is cheap: torch is imported only when Apply is clicked.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Annotated, Optional, Union

import ctk
import qt
import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import DEVICES, SCORE_TYPES, RunOptions, ScoreOptions
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic, CeVAEAnomalyResult
from CeVAEAnomalyLib.slicer.mrml import OutputNodes, component_position
from CeVAEAnomalyLib.progress import Cancelled
from CeVAEAnomalyLib.slicer.resources import resource_dir

__all__ = ["CeVAEAnomaly", "CeVAEAnomalyLogic", "CeVAEAnomalyParameterNode", "CeVAEAnomalyTest",
           "CeVAEAnomalyWidget"]

SENSITIVITY_MODEL = "Model's default rate"
SENSITIVITY_FPR = "False-positive rate"
SENSITIVITY_THRESHOLD = "Absolute threshold"
TORCH_REQUIREMENT = "torch>=2.1"
PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4"}


#
# CeVAEAnomaly
#


class CeVAEAnomaly(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CeVAE Anomaly")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CeVAEAnomaly developers"]
        self.parent.helpText = _("""
Finds regions of a brain MRI that look unlike healthy brains, without having been shown any lesion:
a context-encoding variational autoencoder (ceVAE) trained on healthy T1-weighted scans scores every voxel.
<ol>
<li>Select the <b>input volume</b> (T1-weighted brain MRI). Optionally select a <b>brain mask</b>
(labelmap, or a segmentation and one of its segments); otherwise it is computed automatically.</li>
<li>Keep the bundled model or choose a model bundle (.cevae). Set the sensitivity: the model's
recommended false-positive rate on healthy brains, another rate (from the model's calibration), or an
absolute score threshold.</li>
<li>Click <b>Apply</b> (it becomes <b>Cancel</b> while running).</li>
</ol>
Results: the score volume as a heat overlay (scores under half the threshold are transparent), the
segment "Anomaly" outlined in all views, and a table of connected anomalies (volume, scores, centroid);
click a row to jump there. <b>Research use only; not for diagnosis.</b>
""")
        self.parent.acknowledgementText = _("""
Method: D. Zimmerer, S. A. A. Kohl, J. Petersen, F. Isensee, K. H. Maier-Hein,
"Context-encoding Variational Autoencoder for Unsupervised Anomaly Detection", MIDL 2019
(arXiv:1812.05941), and "Unsupervised Anomaly Localization using Variational Auto-Encoders", MICCAI 2019.
This module is an independent implementation built on 3D Slicer and PyTorch.
""")
        # Resources/ sits beside this file when installed and at the repository top in a source
        # checkout; the base class only looks beside this file.
        try:
            self.parent.icon = qt.QIcon(str(resource_dir() / "Icons" / "CeVAEAnomaly.png"))
        except CeVAEError as exc:
            logging.warning("CeVAE Anomaly: %s", exc)


#
# CeVAEAnomalyParameterNode
#


@parameterNodeWrapper
class CeVAEAnomalyParameterNode:
    """Everything the user chose; saved with the scene.

    brainMask: optional; a labelmap volume or a segmentation. Outputs left empty are created on Apply.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    useBundledModel: bool = True
    modelPath: str = ""  # bound by hand: ctkPathLineEdit binds only to pathlib types (shown as '.')
    scoreType: Annotated[str, Choice(list(SCORE_TYPES))] = ScoreOptions.score_type
    sensitivity: Annotated[str, Choice([SENSITIVITY_MODEL, SENSITIVITY_FPR, SENSITIVITY_THRESHOLD])] = SENSITIVITY_MODEL
    falsePositiveRate: Annotated[float, WithinRange(1e-6, 0.5)] = 0.001  # decimals: set in the .ui
    threshold: Annotated[float, Minimum(0.0)] = 0.5
    overridePostprocess: bool = False
    rimMm: Annotated[float, WithinRange(0.0, 30.0)] = 0.0
    medianRadius: Annotated[int, WithinRange(0, 5)] = 0
    minVolumeMm3: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    device: Annotated[str, Choice(list(DEVICES))] = RunOptions.device
    batchSize: Annotated[int, WithinRange(1, 512)] = 32
    scoreVolume: vtkMRMLScalarVolumeNode
    anomalySegmentation: vtkMRMLSegmentationNode
    anomalyLabelmap: vtkMRMLLabelMapVolumeNode
    componentTable: vtkMRMLTableNode
    show3D: bool = False
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# CeVAEAnomalyWidget
#


class CeVAEAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel. Cheap to set up: nothing is installed or imported heavily here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CeVAEAnomalyLogic] = None
        self._parameterNode: Optional[CeVAEAnomalyParameterNode] = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._lastResult: Optional[CeVAEAnomalyResult] = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CeVAEAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = ["*.cevae"]
        self.ui.progressBar.visible = False

        self.logic = CeVAEAnomalyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.jumpToTopSliceButton.connect("clicked(bool)", self.onJumpToTopSlice)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.componentTableView.connect("selectionChanged()", self.onComponentSelected)
        self.ui.brainMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onBrainMaskChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)

        self.initializeParameterNode()
        self._updateResultsGui()

    def resourcePath(self, filename: str) -> str:
        """Path of a file in the module's Resources folder (installed or source layout)."""
        return str(resource_dir() / filename)

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._lastResult = None
        self._updateResultsGui()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Forget the library modules too, so that Reload picks up their changes."""
        for name in [n for n in sys.modules if n == "CeVAEAnomalyLib" or n.startswith("CeVAEAnomalyLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(CeVAEAnomalyParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[CeVAEAnomalyParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.modelPathLineEdit.enabled = not p.useBundledModel
        if self.ui.modelPathLineEdit.currentPath != p.modelPath:
            self.ui.modelPathLineEdit.currentPath = p.modelPath
        self.ui.falsePositiveRateSpinBox.enabled = p.sensitivity == SENSITIVITY_FPR
        self.ui.thresholdSpinBox.enabled = p.sensitivity == SENSITIVITY_THRESHOLD
        for widget in (self.ui.rimSpinBox, self.ui.medianRadiusSpinBox, self.ui.minVolumeSpinBox):
            widget.enabled = p.overridePostprocess
        if self._running:
            return
        if p.inputVolume:
            self.ui.applyButton.toolTip = _("Detect anomalies in the input volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select an input volume.")
            self.ui.applyButton.enabled = False

    def onBrainMaskChanged(self, node) -> None:
        """A segmentation as brain mask: offer its segments."""
        isSegmentation = isinstance(node, vtkMRMLSegmentationNode)
        self.ui.brainMaskSegmentSelector.enabled = isSegmentation
        self.ui.brainMaskSegmentSelector.setCurrentNode(node if isSegmentation else None)

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path

    # --- running -------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        """Apply starts a run; while running, the same button cancels it."""
        if self._running:
            self._cancelRequested = True
            self.ui.applyButton.enabled = False
            self.ui.applyButton.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection failed."), waitCursor=False):
            if not self._ensureDependencies():
                return
            self._setRunning(True)
            try:
                result = self.logic.process(progress=self._onProgress, **self._processArguments())
            except Cancelled:
                self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
                return
            finally:
                self._setRunning(False)
            self._showResult(result)

    def _processArguments(self) -> dict:
        p = self._parameterNode
        modelPath = None
        if not p.useBundledModel:
            if not p.modelPath:
                raise CeVAEError(_("Choose a model bundle file, or use the bundled model."))
            modelPath = p.modelPath
        segmentId = self.ui.brainMaskSegmentSelector.currentSegmentID() if p.brainMask else ""
        postprocess = None
        if p.overridePostprocess:
            postprocess = {"rim_mm": p.rimMm, "median_radius": p.medianRadius, "min_volume_mm3": p.minVolumeMm3}
        return dict(
            volumeNode=p.inputVolume, maskNode=p.brainMask, maskSegmentId=segmentId or None, modelPath=modelPath,
            scoreType=p.scoreType, fpr=p.falsePositiveRate if p.sensitivity == SENSITIVITY_FPR else None,
            threshold=p.threshold if p.sensitivity == SENSITIVITY_THRESHOLD else None,
            postprocess=postprocess, device=p.device,
            batchSize=p.batchSize, createLabelmap=False, show3D=p.show3D,
            outputs=OutputNodes(score=p.scoreVolume, segmentation=p.anomalySegmentation,
                                labelmap=p.anomalyLabelmap, components=p.componentTable),
        )

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.resultsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        if running:
            self.ui.statusLabel.text = ""
        else:
            self._updateGui()

    def _onProgress(self, fraction: float, message: str) -> None:
        """Core progress callback: update the bar, keep the GUI alive, honour Cancel."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message}: %p%"
        slicer.app.processEvents()
        if self._cancelRequested:
            raise Cancelled(_("Cancelled by the user."))

    def _ensureDependencies(self) -> bool:
        """On first Apply: offer to install torch (and other missing packages). False if declined."""
        missing = [name for name in ["torch", *PIP_REQUIREMENTS] if importlib.util.find_spec(name) is None]
        if not missing:
            return True
        if slicer.app.testingEnabled():
            raise CeVAEError(_("Missing Python packages: {names}. Install them before testing.").format(
                names=", ".join(missing)))
        message = _(
            "CeVAE Anomaly needs these Python packages, which are not installed yet: {names}.\n\n"
            "Install them now? PyTorch is a large download and may take several minutes."
        ).format(names=", ".join(missing))
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("Install dependencies")):
            return False
        with slicer.util.WaitCursor():
            if "torch" in missing:
                self._installTorch()
            for name in missing:
                if name in PIP_REQUIREMENTS:
                    slicer.util.pip_install(PIP_REQUIREMENTS[name])
        importlib.invalidate_caches()
        return True

    @staticmethod
    def _installTorch() -> None:
        """Through the PyTorch extension when present (matches CUDA to the driver), else pip."""
        try:
            import PyTorchUtils
        except ImportError:
            logging.info("PyTorch extension not installed; installing %s from PyPI.", TORCH_REQUIREMENT)
            slicer.util.pip_install(TORCH_REQUIREMENT)
            return
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=TORCH_REQUIREMENT[5:])
        if torch is None:
            raise CeVAEError(_("PyTorch could not be installed; install it from the PyTorch extension."))

    # --- results -------------------------------------------------------------------------------

    def _showResult(self, result: CeVAEAnomalyResult) -> None:
        self._lastResult = result
        p = self._parameterNode
        p.scoreVolume = result.nodes.score
        p.anomalySegmentation = result.nodes.segmentation
        p.componentTable = result.nodes.components
        self.logic.showResults(result, p.overlayOpacity)
        self._updateResultsGui()
        self.ui.statusLabel.text = result.summary
        self.onJumpToTopSlice()

    def _updateResultsGui(self) -> None:
        result = self._lastResult
        self.ui.componentTableView.setMRMLTableNode(result.nodes.components if result else None)
        self.ui.jumpToTopSliceButton.enabled = bool(result and result.detection.slices)
        self.ui.showPlotButton.enabled = result is not None

    def onJumpToTopSlice(self) -> None:
        if self._lastResult and self._lastResult.topSliceRas:
            self.logic.jumpToSlice(self._lastResult.topSliceRas)

    def onShowPlot(self) -> None:
        if self._lastResult:
            slicer.modules.plots.logic().ShowChartInLayout(self._lastResult.nodes.slice_chart)

    def onOpacityChanged(self, value: float) -> None:
        if self._lastResult:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onComponentSelected(self) -> None:
        """Jump the slice views to the centroid of the selected component."""
        table = self.ui.componentTableView.mrmlTableNode()
        index = self.ui.componentTableView.currentIndex()
        if table is None or not index.isValid():
            return
        row = self.ui.componentTableView.sortFilterProxyModel().mapToSource(index).row()
        self.logic.jumpToSlice(component_position(table, row))


#
# CeVAEAnomalyTest
#


class CeVAEAnomalyTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the logic end to end on a synthetic head with the bundled model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectOnSyntheticHead()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_WidgetApplyState()

    @staticmethod
    def _syntheticHead():
        """A 48x52x40 head (brain ellipsoid, darker core) with a bright lesion; (volume, mask, lesion array)."""
        import numpy as np

        k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 52, 48)), indexing="ij")
        radius = np.sqrt(i ** 2 + j ** 2 + k ** 2)
        brain = radius < 0.7
        lesion = np.sqrt((i - 0.3) ** 2 + j ** 2 + k ** 2) < 0.15
        voxels = np.where(radius < 0.9, 30.0, 0.0)
        voxels = np.where(brain, 100.0 - 40.0 * (radius < 0.3), voxels)
        voxels[lesion] = 250.0
        voxels += np.random.default_rng(0).normal(0.0, 3.0, voxels.shape)
        ijkToRas = np.diag([1.2, 1.0, 1.5, 1.0])
        volume = slicer.util.addVolumeFromArray(voxels.astype(np.float32), ijkToRas, "CeVAEAnomalyTestHead")
        mask = slicer.util.addVolumeFromArray(brain.astype(np.uint8), ijkToRas, "CeVAEAnomalyTestMask",
                                              "vtkMRMLLabelMapVolumeNode")
        return volume, mask, lesion

    def test_DetectOnSyntheticHead(self):
        import numpy as np

        self.delayDisplay("Detecting anomalies in a synthetic head with the bundled model")
        volume, mask, lesion = self._syntheticHead()
        result = CeVAEAnomalyLogic().process(volume, mask, device="cpu")
        score = result.nodes.score
        self.assertEqual(score.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(expected)
        score.GetIJKToRASMatrix(actual)
        self.assertEqual([expected.GetElement(r, c) for r in range(4) for c in range(4)],
                         [actual.GetElement(r, c) for r in range(4) for c in range(4)])
        scores = slicer.util.arrayFromVolume(score)
        brain = slicer.util.arrayFromVolume(mask) > 0
        self.assertTrue(np.isfinite(scores).all())
        self.assertEqual(float(np.abs(scores[~brain]).max()), 0.0)
        self.assertGreater(float(scores[lesion].mean()), float(scores[brain & ~lesion].mean()))
        segmentation = result.nodes.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), "Anomaly")
        self.assertEqual(result.nodes.components.GetNumberOfRows(), len(result.detection.components))
        self.assertIsNotNone(result.topSliceRas)
        self.delayDisplay("Detection test passed")

    def test_CancelLeavesSceneUnchanged(self):
        from CeVAEAnomalyLib.slicer.mrml import node_ids

        self.delayDisplay("Cancelling a run")
        volume, mask, _lesion = self._syntheticHead()
        before = node_ids(slicer.mrmlScene)

        def cancel(fraction, message):
            if fraction > 0.5:
                raise Cancelled("Cancelled by the test.")

        with self.assertRaises(Cancelled):
            CeVAEAnomalyLogic().process(volume, mask, device="cpu", progress=cancel)
        self.assertEqual(node_ids(slicer.mrmlScene), before)
        self.delayDisplay("Cancel test passed")

    def test_WidgetApplyState(self):
        self.delayDisplay("Module panel: Apply needs an input volume")
        widget = slicer.util.getModuleWidget("CeVAEAnomaly")
        widget.initializeParameterNode()
        self.assertFalse(widget.ui.applyButton.enabled)
        volume, _mask, _lesion = self._syntheticHead()
        widget._parameterNode.inputVolume = volume
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.delayDisplay("Widget test passed")
