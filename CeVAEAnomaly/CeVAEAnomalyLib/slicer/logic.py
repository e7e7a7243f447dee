"""The module logic: MRML nodes in, detection through the core engine, MRML nodes out.

Runs inside Slicer (where it is the module's ``ScriptedLoadableModuleLogic``) and on
``slicer-core`` without Qt. Importing this file imports neither torch nor SimpleITK.

Two ways to run a detection:

- :meth:`CeVAEAnomalyLogic.process` runs in this process and returns when done (console, scripts)::

      from CeVAEAnomaly import CeVAEAnomalyLogic
      result = CeVAEAnomalyLogic().process(slicer.util.getNode("MRHead"))
      print(result.summary)

- :meth:`CeVAEAnomalyLogic.startDetection` starts a worker process and returns a job at once;
  poll it (the module does, from a timer), then :meth:`finishDetection` loads its results into
  the scene. :meth:`startCalibration` recalibrates a model on healthy volumes the same way, and
  :meth:`startAdaptation` fine-tunes one on them (adapting it to a scanner). :meth:`shareModel` writes a copy of a
  model without the names of the scans it was made from, to share it. :meth:`saveReport` writes a result's HTML
  report (the page of ``detect --report``). :meth:`stopAllJobs` stops every worker
  job still running, whichever logic started it (Slicer calls it as it quits).

Each checks first that torch and safetensors are installed and recent enough
(:meth:`CeVAEAnomalyLogic.checkDependencies`); :meth:`CeVAEAnomalyLogic.installDependencies`
installs them (the module's Apply offers it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import numbers
import os
import re
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import slicer

from ..errors import CeVAEError
from ..options import THOROUGH_STEPS, DetectionRequest, PostprocessOptions, ScoreOptions, check_calibratable
from ..progress import Cancelled, ProgressCallback, checked, report, scaled
from . import dependencies
from .gui_binding import typed_path
from .jobs import JOB_FOLDER_PREFIX, JobState, Launcher, Name, RunningJobs, WorkerJob, remove_abandoned_job_folders

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ..engine.bundle import Bundle
    from ..result import DetectionResult
    from ..training.adapt_plan import AdaptOptions
    from .mrml import OutputNodes
    from .nodes import SequenceFrame

try:  # inside Slicer; slicer-core has no Qt and no ScriptedLoadableModule
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:
    _LogicBase = object

log = logging.getLogger(__name__)
SCENE_CLOSED = "Stopped: the scene was closed."  # a detection's job.message once its scene closed (_stopWithScene)
INPUT_REMOVED = "Stopped: the input volume '{name}' was removed from the scene."  # job.message then (_stopWithScene)
FILE_STEM_MAX = 48  # characters of a node's name in its worker copy's file name (numbered, so they stay distinct)


class InputRemovedError(CeVAEError):
    """The input volume was removed from the scene while its detection ran, or its scene was closed before the results
    were loaded: its results, with no scan to lie on, were discarded. Nothing failed: the module says so on its status
    line, not in an error dialog."""


@dataclass(repr=False)
class CeVAEAnomalyResult:
    """What a detection produced: the nodes and the raw detection."""

    volume: slicer.vtkMRMLScalarVolumeNode
    nodes: "OutputNodes"
    detection: "DetectionResult"
    warnings: Tuple[str, ...] = ()  # what the detection warned of (a poor automatic mask, a CPU fallback, ...)
    frame: Optional["SequenceFrame"] = None  # the sequence frame scored, where a sequence browser drives the volume

    @property
    def topSliceRas(self) -> Optional[Tuple[float, float, float]]:
        """Where "jump to the most anomalous" goes, in world RAS: the top component's highest-scoring voxel (a
        point in it, as its table row) when the labelmap has one, else the highest-scoring voxel of the most
        anomalous slice (DetectionResult.top_slice; its centre if it scores nothing); read where the score volume
        lies now, or the input if it was deleted (nodes.run_frame: a deleted node has no transform)."""
        import numpy as np
        import SimpleITK as sitk

        from .mrml import peak_ras
        from .nodes import ijk_to_ras, slice_center_ras, slice_peak_ijk, to_world

        score = self.nodes.score
        kept = score is not None and score.GetScene() is not None and score.GetImageData() is not None
        frame = score if kept else self.volume
        if self.detection.components:
            return to_world(frame, peak_ras(frame, self.detection)[0])
        top = self.detection.top_slice
        if top is None:
            return None
        peak = slice_peak_ijk(sitk.GetArrayViewFromImage(self.detection.score), top.axis, top.index)
        if peak is None:
            return slice_center_ras(frame, top.axis, top.index)
        return to_world(frame, (ijk_to_ras(frame) @ np.array([*peak, 1.0]))[:3])

    @property
    def title(self) -> str:
        """The input as the report names it: its volume node's name, with the sequence frame scored as the result's
        nodes name it (e.g. "cine (frame 3)")."""
        return self.volume.GetName() + (f" (frame {self.frame.item + 1})" if self.frame is not None else "")

    @property
    def summary(self) -> str:
        """One line: components, flagged volume, the first component's volume and side (result.components_summary),
        and the threshold with its source; the sequence frame scored."""
        from ..result import components_summary

        d = self.detection
        scored = f" Scored {self.frame.label}." if self.frame is not None else ""
        return f"{components_summary(d.components)}; threshold {d.threshold:.4g} ({d.threshold_source}).{scored}"

    @property
    def message(self) -> str:
        """What the panel's status line shows: the summary, then each warning of the run once."""
        from .widget_state import with_warnings

        return with_warnings(self.summary, self.warnings)

    def __repr__(self) -> str:  # at the console: one line, not every slice row of the detection
        return f"<CeVAEAnomalyResult of '{self.volume.GetName()}': {self.summary}>"


@dataclass
class _DetectionTarget:
    """Where a worker's detection goes when it is loaded back."""

    volume: slicer.vtkMRMLScalarVolumeNode
    outputs: Optional["OutputNodes"]
    createLabelmap: bool
    show3D: bool
    state: Tuple  # the volume's grid and voxels when the job started (_state)
    mask: Optional[slicer.vtkMRMLNode] = None  # the brain mask node it used (None: the automatic one)
    latest: Optional[str] = None  # the run stamp of the input's latest results (of its frame) when the job started
    frame: Optional["SequenceFrame"] = None  # the sequence frame the input showed when the job started
    sceneClosed: bool = False  # the input's scene closed before the results were loaded (_stopWithScene)
    inputRemoved: bool = False  # the input was removed from its scene before the results were loaded (_stopWithScene)
    said: Tuple[str, ...] = ()  # warnings logged as the job's inputs were read in this process (a mask's transform)
    unwatch: Callable[[], Any] = dataclasses.field(init=False)  # stops watching the scene (set by startDetection)

    def outputs_now(self) -> Tuple[Optional["OutputNodes"], bool]:
        """The nodes to load into, and whether to make new ones: without a chosen score volume, a job updates the
        results that were the input's latest (on a sequence, its frame's) when it started; if another run has filled
        or made the latest ones since, those are left alone (the job updates its start's, or gets nodes of its
        own)."""
        from .mrml import OutputNodes
        from .nodes import SCORE_ROLE, find_output

        scene = self.volume.GetScene()
        if (self.outputs is not None and self.outputs.score is not None) or scene is None:  # (removed: refused later)
            return self.outputs, False
        newest = _latestRun(scene, self.volume, self.frame)
        if newest is None or newest == self.latest:
            return self.outputs, False
        started = None if self.latest is None else find_output(scene, "vtkMRMLScalarVolumeNode", SCORE_ROLE,
                                                                self.volume, self.latest, exact=True)
        return dataclasses.replace(self.outputs or OutputNodes(), score=started), started is None


