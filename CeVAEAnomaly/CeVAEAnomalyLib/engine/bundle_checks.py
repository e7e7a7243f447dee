"""Model bundles are untrusted input: every header section is checked before anything is built.

A tampered header must end in one clear :class:`CeVAEError`, never in a huge allocation or an
unexpected error later: types and ranges of the architecture, preprocessing, loss, score and
post-processing options, calibration tables and default rate; and the architecture against the
tensor shapes the file holds (read from the safetensors header, before the network is built).
The options a model recommends are checked against the command line's ranges here (bundles of earlier
versions hold such values); a detection that would use a recommended value beyond the narrower range a
model may recommend (``model_high`` in options.py) without being asked for it is refused where the
request meets the model (:meth:`~..options.DetectionRequest.checked_options`), so that a plain detection
with a model someone sent cannot take hours.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from dataclasses import Field, fields
from typing import Any, Dict, Mapping, Sequence, Tuple

from ..errors import CeVAEError
from ..options import ORIENTATIONS, PostprocessOptions, ScoreOptions, check_value, option_field, real_number
from .calibration import FPR_GRID, calibrated_test_time_steps
from .config import (MAX_BETA, MAX_CHANNELS, MAX_MARGIN_MM, MAX_Z, SUPPORTED_INPUT_SIZES, LossConfig, ModelConfig,
                     PreprocessConfig)

WEIGHT_DTYPES = ("F32", "F16")
NAMES_REMOVED = "names_removed"  # a shareable copy's record that its scans' names were removed (engine/sharing.py)
# an adapted model's record (in its adaptation section) of the volumes its base model learned from (training/adapt.py)
BASE_VOLUMES_KEY = "base_volumes"
# a model file's calibration tables (this project writes 3 per calibrated mode, up to 12): every threshold lookup
# reads each table's key, so 20000 took 2 s per detection and per update of the Slicer panel, which makes several
MAX_CALIBRATION_TABLES = 1000
# what a calibration table holds (engine/calibration.calibrate), and the most brain voxels it may count
CALIBRATION_KEYS = ("fpr", "threshold", "n_voxels", "source", "scan_voxels", "leave_one_out", "largest_voxel_mm",
                    "bright_tail")
MAX_VOXELS = 10 ** 15
UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # when a model was trained or calibrated (ISO 8601, UTC, to the second)


def _fail(where: str, problem: str) -> None:
    raise CeVAEError(f"{where} {problem}")


def _whole(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(where, f"must be a whole number in [{low}, {high}], got {value!r}")
    return value


def _utc_time(where: str, value: Any) -> None:
    """Check a time a model file records (:data:`UTC_FORMAT`)."""
    try:
        datetime.strptime(value, UTC_FORMAT)
        ok = isinstance(value, str) and len(value) == 20  # (strptime also takes unpadded fields)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        _fail(where, f"must be a UTC time as YYYY-MM-DDTHH:MM:SSZ (ISO 8601), got {value!r}")


def _number(where: str, value: Any, low: float, high: float, open_low: bool = False, open_high: bool = False) -> float:
    ok = real_number(value, finite=True) and (value > low if open_low else value >= low) and (
        value < high if open_high else value <= high)
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        _fail(where, f"must be a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return float(value)


def _section(header: Mapping[str, Any], key: str, known: Sequence[str], within: str = "") -> Dict[str, Any]:
    """The object ``header[key]`` holding no key but ``known`` (``within``: where ``header`` lies, as "a.b.")."""
    section = header.get(key)
    if not isinstance(section, dict):
        _fail(f"header section '{within}{key}'", f"must be a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(known))  # type: ignore[arg-type]
    if unknown:
        _fail(f"header section '{within}{key}'", f"has unknown key(s) {', '.join(map(repr, unknown))}")
    return section  # type: ignore[return-value]


def _names(cls: type) -> Tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def check_model_section(header: Mapping[str, Any]) -> ModelConfig:
    """The architecture, with types and ranges checked so that building it cannot explode."""
    m = _section(header, "model", _names(ModelConfig))
    size = m.get("input_size", ModelConfig.input_size)
    if not isinstance(size, int) or isinstance(size, bool) or size not in SUPPORTED_INPUT_SIZES:
        _fail("model.input_size", f"must be one of {SUPPORTED_INPUT_SIZES}, got {size!r}")
    channels = m.get("channels", list(ModelConfig.channels))
    if not isinstance(channels, list) or not 1 <= len(channels) <= int(math.log2(size)):
        _fail("model.channels", f"must be a list of 1 to {int(math.log2(size))} layer widths, got {channels!r}")
    for i, c in enumerate(channels):
        _whole(f"model.channels[{i}]", c, 1, MAX_CHANNELS)
    _whole("model.z_dim", m.get("z_dim", ModelConfig.z_dim), 1, MAX_Z)
    return ModelConfig.from_dict(m)


def check_sections(header: Mapping[str, Any], model: ModelConfig) -> None:
    """Every other section the detection path reads."""
    p = _section(header, "preprocess", _names(PreprocessConfig))
    size = p.get("input_size", PreprocessConfig.input_size)
    if not isinstance(size, int) or isinstance(size, bool) or size != model.input_size:
        _fail("preprocess.input_size", f"must equal model.input_size {model.input_size}, got {p.get('input_size')!r}")
    low = _number("preprocess.low_percentile", p.get("low_percentile", PreprocessConfig.low_percentile), 0, 100)
    _number("preprocess.high_percentile", p.get("high_percentile", PreprocessConfig.high_percentile), low, 100,
            open_low=True)
    _number("preprocess.clip_max", p.get("clip_max", PreprocessConfig.clip_max), 1, 1000)
    _number("preprocess.margin_mm", p.get("margin_mm", PreprocessConfig.margin_mm), 0, MAX_MARGIN_MM)
    _number("preprocess.min_brain_fraction", p.get("min_brain_fraction", PreprocessConfig.min_brain_fraction), 0, 1)
    if "loss" in header:
        loss = _section(header, "loss", _names(LossConfig))
        if loss.get("rec", "l1") not in ("l1", "l2"):
            _fail("loss.rec", f"must be 'l1' or 'l2', got {loss.get('rec')!r}")
        _number("loss.ce_weight", loss.get("ce_weight", LossConfig.ce_weight), 0, 1)
        _number("loss.beta", loss.get("beta", LossConfig.beta), 0, MAX_BETA)
    for key, cls in (("score_options", ScoreOptions), ("postprocess", PostprocessOptions)):
        if key in header:
            _check_options(header, key, cls)
    if "calibration" in header:
        _check_calibration(header.get("calibration"))
    if "default_fpr" in header:  # a rate the calibration holds thresholds for, as calibrate --default-fpr takes
        _number("default_fpr", header["default_fpr"], float(FPR_GRID[0]), float(FPR_GRID[-1]))
    for key in ("name", "modality"):
        if not isinstance(header.get(key, ""), str):
            _fail(key, f"must be text, got {header.get(key)!r}")
    names = header.get("calibration_subjects", [])
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        _fail("calibration_subjects", f"must be a list of the calibration scans' names, got {type(names).__name__}")
    _check_training(header)
    if "recalibration" in header:
        _check_recalibration(header["recalibration"])
    if NAMES_REMOVED in header:
        _section(header, NAMES_REMOVED, ("scans",))
        _whole(f"{NAMES_REMOVED}.scans", header[NAMES_REMOVED].get("scans"), 0, 10 ** 9)
    if header.get("weights_dtype", "float32") not in ("float32", "float16"):
        _fail("weights_dtype", f"must be 'float32' or 'float16', got {header.get('weights_dtype')!r}")


def _check_training(header: Mapping[str, Any]) -> None:
    """The records of how the model was trained that detection, calibration and adaptation read: the training
    run's orientations and volumes, and the depth contrast of its training or site scans."""
    training = header.get("training")
    if training is not None and not isinstance(training, dict):
        _fail("header section 'training'", f"must be a JSON object or null, got {type(training).__name__}")
    training = training or {}
    orientations = training.get("orientations", ["axial"])
    if not (isinstance(orientations, list) and orientations and all(o in ORIENTATIONS for o in orientations)):
        _fail("training.orientations", f"must be a list of {', '.join(ORIENTATIONS)}, got {orientations!r}")
    if "trained_utc" in training:  # (models written before it lack it)
        _utc_time("training.trained_utc", training["trained_utc"])
    for key in ("subjects", "validation_subjects"):
        _check_volumes(f"training.{key}", training.get(key, []))
    for key in ("training_contrast", "adaptation"):
        record = header.get(key, {})
        if not isinstance(record, dict):
            _fail(f"header section '{key}'", f"must be a JSON object, got {type(record).__name__}")
        if "depth_contrast" in record:
            _number(f"{key}.depth_contrast", record["depth_contrast"], -1000, 1000)  # clip_max bounds the scale
    # what an adapted model's base model learned from (models adapted by earlier versions do not record it)
    _check_volumes(f"adaptation.{BASE_VOLUMES_KEY}", header.get("adaptation", {}).get(BASE_VOLUMES_KEY, []))
    scans = header.get("adaptation", {}).get("site_scans") if header.get("adaptation") else [None]
    if not isinstance(scans, list) or not scans:  # (an adapted model was fine-tuned on one or more)
        _fail("adaptation.site_scans", "must be a list of 1 or more volumes (the scans the model was adapted on), "
              f"got {scans!r}")
    if header.get("adaptation"):  # each as training/packaging.subject_records writes it
        for i, scan in enumerate(scans):
            _texts(f"adaptation.site_scans[{i}]", scan, ("name", "sha256"), ("mask_sha256", "person", "content_sha256"))
        _check_fine_tuning(header["adaptation"])


