"""The module panel's option values, what a model offers, and the run request, without Qt or torch.

The widget shows translated display names for these values (the mapping is in the module file)
and stores the values in its parameter node.
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..engine.header import BundleHeader, read_header
from ..errors import CeVAEError
from ..options import (DEVICES, SCORE_TYPES, THOROUGH_STEPS, DetectionRequest, PostprocessOptions, ScoreOptions,
                       ThresholdPolicy, flag_of, too_costly)
from .gui_binding import typed_path

__all__ = ["DEVICES", "MODEL_SCORE_TYPE", "SCORE_TYPES", "SCORE_TYPE_CHOICES", "SENSITIVITIES", "ModelSettings",
           "ModelSettingsCache", "SensitivityChange", "adapt_override_note", "chosen_model", "detection_request",
           "file_stamp", "model_file_key", "model_path", "model_problem", "override_postprocess", "plain_tooltip",
           "postprocess_fields", "rate_refusal", "sensitivity_change"]

log = logging.getLogger(__name__)

SENSITIVITY_MODEL = "model"  # the model's calibrated default false-positive rate
SENSITIVITY_FPR = "fpr"  # another calibrated false-positive rate
SENSITIVITY_THRESHOLD = "threshold"  # an absolute score threshold
SENSITIVITIES = (SENSITIVITY_MODEL, SENSITIVITY_FPR, SENSITIVITY_THRESHOLD)
# the panel's score type until the user picks one: the model's own (its header's score_options), as detect uses it
MODEL_SCORE_TYPE = ""
SCORE_TYPE_CHOICES = (MODEL_SCORE_TYPE, *SCORE_TYPES)
# the panel's absolute threshold field: finite (its spin box needs a maximum), up to the largest score a map (float32)
# holds, so that no model's calibrated threshold is cut to fit it
THRESHOLD_RANGE = (0.0, float(np.finfo(np.float32).max))


def shown_threshold(threshold: float) -> float:
    """``threshold`` clamped into the panel's field (:data:`THRESHOLD_RANGE`)."""
    return min(max(threshold, THRESHOLD_RANGE[0]), THRESHOLD_RANGE[1])


def plain_tooltip(text: str) -> str:
    """``text`` as a Qt tooltip shows it, lines kept: escaped HTML (Qt renders a tooltip that looks like HTML as HTML,
    and a received model's name or scan names may look so)."""
    return f'<p style="white-space:pre-wrap">{html.escape(text)}</p>'