def _latestRun(scene: slicer.vtkMRMLScene, volumeNode, frame: Optional["SequenceFrame"]) -> Optional[str]:
    """The run stamp of ``volumeNode``'s latest results, of those that scored ``frame`` where a sequence browser drives
    it (another frame's are never updated: mrml._run_to_update); None if there are none."""
    from .nodes import RUN_ATTRIBUTE, SCORE_ROLE, find_output, frame_run

    if frame is not None:
        return frame_run(scene, volumeNode, frame)
    latest = find_output(scene, "vtkMRMLScalarVolumeNode", SCORE_ROLE, volumeNode)
    return None if latest is None else latest.GetAttribute(RUN_ATTRIBUTE)


def _state(volumeNode) -> Tuple:
    """The volume's voxel grid (dimensions and IJK-to-RAS matrix) and a digest of its voxels. A parent transform
    set meanwhile is fine: the outputs are put under the input's transform when they are loaded; hardening one
    changes the matrix, showing another frame of a sequence or editing the voxels changes the digest."""
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    data = volumeNode.GetImageData()
    scalars = None if data is None else data.GetPointData().GetScalars()
    digest = None if scalars is None else hashlib.blake2b(
        memoryview(np.ascontiguousarray(numpy_support.vtk_to_numpy(scalars))), digest_size=16).hexdigest()
    return (None if data is None else tuple(data.GetDimensions()),
            tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)), digest)


def _refuseChanged(volumeNode, before: Tuple, frame: Optional["SequenceFrame"] = None) -> None:
    """Refuse to load results onto an input whose grid or voxels are no longer those the detection read; of a
    sequence's ``frame`` (the one read), those the sequence keeps for it, whichever frame the browser shows now. The
    message says what changed: its voxels cleared, its size, its geometry (origin, spacing, orientation), its voxels."""
    from .nodes import read_frame_node

    now, name = _state(read_frame_node(volumeNode, frame)), volumeNode.GetName()
    if now[2] is None or 0 in (now[0] or (0,)):
        raise CeVAEError(f"The voxels of the input volume '{name}' were cleared (its image data removed) while the "
                         "detection ran; its results have no scan to lie on. Run the detection again.")
    if now[0] != before[0]:
        raise CeVAEError(f"The input volume '{name}' changed size while the detection ran, from {_voxels(before[0])} "
                         f"to {_voxels(now[0])} voxels (cropped or resampled); its results would not lie on it. Run "
                         "the detection again.")
    if now[1] != before[1]:
        raise CeVAEError(f"The input volume '{name}' was moved while the detection ran: its origin, spacing or "
                         "orientation changed (a transform hardened?); its results would not lie on it. Run the "
                         "detection again.")
    if now[2] != before[2]:
        raise CeVAEError(f"The voxels of the input volume '{name}' changed while the detection ran "
                         "(an edit, or another image put into it); its results belong to the voxels it read. "
                         "Run the detection again.")


def _voxels(dimensions: Tuple[int, ...]) -> str:
    """A grid's dimensions in words: "40x44x36"."""
    return "x".join(str(d) for d in dimensions)