def _check_fine_tuning(record: Mapping[str, Any]) -> None:
    """An adapted model's folds, steps per run and learning rate as training/adapt.py writes them, which ``info``
    says (models adapted by earlier versions may lack them)."""
    if "steps_per_run" in record:
        _whole("adaptation.steps_per_run", record["steps_per_run"], 1, 10 ** 9)
    if "lr" in record:
        _number("adaptation.lr", record["lr"], 0, math.inf, open_low=True)
    folds = record.get("folds", [])
    if "folds" in record and not (isinstance(folds, list) and folds):
        _fail("adaptation.folds", f"must be a list of 1 or more folds (the scans each held out), got {folds!r}")
    for i, fold in enumerate(folds):
        if not isinstance(fold, dict):
            _fail(f"adaptation.folds[{i}]", f"must be a JSON object, got {type(fold).__name__}")
        for key in ("held_out", "trained_on"):
            names = fold.get(key)
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                _fail(f"adaptation.folds[{i}].{key}", f"must be a list of scan names, got {names!r}")


def _check_volumes(where: str, volumes: Any) -> None:
    """A list of volume records (training/packaging.subject_records): each with a text name and sha256."""
    if not (isinstance(volumes, list) and all(
            isinstance(v, dict) and all(isinstance(v.get(k, ""), str) for k in ("name", "sha256"))
            and all(isinstance(v.get(k), (str, type(None))) for k in ("person", "content_sha256"))
            for v in volumes)):
        _fail(where, "must be a list of volumes, each with a text name and sha256 (and a text person and "
              "content_sha256, if any)")


