"""CeVAE Anomaly: unsupervised anomaly localisation in brain MRI (3D Slicer scripted module).

The computation lives in ``CeVAEAnomalyLib`` (the same engine as the ``cevae-anomaly`` command).
This file holds the module description, its parameter node, the widget and the self-test. The
widget binds Qt to Qt-free parts: ``widget_state`` decides what is enabled and what a click does,
``settings`` what a model offers, the logic runs detection and calibration in a worker process
polled by a timer. Loading the module imports neither torch nor SimpleITK.
"""
import contextlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Dict, Iterator, Optional, Union

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
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CeVAEAnomalyLib.engine.calibration import DEFAULT_FPR
from CeVAEAnomalyLib.errors import CeVAEError, one_line
from CeVAEAnomalyLib.options import DEVICES, PostprocessOptions, RunOptions, ThresholdPolicy, option_range
from CeVAEAnomalyLib.slicer.gui_binding import GuiBinding, takes_path_now, typed_path
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic, CeVAEAnomalyResult, InputRemovedError
from CeVAEAnomalyLib.slicer.resources import resource_dir
from CeVAEAnomalyLib.slicer.sample_data import sample_sources
from CeVAEAnomalyLib.slicer.settings import (
    MODEL_SCORE_TYPE,
    SCORE_TYPE_CHOICES,
    SENSITIVITIES,
    SENSITIVITY_FPR,
    SENSITIVITY_MODEL,
    SENSITIVITY_THRESHOLD,
    THRESHOLD_RANGE,
    ModelSettings,
    ModelSettingsCache,
    plain_tooltip,
)
from CeVAEAnomalyLib.slicer.widget_state import (ADAPT, CALIBRATE, DETECT, Action, Phase, WidgetState,
                                                  progress_format, report_default_path, report_output, with_warnings)

__all__ = ["CeVAEAnomaly", "CeVAEAnomalyLogic", "CeVAEAnomalyParameterNode", "CeVAEAnomalyTest",
           "CeVAEAnomalyWidget"]

DOCUMENTATION_URL = "https://github.com/CeVAEAnomaly/SlicerCeVAEAnomaly/blob/main/docs/SLICER.md"
POLL_INTERVAL_MS = 100
INPUT_SELECTORS = ("inputVolumeSelector", "brainMaskSelector", "healthyVolumesSelector", "healthyMasksSelector",
                   "adaptVolumesSelector", "adaptMasksSelector")


def scoreTypeNames() -> Dict[str, str]:
    """Display names of the score types (option values in ``settings.SCORE_TYPE_CHOICES``; the model's own:
    :meth:`CeVAEAnomalyWidget._scoreTypeChoices` names its type too)."""
    return {
        MODEL_SCORE_TYPE: _("Model's default"),
        "combi": _("Combined (reconstruction \u00d7 KL gradient)"),
        "rec": _("Reconstruction error"),
        "grad": _("KL gradient"),
    }


def sensitivityNames() -> Dict[str, str]:
    """Display names of the sensitivity modes (``settings.SENSITIVITIES``)."""
    return {
        SENSITIVITY_MODEL: _("Model's recommended false-positive rate"),
        SENSITIVITY_FPR: _("Chosen false-positive rate"),
        SENSITIVITY_THRESHOLD: _("Absolute threshold"),
    }


def deviceNames() -> Dict[str, str]:
    """Display names of the compute devices (``settings.DEVICES``)."""
    return {
        "auto": _("Automatic"),
        "cpu": _("CPU"),
        "cuda": _("NVIDIA GPU (CUDA)"),
        "mps": _("Apple GPU (MPS)"),
    }


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
        self.parent.contributors = ["CeVAEAnomaly maintainers (see CONTRIBUTORS.md)"]
        self.parent.helpText = _("""
Finds regions of a brain MRI that look unlike healthy brains, without having been shown any lesion:
a context-encoding variational autoencoder (ceVAE) trained on healthy T1-weighted scans scores every voxel.
<ol>
<li>Select the <b>input volume</b> (T1-weighted brain MRI). Optionally select a <b>brain mask</b>
(labelmap, or a segmentation and one of its segments); otherwise it is computed automatically.</li>
<li>Keep the bundled model or choose a model file (.cevae). Set the sensitivity: the model's
recommended false-positive rate on healthy brains, another rate, or an absolute score threshold.</li>
<li>Click <b>Apply</b>. Detection runs in a separate process; the button becomes <b>Cancel</b>.</li>
</ol>
Results: the score volume as a heat overlay (scores under the threshold are transparent) with a
colour legend, the segment "Anomaly" outlined in all views, and a table of connected anomalies
(volume, scores, centroid, highest-scoring voxel); click a row to jump to that voxel. <b>Save report...</b> writes
the result's HTML report (summary, model, threshold, warnings, tables, key picture) to open, print and file.
<b>Calibrate on healthy scans</b> adapts the threshold to your site; <b>Adapt to this scanner</b> fine-tunes
the model itself on them; <b>Share model...</b> writes a copy of your model without the names of its scans, to give
to another site;
<b>Thorough</b> (Advanced) adapts a copy of the model to the one scan before scoring it (slower).
See the <a href="{url}">documentation</a>.
<b>Research use only; not for diagnosis.</b>
""").format(url=DOCUMENTATION_URL)
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
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offer the packaged sample scans in the Sample Data module (category CeVAEAnomaly), where Slicer has it."""
    try:
        import SampleData
    except ImportError:
        logging.info("CeVAE Anomaly: no Sample Data module; its sample scans are not offered there.")
        return
    for source in sample_sources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# CeVAEAnomalyParameterNode
#


@parameterNodeWrapper
class CeVAEAnomalyParameterNode:
    """Everything the user chose; saved with the scene.

    brainMask: optional; a labelmap volume or a segmentation (``brainMaskSegmentId`` picks its
    segment). Outputs left empty are created on Apply. Fields without a widget binding in the .ui
    (model paths, segment, the combo boxes with translated names) are bound by hand.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    brainMaskSegmentId: str = ""
    useBundledModel: bool = True
    modelPath: str = ""
    scoreType: Annotated[str, Choice(list(SCORE_TYPE_CHOICES))] = MODEL_SCORE_TYPE  # the model's own until picked
    sensitivity: Annotated[str, Choice(list(SENSITIVITIES))] = SENSITIVITY_MODEL
    # the model's rate is shown instead of the default
    falsePositiveRate: Annotated[float, WithinRange(*option_range(ThresholdPolicy, "fpr"))] = DEFAULT_FPR
    threshold: Annotated[float, WithinRange(*THRESHOLD_RANGE)] = 0.5
    overridePostprocess: bool = False
    rimMm: Annotated[float, WithinRange(*option_range(PostprocessOptions, "rim_mm"))] = 0.0
    medianRadius: Annotated[int, WithinRange(*option_range(PostprocessOptions, "median_radius"))] = 0
    minVolumeMm3: Annotated[float, WithinRange(*option_range(PostprocessOptions, "min_volume_mm3"))] = 0.0
    minPeak: Annotated[float, WithinRange(*option_range(PostprocessOptions, "min_peak"))] = 1.0
    device: Annotated[str, Choice(list(DEVICES))] = RunOptions.device
    batchSize: Annotated[int, WithinRange(*option_range(RunOptions, "batch_size"))] = RunOptions.batch_size
    thorough: bool = False  # test-time adaptation (settings: the request's test_time_steps)
    scoreVolume: vtkMRMLScalarVolumeNode
    anomalySegmentation: vtkMRMLSegmentationNode
    anomalyLabelmap: vtkMRMLLabelMapVolumeNode
    componentTable: vtkMRMLTableNode
    show3D: bool = False
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    calibratedModelPath: str = ""
    adaptedModelPath: str = ""


#
# CeVAEAnomalyWidget
#


class CeVAEAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel. Cheap to set up: nothing is installed or imported heavily here."""

    def __init__(self, parent=None) -> None:
        # the attributes first: without a parent (a panel made from the Python console) the base class's __init__
        # calls setup() itself
        VTKObservationMixin.__init__(self)
        from CeVAEAnomalyLib.slicer.nodes import FrameWatch

        self.logic: Optional[CeVAEAnomalyLogic] = None
        self._parameterNode: Optional[CeVAEAnomalyParameterNode] = None
        self._binding = GuiBinding()  # one connectGui per parameter node, also in Slicer 5.6/5.8
        self.state = WidgetState()
        self._job = None
        self._modelSettingsCache = ModelSettingsCache()
        self._sharing = None  # the Share model... action of the last refresh (share_panel.ModelSharing)
        self._loadedResult: Optional[CeVAEAnomalyResult] = None  # the last detection loaded (Save report... writes it)
        self._reportFolder: Optional[Path] = None  # where the last report went (the next one is offered there)
        self._modelValuesShownFor: Optional[tuple] = None
        self._pendingDisplay: Optional[tuple] = None  # (score volume, input volume) to show on return
        self._modelStandingIn = ""  # the remembered model out of reach at the start (model_memory.StartModel)
        self._frameNote = ""  # what the status line says of the frame the views show (nodes.frame_note)
        # here, not in setup(): cleanup() stops them also after a setup() that failed partway (Resources missing)
        self._frames = FrameWatch(self._onFrameChanged)  # the browser of the results in the panel's fields, if any
        self._timer = qt.QTimer()
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CeVAEAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = ["*.cevae"]
        # Writable files: the browse button opens a save dialog (int(): flags, not a type union)
        self.ui.calibratedModelPathLineEdit.filters = int(ctk.ctkPathLineEdit.Files) | int(ctk.ctkPathLineEdit.Writable)
        self.ui.calibratedModelPathLineEdit.nameFilters = ["*.cevae"]
        self.ui.adaptedModelPathLineEdit.filters = int(ctk.ctkPathLineEdit.Files) | int(ctk.ctkPathLineEdit.Writable)
        self.ui.adaptedModelPathLineEdit.nameFilters = ["*.cevae"]
        self.ui.progressBar.visible = False
        for combo, names in ((self.ui.scoreTypeComboBox, scoreTypeNames()), (self.ui.deviceComboBox, deviceNames())):
            for value, name in names.items():
                combo.addItem(name, value)

        self.logic = CeVAEAnomalyLogic()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._hideModuleVolumes)

        self.ui.applyButton.connect("clicked(bool)", lambda checked: self._onTaskButton(DETECT))
        self.ui.calibrateButton.connect("clicked(bool)", lambda checked: self._onTaskButton(CALIBRATE))
        self.ui.adaptButton.connect("clicked(bool)", lambda checked: self._onTaskButton(ADAPT))
        self.ui.jumpToTopSliceButton.connect("clicked(bool)", self.onJumpToTopSlice)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.shareModelButton.connect("clicked(bool)", self.onShareModel)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.componentTableView.connect("clicked(QModelIndex)", self.onComponentClicked)
        self.ui.brainMaskSegmentSelector.connect("currentSegmentChanged(QString)", self.onBrainMaskSegmentChanged)
        for pathEdit, name in ((self.ui.modelPathLineEdit, "modelPath"),
                               (self.ui.calibratedModelPathLineEdit, "calibratedModelPath"),
                               (self.ui.adaptedModelPathLineEdit, "adaptedModelPath")):
            # its text box: ctkPathLineEdit's currentPathChanged skips texts its name filter rejects (no .cevae), and
            # so does editingFinished while the box has the filter's validator (Qt emits it only for acceptable
            # text), which never blocks typing: without it a typed path of another ending is taken when typing ends
            lineEdit = slicer.util.findChildren(pathEdit, className="QLineEdit")[0]
            lineEdit.setValidator(None)
            lineEdit.connect("textChanged(QString)", self._pathHandler(lineEdit, name, finished=False))
            lineEdit.connect("editingFinished()", self._pathHandler(lineEdit, name, finished=True))
        for combo, name in ((self.ui.scoreTypeComboBox, "scoreType"), (self.ui.sensitivityComboBox, "sensitivity"),
                            (self.ui.deviceComboBox, "device")):
            combo.connect("currentIndexChanged(int)", self._comboHandler(combo, name))
        self.ui.healthyVolumesSelector.connect("checkedNodesChanged()", self._refresh)
        self.ui.adaptVolumesSelector.connect("checkedNodesChanged()", self._refresh)

        self.initializeParameterNode()

    def resourcePath(self, filename: str) -> str:
        """Path of a file in the module's Resources folder (installed or source layout)."""
        return str(resource_dir() / filename)

    def cleanup(self) -> None:
        """Reload or application exit: stop a run first, then let go of the scene and the parameter node. A reload
        only hides this panel's widgets: its GUI binding is undone where Slicer can (5.10+, gui_binding), or the
        hidden widgets would go on following the parameter node and writing to it beside the new panel's."""
        self._interrupt()
        self._timer.stop()
        self._frames.follow(None)
        self.removeObservers()
        self._binding.release()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.state.entered() and self._pendingDisplay is not None:
            self._display(*self._pendingDisplay)  # a run that finished while another module was shown

    def exit(self) -> None:
        """Another module is shown: a run goes on (see WidgetState.left); the GUI binding stays (GuiBinding)."""
        self.state.left()
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        """A detection stops; a calibration or adaptation goes on (WidgetState.scene_closing): the next scene's panel
        shows it running and, at its end, takes its model (:meth:`_useNewModel`)."""
        self._interrupt(sceneClosing=True)
        self._loadedResult = None  # its nodes go with the scene (WidgetState.scene_closing forgets it too)
        self._frames.follow(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        # a panel made from the Python console has a plain qMRMLWidget parent, without isEntered: it is shown, so as
        # entered
        if getattr(self.parent, "isEntered", True):
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A scene was loaded: its input comes with the mask it was saved with. The parameter node's references
        resolve only at the end of the import (a node saved before the volumes), without a ModifiedEvent."""
        p = self._parameterNode
        if p is not None:
            self.state.input_restored(p.inputVolume.GetID() if p.inputVolume is not None else None)
            self._updateGui()

    def onReload(self) -> None:
        """Stop a run, then forget the library modules too, so that Reload picks up their changes."""
        self._interrupt()
        for name in [n for n in sys.modules if n == "CeVAEAnomalyLib" or n.startswith("CeVAEAnomalyLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        self._hideModuleVolumes()  # also those of a scene loaded meanwhile
        node = self.logic.getParameterNode()
        isNew = not node.HasParameter("useBundledModel")  # the wrapper writes every default below
        kept = self.state.close_words()  # why a run stopped as the last scene closed (once)
        self.setParameterNode(CeVAEAnomalyParameterNode(node))
        if isNew:
            self._startWithRememberedModel(kept)
        if not self._parameterNode.inputVolume:
            from CeVAEAnomalyLib.slicer.nodes import first_input_volume

            firstVolume = first_input_volume(slicer.mrmlScene)
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume
        if not self._parameterNode.calibratedModelPath:
            folder = Path(getattr(slicer.app, "defaultScenePath", "") or Path.home())
            self._parameterNode.calibratedModelPath = str(folder / "CeVAEAnomaly_site_calibrated.cevae")
        if not self._parameterNode.adaptedModelPath:
            folder = Path(getattr(slicer.app, "defaultScenePath", "") or Path.home())
            self._parameterNode.adaptedModelPath = str(folder / "CeVAEAnomaly_scanner_adapted.cevae")

    def _startWithRememberedModel(self, kept: str) -> None:
        """A new scene starts with the model used last on this computer (model_memory.start_model); the status line
        says ``kept`` first (why a run stopped as the last scene closed)."""
        from CeVAEAnomalyLib.slicer.model_memory import SETTINGS_KEY, remembered_value, start_model

        start = start_model(qt.QSettings().value(SETTINGS_KEY, ""))  # (start_model judges a value of another type)
        if start.forget:
            qt.QSettings().remove(SETTINGS_KEY)
        self._modelStandingIn = start.standing_in_for
        self.ui.statusLabel.text = ""
        if start.path is not None:
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.useBundledModel = False
                self._parameterNode.modelPath = start.path
        said = self.ui.statusLabel.text  # what the panel said about this model's thresholds, if anything
        self.ui.statusLabel.text = " ".join(text for text in (kept, start.message, said) if text)
        self.state.model_said(remembered_value(self._parameterNode), self.ui.statusLabel.text)

    def _rememberModel(self) -> None:
        """The panel's model is the one a new scene starts with (model_memory)."""
        from CeVAEAnomalyLib.slicer.model_memory import SETTINGS_KEY, remembered_value

        value = remembered_value(self._parameterNode, self._modelStandingIn)
        qt.QSettings().setValue(SETTINGS_KEY, value)
        if value != self._modelStandingIn:
            self._modelStandingIn = ""  # another model was chosen

    def setParameterNode(self, inputParameterNode: Optional[CeVAEAnomalyParameterNode]) -> None:
        self._modelValuesShownFor = None  # a new or reset node (scene closed) holds no model values yet
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = self._binding.bind(inputParameterNode, self.ui)
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        self.state.input_restored(volume.GetID() if volume is not None else None)  # its mask is the saved one
        if self._parameterNode:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _followInput(self) -> bool:
        """The output fields show the input's own nodes (its earlier results, or none: made on Apply),
        never another input's, so a run never replaces another scan's results; when the input changes, the
        mask field shows a mask that can be its own (nodes.mask_for_input), never another scan's. True if
        they changed."""
        from CeVAEAnomalyLib.slicer.nodes import PANEL_OUTPUTS, mask_for_input, outputs_for_input

        p = self._parameterNode
        if self.state.summary_is_stale(p.inputVolume.GetID() if p.inputVolume is not None else None):
            self.ui.statusLabel.text = ""
        if p.inputVolume is None:
            return False
        shown = outputs_for_input(slicer.mrmlScene, p.inputVolume, {f: getattr(p, f) for f in PANEL_OUTPUTS})
        if slicer.mrmlScene.IsImporting():  # a scene being loaded brings its own mask choice
            self.state.input_restored(p.inputVolume.GetID())
        if self.state.input_is_new(p.inputVolume.GetID()):
            shown["brainMask"] = mask_for_input(p.inputVolume, p.brainMask)
        changed = {f: node for f, node in shown.items() if getattr(p, f) is not node}
        if changed:
            with slicer.util.NodeModify(p.parameterNode):
                for field, node in changed.items():
                    setattr(p, field, node)
        return bool(changed)

    def _hideModuleVolumes(self, caller=None, event=None) -> None:
        """Keep this module's score volumes and labelmaps out of the input and healthy-volume selectors
        (attribute filters of a node selector only include, so by node ID)."""
        from CeVAEAnomalyLib.slicer.nodes import module_volume_ids

        hidden = module_volume_ids(slicer.mrmlScene)
        for name in INPUT_SELECTORS:
            getattr(self.ui, name).sortFilterProxyModel().hiddenNodeIDs = hidden

    def _comboHandler(self, combo, name: str):
        """A one-argument slot that stores the option value behind the chosen display name."""
        return lambda index: self._setParameter(name, combo.itemData(index))

    def _pathHandler(self, lineEdit, name: str, finished: bool):
        """A slot that stores a path field's text when gui_binding.takes_path_now says so (``lineEdit.modified``: the
        text was typed, not set by a dialog, the history or the panel)."""
        def handler(*args) -> None:
            if takes_path_now(name, lineEdit.text, lineEdit.modified, finished):
                self._setParameter(name, lineEdit.text)

        return handler

    def _setParameter(self, name: str, value) -> None:
        """A hand-bound widget changed: store its value (None from an empty combo box is ignored)."""
        if self._parameterNode is not None and value is not None and getattr(self._parameterNode, name) != value:
            setattr(self._parameterNode, name, value)

    # --- showing the parameter node -------------------------------------------------------------

    def _modelSettings(self) -> Optional[ModelSettings]:
        """Settings of the chosen model (cached by path and file stamp: settings.file_stamp); None if unreadable."""
        return self._modelSettingsCache.of(self._parameterNode)

    def _showModelValues(self, settings: ModelSettings) -> None:
        """Fields the model decides show the model's values (``settings.model_values``). Set once per model and
        choice they depend on (``settings.model_values_key``), so a widget that rounds a value cannot start a
        ping-pong with the parameter node."""
        from CeVAEAnomalyLib.slicer.settings import model_values, model_values_key

        p = self._parameterNode
        shownFor = (self._modelSettingsCache.key, *model_values_key(p))
        if shownFor == self._modelValuesShownFor:
            return
        shownBefore, self._modelValuesShownFor = self._modelValuesShownFor, shownFor
        previous = shownBefore[2] if shownBefore is not None and shownBefore[0] == shownFor[0] else None
        for name, value in model_values(p, settings, previous).items():
            setattr(p, name, value)

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            self._frames.follow(None)
            self._refresh()
            return
        from CeVAEAnomalyLib.slicer.model_memory import remembered_value
        from CeVAEAnomalyLib.slicer.settings import (model_problem, override_postprocess, rate_refusal,
                                                     sensitivity_change, shown_threshold)

        if self._followInput():
            return  # the output fields changed: this runs again
        if self._followResultsBrowser():
            return  # the fields switched to the results of the frame shown: this runs again
        if self.state.model_words_are_stale(remembered_value(p), self.ui.statusLabel.text):
            self.ui.statusLabel.text = ""  # "the model used last ... is in use", after another model was chosen
        settings = self._modelSettings()
        headline, details = settings.details if settings is not None else ("", "")  # what the model is
        self.ui.modelDetailsLabel.text = headline
        about = details or _("What the chosen model is (as cevae-anomaly info says it).")
        self.ui.modelDetailsLabel.toolTip = plain_tooltip(about)  # (a received model's text is no HTML)
        said = self.state.model_problem(model_problem(p) if settings is None else None)
        if said is not None:
            self.ui.statusLabel.text = said  # a scene's model that was moved, a file that is no model
        if settings is not None:
            self._showModelValues(settings)
            change = sensitivity_change(p, settings)
            if change is not None:  # the override left the calibration: say which threshold is used now
                self.ui.statusLabel.text = change.message
                with slicer.util.NodeModify(p.parameterNode):  # one update of the panel for both fields
                    if change.threshold is not None:
                        p.threshold = shown_threshold(change.threshold)
                    p.sensitivity = change.sensitivity
                return
            said = self.state.rate_said(rate_refusal(p, settings), self.ui.statusLabel.text)
            if said is not None:
                self.ui.statusLabel.text = said  # a rate detection refuses (threshold 0), at once rather than on Apply
        modes = settings.sensitivities(p.scoreType, override_postprocess(p), p.thorough) if settings else SENSITIVITIES
        self._showChoices(self.ui.sensitivityComboBox, {m: sensitivityNames()[m] for m in modes}, p.sensitivity)
        self._showChoices(self.ui.scoreTypeComboBox, self._scoreTypeChoices(settings), p.scoreType)
        self._showChoices(self.ui.deviceComboBox, None, p.device)
        if self.ui.modelPathLineEdit.currentPath != p.modelPath:
            self.ui.modelPathLineEdit.currentPath = p.modelPath
        if self.ui.calibratedModelPathLineEdit.currentPath != p.calibratedModelPath:
            self.ui.calibratedModelPathLineEdit.currentPath = p.calibratedModelPath
        if self.ui.adaptedModelPathLineEdit.currentPath != p.adaptedModelPath:
            self.ui.adaptedModelPathLineEdit.currentPath = p.adaptedModelPath
        self._showBrainMaskSegment()
        self._refresh()

    @staticmethod
    def _scoreTypeChoices(settings: Optional[ModelSettings]) -> Dict[str, str]:
        """The score type combo box's items: the model's own first, naming its type (the chosen model's)."""
        names = scoreTypeNames()
        if settings is not None:
            own = names[settings.header.score_options.score_type]
            names[MODEL_SCORE_TYPE] = _("Model's default: {name}").format(name=own)
        return names

    @staticmethod
    def _showChoices(combo, names: Optional[Dict[str, str]], value: str) -> None:
        """Show ``value`` in a hand-bound combo box (``names``: new items, or None to keep them)."""
        wasBlocked = combo.blockSignals(True)
        if names is not None and [(combo.itemData(i), combo.itemText(i)) for i in range(combo.count)] != list(
                names.items()):
            combo.clear()
            for itemValue, name in names.items():
                combo.addItem(name, itemValue)
        combo.currentIndex = combo.findData(value)
        combo.blockSignals(wasBlocked)

    def _showBrainMaskSegment(self) -> None:
        """The segment selector follows the parameter node (segmentation and stored segment)."""
        p = self._parameterNode
        selector = self.ui.brainMaskSegmentSelector
        segmentation = p.brainMask if isinstance(p.brainMask, vtkMRMLSegmentationNode) else None
        stored = p.brainMaskSegmentId
        if segmentation is not None and stored and segmentation.GetSegmentation().GetSegment(stored) is None:
            stored = ""  # a segment of another segmentation: take the one the selector shows
        wasBlocked = selector.blockSignals(True)
        if selector.currentNode() != segmentation:
            selector.setCurrentNode(segmentation)
        if segmentation is not None and stored and selector.currentSegmentID() != stored:
            selector.setCurrentSegmentID(stored)
        selector.blockSignals(wasBlocked)
        selector.enabled = segmentation is not None and not self.state.busy
        shown = selector.currentSegmentID() if segmentation is not None else ""
        if shown and shown != p.brainMaskSegmentId:
            p.brainMaskSegmentId = shown  # store what the selector shows

    def onBrainMaskSegmentChanged(self, segmentId: str) -> None:
        self._setParameter("brainMaskSegmentId", segmentId)

    def _refresh(self) -> None:
        """Enable and label everything from the state machine and the parameter node."""
        from CeVAEAnomalyLib.slicer.adapt_panel import calibrate_problem, calibrate_warning

        p = self._parameterNode
        self.state.set_ready(DETECT, p is not None and p.inputVolume is not None)
        healthy = self._healthyVolumes(CALIBRATE)
        calibrateProblem = (calibrate_problem(len(healthy), p.calibratedModelPath, self._currentModel())
                            if p is not None else "")
        calibrateWarning = calibrate_warning(p.inputVolume, healthy) if p is not None else ""
        self.state.set_ready(CALIBRATE, calibrateProblem is None)
        adaptChoice = self._adaptChoice()
        self.state.set_ready(ADAPT, adaptChoice is not None and adaptChoice.ready)
        self.ui.adaptEstimateLabel.text = adaptChoice.message if adaptChoice is not None else ""
        view = self.state.view()
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.calibrationHelpLabel,
                       self.ui.healthyVolumesSelector, self.ui.healthyMasksSelector,
                       self.ui.calibratedModelPathLineEdit, self.ui.adaptHelpLabel, self.ui.adaptVolumesSelector,
                       self.ui.adaptMasksSelector, self.ui.adaptedModelPathLineEdit):
            widget.enabled = view.settings_enabled
        self.ui.resultsCollapsibleButton.enabled = view.results_enabled
        self.ui.applyButton.enabled = view.detect_enabled
        self.ui.applyButton.text = self._buttonText(view.detect_cancels, view.cancelling, _("Apply"))
        busy = _("Another task is running; wait for it to end, or cancel it.")
        # (plain_tooltip: Qt wraps only a rich-text tooltip; Calibrate's reasons run to hundreds of characters)
        self.ui.applyButton.toolTip = plain_tooltip(_("Stop the detection.") if view.detect_cancels else
                                                    _("Detect anomalies in the input volume.") if view.detect_enabled
                                                    else busy if view.busy_with else _("Select an input volume."))
        calibrateTip = (_("Stop the calibration.") if view.calibrate_cancels else
                        busy if view.busy_with else calibrateProblem or calibrateWarning or
                        _("Recalibrate the current model on the chosen healthy volumes."))
        self.ui.calibrateButton.toolTip = plain_tooltip(calibrateTip)
        self.ui.calibrateButton.enabled = view.calibrate_enabled
        self.ui.calibrateButton.text = self._buttonText(view.calibrate_cancels, view.cancelling, _("Calibrate"))
        adaptTip = (_("Stop the adaptation.") if view.adapt_cancels else busy if view.busy_with else
                    _("Fine-tune and calibrate the current model on the chosen healthy volumes."))
        self.ui.adaptButton.toolTip = plain_tooltip(adaptTip)  # (what is missing: the text above it)
        self.ui.adaptButton.enabled = view.adapt_enabled
        self.ui.adaptButton.text = self._buttonText(view.adapt_cancels, view.cancelling, _("Adapt"))
        self.ui.progressBar.visible = view.progress_visible
        if p is not None:
            self.ui.modelPathLineEdit.enabled = view.settings_enabled and not p.useBundledModel
            sharing = self._modelSharing()
            self.ui.shareModelButton.enabled = sharing.problem is None
            self.ui.shareModelButton.toolTip = plain_tooltip(sharing.tooltip)
            self.ui.falsePositiveRateSpinBox.enabled = p.sensitivity == SENSITIVITY_FPR
            self.ui.thresholdSpinBox.enabled = p.sensitivity == SENSITIVITY_THRESHOLD
            for widget in (self.ui.rimSpinBox, self.ui.medianRadiusSpinBox, self.ui.minVolumeSpinBox,
                           self.ui.minPeakSpinBox):
                widget.enabled = p.overridePostprocess
        self._updateResultsGui()

    @staticmethod
    def _buttonText(cancels: bool, cancelling: bool, idleText: str) -> str:
        if not cancels:
            return idleText
        return _("Cancelling...") if cancelling else _("Cancel")

    # --- running ----------------------------------------------------------------------------------

    def _onTaskButton(self, task: str) -> None:
        """Apply / Calibrate: start the task, or cancel it if it is the one running."""
        action = self.state.click(task)
        if action is Action.CANCEL:
            self._stopJob(_("Cancelled; the scene is unchanged."))
            self._followHeldFrame()
        elif action is Action.START:
            self._start(task)
        self._refresh()

    @staticmethod
    def _failureText(task: str) -> str:
        return {DETECT: _("Anomaly detection failed."), CALIBRATE: _("Calibration failed."),
                ADAPT: _("Adapting the model failed.")}[task]

    def _start(self, task: str) -> None:
        with slicer.util.tryWithErrorDisplay(self._failureText(task), waitCursor=True):
            try:
                if task != DETECT and not self._inputAcceptedAsHealthy(task):
                    return
                if not self._ensureDependencies(task):
                    return
                starts = {DETECT: self._startDetection, CALIBRATE: self._startCalibration,
                          ADAPT: self._startAdaptation}
                job = starts[task]()
                if job is None:  # the user kept an earlier run's files: nothing starts, and nothing failed
                    return
                self.state.started(task)
                if task == DETECT:
                    self._frames.hold()  # the output fields stay the nodes it writes (nodes.FrameWatch)
                self._job = job
                self.ui.statusLabel.text = ""
                self.ui.progressBar.value = 0
                self.ui.progressBar.format = _("Starting: %p%")
                self._timer.start()
            finally:
                if self.state.phase is Phase.INSTALLING:
                    self.state.end_install()
                self._refresh()

    def _healthyVolumes(self, task: str) -> list:
        """The volumes checked as healthy for ``task`` (CALIBRATE or ADAPT)."""
        selector = self.ui.healthyVolumesSelector if task == CALIBRATE else self.ui.adaptVolumesSelector
        return list(selector.checkedNodes())

    def _inputAcceptedAsHealthy(self, task: str) -> bool:
        """Before a calibration or adaptation: the input volume (the scan being examined) checked as a healthy volume
        is used only when the user confirms it (adapt_panel.examined_as_healthy; testing mode refuses it), and so are
        healthy volumes of different acquisitions for a calibration (adapt_panel.calibrate_warning; Adapt's estimate
        says that before it is pressed). False if declined: nothing starts, and the status line says why."""
        from CeVAEAnomalyLib.slicer.adapt_panel import calibrate_warning, examined_as_healthy

        p, volumes = self._parameterNode, self._healthyVolumes(task)
        warning = (calibrate_warning(p.inputVolume, volumes) if task == CALIBRATE else
                   examined_as_healthy(p.inputVolume, volumes, task))
        if not warning:
            return True
        if slicer.app.testingEnabled():
            raise CeVAEError(warning)
        if self._confirm(warning + "\n\n" + _("Go on with these healthy volumes?"),
                         windowTitle=_("Calibrate") if task == CALIBRATE else _("Adapt")):
            return True
        self.ui.statusLabel.text = warning
        return False

    def _workerArguments(self) -> dict:
        """How the logic starts its worker inside Slicer: ``PythonSlicer`` in Slicer's start-up environment
        (as ``slicer.util.launchConsoleProcess`` does), but in a process group of its own and with a byte
        pipe (``jobs.launch_process``), so that Cancel ends the launcher and the real interpreter."""
        from CeVAEAnomalyLib.slicer.jobs import launch_process

        environment = slicer.util.startupEnvironment()
        return dict(launch=lambda args: launch_process(args, environment),
                    python=shutil.which("PythonSlicer") or sys.executable)

    def _startDetection(self):
        from CeVAEAnomalyLib.slicer.mrml import OutputNodes
        from CeVAEAnomalyLib.slicer.settings import chosen_model, detection_request

        p = self._parameterNode
        request = detection_request(p, chosen_model(p))  # a model that cannot be used: its problem, named
        outputs = OutputNodes(score=p.scoreVolume, segmentation=p.anomalySegmentation,
                              labelmap=p.anomalyLabelmap, components=p.componentTable)
        return self.logic.startDetection(**request, outputs=outputs, createLabelmap=False, show3D=p.show3D,
                                         **self._workerArguments())

    def _startCalibration(self):
        from CeVAEAnomalyLib.slicer.nodes import pair_masks
        from CeVAEAnomalyLib.slicer.settings import model_path, override_postprocess

        p = self._parameterNode
        volumes = self._healthyVolumes(CALIBRATE)
        masks = pair_masks(volumes, list(self.ui.healthyMasksSelector.checkedNodes()))
        outputPath = typed_path(p.calibratedModelPath)
        overwrite = False
        if outputPath.exists():
            kept = _("{path} exists; choose another file name for the calibrated model.").format(path=outputPath)
            if slicer.app.testingEnabled():
                raise CeVAEError(kept)
            if not self._confirm(_("{path} exists. Replace it?").format(path=outputPath), windowTitle=_("Calibrate")):
                self.ui.statusLabel.text = kept  # declined: nothing starts, and nothing failed
                return None
            overwrite = True
        return self.logic.startCalibration(volumes, masks, outputPath, modelPath=model_path(p),
                                           postprocess=override_postprocess(p), device=p.device,
                                           overwrite=overwrite, thorough=p.thorough, **self._workerArguments())

    def _currentModel(self) -> Optional[Path]:
        """The model file detection uses now; None when none is chosen or the bundled one is missing (its own
        message comes from the model settings)."""
        from CeVAEAnomalyLib.data import default_model_path

        p = self._parameterNode
        if not p.useBundledModel:
            return typed_path(p.modelPath) if p.modelPath else None
        try:
            return default_model_path()
        except CeVAEError:
            return None

    def _modelSharing(self):
        """The Share model... action for the panel's model (share_panel.ModelSharing; the last one while unchanged)."""
        from CeVAEAnomalyLib.slicer.share_panel import ModelSharing

        self._sharing = ModelSharing.of_panel(self._parameterNode, self._modelSettings() is not None, self.state.task,
                                              self._sharing)
        return self._sharing

    def onShareModel(self) -> None:
        """Share model...: a copy of the chosen model without its scans' names, where the user chooses (beside it by
        default); written here, in the GUI thread: a copy of one file, done in a moment."""
        if self._parameterNode is None:
            return
        sharing = self._modelSharing()
        if sharing.problem is not None:
            return  # (the button is disabled, and its tooltip says why)
        output = self._askSharedModelPath(sharing.default_output())
        if not output:
            return  # the dialog was cancelled
        with slicer.util.tryWithErrorDisplay(_("Sharing the model failed."), waitCursor=True):
            # the save dialog asked before it returned an existing file; testing mode never asks, so never replaces
            self.ui.statusLabel.text = sharing.share(self.logic, output, replace=not slicer.app.testingEnabled())

    @staticmethod
    def _askSharedModelPath(default: Path) -> str:
        """Where to save the shareable copy: a save dialog that starts at ``default`` and asks before it returns an
        existing file; "" if cancelled. Testing mode asks nothing: ``default``."""
        if slicer.app.testingEnabled():
            return str(default)
        with CeVAEAnomalyWidget._normalCursor():
            return qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Share model"), str(default),
                                                  _("CeVAE model (*.cevae)"))

    def _adaptChoice(self):
        """The adapt section's state (ready, estimate or what is missing) from the panel; None without a parameter
        node."""
        from CeVAEAnomalyLib.slicer.adapt_panel import adapt_choice, examined_as_healthy
        from CeVAEAnomalyLib.slicer.settings import adapt_override_note

        p = self._parameterNode
        if p is None:
            return None
        volumes = self._healthyVolumes(ADAPT)
        return adapt_choice(len(volumes), p.adaptedModelPath, self._currentModel(), p.device,
                            names=[volume.GetName() for volume in volumes],
                            note=adapt_override_note(p, self._modelSettings()),
                            warning=examined_as_healthy(p.inputVolume, volumes, ADAPT),
                            device_name=deviceNames().get(p.device, ""),
                            spacings=[volume.GetSpacing() for volume in volumes])

    def _startAdaptation(self):
        from CeVAEAnomalyLib.slicer.nodes import pair_masks
        from CeVAEAnomalyLib.slicer.settings import model_path

        p = self._parameterNode
        volumes = self._healthyVolumes(ADAPT)
        masks = pair_masks(volumes, list(self.ui.adaptMasksSelector.checkedNodes()))
        choice = self._adaptChoice()
        if not choice.ready:
            raise CeVAEError(choice.message)
        overwrite = resume = False
        if choice.existing:
            names = ", ".join(path.name for path in choice.existing)
            kept = _("{names} exist; choose another file name for the adapted model.").format(names=names)
            if slicer.app.testingEnabled():
                raise CeVAEError(kept)
            if choice.resumable:  # an interrupted adaptation: go on from its checkpoints, or start anew
                answer = self._resumeOrReplace(names)
                if answer is None:
                    self.ui.statusLabel.text = kept  # declined: nothing starts, and nothing failed
                    return None
                resume, overwrite = answer, not answer
            elif self._confirm(_("An earlier run left {names}. Replace them?").format(names=names),
                               windowTitle=_("Adapt")):
                overwrite = True
            else:
                self.ui.statusLabel.text = kept
                return None
        return self.logic.startAdaptation(volumes, masks, typed_path(p.adaptedModelPath), modelPath=model_path(p),
                                          device=p.device, overwrite=overwrite,
                                          options={"resume": True} if resume else None, **self._workerArguments())

    @staticmethod
    def _resumeOrReplace(names: str) -> Optional[bool]:
        """Ask about an interrupted adaptation: True to resume it, False to start anew replacing its files, None to
        cancel."""
        buttons = qt.QMessageBox.Yes
        buttons |= qt.QMessageBox.No
        buttons |= qt.QMessageBox.Cancel
        with CeVAEAnomalyWidget._normalCursor():
            answer = slicer.util.messageBox(
                _("An earlier adaptation to this file was interrupted ({names}). Resume it from its checkpoints (Yes), "
                  "or start anew and replace them (No)?").format(names=names),
                windowTitle=_("Adapt"), standardButtons=buttons)
        return {qt.QMessageBox.Yes: True, qt.QMessageBox.No: False}.get(answer)

    def _onPoll(self) -> None:
        """Timer: take the worker's progress; when it has ended, load its results. Not while a scene closes (a
        calibration or adaptation goes on through it): its model goes to the next scene's parameter node."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        if slicer.mrmlScene.IsClosing():  # (another module's observer of the close may process events)
            return
        finished = job.poll()
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.progressBar.format = progress_format(job.message)
        if job.warnings:  # as they come: an adaptation's come before its first step, while stopping costs nothing
            self.ui.statusLabel.text = with_warnings("", job.warnings)
        if not finished:
            return
        self._timer.stop()
        self._job = None
        task = self.state.task
        wanted = self.state.finished()
        with slicer.util.tryWithErrorDisplay(self._failureText(task), waitCursor=True):
            try:
                if not wanted:
                    self.logic.discardJob(job)
                elif task == DETECT:
                    try:
                        self._showResult(self.logic.finishDetection(job))
                    except InputRemovedError as exc:  # nothing failed: said on the status line, not in a dialog
                        self.ui.statusLabel.text = one_line(exc)
                elif task == CALIBRATE:
                    self._useNewModel(job, self.ui.calibratedModelPathLineEdit,
                                      _("Calibrated model saved as {path}; it is now the model used for detection."))
                else:
                    self._useNewModel(job, self.ui.adaptedModelPathLineEdit,
                                      _("Adapted model saved as {path}; it is now the model used for detection."))
            finally:
                self._followHeldFrame()
                self.state.settled()  # a click that waited while the results were loaded was aimed at Cancel
                self._refresh()

    def _stopJob(self, message: str) -> None:
        """Stop the running job now (the state already says it is cancelled); stopping the worker's processes
        can take seconds, under a wait cursor."""
        from CeVAEAnomalyLib.slicer.adapt_panel import adaptation_stopped

        self._timer.stop()
        job, self._job = self._job, None
        if job is not None:
            with slicer.util.WaitCursor():
                self.logic.discardJob(job)
            if job.wrote_output:  # the cancel came after the worker's last write
                message = _("Cancelled after the run had written {path}: the model is complete but not in use; "
                            "choose it as the model to use it.").format(path=job.request["out"])
            elif job.request.get("task") == ADAPT:  # its checkpoints stay, to resume from
                message = " ".join((message, adaptation_stopped(job.request)))
            message = with_warnings(message, job.warnings)  # those shown while it ran (perhaps why it was stopped)
        self.state.finished()
        self.ui.statusLabel.text = message

    def _interrupt(self, sceneClosing: bool = False) -> None:
        """Reload, application exit: a running job is stopped and nothing is loaded; scene close (``sceneClosing``):
        the same for a detection, while a calibration or adaptation goes on (WidgetState.scene_closing)."""
        self._pendingDisplay = None
        if self.state.scene_closing() if sceneClosing else self.state.interrupt():
            self._stopJob(_("Stopped: the scene was closed or the module reloaded; nothing was changed."))
            self._frames.release()  # the panel is let go of, or its scene
            if sceneClosing:
                self.state.stopped_by_close(self.ui.statusLabel.text)  # said again in the next scene
        if hasattr(self, "ui"):
            self._refresh()

    @staticmethod
    @contextlib.contextmanager
    def _normalCursor() -> Iterator[None]:
        """A question asked in the block shows the normal cursor: a run is started under a wait cursor
        (tryWithErrorDisplay), which would cover the dialog; it is put back afterwards."""
        waiting = qt.QApplication.overrideCursor() is not None
        if waiting:
            qt.QApplication.restoreOverrideCursor()
        try:
            yield
        finally:
            if waiting:
                qt.QApplication.setOverrideCursor(qt.QCursor(qt.Qt.WaitCursor))

    @staticmethod
    def _confirm(text: str, windowTitle: str) -> bool:
        """OK/Cancel with the normal cursor."""
        with CeVAEAnomalyWidget._normalCursor():
            return slicer.util.confirmOkCancelDisplay(text, windowTitle=windowTitle)

    def _ensureDependencies(self, task: str) -> bool:
        """Before a run: offer to install torch and safetensors if they are missing or too old (the
        logic installs them). False if declined."""
        from CeVAEAnomalyLib.slicer.dependencies import unmet_message

        unmet = self.logic.unmetDependencies()
        if not unmet:
            return True
        if slicer.app.testingEnabled():
            raise CeVAEError(unmet_message(unmet) + " " + _("Install them before testing."))
        message = unmet_message(unmet) + "\n\n" + self.logic.describeInstall(unmet) + "\n\n" + _("Install them now?")
        if not self._confirm(message, windowTitle=_("Install dependencies")):
            return False
        self.state.begin_install(task)  # pip pumps Qt events: nothing may be clickable meanwhile
        self._refresh()
        self.ui.statusLabel.text = _("Installing {names}...").format(names=", ".join(u.spec for u in unmet))
        try:
            self.logic.installDependencies()
        except Exception as exc:  # the status line said "Installing ..." still
            self.ui.statusLabel.text = one_line(exc)
            raise
        if self.state.install_interrupted:  # the scene closed while pip ran: its inputs are gone
            self.ui.statusLabel.text = _("Dependencies installed; the scene was closed meanwhile, so nothing was "
                                         "started.")
            return False
        self.ui.statusLabel.text = ""
        return True

    # --- results ------------------------------------------------------------------------------

    def _showResult(self, result: CeVAEAnomalyResult) -> None:
        """The run's results fill the output fields; the views show them and go to the most anomalous place, unless the
        reader moved the sequence browser to another frame while it ran: the views stay there, and the status line
        says so (nodes.run_end_message). From then on the panel follows the browser again (nodes.FrameWatch)."""
        from CeVAEAnomalyLib.slicer.nodes import frame_note, result_elsewhere, run_end_message

        p = self._parameterNode
        elsewhere = result_elsewhere(p.inputVolume, result.volume, result.nodes.score)
        if elsewhere:  # the input changed during the run (a scene added, the console): it stays in the views
            self._hideModuleVolumes()
            self.ui.statusLabel.text = with_warnings(f"{result.summary} {elsewhere}", result.warnings)
            return
        self._frames.release()  # a move of the browser while it ran: said below
        self._frames.follow(result.nodes.score)  # first (also while the panel is hidden): these are the results shown
        self._loadedResult = result
        self.state.result_loaded(result.volume.GetID(), result.nodes.score.GetID())
        p.scoreVolume = result.nodes.score
        p.anomalySegmentation = result.nodes.segmentation
        p.componentTable = result.nodes.components
        if result.nodes.labelmap is not None:
            p.anomalyLabelmap = result.nodes.labelmap
        if not p.useBundledModel:
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
        self._rememberModel()
        self._updateResultsGui()
        self.ui.componentTableView.clearSelection()  # the rows are this result's now
        self._hideModuleVolumes()
        self.ui.statusLabel.text = run_end_message(result.nodes.score, result.summary, result.warnings)
        self._frameNote = frame_note(result.nodes.score)
        self.state.summary_shown(result.volume.GetID())
        self._pendingDisplay = None
        if self.state.show_result():
            self._display(result.nodes.score, result.volume)
        else:
            self._pendingDisplay = (result.nodes.score, result.volume)

    def _followResultsBrowser(self) -> bool:
        """Observe the sequence browser of the results in the panel's fields (nodes.FrameWatch; none while a scene is
        being loaded: at its end); when it is another one (results loaded with a scene, an input picked with earlier
        results), say what the views show of them now (:meth:`_onFrameChanged`). True if the fields switched."""
        if slicer.mrmlScene.IsImporting() or not self._frames.follow(self._parameterNode.scoreVolume):
            return False
        return self._onFrameChanged()

    def _onFrameChanged(self, said: str = "") -> bool:
        """The browser moved (or the panel's results came from another browser: nodes.FrameWatch): to a frame with
        results of its own, the panel's output fields (and the heat map, where the views showed the other frame's)
        switch to them (nodes.shown_frame_results), and the status line says that run's summary and warnings; else it
        says when the heat map lies over another frame than it scored, and the run's summary and warnings again once
        the scored frame is back (nodes.run_message), after ``said`` (what it said of a run's end). True if the fields
        switched."""
        from CeVAEAnomalyLib.slicer.nodes import frame_note, run_message, shown_frame_results, source_volume

        p = self._parameterNode
        if p is None:
            return False
        own = shown_frame_results(p.scoreVolume)
        if own is not None:
            with slicer.util.NodeModify(p.parameterNode):  # one update of the panel for all fields
                for field, node in own.fields.items():
                    setattr(p, field, node)
            if own.overlay:
                score = own.fields["scoreVolume"]
                self.logic.showResults(score, source_volume(score), p.overlayOpacity)
            self._frameNote = ""
            if not self.state.busy:
                self.ui.statusLabel.text = " ".join(text for text in (said, own.message) if text)
            return True
        note = frame_note(p.scoreVolume)
        if note != self._frameNote and not self.state.busy:
            self.ui.statusLabel.text = " ".join(text for text in (said, note or run_message(p.scoreVolume)) if text)
        self._frameNote = note
        return False

    def _followHeldFrame(self) -> None:
        """A detection ended without loading results (cancelled, failed): a move of the browser while it ran
        (nodes.FrameWatch.hold) is followed now, after what the status line says of its end."""
        if self._frames.release():
            self._onFrameChanged(said=self.ui.statusLabel.text)

    def _display(self, scoreVolume, volume) -> None:
        """The score overlay in the slice views, which jump to the most anomalous place; not where the sequence
        browser was moved to another frame than scored (by the reader, while the run went on or the panel was hidden):
        the views stay there."""
        from CeVAEAnomalyLib.slicer.nodes import off_scored_frame

        self._pendingDisplay = None
        if scoreVolume.GetScene() is None or volume.GetScene() is None or off_scored_frame(scoreVolume):
            return  # deleted meanwhile, or the reader looks at another frame
        self.logic.showResults(scoreVolume, volume, self._parameterNode.overlayOpacity)
        self.onJumpToTopSlice()

    def _useNewModel(self, job, pathLineEdit, message: str) -> None:
        """A calibration or adaptation finished: its model becomes the one used for detection, also by the scene
        opened after the one it started in was closed (its parameter node is bound first when the panel was not
        shown then: onSceneEndClose binds one only for a shown panel)."""
        try:
            job.raise_for_failure()
            path = job.done["model"]
        finally:
            job.cleanup()
        from CeVAEAnomalyLib.slicer.settings import after_new_model

        if self._parameterNode is None:
            self.initializeParameterNode()
        p = self._parameterNode
        sensitivity, said = after_new_model(p, ModelSettings.read(path), self._modelSettings())  # (before: in use)
        with slicer.util.NodeModify(p.parameterNode):  # one update of the panel for all three
            p.useBundledModel = False
            p.modelPath = path
            if sensitivity is not None:
                p.sensitivity = sensitivity
        self.ui.modelPathLineEdit.currentPath = path  # also when the panel was not shown (no GUI update then)
        if typed_path(pathLineEdit.currentPath) == Path(job.request["out"]):  # (a new scene's: its default path)
            pathLineEdit.addCurrentPathToHistory()
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        self._rememberModel()
        self.ui.statusLabel.text = with_warnings(" ".join([message.format(path=path), *([said] if said else [])]),
                                                 job.warnings)

    def _storedResult(self):
        from CeVAEAnomalyLib.slicer.nodes import stored_result

        return stored_result(self._parameterNode.scoreVolume) if self._parameterNode else None

    def _updateResultsGui(self) -> None:
        """The Results section follows the parameter node's output nodes (also after a scene reload)."""
        p = self._parameterNode
        stored = self._storedResult()
        table = p.componentTable if p else None
        shown = self.ui.componentTableView.mrmlTableNode()
        if (shown.GetID() if shown else None) != (table.GetID() if table else None):
            self.ui.componentTableView.setMRMLTableNode(table)  # (it emits selectionChanged even for the same node)
        self.ui.jumpToTopSliceButton.enabled = bool(stored and stored.jump_ras)
        self.ui.showPlotButton.enabled = bool(stored and stored.slice_chart)
        self.ui.opacitySliderWidget.enabled = bool(p and p.scoreVolume)
        problem = self._reportProblem()
        self.ui.saveReportButton.enabled = problem is None
        self.ui.saveReportButton.toolTip = plain_tooltip(problem or _(
            "Save the report of these results as one HTML page (summary, model, threshold, warnings, lesion and "
            "slice tables, key picture) to open in a browser, print and file."))

    def _reportProblem(self) -> Optional[str]:
        """Why Save report... is disabled now, or None (WidgetState.report_problem)."""
        p, result = self._parameterNode, self._loadedResult
        removed = result is not None and (result.volume.GetScene() is None or result.nodes.score is None
                                          or result.nodes.score.GetScene() is None)
        shown = (p.inputVolume, p.scoreVolume) if p is not None else (None, None)
        return self.state.report_problem(*(node.GetID() if node is not None else None for node in shown),
                                         removed=removed)

    def onSaveReport(self) -> None:
        """Save report...: the HTML report of the results shown (the logic's saveReport: the page of detect --report)
        where the user chooses, NAME_report.html in the last folder used by default; written here, in the GUI thread
        (one page and its picture, done in a moment)."""
        if self._reportProblem() is not None:
            return  # (the button is disabled, and its tooltip says why)
        result = self._loadedResult
        folder = self._reportFolder or Path(getattr(slicer.app, "defaultScenePath", "") or Path.home())
        chosen = self._askReportPath(report_default_path(folder, result.title))
        if not chosen:
            return  # the dialog was cancelled
        with slicer.util.tryWithErrorDisplay(_("Saving the report failed."), waitCursor=True):
            path, replace = report_output(chosen)
            self._reportFolder = path.parent
            if replace is None and not slicer.app.testingEnabled():  # ".html" added: the dialog asked of another name
                replace = self._confirm(_("{path} already exists. Replace it?").format(path=path), _("Save report"))
                if not replace:
                    return
            # the save dialog asked before it returned an existing file; testing mode never asks, so never replaces
            written = self.logic.saveReport(result, path, overwrite=bool(replace) and not slicer.app.testingEnabled())
            self.ui.statusLabel.text = _("Report saved as {path}.").format(path=written)

    @staticmethod
    def _askReportPath(default: Path) -> str:
        """Where to save the report: a save dialog that starts at ``default`` and asks before it returns an existing
        file; "" if cancelled. Testing mode asks nothing: ``default``."""
        if slicer.app.testingEnabled():
            return str(default)
        with CeVAEAnomalyWidget._normalCursor():
            return qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save report"), str(default),
                                                  _("HTML report (*.html *.htm)"))

    def _showRunOf(self, output) -> None:
        """Before a jump into a result: the slice views show its run's score volume over its input, unless one does
        already. After another scan's run they showed that scan under its heat map, and the jump to this scan's
        finding landed in the other scan's anatomy."""
        from CeVAEAnomalyLib.slicer.nodes import run_frame, show_scored_frame, shows_result, source_volume

        show_scored_frame(output)  # a sequence's input: the frame the results are of, under them
        volume, score = source_volume(output), run_frame(output)
        if volume is not None and score is not volume and not shows_result(slicer.mrmlScene, score, volume):
            self.logic.showResults(score, volume, self._parameterNode.overlayOpacity)

    def onJumpToTopSlice(self) -> None:
        stored = self._storedResult()
        if stored and stored.jump_ras:
            self._showRunOf(stored.score)
            self.logic.jumpToSlice(stored.jump_ras)

    def onShowPlot(self) -> None:
        stored = self._storedResult()
        if stored and stored.slice_chart:
            slicer.modules.plots.logic().ShowChartInLayout(stored.slice_chart)

    def onOpacityChanged(self, value: float) -> None:
        if self._parameterNode and self._parameterNode.scoreVolume:
            self.logic.setOverlayOpacity(self._parameterNode.scoreVolume, value)

    def onComponentClicked(self, index) -> None:
        """Jump the slice views to the highest-scoring voxel of the component whose row was clicked (again: jump
        again)."""
        from CeVAEAnomalyLib.slicer.nodes import COMPONENT_TABLE_ROLE, ROLE_ATTRIBUTE, component_position

        table = self.ui.componentTableView.mrmlTableNode()
        if table is None or not index.isValid() or table.GetAttribute(ROLE_ATTRIBUTE) != COMPONENT_TABLE_ROLE:
            return  # no table, or a table of something else picked as the output
        row = self.ui.componentTableView.sortFilterProxyModel().mapToSource(index).row()
        self._showRunOf(table)
        self.logic.jumpToSlice(component_position(table, row))