class CeVAEAnomalyLogic(_LogicBase):
    """Anomaly detection on volume nodes. Results go to the input node's scene; ``scene``, if given, must be it."""

    def __init__(self, scene: Optional[slicer.vtkMRMLScene] = None) -> None:
        _LogicBase.__init__(self)
        self.scene = scene
        self._bundle: Optional["Bundle"] = None
        self._bundleKey: Optional[Tuple[str, Tuple[int, ...], str]] = None
        self._targets: "weakref.WeakKeyDictionary[WorkerJob, _DetectionTarget]" = weakref.WeakKeyDictionary()
        self._closed: "weakref.WeakSet[WorkerJob]" = weakref.WeakSet()  # detections loaded or discarded

    def _sceneFor(self, volumeNode, what: str = "input volume") -> slicer.vtkMRMLScene:
        """The scene of the input (``what``: the node's role in messages), where the results go; the logic's own
        ``scene`` must be that one."""
        scene = volumeNode.GetScene()
        if scene is None:
            raise CeVAEError(f"The {what} '{volumeNode.GetName()}' is not in an MRML scene; add it to the "
                             "scene first (scene.AddNode).")
        if self.scene is not None and scene is not self.scene:
            raise CeVAEError(f"The {what} '{volumeNode.GetName()}' is in another scene than the one this "
                             "logic was made for; make the logic without scene= or with the volume's scene.")
        return scene

    # --- dependencies ---------------------------------------------------------------------------

    @staticmethod
    def unmetDependencies() -> List[dependencies.Unmet]:
        """The Python packages (torch, safetensors) that are missing or too old; checked without importing them."""
        return dependencies.unmet()

    def checkDependencies(self) -> None:
        """Raise a CeVAEError that names what is missing or too old and how to install it."""
        unmet = self.unmetDependencies()
        if unmet:
            raise CeVAEError(dependencies.unmet_message(unmet) + " " + _installAdvice(unmet))

    def installDependencies(self) -> None:
        """Install or upgrade what :meth:`unmetDependencies` lists, in the Slicer application: torch
        through the PyTorch extension (``PyTorchUtils``, which picks the CUDA build that matches the
        driver), or with pip if that extension is missing; the others with pip. Asks nothing: the
        caller confirms first. A one-line CeVAEError if an install fails (e.g. offline) or something is still
        unmet afterwards (:func:`~CeVAEAnomalyLib.slicer.dependencies.install`), and before installing anything if
        a package to upgrade is imported already (restart Slicer first)."""
        unmet = self.unmetDependencies()
        if not unmet:
            return
        if getattr(slicer, "app", None) is None:
            raise CeVAEError(dependencies.unmet_message(unmet) + " " + _installAdvice(unmet))
        dependencies.refuse_loaded_upgrades(unmet)
        dependencies.install(unmet, slicer.util.pip_install, _installTorch)

    @staticmethod
    def describeInstall(unmet: Sequence[dependencies.Unmet]) -> str:
        """What :meth:`installDependencies` would install for ``unmet``: which torch build and roughly how large.
        A CeVAEError instead where it would refuse a package imported already (before anything is asked)."""
        dependencies.refuse_loaded_upgrades(unmet)
        return dependencies.install_description(unmet)

    # --- models ---------------------------------------------------------------------------------

    def loadModel(self, modelPath: Union[str, Path, None] = None, device: str = "auto") -> "Bundle":
        """Load a model bundle (the bundled default if no path), reusing the last one while its file is the same and
        unwritten since (settings.file_stamp)."""
        from ..data import default_model_path
        from ..engine.bundle import load_bundle
        from ..engine.devices import resolve_device
        from .settings import file_stamp

        path = _modelFile(modelPath) or default_model_path()
        torchDevice = resolve_device(device)
        key = (str(path.resolve()), file_stamp(path), str(torchDevice))
        if key != self._bundleKey:
            self._bundle, self._bundleKey = load_bundle(path, torchDevice), key
        return self._bundle

    def shareModel(self, modelPath: Union[str, Path], outputPath: Union[str, Path], overwrite: bool = False) -> Path:
        """Write a copy of the model file ``modelPath`` to ``outputPath`` to share with another site: its records call
        the scans it was trained, adapted and calibrated on "scan 1", "scan 2", ... instead of by their volume or file
        names (which may hold a patient's name or ID); its weights and calibration are the model's, so it detects
        alike (engine/sharing.py). Runs here, without torch, in a moment; returns the copy's path."""
        from ..engine.sharing import share_model

        _refuseNonBoolean(overwrite=overwrite)
        source = _modelFile(modelPath)
        if source is None:
            raise CeVAEError("Choose the model file to share: the bundled model is shared already (it names only "
                             "public sample scans).")
        output = _typedPath(outputPath)
        _refuseOutput(output, [output], overwrite, "shareable")
        return share_model(source, output, overwrite)

    def _checkInputs(self, volumeNode, maskNode, outputs: Optional["OutputNodes"],
                     **flags: Any) -> slicer.vtkMRMLScene:
        """Refuse, before anything runs, what :func:`_refuseArguments` refuses and an input, mask or output node of
        another scene; the input's scene."""
        _refuseArguments(volumeNode, maskNode, outputs, **flags)
        scene = self._sceneFor(volumeNode)
        if maskNode is not None and maskNode.GetScene() is not scene:
            raise CeVAEError(f"The brain mask '{maskNode.GetName()}' is not in the input volume's scene.")
        _refuseOutputsElsewhere(scene, outputs)
        return scene

    @staticmethod
    def _inputImages(volumeNode, maskNode, maskSegmentId, what: str = "input volume",
                     shown: Optional[str] = None) -> Tuple["sitk.Image", Optional["sitk.Image"]]:
        """The images of ``volumeNode`` (``what``: its role, and ``shown``: its name as the panel shows it, default its
        node's, in messages) and of its brain mask (None: none)."""
        from ..io.images import check_volume
        from . import mrml

        if maskNode is None and maskSegmentId:  # not the automatic mask in silence
            raise CeVAEError(f"maskSegmentId '{maskSegmentId}' picks a segment of a brain mask segmentation, but no "
                             "brain mask (maskNode) was given; give the segmentation as maskNode, or no maskSegmentId "
                             "for the automatic mask.")
        name = volumeNode.GetName() if shown is None else shown
        image = check_volume(mrml.image_from_volume(volumeNode, what, name), f"volume '{name}'")
        mask = mrml.mask_image(maskNode, volumeNode, maskSegmentId, name) if maskNode is not None else None
        return image, mask

    def process(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode,
        maskNode: Optional[slicer.vtkMRMLNode] = None,
        request: Union[DetectionRequest, Mapping[str, Any], None] = None,
        modelPath: Union[str, Path, None] = None,
        maskSegmentId: Optional[str] = None,
        outputs: Optional["OutputNodes"] = None,
        createLabelmap: bool = False,
        show3D: bool = False,
        progress: Optional[ProgressCallback] = None,
        **options: Any,
    ) -> CeVAEAnomalyResult:
        """Detect anomalies in ``volumeNode`` in this process and create or update the result nodes.

        ``maskNode``: brain mask (labelmap, or segmentation with ``maskSegmentId`` or all its
        segments); computed automatically if None. ``request``: the detection's options (a
        :class:`~CeVAEAnomalyLib.options.DetectionRequest` or its ``to_dict()`` form; None: the model's own), with any
        detection option given by name in ``options`` on top, e.g. ``score_type="rec"``,
        ``fpr=0.01`` (healthy false-positive rate of the calibrated threshold), ``threshold=0.5``
        (an absolute one, which takes precedence over ``fpr``), ``rim_mm=2.0``, ``device="cpu"``,
        ``batch_size=16``. ``modelPath``: a ``.cevae`` bundle (None: the bundled default model).
        ``outputs``: existing nodes to update (a :class:`~CeVAEAnomalyLib.slicer.mrml.OutputNodes`).
        ``createLabelmap``: also make a labelmap volume; ``show3D``: show the segment in 3D.
        ``progress(fraction, message)`` may raise :class:`~CeVAEAnomalyLib.progress.Cancelled`.
        On any error or cancel, the scene's node set is left as it was. If the scene closes or the input is removed
        meanwhile (a callback that lets the GUI run), the run stops at its next report with an
        :class:`InputRemovedError` that says so.

        Returns a :class:`CeVAEAnomalyResult`: ``.nodes`` (``score``, ``segmentation``, ``labelmap``,
        ``components``, ``slice_table``, ``slice_chart``), ``.detection`` (the engine's result: threshold,
        components, slices, brain_mask, record), ``.summary`` (one line), ``.warnings`` (what the run warned of),
        ``.message`` (the summary and those warnings) and ``.topSliceRas``.
        """
        self.checkDependencies()  # before anything imports torch
        dependencies.refuse_replaced_while_loaded()  # one imported already runs here, with the files installed now
        from ..engine.detector import Detector
        from ..engine.devices import resolve_device
        from .nodes import mask_words, sequence_frame

        request = DetectionRequest.given(request, **options)
        checked(progress)
        scene = self._checkInputs(volumeNode, maskNode, outputs, createLabelmap=createLabelmap, show3D=show3D)
        with warningsLogged() as warnings, _closeWatched(scene, volumeNode) as refuseClosed:
            device = resolve_device(request.run.device)  # a missing GPU said (or its index refused) before the read
            request = dataclasses.replace(request, run=dataclasses.replace(request.run, device=str(device)))  # once
            watched = _untilClosed(progress, refuseClosed)  # the callback may run the GUI (a close, a deletion)
            report(watched, 0.0, "Reading the volume")
            state, frame = _state(volumeNode), sequence_frame(volumeNode)
            image, mask = self._inputImages(volumeNode, maskNode, maskSegmentId)
            report(watched, 0.02, "Loading the model")
            detector = Detector.from_request(self.loadModel(modelPath, request.run.device), request)
            detection = detector(image, mask, progress=scaled(watched, 0.05, 0.95))
            report(watched, 0.95, "Creating the result nodes")
            if volumeNode.GetScene() is not None:  # (a removed input is refused by publish)
                _refuseChanged(volumeNode, state, frame)  # a progress callback running the GUI lets the user change it
            result = self.publish(volumeNode, detection, outputs, createLabelmap, show3D, maskNode, frame=frame)
        said = _reworded(warnings, mask_words(maskNode, volumeNode))  # (a mask on another grid: both named)
        result = _recorded(dataclasses.replace(result, warnings=tuple(dict.fromkeys(said))))
        try:
            report(progress, 1.0, "Done")
        except Cancelled:  # too late to cancel: the results are in the scene, whole
            pass
        except Exception:  # a failing callback must not report a run whose results are in the scene as failed
            log.exception("CeVAEAnomaly: the progress callback failed at the end; the results are in the scene.")
        return result

    def publish(self, volumeNode, detection: "DetectionResult", outputs: Optional["OutputNodes"] = None,
                createLabelmap: bool = False, show3D: bool = False,
                maskNode: Optional[slicer.vtkMRMLNode] = None, newNodes: bool = False,
                frame: Optional["SequenceFrame"] = None) -> CeVAEAnomalyResult:
        """Create or update the result nodes of a detection of ``volumeNode`` (made with the brain mask ``maskNode``;
        None: the automatic one); ``newNodes``: make new ones, not update the latest run's, where ``outputs`` names
        no score volume; ``frame``: the sequence frame the detection read (nodes.sequence_frame), recorded. Refused in
        one line, as by :meth:`process`, for arguments that are not these (a CeVAEAnomalyResult as ``detection``: give
        its ``.detection``); a brain mask removed from the scene meanwhile is just not recorded."""
        from . import mrml

        _refuseNotDetection(detection)
        _refuseNotFrame(frame)
        _refuseArguments(volumeNode, maskNode, outputs, createLabelmap=createLabelmap, show3D=show3D,
                         newNodes=newNodes)
        if volumeNode.GetScene() is None:
            raise InputRemovedError(_inputRemovedMessage(volumeNode))
        scene = self._sceneFor(volumeNode)
        if maskNode is not None and maskNode.GetScene() not in (scene, None):
            raise CeVAEError(f"The brain mask '{maskNode.GetName()}' is not in the input volume's scene.")
        _refuseOutputsElsewhere(scene, outputs)
        made = mrml.publish(scene, volumeNode, detection, outputs, createLabelmap, show3D, maskNode, newNodes, frame)
        result = CeVAEAnomalyResult(volumeNode, made, detection, frame=frame)
        log.info("CeVAEAnomaly: %s", result.summary)
        return result

    # --- reports -----------------------------------------------------------------------------------

    def saveReport(self, result: CeVAEAnomalyResult, path: Union[str, "os.PathLike[str]"],
                   overwrite: bool = False) -> Path:
        """Write the HTML report of ``result`` (what :meth:`process` or :meth:`finishDetection` returned) to ``path``
        (``~`` expanded; a name ending .html or .htm) and return it: the page ``cevae-anomaly detect --report`` writes
        (report.py), one file to open, print and file. The input is named by its volume node's name (as the scene, the
        panel and the views show it: a volume from DICOM or made in Slicer has no file of its own, and a file's node is
        named by the file's name without its extension), with the sequence frame scored where a sequence browser drives
        it (:attr:`CeVAEAnomalyResult.title`; the frame in words among the facts). The warnings are those the module
        said of the run (``result.warnings``; the record's where it holds none). The key picture is embedded where the
        research extra (matplotlib) is installed, drawn from the input volume as ``detect --picture`` draws it; the page
        says otherwise. Written whole or not at all (io.atomic), its folder (and any above it) made if missing.
        Refused in one line, with nothing written: a name of another ending, an existing file without ``overwrite``, a
        result whose input or score volume was removed from the scene (or whose scene closed), a result with no record
        of how it was made (a run of a version before records), and, where the picture is drawn, an input volume whose
        voxels changed since the detection (the volume edited; on a sequence the frame scored is drawn, whichever frame
        is shown): the picture would show another scan."""
        from ..io.atomic import write_all
        from ..report import result_report_html
        from ..result import REPORT_OUTPUT, refuse_unwritable_names

        _refuseNotResult(result)
        _refuseNonBoolean(overwrite=overwrite)
        output = _typedPath(path)
        refuse_unwritable_names({REPORT_OUTPUT: output})
        volume, score, detection = result.volume, result.nodes.score, result.detection
        if volume.GetScene() is None:
            raise CeVAEError(f"The input volume '{volume.GetName()}' of this result was removed from the scene (or its "
                             "scene closed); its report cannot be saved. Run the detection again.")
        if score is None or score.GetScene() is None:
            raise CeVAEError(f"The results of '{volume.GetName()}' were removed from the scene (its score volume); "
                             "their report cannot be saved. Run the detection again.")
        if detection.record is None:
            raise CeVAEError(f"This result of '{volume.GetName()}' holds no record of how it was made (the model, "
                             "threshold and time a report names): it comes from an earlier version's run. Run the "
                             "detection again to save its report.")
        said = tuple(dict.fromkeys(result.warnings)) or detection.record.warnings
        detection = dataclasses.replace(detection, record=dataclasses.replace(detection.record, warnings=said))
        page = result_report_html(result.title, detection, self._reportPicture(result),
                                  result.frame.label if result.frame is not None else None)
        return write_all({output: page}, overwrite, command="saveReport")[0]

    def _reportPicture(self, result: CeVAEAnomalyResult) -> Optional[bytes]:
        """The key picture of ``result``'s report (report.report_picture: None without the research extra), drawn
        from its input volume (on a sequence, the frame scored, which the sequence keeps while another is shown),
        refused where that holds other voxels than the detection scored."""
        from ..io.checksum import image_voxel_sha256
        from ..io.images import same_grid
        from ..report import report_picture
        from ..result import PICTURE_MODULES
        from ..system import missing_modules
        from .nodes import read_frame_node

        if missing_modules(PICTURE_MODULES):
            return None
        detection = result.detection
        image = self._inputImages(read_frame_node(result.volume, result.frame), None, None,
                                  shown=result.volume.GetName())[0]
        digest = detection.record.image_voxels_sha256
        if not same_grid(image, detection.score) or (digest is not None and image_voxel_sha256(image) != digest):
            raise CeVAEError(f"The input volume '{result.volume.GetName()}' holds other voxels than this detection "
                             "scored (it was changed since, or the frame scored was removed from its sequence): the "
                             "report's picture would show another scan. Run the detection again.")
        return report_picture(image, detection, result.title)

    # --- in a worker process -------------------------------------------------------------------

    def startDetection(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode,
        maskNode: Optional[slicer.vtkMRMLNode] = None,
        request: Union[DetectionRequest, Mapping[str, Any], None] = None,
        modelPath: Union[str, Path, None] = None,
        maskSegmentId: Optional[str] = None,
        outputs: Optional["OutputNodes"] = None,
        createLabelmap: bool = False,
        show3D: bool = False,
        launch: Optional[Launcher] = None,
        python: Optional[str] = None,
        **options: Any,
    ) -> WorkerJob:
        """Start the detection :meth:`process` would do in a worker process; returns the running job.

        The input (and mask) are copied into a temporary folder first, so the scene may change
        while the job runs. ``launch(args)`` starts the process (default: ``jobs.launch_process``, in a
        process group of its own so that Cancel ends the whole tree), ``python`` is the interpreter
        (Slicer: ``PythonSlicer``). Closing the input's scene, or removing the input from it, stops the job and removes
        its copy of the scan.
        """
        from .nodes import sequence_frame

        self.checkDependencies()
        request = DetectionRequest.given(request, **options)
        self._checkInputs(volumeNode, maskNode, outputs, createLabelmap=createLabelmap, show3D=show3D)
        model = _modelFile(modelPath)  # said now, not by the worker after the copy
        state, frame = _state(volumeNode), sequence_frame(volumeNode)
        with warningsLogged() as said:  # (for the result, with the worker's)
            image, mask = self._inputImages(volumeNode, maskNode, maskSegmentId)
        folder = _jobFolder(JOB_FOLDER_PREFIX)
        try:
            _writeInputs(folder, "input", image, mask)
            task = dict(task="detect", image=str(folder / "input.nrrd"),
                        mask=str(folder / "input_mask.nrrd") if mask is not None else None,
                        model=_text(model), request=request.to_dict(), out_dir=str(folder))
            job = _held(WorkerJob(task, folder, launch, python,
                                  names=_detectionNames(folder, volumeNode, maskNode if mask is not None else None)))
        except BaseException:
            _removeFolder(folder)
            raise
        target = _DetectionTarget(volumeNode, outputs, createLabelmap, show3D, state, maskNode,
                                  _latestRun(volumeNode.GetScene(), volumeNode, frame), frame, said=tuple(said))
        target.unwatch = _stopWithScene(volumeNode.GetScene(), job, target)
        self._targets[job] = target
        return job

    def finishDetection(self, job: WorkerJob) -> CeVAEAnomalyResult:
        """Load a finished detection job's results into the scene and remove its temporary folder. Refused
        (nothing loaded) if the input volume's voxel grid changed while the job ran (resampled, a transform
        hardened): the results lie on the grid the job started from; if its temporary folder was removed meanwhile;
        and with an InputRemovedError if the input was removed, or its scene closed, before the results were
        loaded."""
        from ..result import load_result

        target = self._targets.get(job)
        if target is None:
            _refuseModelJob(job)
            if job in self._closed:
                raise CeVAEError("This detection's results were loaded or discarded already.")
            raise CeVAEError("This detection was not started by this CeVAEAnomalyLogic; finish it with the logic "
                             "whose startDetection returned it.")
        if not job.poll():
            raise CeVAEError("The detection is still running; call job.poll() until it returns True, then "
                             "finishDetection(job) (or discardJob(job) to stop it).")
        del self._targets[job]
        self._closed.add(job)
        target.unwatch()
        try:
            job.raise_for_failure()
            if target.sceneClosed:
                raise InputRemovedError(_sceneClosedMessage(target.volume))
            if target.inputRemoved or target.volume.GetScene() is None:
                raise InputRemovedError(_inputRemovedMessage(target.volume))
            if job.state is JobState.CANCELLED:
                raise CeVAEError("The detection was cancelled (job.cancel()); nothing was loaded.")
            if job.done is None:
                raise CeVAEError("The detection did not finish.")
            if target.volume.GetScene() is not None:
                _refuseChanged(target.volume, target.state, target.frame)
            if not job.folder.is_dir():  # (its worker had ended: nothing stopped it)
                raise CeVAEError(f"The run's temporary folder {job.folder} was removed after the detection finished "
                                 "(by a clean-up of temporary files?), before its results were loaded; nothing was "
                                 "loaded. Run it again.")
            outputs, new_nodes = target.outputs_now()
            with warningsLogged() as warnings:
                result = self.publish(target.volume, load_result(job.folder), outputs, target.createLabelmap,
                                      target.show3D, target.mask, new_nodes, target.frame)
            said = (*target.said, *job.warnings, *warnings)
            return _recorded(dataclasses.replace(result, warnings=tuple(dict.fromkeys(said))))
        finally:
            job.cleanup()

    @staticmethod
    def stopAllJobs() -> int:
        """Stop every worker job a CeVAEAnomalyLogic started (the panel's and the console's, of any logic) that still
        runs, as :meth:`discardJob` does, and remove its temporary folder; jobs that have ended are left as they are.
        Inside Slicer the application's exit (aboutToQuit) calls it. How many were stopped."""
        return _RUNNING.stop_all()

    def discardJob(self, job: WorkerJob) -> None:
        """Stop a job if it still runs and forget it (nothing is loaded)."""
        job.cancel()
        target = self._targets.pop(job, None)
        if target is not None:
            target.unwatch()
        self._closed.add(job)
        job.cleanup()

    def startCalibration(
        self,
        volumes: Sequence[slicer.vtkMRMLScalarVolumeNode],
        masks: Sequence[Optional[slicer.vtkMRMLNode]],
        outputPath: Union[str, Path],
        modelPath: Union[str, Path, None] = None,
        postprocess: Optional[Dict[str, Any]] = None,
        device: str = "auto",
        overwrite: bool = False,
        thorough: bool = False,
        launch: Optional[Launcher] = None,
        python: Optional[str] = None,
    ) -> WorkerJob:
        """Recalibrate a model on healthy volumes (``masks[i]``: brain mask of ``volumes[i]`` or None)
        in a worker process, writing a new bundle to ``outputPath``. ``job.done["model"]`` is its path.
        The model's default mode is calibrated, and with ``thorough`` the thorough mode too (each healthy
        volume is then scored a second time, with test-time adaptation)."""
        self.checkDependencies()
        _checkHealthy(volumes, masks)
        if not volumes:
            raise CeVAEError("Choose at least one healthy volume to calibrate on.")
        request = DetectionRequest.of(device=device, test_time_steps=THOROUGH_STEPS if thorough else None,
                                      **(postprocess or {}))  # refused before any copy
        check_calibratable(*request.options(ScoreOptions(), PostprocessOptions()))  # and values a model may not hold
        # said now, not by the worker after the copies
        model, output = _modelFile(modelPath), _typedPath(outputPath)
        _refuseOutput(output, [output], overwrite, "calibrated", model=model)
        return self._startOnHealthy("calibrate", volumes, masks, launch, python, model=_text(model),
                                    request=request.to_dict(), out=str(output), overwrite=bool(overwrite))

    def startAdaptation(
        self,
        volumes: Sequence[slicer.vtkMRMLScalarVolumeNode],
        masks: Sequence[Optional[slicer.vtkMRMLNode]],
        outputPath: Union[str, Path],
        modelPath: Union[str, Path, None] = None,
        device: str = "auto",
        overwrite: bool = False,
        options: Optional[Dict[str, Any]] = None,
        launch: Optional[Launcher] = None,
        python: Optional[str] = None,
    ) -> WorkerJob:
        """Fine-tune and calibrate a model on a site's healthy volumes (training/adapt.py) in a worker
        process, writing the adapted bundle to ``outputPath`` (its checkpoints and logs beside it).
        ``options``: AdaptOptions fields (steps, lr, ...). ``job.done["model"]`` is the bundle's path."""
        from ..training.adapt_plan import MIN_SCANS, adapt_options, earlier_outputs, resumable
        from .adapt_panel import node_person, persons_scanned

        self.checkDependencies()
        _checkHealthy(volumes, masks)
        if len(volumes) < MIN_SCANS:
            raise CeVAEError(f"Choose at least {MIN_SCANS} healthy volumes to adapt the model to.")
        DetectionRequest.of(device=device)  # the device's name, checked as everywhere
        checked = adapt_options(options or {}, device=device, overwrite=bool(overwrite))  # before any copy
        model, output = _modelFile(modelPath), _typedPath(outputPath)
        persons = persons_scanned([node_person(volume.GetName()) for volume in volumes])  # as the run counts them
        if persons < MIN_SCANS:
            raise CeVAEError(f"The volumes are scans of {persons} person (their names' sub-<label>); choose scans of "
                             f"at least {MIN_SCANS} persons: a person's scans are held out together.")
        earlier = earlier_outputs(output, persons, checked)
        interrupted = resumable(earlier)
        if checked.resume and not interrupted:
            raise CeVAEError(f"There is no interrupted adaptation to {output} to resume (no checkpoint of an "
                             "unfinished one exists); start it anew without resume.")
        if not checked.resume:
            _refuseOutput(output, earlier, overwrite, "adapted",
                          " (or options={'resume': True} to continue the adaptation that wrote them)"
                          if interrupted else "", model)
        return self._startOnHealthy("adapt", volumes, masks, launch, python,
                                    model=_text(model), device=device, out=str(output), overwrite=bool(overwrite),
                                    options=_requestOptions(checked, options or {}))

    def _startOnHealthy(self, task: str, volumes, masks, launch: Optional[Launcher], python: Optional[str],
                        **request: Any) -> WorkerJob:
        """A worker job of ``task`` on copies of healthy volumes and their masks (``request["subjects"]``, checked by
        :func:`_checkHealthy`), each with the person its node's name says was scanned (a BIDS name's
        ``sub-<label>``), which adapting splits by, and its node's name (nodes.distinct_node_names), which the
        model records. A mask under another transform than its volume is copied as detection uses it (mrml.mask_image),
        and its warning is the job's first (``job.warnings``); one on another grid is copied as it is, resampled onto
        the volume's grid by the worker (as the command line's calibrate and detection resample it), which warns of it
        in the job's warnings, naming both nodes (:func:`_copyNames`), and refused before anything runs where it does
        not overlap its volume (mrml.refuse_mask_elsewhere)."""
        from . import mrml
        from .adapt_panel import node_person
        from .nodes import distinct_node_names

        folder = _jobFolder(f"{JOB_FOLDER_PREFIX}{task}-")
        try:
            subjects: List[Dict[str, Optional[str]]] = []
            names: Dict[str, str] = {}
            said: List[str] = []
            shown = distinct_node_names(volumes)
            for n, (volume, mask) in enumerate(zip(volumes, masks)):
                with warningsLogged() as read:  # a mask under another transform, as detection says it
                    image, maskImage = self._inputImages(volume, mask, None, "healthy volume", shown[n])
                if maskImage is not None:  # (one on another grid: the worker resamples it, as detection's does)
                    mrml.refuse_mask_elsewhere(maskImage, image, mask, volume, "healthy volume", shown[n])
                said.extend(read)
                stem = f"{n + 1:02d}_{_fileStem(volume.GetName())}"
                _writeInputs(folder, stem, image, maskImage)
                names.update(_copyNames(folder, stem, volume, shown[n], mask if maskImage is not None else None))
                subjects.append(dict(image=str(folder / f"{stem}.nrrd"),
                                     mask=str(folder / f"{stem}_mask.nrrd") if maskImage is not None else None,
                                     person=node_person(volume.GetName()), name=shown[n]))
            return _held(WorkerJob(dict(request, task=task, subjects=subjects), folder, launch, python,
                                   remove_folder_at_end=True, names=names, said=said))
        except BaseException:
            _removeFolder(folder)
            raise

    # --- display (only inside the Slicer application) ------------------------------------------

    def showResults(self, scoreVolume, volume, opacity: float = 0.5) -> None:
        """The heat map over the input in the slice views, with a colour legend, and its run's "Anomaly" segment
        alone among this module's (nodes.show_only_run_segment)."""
        from .nodes import show_only_run_segment

        _refuseNotScoreVolume(scoreVolume)
        if not isinstance(volume, slicer.vtkMRMLVolumeNode):
            raise CeVAEError(f"The input volume must be a volume node (result.volume), not {_described(volume)}.")
        opacity = _opacity(opacity)
        show_only_run_segment(self._sceneFor(scoreVolume, "score volume"), scoreVolume)
        if getattr(slicer, "app", None) is None:
            return
        slicer.util.setSliceViewerLayers(background=volume, foreground=scoreVolume, foregroundOpacity=opacity)
        displays = [scoreVolume.GetNthDisplayNode(i) for i in range(scoreVolume.GetNumberOfDisplayNodes())]
        if not any(d is not None and d.IsA("vtkMRMLColorLegendDisplayNode") for d in displays):
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(scoreVolume)

    def setOverlayOpacity(self, scoreVolume, opacity: float) -> int:
        """Opacity of the score overlay in the views that show it (other overlays untouched)."""
        from .nodes import set_overlay_opacity

        _refuseNotScoreVolume(scoreVolume)
        return set_overlay_opacity(self._sceneFor(scoreVolume, "score volume"), scoreVolume, _opacity(opacity))

    def jumpToSlice(self, ras: Tuple[float, float, float]) -> None:
        """Centre all slice views on a world RAS point."""
        if getattr(slicer, "app", None) is None:
            return
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)