def _check_recalibration(record: Any) -> None:
    """A calibrated copy's record of the model it was made from, when, on which scans and with which options
    (engine/calibrate.py), which ``info`` and detection's record say."""
    if not isinstance(record, dict):
        _fail("header section 'recalibration'", f"must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("parent", "original", "calibrated_utc", "scans", "options") if k not in record]
    if missing:
        _fail("header section 'recalibration'", f"lacks {', '.join(map(repr, missing))}")
    for key in ("parent", "original"):
        _texts(f"recalibration.{key}", record[key], ("name",), ("file", "sha256"))
    _utc_time("recalibration.calibrated_utc", record["calibrated_utc"])
    scans = record["scans"]
    if not isinstance(scans, list) or not scans:
        _fail("recalibration.scans", f"must be a non-empty list of scans, got {scans!r}")
    for i, scan in enumerate(scans):
        _texts(f"recalibration.scans[{i}]", scan, ("name", "sha256"), ("mask_sha256",))
    # (batch_size and software: copies written before they were recorded lack them)
    options = _section(record, "options", ("score_options", "postprocess", "default_fpr", "amp", "batch_size"),
                       "recalibration.")
    for key, cls in (("score_options", ScoreOptions), ("postprocess", PostprocessOptions)):
        _check_options(options, key, cls, "recalibration.options.")
    _number("recalibration.options.default_fpr", options.get("default_fpr"), float(FPR_GRID[0]),
            float(FPR_GRID[-1]))
    if not isinstance(options.get("amp"), bool):
        _fail("recalibration.options.amp", f"must be true or false, got {options.get('amp')!r}")
    size = options.get("batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        _fail("recalibration.options.batch_size", f"must be a number of slices, got {size!r}")
    software = record.get("software", {})
    if not isinstance(software, dict) or not all(isinstance(v, str) for v in software.values()):
        _fail("recalibration.software", f"must be versions by name, got {software!r}")


def _texts(where: str, value: Any, required: Sequence[str], optional: Sequence[str]) -> None:
    """Check a JSON object whose keys ``required`` hold text and ``optional`` text or null (or are absent)."""
    if not isinstance(value, dict):
        _fail(where, f"must be a JSON object, got {type(value).__name__}")
    for key in required:
        if not isinstance(value.get(key), str):
            _fail(f"{where}.{key}", f"must be text, got {value.get(key)!r}")
    for key in optional:
        if value.get(key) is not None and not isinstance(value.get(key), str):
            _fail(f"{where}.{key}", f"must be text or null, got {value.get(key)!r}")


def _check_options(header: Mapping[str, Any], key: str, cls: type, within: str = "") -> None:
    """A section of detection options, each value against its declared range (options.py)."""
    section = _section(header, key, _names(cls), within)
    for f in fields(cls):
        if f.name in section:
            _option_value(f, section[f.name], f"{within}{key}.{f.name}")


def _option_value(f: Field, value: Any, where: str) -> None:
    """Check an option's value a model file holds against the option's range (``where``: its place in the
    header)."""
    try:
        check_value(f, value, where=where)
    except CeVAEError as exc:
        raise CeVAEError(str(exc).rstrip(".")) from None


def _check_calibration(calibration: Any) -> None:
    if not isinstance(calibration, dict):
        _fail("header section 'calibration'", f"must be a JSON object, got {type(calibration).__name__}")
    if len(calibration) > MAX_CALIBRATION_TABLES:  # type: ignore[arg-type]
        _fail("header section 'calibration'", f"must hold at most {MAX_CALIBRATION_TABLES} calibration tables, got "
                                               f"{len(calibration)}")  # type: ignore[arg-type]
    for n, (key, entry) in enumerate(calibration.items(), start=1):  # type: ignore[union-attr]
        where = f"calibration table {n}"
        options = _json(key)  # (one of a later version's options is still named in one)
        if not (isinstance(options, dict) and set(options) == {"score", "post"}
                and all(isinstance(v, dict) for v in options.values())):
            _fail(where, "has a key that is not the JSON object of its options (score and post)")
        if not isinstance(entry, dict) or not isinstance(entry.get("fpr"), list) \
                or not isinstance(entry.get("threshold"), list):
            _fail(where, "must hold the lists 'fpr' and 'threshold'")
        unknown = sorted(set(entry) - set(CALIBRATION_KEYS))
        if unknown:
            _fail(where, f"has unknown key(s) {', '.join(map(repr, unknown))}")
        missing = [k for k in ("n_voxels", "source") if k not in entry]  # (every version wrote both)
        if missing:
            _fail(where, f"lacks {', '.join(map(repr, missing))}")
        voxels = _whole(f"{where} n_voxels", entry["n_voxels"], 1, MAX_VOXELS)
        if not isinstance(entry["source"], str):
            _fail(f"{where} source", f"must be text, got {entry['source']!r}")
        fpr, thr = entry["fpr"], entry["threshold"]
        if len(fpr) != len(thr) or len(fpr) < 2:
            _fail(where, f"needs as many thresholds as rates (at least 2), got {len(thr)} and {len(fpr)}")
        for i, (f, t) in enumerate(zip(fpr, thr)):
            _number(f"{where} rate {i}", f, 0, 1, open_low=True, open_high=True)
            _number(f"{where} threshold {i}", t, -math.inf, math.inf, open_low=True, open_high=True)
        if any(b <= a for a, b in zip(fpr, fpr[1:])):
            _fail(where, "has rates that do not increase strictly")
        if any(b > a for a, b in zip(thr, thr[1:])):
            _fail(where, "has thresholds that rise with the rate (they must fall)")
        for key, items, high, open_low in (("largest_voxel_mm", "sizes", 100, True),
                                           ("bright_tail", "numbers", 1000, False)):
            if key in entry:
                _range(f"{where} {key}", entry[key], items, high, open_low)
        if "scan_voxels" in entry:  # each calibration volume's brain voxels: n_voxels in all
            _list(f"{where} scan_voxels", entry["scan_voxels"], 1, MAX_VOXELS)
            if sum(entry["scan_voxels"]) != voxels:
                _fail(f"{where} scan_voxels", f"add up to {sum(entry['scan_voxels']):.0f}, not its n_voxels {voxels}")
        if "leave_one_out" in entry:  # each volume's threshold from the others at a rate, and its own rate there
            _leave_one_out(f"{where} leave_one_out", entry["leave_one_out"])
            scans = entry.get("scan_voxels")
            if isinstance(scans, list) and len(entry["leave_one_out"]["rate"]) != len(scans):
                _fail(f"{where} leave_one_out", f"holds {len(entry['leave_one_out']['rate'])} volumes, its "
                      f"scan_voxels {len(scans)}")
    steps = option_field(ScoreOptions, "test_time_steps")
    for n in calibrated_test_time_steps(calibration):  # (keys this version cannot read are never used)
        _option_value(steps, n, "calibration test_time_steps")


def _json(text: str) -> Any:
    """``text`` read as JSON; None where it is none."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _list(where: str, value: Any, low: float, high: float, whole: bool = True) -> None:
    """Check a list of numbers in [``low``, ``high``] (whole numbers if ``whole``)."""
    if not isinstance(value, list) or not value:
        _fail(where, f"must be a non-empty list of numbers, got {value!r}")
    for i, item in enumerate(value):
        _number(f"{where}[{i}]", item, low, high)
        if whole and item != int(item):
            _fail(f"{where}[{i}]", f"must be a whole number, got {item!r}")


def _leave_one_out(where: str, record: Any) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("threshold"), list) \
            or not isinstance(record.get("rate"), list) or len(record["threshold"]) != len(record["rate"]):
        _fail(where, "must hold a rate 'fpr' and the equally long lists 'threshold' and 'rate'")
    _number(f"{where} fpr", record.get("fpr"), 0, 1, open_low=True, open_high=True)
    _list(f"{where} threshold", record["threshold"], -math.inf, math.inf, whole=False)
    _list(f"{where} rate", record["rate"], 0, 1, whole=False)


def _range(where: str, value: Any, items: str, high: float, open_low: bool) -> None:
    """Check a recorded [low, high] range (``items``: what it holds, for the message) within [0, ``high``]."""
    if not isinstance(value, list) or len(value) != 2:
        _fail(where, f"must be a list of two {items}, got {value!r}")
    low = _number(f"{where}[0]", value[0], 0, high, open_low=open_low)
    _number(f"{where}[1]", value[1], low, high)


def check_tensor_shapes(declared: Mapping[str, Tuple[Tuple[int, ...], str]], cfg: ModelConfig) -> None:
    """Compare the file's tensors (name -> (shape, dtype), from its header) with the declared architecture.

    The expected shapes come from the network built on the ``meta`` device, which allocates nothing.
    """
    import torch

    from .model import CeVAE

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CeVAE(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(declared))
    extra = sorted(set(declared) - set(expected))
    if missing or extra:
        raise CeVAEError(f"the file does not match its declared architecture (missing: {missing[:3]}, "
                          f"unexpected: {extra[:3]})")
    for key, shape in expected.items():
        got, dtype = declared[key]
        if tuple(got) != shape:
            raise CeVAEError(f"tensor {key} has shape {tuple(got)}, expected {shape} for the declared architecture")
        if dtype not in WEIGHT_DTYPES:
            raise CeVAEError(f"tensor {key} has type {dtype}; float32 or float16 weights are expected")