#
# CeVAEAnomalyTest
#


class CeVAEAnomalyTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer. The panel checks need no torch; each detection check skips itself without
    torch or safetensors (factory builds collect the ``test_*`` methods directly, not ``runTest``)."""

    DETECTION_TESTS = ("test_DetectOnSyntheticHead", "test_CancelLeavesSceneUnchanged", "test_ApplyRunsAWorker")

    def setUp(self):
        """A clear scene that starts with the bundled model, whatever model this computer's user chose last (set
        aside until the test's cleanups, so that the tests neither read nor change it)."""
        from CeVAEAnomalyLib.slicer.model_memory import set_aside

        self.addCleanup(set_aside(qt.QSettings()))
        slicer.mrmlScene.Clear()

    @staticmethod
    def _missingDependenciesMessage() -> Optional[str]:
        """Why the detection tests cannot run here (what to install), or None if they can."""
        from CeVAEAnomalyLib.slicer.dependencies import unmet_message

        unmet = CeVAEAnomalyLogic.unmetDependencies()
        if not unmet:
            return None
        return ("CeVAEAnomaly self-test SKIPPED: " + unmet_message(unmet) + " Install the PyTorch extension "
                "(Extensions Manager), then torch from its PyTorch Utils module, and run "
                "slicer.util.pip_install('safetensors>=0.4') in the Python console.")

    def _skipWithoutDependencies(self) -> None:
        message = self._missingDependenciesMessage()
        if message:
            logging.warning(message)
            self.skipTest(message)

    def runTest(self):
        try:
            self.setUp()
            self.test_PanelChoicesAndStates()
            self.setUp()
            self.test_SampleData()
            message = self._missingDependenciesMessage()
            if message:
                logging.warning(message)
                self.delayDisplay(message)
                return
            for name in self.DETECTION_TESTS:
                self.setUp()
                getattr(self, name)()
        finally:
            self.doCleanups()  # (unittest runs them after each test; "Reload and Test" calls runTest alone)

    def test_SampleData(self):
        """Each sample loads from the package through the Sample Data module's logic under its node name, the
        lesions' truth as a labelmap on the lesioned scan's grid (no torch needed; skipped in a Slicer without that
        module)."""
        try:
            import SampleData
        except ImportError:
            self.skipTest("no Sample Data module in this Slicer")
        registerSampleData()
        nodes = []
        for source in sample_sources():
            node = SampleData.SampleDataLogic().downloadSample(source["sampleName"])
            labelmap = source.get("loadFileProperties", {}).get("labelmap", False)
            self.assertTrue(node.IsA("vtkMRMLScalarVolumeNode"))
            self.assertEqual(node.IsA("vtkMRMLLabelMapVolumeNode"), labelmap)
            self.assertEqual(node.GetName(), source["nodeNames"])
            self.assertIsNone(node.GetStorageNode())
            nodes.append(node)
        scan, truth = nodes[:2]
        self.assertEqual(truth.GetImageData().GetDimensions(), scan.GetImageData().GetDimensions())
        self.assertEqual(slicer.util.arrayFromVolume(truth).max(), 1)

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

    def test_PanelChoicesAndStates(self):
        self.delayDisplay("Module panel: choices, Apply state")
        widget = slicer.util.getModuleWidget("CeVAEAnomaly")
        widget.initializeParameterNode()
        p = widget._parameterNode
        self.assertTrue(p.useBundledModel)  # (setUp): compared with the bundled model's settings below
        self.assertFalse(widget.ui.applyButton.enabled)
        volume, _mask, _lesion = self._syntheticHead()
        p.inputVolume = volume
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertEqual(p.scoreType, MODEL_SCORE_TYPE)  # the model's own until the user picks one
        self.assertEqual(widget.ui.scoreTypeComboBox.currentData, p.scoreType)
        own = scoreTypeNames()[ModelSettings.read().header.score_options.score_type]
        self.assertIn(own, widget.ui.scoreTypeComboBox.currentText)
        widget.ui.scoreTypeComboBox.currentIndex = widget.ui.scoreTypeComboBox.findData("rec")
        self.assertEqual(p.scoreType, "rec")
        settings = ModelSettings.read()
        self.assertEqual(widget.ui.sensitivityComboBox.count, len(settings.sensitivities("rec")))
        self.assertEqual(p.rimMm, settings.postprocess["rim_mm"])  # override fields start from the model
        self.assertAlmostEqual(p.falsePositiveRate, settings.default_fpr)
        self.assertLess(widget.ui.thresholdSpinBox.maximum, float("inf"))
        self.assertFalse(widget.ui.adaptButton.enabled)  # no healthy volumes chosen: it says what is missing
        self.assertIn("at least 2", widget.ui.adaptEstimateLabel.text)
        self.delayDisplay("Panel test passed")

    def test_DetectOnSyntheticHead(self):
        self._skipWithoutDependencies()
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
        self._skipWithoutDependencies()
        from CeVAEAnomalyLib.progress import Cancelled
        from CeVAEAnomalyLib.slicer.nodes import node_ids

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

    def _waitForWorker(self, widget, timeoutS: float = 300.0) -> None:
        import time

        deadline = time.monotonic() + timeoutS
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, "the worker did not finish")
            slicer.app.processEvents()
            time.sleep(0.05)

    def test_ApplyRunsAWorker(self):
        self._skipWithoutDependencies()
        import time

        from CeVAEAnomalyLib.slicer.nodes import node_ids

        self.delayDisplay("Apply runs the detection in a worker process; a later click cancels it")
        widget = slicer.util.getModuleWidget("CeVAEAnomaly")
        widget.initializeParameterNode()
        p = widget._parameterNode
        volume, mask, _lesion = self._syntheticHead()
        p.inputVolume, p.brainMask, p.device = volume, mask, "cpu"
        before = node_ids(slicer.mrmlScene)
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()  # the second click of a double click: the run goes on
        self.assertIsNotNone(widget._job)
        time.sleep(0.6)
        widget.ui.applyButton.click()  # Cancel: stops it, starts nothing
        self.assertIsNone(widget._job)
        self.assertEqual(node_ids(slicer.mrmlScene), before)
        widget.ui.applyButton.click()  # a late click just after the end was aimed at Cancel: ignored
        self.assertIsNone(widget._job)
        time.sleep(0.6)
        widget.ui.applyButton.click()
        widget.exit()  # switching to another module keeps the run going
        self.assertIsNotNone(widget._job)
        self._waitForWorker(widget)
        widget.enter()
        self.assertIsNotNone(p.scoreVolume)
        self.assertTrue(widget.ui.jumpToTopSliceButton.enabled)
        self.assertTrue(widget.ui.saveReportButton.enabled)
        widget._reportFolder = Path(tempfile.mkdtemp())
        widget.ui.saveReportButton.click()  # testing mode: NAME_report.html there, no dialog
        self.assertEqual([f.suffix for f in widget._reportFolder.iterdir()], [".html"])
        shutil.rmtree(widget._reportFolder)
        self.delayDisplay("Worker test passed")