def _installAdvice(unmet: Sequence[dependencies.Unmet]) -> str:
    """How to install ``unmet``: outside Slicer, the pip commands for this computer (dependencies.pip_commands)."""
    if getattr(slicer, "app", None) is None:
        return f"Install them with: {dependencies.pip_commands(unmet)}"
    return ("Click Apply in the CeVAE Anomaly module to install them, or run "
            "CeVAEAnomalyLogic().installDependencies() in the Python console.")


def _installTorch(spec: str) -> None:
    """torch through the PyTorch extension (it matches the CUDA build to the driver); with pip if it is missing or
    does not import (:func:`~CeVAEAnomalyLib.slicer.dependencies.torch_install` picks the index)."""
    plan = dependencies.planned_torch_install(spec)
    if plan.pip_args is None:
        try:
            import PyTorchUtils
        except ImportError as exc:  # found but broken (e.g. half installed): as without it
            log.warning("The PyTorch extension could not be imported (%s).", exc)
            plan = dependencies.pip_torch_install(spec)
    if plan.pip_args is not None:
        log.warning("Installing %s without the PyTorch extension, %s.", spec, plan.build)
        slicer.util.pip_install(plan.pip_args)
        return
    requirement = spec[len("torch"):]
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)
    if torch is None:
        raise CeVAEError("PyTorch could not be installed; install it from the PyTorch module.")