@dataclass(frozen=True)
class ModelSettings:
    """What a model bundle's header says about detection with it."""

    path: Path
    header: BundleHeader  # (a method's ``score_type``: one of SCORE_TYPE_CHOICES, "" for the model's own)

    @classmethod
    def read(cls, path: Optional[Path] = None) -> "ModelSettings":
        """Settings of the bundle at ``path`` (the bundled default model if None)."""
        from ..data import default_model_path

        target = Path(path) if path else default_model_path()
        return cls(target, read_header(target))

    @cached_property
    def details(self) -> Tuple[str, str]:
        """What the model is, as ``cevae-anomaly info`` says it (engine/model_info.py): (its first line, the whole
        text); for a model whose weights are damaged, (that problem, "")."""
        from ..engine.model_info import describe_model, model_headline, model_info

        try:
            info = model_info(self.path)
        except CeVAEError as exc:
            return str(exc), ""
        return model_headline(info), describe_model(info)

    @property
    def postprocess(self) -> Dict[str, Any]:
        """The model's post-processing (rim_mm, median_radius, min_volume_mm3, ...)."""
        return self.header.postprocess.to_dict()

    @property
    def default_fpr(self) -> float:
        return self.header.default_fpr

    def calibrated(self, score_type: str, postprocess: Optional[Dict[str, Any]] = None, thorough: bool = False) -> bool:
        """Whether the model holds a threshold calibration for this scoring and post-processing
        (``postprocess``: overrides of the model's, as the detection applies them; ``thorough``: with
        the thorough mode's test-time adaptation)."""
        return self.header.is_calibrated(*self._options(score_type, thorough, postprocess))

    def calibrated_threshold(self, score_type: str, fpr: Optional[float] = None, thorough: bool = False,
                             postprocess: Optional[Dict[str, Any]] = None) -> Optional[float]:
        """The model's calibrated threshold at ``fpr`` (default: its own rate) with its own post-processing or the
        overrides ``postprocess`` (``thorough``: in the thorough mode); None if it has none for these options or
        rate."""
        try:
            return self.rated_threshold(score_type, fpr, thorough, postprocess)[0]
        except CeVAEError:  # (panel options detection refuses)
            return None

    def rate_refusal(self, score_type: str, fpr: Optional[float] = None, thorough: bool = False,
                     postprocess: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """Why detection refuses the rate ``fpr`` (default: the model's) for options the model is calibrated for, in
        its words (e.g. a rate whose calibrated threshold is 0 would flag the whole brain); None if it gets a
        threshold or the model is not calibrated for these options."""
        return self.rated_threshold(score_type, fpr, thorough, postprocess)[1]

    def rated_threshold(self, score_type: str, fpr: Optional[float] = None, thorough: bool = False,
                        postprocess: Optional[Dict[str, Any]] = None) -> Tuple[Optional[float], Optional[str]]:
        """(:meth:`calibrated_threshold`, :meth:`rate_refusal`) from one look-up of the rate; options detection
        refuses raise their :class:`CeVAEError`, as in :meth:`rate_refusal`."""
        score, post = self._options(score_type, thorough, postprocess)
        try:
            return self.header.threshold(score, post, ThresholdPolicy(fpr=fpr))[0], None
        except CeVAEError as exc:
            return None, str(exc) if self.header.is_calibrated(score, post) else None

    def _options(self, score_type: str, thorough: bool,
                 postprocess: Optional[Dict[str, Any]]) -> Tuple[ScoreOptions, PostprocessOptions]:
        """(scoring, post-processing) of the panel's choices over the model's, as detection applies them."""
        return DetectionRequest(score=_score(score_type, thorough), post=dict(postprocess or {})).options(
            self.header.score_options, self.header.postprocess)

    def sensitivities(self, score_type: str, postprocess: Optional[Dict[str, Any]] = None,
                      thorough: bool = False) -> Tuple[str, ...]:
        """The sensitivity modes this model supports for these options (calibrated ones only if calibrated)."""
        if self.calibrated(score_type, postprocess, thorough):
            return SENSITIVITIES
        return (SENSITIVITY_THRESHOLD,)


def _score(score_type: str, thorough: bool) -> Dict[str, Any]:
    """The scoring overrides of the panel: the score type (none for :data:`MODEL_SCORE_TYPE`: the model's own), and
    the thorough mode's test-time adaptation."""
    return dict(**(dict(score_type=score_type) if score_type != MODEL_SCORE_TYPE else {}),
                **(dict(test_time_steps=THOROUGH_STEPS) if thorough else {}))


@dataclass(frozen=True)
class SensitivityChange:
    """How the panel leaves a calibrated sensitivity mode that the chosen options no longer allow."""

    sensitivity: str
    threshold: Optional[float]  # the absolute threshold to prefill; None: keep the field as it is
    message: str


def sensitivity_change(parameters: Any, settings: ModelSettings) -> Optional[SensitivityChange]:
    """None while the chosen sensitivity mode is offered for the chosen options. Otherwise (the
    post-processing override or the thorough mode left the model's calibration) the absolute threshold,
    prefilled with the model's closest calibrated threshold at the rate that was in use, and a sentence
    that says so."""
    thorough = bool(parameters.thorough)
    modes = settings.sensitivities(parameters.scoreType, override_postprocess(parameters), thorough)
    if parameters.sensitivity in modes:
        return None
    fpr = parameters.falsePositiveRate if parameters.sensitivity == SENSITIVITY_FPR else settings.default_fpr
    missing = "the thorough mode" if thorough and not settings.calibrated(parameters.scoreType, None, True) \
        else "this post-processing"
    threshold = settings.calibrated_threshold(parameters.scoreType, fpr, thorough)
    source = "with its own post-processing"
    if threshold is None and thorough:
        threshold, source = settings.calibrated_threshold(parameters.scoreType, fpr), f"{source}, not thorough"
    if threshold is None:
        return SensitivityChange(SENSITIVITY_THRESHOLD, None, "The model has no calibration for these options; "
                                 "set an absolute threshold, or calibrate it on healthy scans.")
    return SensitivityChange(
        SENSITIVITY_THRESHOLD, threshold,
        f"The model is not calibrated for {missing}, so an absolute threshold is used. It starts at "
        f"{threshold:.4g}: the model's calibrated threshold at a false-positive rate of {fpr:g} {source} (the "
        "rate differs with yours). Calibrate on healthy scans to get rates for it.")


def after_new_model(parameters: Any, settings: ModelSettings,
                    previous: Optional[ModelSettings]) -> Tuple[Optional[str], str]:
    """When a calibration or adaptation has made ``settings``' model the one in use (``previous``: the model used
    before): the sensitivity mode to switch to (None: keep it) and what to add to the status line. An absolute
    threshold that stood in for a calibration the previous model lacked gives way to the new model's calibrated
    rate; one chosen while the previous model was calibrated stays, and the status line says that the new rates are
    not used. Where the new model is not calibrated for the panel's options (an adaptation calibrates the model's own
    post-processing, not the panel's override), the absolute threshold stays and the status line says why."""
    override = override_postprocess(parameters)
    thorough = bool(parameters.thorough)
    if parameters.sensitivity == SENSITIVITY_THRESHOLD:
        if settings.calibrated(parameters.scoreType, override, thorough):
            if previous is not None and previous.calibrated(parameters.scoreType, override, thorough):
                return None, ("Your absolute threshold stays in use, not the new model's calibrated rates: choose a "
                              "false-positive rate as sensitivity to use them.")  # chosen by hand
            return SENSITIVITY_MODEL, ("Its calibrated false-positive rate is used now, not the absolute threshold "
                                       "that stood in for the missing calibration.")
        options = "the panel's post-processing (adapting calibrates the model's own)" if override else "these options"
        return None, f"It is not calibrated for {options}, so the absolute threshold stays in use."
    change = sensitivity_change(parameters, settings)
    return None, change.message if change is not None else ""


def adapt_override_note(parameters: Any, settings: Optional[ModelSettings]) -> str:
    """What the Adapt section says before a run with a post-processing override the model is not calibrated for
    (another rim or median filter): adapting calibrates the model's own, so that override keeps the absolute
    threshold after it. "" otherwise."""
    override = override_postprocess(parameters)
    if override is None or settings is None or settings.calibrated(parameters.scoreType, override):
        return ""
    return ("Adapting calibrates the model's own post-processing, not the override in Advanced: with the override, "
            "detection keeps the absolute threshold (calibrate the adapted model with it to get rates).")


def override_postprocess(parameters: Any) -> Optional[Dict[str, Any]]:
    """The user's post-processing from the panel's parameters, or None to use the model's."""
    if not parameters.overridePostprocess:
        return None
    return dict(rim_mm=float(parameters.rimMm), median_radius=int(parameters.medianRadius),
                min_volume_mm3=float(parameters.minVolumeMm3), min_peak=float(parameters.minPeak))


def model_values(parameters: Any, settings: ModelSettings, previous: Optional[str]) -> Dict[str, Any]:
    """Parameter values the model decides now: the post-processing fields unless overridden, the model's rate in
    the model's-rate mode, and the threshold field: in a calibrated mode the threshold that mode uses (0 for a rate
    detection refuses, e.g. one whose calibrated threshold is 0: :func:`rate_refusal` says why), and when the
    user has just switched from one (``previous``) to the absolute threshold, that mode's threshold (a value that
    flags what that mode flagged, not the field's last one)."""
    values = {} if parameters.overridePostprocess else postprocess_fields(settings)
    if parameters.sensitivity == SENSITIVITY_MODEL:
        values["falsePositiveRate"] = settings.default_fpr
    mode = previous if parameters.sensitivity == SENSITIVITY_THRESHOLD else parameters.sensitivity
    if mode in (SENSITIVITY_MODEL, SENSITIVITY_FPR):
        rate = parameters.falsePositiveRate if mode == SENSITIVITY_FPR else settings.default_fpr
        threshold, refusal = settings.rated_threshold(parameters.scoreType, rate, bool(parameters.thorough),
                                                      override_postprocess(parameters))
        if refusal is not None:
            # refused: shown as the 0 it gets, not the previous rate's threshold, which detection would not use
            # either; an absolute threshold chosen from there starts at the model's own rate's, not at 0 (every
            # voxel of the brain)
            threshold = 0.0 if parameters.sensitivity != SENSITIVITY_THRESHOLD else settings.calibrated_threshold(
                parameters.scoreType, None, bool(parameters.thorough), override_postprocess(parameters))
        if threshold is not None:
            values["threshold"] = shown_threshold(threshold)
    return values


def rate_refusal(parameters: Any, settings: ModelSettings) -> Optional[str]:
    """Why detection will refuse the panel's calibrated rate (the chosen one, or the model's own), in the words Apply
    would get, for the status line to say at once; None in the absolute-threshold mode, when the rate gets a
    threshold, or where the model is not calibrated for the panel's options (:func:`sensitivity_change` says that)."""
    if parameters.sensitivity not in (SENSITIVITY_MODEL, SENSITIVITY_FPR):
        return None
    rate = parameters.falsePositiveRate if parameters.sensitivity == SENSITIVITY_FPR else None
    return settings.rate_refusal(parameters.scoreType, rate, bool(parameters.thorough),
                                 override_postprocess(parameters))


def model_values_key(parameters: Any) -> Tuple[Any, ...]:
    """What :func:`model_values` depends on besides the model (the sensitivity mode third): they are set again when it
    changes. The rate counts only where the user types it, not the model's own rate, which the rate field rounds."""
    rate = parameters.falsePositiveRate if parameters.sensitivity == SENSITIVITY_FPR else None
    override = tuple(sorted((override_postprocess(parameters) or {}).items()))
    return (bool(parameters.overridePostprocess), parameters.sensitivity, parameters.scoreType,
            bool(parameters.thorough), rate, override)


def postprocess_fields(settings: ModelSettings) -> Dict[str, Any]:
    """Parameter values that start the override fields from the model's post-processing."""
    post = settings.postprocess
    return dict(rimMm=float(post["rim_mm"]), medianRadius=int(post["median_radius"]),
                minVolumeMm3=float(post["min_volume_mm3"]), minPeak=float(post["min_peak"]))


def model_path(parameters: Any) -> Optional[str]:
    """The chosen model file (``~`` expanded: gui_binding.typed_path), None for the bundled model; an error if none is
    chosen."""
    if parameters.useBundledModel:
        return None
    if not parameters.modelPath:
        raise CeVAEError("Choose a model file (.cevae), or use the bundled model.")
    return str(typed_path(parameters.modelPath))


def chosen_model(parameters: Any) -> ModelSettings:
    """Settings of the panel's model, read now; an error naming the file and its problem (none chosen, missing, not
    a model bundle, written by a newer version) if it cannot be used."""
    path = model_path(parameters)
    return ModelSettings.read(Path(path) if path else None)


def model_file_key(parameters: Any) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """The panel's model file (the bundled one with useBundledModel) and its :func:`file_stamp`, by which the panel
    keeps what it read of it; None where it names no file the system can look up (missing, a NUL byte)."""
    from ..data import default_model_path

    try:
        path = default_model_path() if parameters.useBundledModel else typed_path(parameters.modelPath)
        return str(path), file_stamp(path)
    except (CeVAEError, OSError, ValueError):  # ValueError: a NUL byte in the path
        return None


def file_stamp(path: Path) -> Tuple[int, ...]:
    """What tells a model file from another one at its path, or from itself written since: its device, inode, size,
    modification and status-change times (a file replaced by one whose modification time was kept, as cp -p or
    rsync -t do, has another inode or status-change time). OSError where it cannot be looked up."""
    status = path.stat()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


@dataclass
class ModelSettingsCache:
    """The settings of the panel's model, read again only when its file changes (:func:`model_file_key`)."""

    key: Optional[Tuple[str, Tuple[int, ...]]] = None
    settings: Optional[ModelSettings] = None

    def of(self, parameters: Any) -> Optional[ModelSettings]:
        """Settings of the panel's model; None if it cannot be read (why: logged once per file version, and said by
        :func:`model_problem`)."""
        key = model_file_key(parameters)
        if key is None:
            return None
        if key != self.key:
            try:
                self.key, self.settings = key, ModelSettings.read(Path(key[0]))
            except CeVAEError as exc:
                log.warning("CeVAE Anomaly: %s", exc)
                self.key, self.settings = key, None
        return self.settings


def model_problem(parameters: Any) -> Optional[str]:
    """What is wrong with the panel's model choice (:func:`chosen_model`'s error), or None if it can be used."""
    try:
        chosen_model(parameters)
    except CeVAEError as exc:
        return str(exc)
    return None


def detection_request(parameters: Any, settings: ModelSettings) -> Dict[str, Any]:
    """Keyword arguments of the logic's detection for the panel's parameters: the nodes, the model and
    one :class:`~..options.DetectionRequest`."""
    if parameters.inputVolume is None:
        raise CeVAEError("Select an input volume.")
    post = override_postprocess(parameters)
    thorough = bool(parameters.thorough)
    if parameters.sensitivity not in settings.sensitivities(parameters.scoreType, post, thorough):
        raise CeVAEError(
            "The model has no calibrated threshold for this score type, post-processing and thorough setting. Choose "
            "'Absolute threshold' as sensitivity, or calibrate the model on healthy scans of your site "
            "(section 'Calibrate on healthy scans')."
        )
    request = DetectionRequest.of(
        **_score(parameters.scoreType, thorough),
        fpr=parameters.falsePositiveRate if parameters.sensitivity == SENSITIVITY_FPR else None,
        threshold=parameters.threshold if parameters.sensitivity == SENSITIVITY_THRESHOLD else None,
        device=parameters.device, batch_size=int(parameters.batchSize), **(post or {}))
    _refuse_costly_recommendation(request, settings)
    mask = parameters.brainMask
    segment = parameters.brainMaskSegmentId if mask is not None and mask.IsA("vtkMRMLSegmentationNode") else ""
    return dict(volumeNode=parameters.inputVolume, maskNode=mask, maskSegmentId=segment or None,
                modelPath=model_path(parameters), request=request)


def _refuse_costly_recommendation(request: DetectionRequest, settings: ModelSettings) -> None:
    """Refuse, in the panel's words and before the volume is sent to a worker, a value the model recommends beyond
    what a model may recommend that ``request`` would use without asking for it (detection refuses it too, naming
    a command-line flag the panel does not have)."""
    costly = request.costly_recommendation(settings.header.score_options, settings.header.postprocess)
    if costly is None:
        return
    f, value, high = costly
    elsewhere = f"detect on the command line with {flag_of(f)} {value} to use it anyway"
    how = {"median_radius": "To use it anyway, tick 'Override post-processing' (Advanced) and set the median filter "
                            f"radius to {value}; or set a lower one there.",
           "test_time_steps": f"Tick 'Thorough' for {THOROUGH_STEPS} steps instead, or {elsewhere}."}.get(
        f.name, f"The panel cannot ask for another value: {elsewhere}, or with a lower value.")
    raise CeVAEError(f"{too_costly(f, value, high)} {how}")