class _Collected(logging.Handler):
    """Keeps the messages of the records it is given."""

    def __init__(self, messages: List[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _recorded(result: CeVAEAnomalyResult) -> CeVAEAnomalyResult:
    """``result``, its summary and warnings recorded on its score volume (nodes.run_message), so that the panel can
    say them again whenever it shows these results again."""
    from .nodes import record_run_message

    record_run_message(result.nodes.score, result.summary, result.warnings)
    return result


@contextlib.contextmanager
def warningsLogged() -> Iterator[List[str]]:
    """The messages of the library's warnings logged in the block (still logged as usual), for a result's warnings
    (DetectVolume.py adds those of reading its mask file)."""
    messages: List[str] = []
    handler, library = _Collected(messages), logging.getLogger("CeVAEAnomalyLib")
    library.addHandler(handler)
    try:
        yield messages
    finally:
        library.removeHandler(handler)


def _reworded(texts: Sequence[str], words: Mapping[str, str]) -> List[str]:
    """``texts`` with each key of ``words`` replaced by its value (as WorkerJob names a worker's warnings)."""
    reworded = []
    for text in texts:
        for old, new in words.items():
            text = text.replace(old, new)
        reworded.append(text)
    return reworded


def _modelFile(modelPath: Any) -> Optional[Path]:
    """The model file a ``modelPath`` argument names (None or "": the bundled model, None here), refused in one line
    unless it is the path of a file (a path the system cannot look up, e.g. one holding a NUL byte, said as such)."""
    from ..io.targets import refuse_unsearchable

    if modelPath is None or (isinstance(modelPath, str) and not modelPath):
        return None
    if not isinstance(modelPath, (str, os.PathLike)):
        raise CeVAEError(f"modelPath must be the path of a .cevae file (a str or pathlib.Path), or None for the "
                         f"bundled model, got {type(modelPath).__name__}.")
    path = _typedPath(modelPath)
    refuse_unsearchable(path, "model bundle")  # (Path.is_file says False for a NUL byte or a link loop)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CeVAEError(f"The model bundle {path} {what}; choose a .cevae file.")
    return path


def _typedPath(path: Union[str, "os.PathLike[str]"]) -> Path:
    """The file a path argument names, ``~`` expanded as the panel expands a typed one (gui_binding.typed_path)."""
    return typed_path(os.fspath(path))


def _text(path: Optional[Path]) -> Optional[str]:
    """A model path as the worker's request holds it (None: the bundled model)."""
    return None if path is None else str(path)


def _refuseOutput(path: Path, written: Sequence[Path], overwrite: bool, kind: str, resume: str = "",
                  model: Optional[Path] = None) -> None:
    """Refuse a ``kind`` ("calibrated", "adapted") model output ``path`` that is a folder, the ``model`` the run
    starts from (None: the bundled one) or the bundled model, or files a run would write (``written``) that exist
    without ``overwrite``; ``resume`` says how to continue instead."""
    if path.is_dir():
        raise CeVAEError(f"The model file {path} is a folder; give the path of a .cevae file.")
    from ..io.naming import refuse_misnamed
    from .adapt_panel import bundled_model_problem, replaced_model_problem

    refuse_misnamed(path, "model file", "a .cevae bundle", ".cevae")
    problem = bundled_model_problem(path, kind) or replaced_model_problem(path, model, kind)
    if problem is not None:  # even with overwrite
        raise CeVAEError(problem)
    existing = [p for p in written if p.exists()]
    if existing and not overwrite:
        raise CeVAEError(f"{', '.join(str(p) for p in existing)} exist(s); choose another file, or pass "
                         f"overwrite=True to replace them{resume}.")


def _requestOptions(checked: "AdaptOptions", given: Mapping[str, Any]) -> Dict[str, Any]:
    """The adaptation options ``given`` as the worker's request file holds them: their checked values (NumPy numbers
    as plain ones), a cache folder as text (``~`` expanded)."""
    values = {name: getattr(checked, name) for name in given}
    if values.get("cache_dir") is not None:
        values["cache_dir"] = str(_typedPath(values["cache_dir"]))
    return values


def _refuseNonBoolean(**flags: Any) -> None:
    """Refuse a flag that is not True or False (``createLabelmap="no"`` would count as True)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise CeVAEError(f"{name} must be True or False, not {_described(value)}.")


def _described(value: Any) -> str:
    """What a wrong argument is, for an error message: its class and, for a node, its name."""
    name = value.GetName() if hasattr(value, "GetName") else None
    kind = type(value).__name__
    if name or value is None:
        return f"{kind} '{name}'" if name else "None"
    return f"{'an' if kind[0] in 'AEIOUaeiou' else 'a'} {kind}"


def _fileStem(name: str) -> str:
    """A node name as a safe file name stem, at most :data:`FILE_STEM_MAX` characters: the copies' paths in the
    temporary folder must fit in Windows' 260 characters and in any file system's 255 bytes a name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:FILE_STEM_MAX].strip("._") or "volume"


def _refuseNotScan(volumeNode: Any, maskNode: Any, what: str) -> None:
    """Refuse what cannot be a scan (``what``: "input volume", "healthy volume") or its brain mask: another kind of
    node or value, a labelmap volume as the scan, the scan as its own mask."""
    if volumeNode is None:
        raise CeVAEError(f"Select a scalar {what} (got None).")
    if not isinstance(volumeNode, slicer.vtkMRMLScalarVolumeNode):
        inMemory = type(volumeNode).__module__.split(".")[0] in ("SimpleITK", "numpy")
        detect = "; an image in memory is scored by CeVAEAnomalyLib.engine.detector.detect" if inMemory else ""
        raise CeVAEError(f"The {what} must be a scalar volume node (by name: slicer.util.getNode(name)), not "
                         f"{_described(volumeNode)}{detect}.")
    if maskNode is not None and not isinstance(maskNode, slicer.vtkMRMLNode):
        raise CeVAEError(f"The brain mask must be a labelmap volume or segmentation node, not {_described(maskNode)} "
                         "(a node by name: slicer.util.getNode(name)).")
    if isinstance(volumeNode, slicer.vtkMRMLLabelMapVolumeNode):  # as the panel's selectors: no labelmaps
        raise CeVAEError(f"'{volumeNode.GetName()}' is a labelmap volume (labels, not intensities); choose a "
                         "scalar volume. A scan loaded as a labelmap by mistake can be converted in the "
                         "Volumes module (Volume Information, Convert to scalar volume).")
    if maskNode is volumeNode:  # its every voxel above 0 would be "brain": the head, the neck, the noise
        raise CeVAEError(f"The brain mask '{maskNode.GetName()}' is the {what} itself; choose a brain mask "
                         "(a labelmap or a segmentation), or none for the automatic one.")


def _checkHealthy(volumes: Any, masks: Any) -> None:
    """Refuse, before anything is copied, healthy volumes and masks that are not lists of one mask (or None) per
    volume, or a pair that is not a scan and its mask (:func:`_refuseNotScan`), or a result of this module."""
    for name, given in (("volumes", volumes), ("masks", masks)):
        if isinstance(given, str) or not isinstance(given, Sequence):
            raise CeVAEError(f"{name} must be a list of nodes (one per healthy volume), not {_described(given)}.")
    if len(masks) != len(volumes):
        raise CeVAEError("Give one brain mask (or None) per healthy volume.")
    for volume, mask in zip(volumes, masks):
        _refuseNotScan(volume, mask, "healthy volume")
    _refuseModuleOutputs(volumes, masks, "a healthy scan or its mask")


def _refuseArguments(volumeNode: Any, maskNode: Any, outputs: Any, **flags: Any) -> None:
    """Refuse, whatever scene they are in, what cannot be a detection's input, brain mask and output nodes: not a
    scan (:func:`_refuseNotScan`), a result of this module as an input, ``outputs`` that are no OutputNodes, of the
    wrong classes or one of the inputs, and ``flags`` (createLabelmap, ...) that are not True or False."""
    _refuseNonBoolean(**flags)
    _refuseNotScan(volumeNode, maskNode, "input volume")
    from .mrml import OutputNodes, check_output_classes

    if outputs is not None and not isinstance(outputs, OutputNodes):
        raise CeVAEError(f"outputs must be an OutputNodes (CeVAEAnomalyLib.slicer.mrml), not {_described(outputs)}.")
    _refuseModuleOutputs([volumeNode], [maskNode], "an input")
    for node in vars(outputs).values() if outputs is not None else ():
        if node is not None and (node is volumeNode or node is maskNode):
            raise CeVAEError(f"The output '{node.GetName()}' is also an input; choose another output node.")
    if outputs is not None:
        check_output_classes(outputs)


def _refuseOutputsElsewhere(scene: slicer.vtkMRMLScene, outputs: Optional["OutputNodes"]) -> None:
    """Refuse an output node of another scene than the input's (one deleted from the scene is made again)."""
    for node in vars(outputs).values() if outputs is not None else ():
        if node is not None and node.GetScene() not in (scene, None):
            raise CeVAEError(f"The output '{node.GetName()}' is in another scene than the input volume; choose "
                             "a node of its scene, or none for a new one.")


def _refuseNotDetection(detection: Any) -> None:
    """Refuse a ``detection`` that is not a DetectionResult (the whole CeVAEAnomalyResult of a run, say)."""
    from ..result import DetectionResult

    if not isinstance(detection, DetectionResult):
        own = "; give its .detection" if isinstance(detection, CeVAEAnomalyResult) else ""
        raise CeVAEError(f"detection must be a DetectionResult (CeVAEAnomalyLib.result), not "
                         f"{_described(detection)}{own}.")


def _refuseNotResult(result: Any) -> None:
    """Refuse, in one line, a ``result`` argument that is not a CeVAEAnomalyResult (its ``.detection``, say)."""
    if not isinstance(result, CeVAEAnomalyResult):
        raise CeVAEError(f"result must be the CeVAEAnomalyResult that process() or finishDetection() returned, got "
                         f"{_described(result)}.")


def _refuseNotScoreVolume(scoreVolume: Any) -> None:
    """Refuse a ``scoreVolume`` that is not a volume node (the whole CeVAEAnomalyResult of a run, say)."""
    if not isinstance(scoreVolume, slicer.vtkMRMLScalarVolumeNode):
        own = "; give its .nodes.score" if isinstance(scoreVolume, CeVAEAnomalyResult) else ""
        raise CeVAEError(f"The score volume must be a scalar volume node (result.nodes.score), not "
                         f"{_described(scoreVolume)}{own}.")


def _opacity(opacity: Any) -> float:
    """``opacity`` as a float, refused unless it is a number from 0 to 1."""
    if isinstance(opacity, bool) or not isinstance(opacity, numbers.Real) or not 0.0 <= float(opacity) <= 1.0:
        raise CeVAEError(f"opacity must be a number from 0 to 1, got {opacity!r}.")
    return float(opacity)


def _refuseNotFrame(frame: Any) -> None:
    """Refuse a ``frame`` that is neither None nor a SequenceFrame (its item number, say)."""
    from .nodes import SequenceFrame

    if frame is not None and not isinstance(frame, SequenceFrame):
        raise CeVAEError(f"frame must be a SequenceFrame (CeVAEAnomalyLib.slicer.nodes.sequence_frame of the input) "
                         f"or None, not {_described(frame)}.")


def _refuseModuleOutputs(scans, masks, what: str) -> None:
    """Refuse a node this module made (a score volume, an anomaly labelmap or segmentation) as ``what``: one with its
    attributes or anomaly segment, and among ``scans`` one whose name says so without them (nodes.named_as_result):
    its file saved from the panel and loaded alone again, or a file the command line wrote loaded beside its scan. A
    mask is not refused by its name: a user's own brain mask may be named NAME_labelmap."""
    from .nodes import ROLE_ATTRIBUTE, is_module_output, named_as_result

    for node in (*scans, *masks):
        if node is not None and is_module_output(node):
            role = node.GetAttribute(ROLE_ATTRIBUTE) or "anomaly segment"  # a saved segmentation loaded back
            raise CeVAEError(f"'{node.GetName()}' holds results of this module ({role}), not a scan; it cannot be "
                             f"{what}.")
    for node in scans:
        named = named_as_result(node) if node is not None else None
        if named is not None:
            scan, tag, how = named
            raise CeVAEError(f"'{node.GetName()}' is named as a result of this module for '{scan}' (NAME{tag}, {how}), "
                             f"not a scan; it cannot be {what}. If it is a scan, rename it.")


def _writeInputs(folder: Path, stem: str, image: "sitk.Image", mask: Optional["sitk.Image"]) -> None:
    """The worker's copies of a volume (``STEM.nrrd``) and its mask (``STEM_mask.nrrd``), uncompressed for
    speed, each checked complete (from its header and size) before it is renamed into place."""
    import SimpleITK as sitk

    from ..io.atomic import write_all

    files: Dict[Path, object] = {folder / f"{stem}.nrrd": lambda tmp: sitk.WriteImage(image, tmp)}
    if mask is not None:
        files[folder / f"{stem}_mask.nrrd"] = lambda tmp: sitk.WriteImage(mask, tmp)
    write_all(files, overwrite=True)


def _copyNames(folder: Path, stem: str, volume, volumeName: str, mask) -> Dict[str, str]:
    """The worker's copies written by :func:`_writeInputs` and the names of the nodes they copy (``volume``'s:
    ``volumeName``), quoted; and the engine's words of a mask on another grid than this volume, led by the copy's path
    (its warning of resampling the mask), as detection words them (nodes.mask_words)."""
    from .nodes import mask_words

    image = str(folder / f"{stem}.nrrd")
    names = {image: f"'{volumeName}'"}
    if mask is not None:
        names[str(folder / f"{stem}_mask.nrrd")] = f"'{mask.GetName()}'"
        for words, said in mask_words(mask, volume, "healthy volume", volumeName).items():
            names[f"{image}: {words}"] = said
    return names


def _detectionNames(folder: Path, volume, mask) -> Dict[str, Name]:
    """The detection worker's copies of ``volume`` and ``mask`` (:func:`_writeInputs`, stem "input") and the engine's
    words of a mask on another grid (nodes.mask_words), each with what the user calls it when a warning is read: a
    node renamed while the job runs is named by its new name."""
    from .nodes import mask_words

    names: Dict[str, Name] = {str(folder / "input.nrrd"): lambda: f"'{volume.GetName()}'"}
    if mask is not None:
        names[str(folder / "input_mask.nrrd")] = lambda: f"'{mask.GetName()}'"
    for words, atStart in mask_words(mask, volume).items():  # (the mask deleted meanwhile: the words at the start)
        names[words] = lambda words=words, atStart=atStart: mask_words(mask, volume).get(words, atStart)
    return names


_RUNNING = RunningJobs()  # the worker jobs every logic of this import started (stopAllJobs)
_EXIT_HOOKED: List[Any] = []  # the application whose aboutToQuit calls stopAllJobs (inside Slicer: slicer.app)


def _held(job: WorkerJob) -> WorkerJob:
    """``job``, among those :meth:`CeVAEAnomalyLogic.stopAllJobs` stops; inside Slicer, the first one connects that to
    the application's exit, so that no worker outlives the Slicer that started it (the panel's cleanup stops only
    the panel's job, and only where the panel was shown)."""
    _RUNNING.add(job)
    app = getattr(slicer, "app", None)
    if app is not None and not any(hooked is app for hooked in _EXIT_HOOKED):
        app.connect("aboutToQuit()", CeVAEAnomalyLogic.stopAllJobs)  # a function: it keeps this import's registry
        _EXIT_HOOKED.append(app)
    return job


def _stopWithScene(scene: slicer.vtkMRMLScene, job: WorkerJob, target: _DetectionTarget) -> "weakref.finalize":
    """Stop the detection ``job`` and remove its copy of the scan when ``scene`` starts to close, as the panel stops
    its own (the input and its outputs leave with the scene, and a node of the next scene may take their IDs), or when
    its input volume is removed from ``scene`` (its results would be discarded). ``target.sceneClosed`` and
    ``target.inputRemoved`` record it for finishDetection. Returns what stops the watch (it also stops once the job is
    collected)."""
    held = weakref.ref(job)  # a job dropped unloaded is still collected (and its worker stopped)

    def stop(reason: str) -> None:
        running = held()
        if running is not None:
            running.cancel(reason)
            running.cleanup()

    def closing(caller, event) -> None:
        target.sceneClosed = True
        stop(SCENE_CLOSED)

    def removed(caller, event) -> None:
        if target.volume.GetScene() is None and not (target.sceneClosed or target.inputRemoved):
            target.inputRemoved = True
            stop(INPUT_REMOVED.format(name=target.volume.GetName()))

    tags = [scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, closing),
            scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, removed)]
    unwatch = weakref.finalize(job, _removeObservers, scene, tags)
    unwatch.atexit = False  # (at exit, nothing closes any more)
    return unwatch


def _removeObservers(scene: slicer.vtkMRMLScene, tags: Sequence[int]) -> None:
    """Remove the observers ``tags`` from ``scene``."""
    for tag in tags:
        scene.RemoveObserver(tag)


_MODEL_JOBS = {"calibrate": ("a calibration", "startCalibration"), "adapt": ("an adaptation", "startAdaptation")}


def _refuseModelJob(job: WorkerJob) -> None:
    """Refuse, as a detection to load, a calibration's or adaptation's job: it writes a model file, not the scene;
    say how it ends instead."""
    task = job.request.get("task")
    if task in _MODEL_JOBS:
        what, start = _MODEL_JOBS[task]
        raise CeVAEError(f"This job is {what} ({start}), not a detection: it loads nothing into the scene. Call "
                         "job.poll() until it returns True, then job.raise_for_failure(); job.done['model'] is the "
                         "path of the model it wrote.")


def _inputRemovedMessage(volumeNode) -> str:
    """What a detection of ``volumeNode`` says when the volume was removed from its scene before its results were
    loaded."""
    return f"'{volumeNode.GetName()}' was removed during the run; its results were discarded."


def _sceneClosedMessage(volumeNode) -> str:
    """What a detection of ``volumeNode`` says when its scene closed before its results were loaded."""
    return (f"The scene of '{volumeNode.GetName()}' was closed before its detection's results were loaded; the "
            "detection was stopped and nothing was loaded.")


@contextlib.contextmanager
def _closeWatched(scene: slicer.vtkMRMLScene, volumeNode) -> Iterator[Callable[[], None]]:
    """In the block, a check that raises InputRemovedError once ``scene`` has started to close (the input and its
    outputs left with it, and a node of the next scene may have taken their IDs: :func:`_sceneClosedMessage`) or the
    input ``volumeNode`` was removed from it (its results would be discarded: :func:`_inputRemovedMessage`)."""
    closed: List[bool] = []
    tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, lambda caller, event: closed.append(True))

    def refuseClosed() -> None:
        if closed:
            raise InputRemovedError(_sceneClosedMessage(volumeNode))
        if volumeNode.GetScene() is None:
            raise InputRemovedError(_inputRemovedMessage(volumeNode))

    try:
        yield refuseClosed
    finally:
        scene.RemoveObserver(tag)


def _untilClosed(progress: Optional[ProgressCallback], refuseClosed: Callable[[], None]) -> ProgressCallback:
    """``progress`` (None: none), followed by ``refuseClosed`` at each report, so that a run stops at its first report
    after its scene closed or its input was removed."""
    def reporting(fraction: float, message: str) -> None:
        report(progress, fraction, message)
        refuseClosed()

    return reporting


def _jobFolder(prefix: str) -> Path:
    """A new temporary folder for a worker job, once those that crashed Slicers left are removed; where none can be
    made (a full disk or quota, a TMPDIR that is no folder) a CeVAEError says so, not Python's bare error."""
    remedy = "Free space there, or start Slicer with TMPDIR set to a folder on a disk with room."
    try:
        where = tempfile.gettempdir()
    except OSError as exc:  # none of the candidates takes a file: the cause is not known, only guessed
        raise CeVAEError(f"The worker needs a temporary folder for its copies of the scans, and none can be written: "
                         f"{exc.strerror or exc} (a full disk or a used-up quota?). {remedy}") from None
    try:
        remove_abandoned_job_folders(Path(where))
        return Path(tempfile.mkdtemp(prefix=prefix))
    except OSError as exc:
        raise CeVAEError(f"The worker needs a temporary folder for its copies of the scans, and none could be made in "
                         f"{where}: {exc.strerror or exc}. {remedy}") from None


def _removeFolder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
