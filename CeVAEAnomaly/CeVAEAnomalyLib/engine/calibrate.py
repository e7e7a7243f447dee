"""Calibrating a model bundle on healthy volumes (runs the detection pipeline)."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .bundle import Bundle, save_bundle
from .bundle_checks import NAMES_REMOVED
from .header import BundleHeader, utc_now
from .calibration import (ACQUISITION_FACTOR, CALIBRATE_SOURCE, calibrate, calibration_key, check_default_fpr,
                          largest_side, other_acquisitions, thin_tail, unlike_scans)
from ..io.manifest import (Subject, bids_person, check_subjects, check_volume_path, distinct_names,
                           unknown_persons_note)
from .brainmask import SCORED_MARGIN_MM, given_or_computed_mask
from ..data import refuse_bundled_output
from ..errors import (CALIBRATE_HIGHER_RATE, CALIBRATE_PER_ACQUISITION, CALIBRATE_UNLIKE_SCAN, COMMAND_LINE_SAME_PERSON,
                      COMMAND_LINE_UNKNOWN_PERSONS, CeVAEError)
from ..io.checksum import refuse_changed, sha256_of
from ..io.images import read_image
from ..options import SCORE_TYPES, PostprocessOptions, RunOptions, ScoreOptions, ThresholdPolicy, check_calibratable
from .detector import Detector, mask_warnings_held, software_versions
from .modality import contrast_problem, scan_bright_tail, scan_depth_contrast
from ..progress import ProgressCallback, checked, labelled, report, scaled

log = logging.getLogger(__name__)
WRITE_SHARE = 0.02  # of the progress of a calibration that writes a bundle: its write, after the scoring


def warn_of_training_scans(header: BundleHeader, images: Sequence[Path], checksums: Mapping[Path, str]) -> None:
    """Warn of healthy scans ``images`` (their file sha256: ``checksums``) the model was trained on (a training volume
    its header records, in this file or saved again in another: BundleHeader.trained_scans): they score lower than
    new scans, so thresholds calibrated on them flag more of a new scan. The Slicer panel names its worker's copies
    by their volumes' names (slicer.jobs.WorkerJob)."""
    seen = [str(p) for p in header.trained_scans(images, checksums)]
    if seen:
        log.warning("%s %s among the model's training volumes: scans a model learned from score lower than new ones, "
                    "so a calibration on them flags more of a new scan. Calibrate on healthy scans it did not see.",
                    ", ".join(seen), "is" if len(seen) == 1 else "are")


def healthy_scores(bundle: Bundle, subjects: Sequence[Subject], opts: ScoreOptions,
                   post: PostprocessOptions) -> List[np.ndarray]:
    """Brain-voxel scores of each healthy subject."""
    return [s[0][opts.score_type] for s in _subject_scores(bundle, subjects, [opts], post, [opts.score_type])[0]]


def _subject_scores(bundle: Bundle, subjects: Sequence[Subject], modes: Sequence[ScoreOptions],
                    post: PostprocessOptions, score_types: Sequence[str], progress: Optional[ProgressCallback] = None,
                    scorers: Optional[Sequence[Bundle]] = None, run: RunOptions = RunOptions(),
                    check_contrast: bool = False
                    ) -> Tuple[List[List[Dict[str, np.ndarray]]], List[float], List[Optional[float]]]:
    """For each subject and each scoring mode of ``modes``, the brain-voxel scores of every score type
    (one read per subject, one network pass per mode in batches of ``run``), scored by ``bundle`` or, if
    given, by ``scorers[i]`` for subject i; each subject's largest voxel side (mm) and bright tail
    (engine/modality.py; None where it cannot be measured).

    ``progress`` is called per subject and during an automatic brain mask; it may raise
    :class:`~..progress.Cancelled`. ``check_contrast``: warn about a volume whose contrast is not the model's
    (engine/modality.py).
    """
    models = list(scorers) if scorers is not None else [bundle] * len(subjects)
    if len(models) != len(subjects):
        raise CeVAEError("Give one scoring model per calibration subject.")
    detectors = {id(m): [Detector(m, opts, post, ThresholdPolicy(threshold=math.inf), run.batch_size, run.amp)
                         for opts in modes] for m in models}
    out, largest, tails = [], [], []
    for n, (s, model) in enumerate(zip(subjects, models)):
        part = labelled(scaled(progress, n / len(subjects), (n + 1) / len(subjects)),
                        f"Healthy volume {n + 1}/{len(subjects)} ({s.name})")
        report(part, 0.0, "Reading")
        with s.named_errors():  # in a list of healthy volumes: say which one
            image = read_image(s.image)
            largest.append(largest_side(image.GetSpacing()))
            with mask_warnings_held():  # (said after the brain's size, as detection says them)
                mask = given_or_computed_mask(image, s.mask, str(s.image), scaled(part, 0.0, 0.3), SCORED_MARGIN_MM,
                                              where=f"{s.image}: ")  # (its warnings name the scan as detection's do)
                scan = detectors[id(model)][0].prepared(image, mask, f"{s.image}: ", automatic=s.mask is None)
            if check_contrast and not scan.ct:  # (after the checks: a scan refused there is not warned of first in
                _warn_of_contrast(s, image, mask, model)  # the same words; a CT was warned of as one only)
            scores = []
            for k, detector in enumerate(detectors[id(model)]):  # each mode scores the scan checked once
                mode = f" (mode {k + 1}/{len(modes)})" if len(modes) > 1 else ""
                step = labelled(scaled(part, 0.3 + 0.7 * k / len(modes), 0.3 + 0.7 * (k + 1) / len(modes)),
                                f"Scoring{mode}")
                report(step, 0.0, "starting")
                scores.append(detector.prepared_scores(scan, score_types, step))
            del scan  # (its model slices: freed before the next scan is read)
            tails.append(scan_bright_tail(image, mask))
        out.append(scores)
    report(progress, 1.0, "Scored every healthy volume")
    return out, largest, tails


def _warn_of_contrast(subject: Subject, image, mask, model: Bundle) -> None:
    """A warning, naming the volume, when its contrast is not the model's (a T2 for a T1 model), or when it cannot
    be told. Not a refusal: a thin slab of a T1 also measures lower (``adapt``, which trains on the scans, refuses).
    (A CT is not passed here: it is warned of as one, by detector.checked_image, only.)"""
    try:
        problem = contrast_problem([subject.name], [scan_depth_contrast(image, mask, model.preprocess)], model.header)
    except CeVAEError as exc:
        problem = f"{exc}"
    if problem:
        log.warning("%s: %s The thresholds taken on it may not fit the model's scans; check the scan and its brain "
                    "mask (a partial slab, or a mask that holds the head, measures differently).", subject.image,
                    problem)


def calibrate_model(bundle: Bundle, subjects: Sequence[Subject], source: str, opts: ScoreOptions,
                    post: PostprocessOptions, progress: Optional[ProgressCallback] = None,
                    scorers: Optional[Sequence[Bundle]] = None, run: RunOptions = RunOptions(),
                    test_time_steps: Sequence[int] = (), check_contrast: bool = False,
                    fpr: Optional[float] = None, higher_rate: str = CALIBRATE_HIGHER_RATE,
                    unlike_scan: str = CALIBRATE_UNLIKE_SCAN,
                    per_acquisition: Optional[str] = CALIBRATE_PER_ACQUISITION) -> Dict[str, dict]:
    """Calibrations for every score type with otherwise the given options, keyed for lookup (the network
    runs as ``run`` says: batch size, mixed precision).

    ``fpr``: the model's default rate; with volumes of 2 or more persons (a person's scans left out together) each
    table records each volume's leave-one-out threshold
    and rate at it, and a volume unlike the others there (engine/calibration.unlike_scans) is warned about by name,
    for ``opts``, and a rate too low for the voxels calibrated on is warned about; each says what to do in the
    caller's words (``unlike_scan``, ``higher_rate``). Volumes of different acquisitions are warned about, ending with
    ``per_acquisition`` (None: not warned about, the caller said it already in its own words).

    ``scorers``: one model per subject that scores it instead of ``bundle`` (models that never saw
    their subject give the rates an unseen subject gets; with normalised scores these transfer).
    ``test_time_steps``: thorough modes (test-time adaptation steps) calibrated as well, on the same reads.
    ``check_contrast``: see :func:`_subject_scores`.
    """
    checked(progress)
    if not subjects:
        raise CeVAEError("No healthy volumes to calibrate on.")
    check_subjects(subjects)
    modes = [opts.replace(test_time_steps=n) for n in dict.fromkeys([opts.test_time_steps, *test_time_steps])]
    scores, largest, tails = _subject_scores(bundle, subjects, modes, post, SCORE_TYPES, progress, scorers, run,
                                             check_contrast)
    log.info("Calibrated %s on %d healthy volume(s)%s.", ", ".join(SCORE_TYPES), len(subjects),
             "".join(f", {m.test_time_steps} test-time steps" for m in modes if m.test_time_steps))
    persons = [s.group for s in subjects]  # a person's scans are left out together
    entries = {calibration_key(mode.replace(score_type=t), post):
               calibrate([s[k][t] for s in scores], source, largest, tails, fpr, persons)
               for k, mode in enumerate(modes) for t in SCORE_TYPES}
    default = entries[calibration_key(opts, post)]
    if "leave_one_out" in default:
        log.info("%s", _spread_line(default["leave_one_out"], persons))
    for warning in unlike_scans(default, [str(s.image) for s in subjects], unlike_scan, persons):
        log.warning("%s", warning)
    if per_acquisition is not None:
        _warn_of_mixed_acquisitions(subjects, largest, default["scan_voxels"], per_acquisition)
    thin = thin_tail(default, fpr) if fpr is not None else None
    if thin:
        log.warning("The model's default rate is too low for %d healthy volume(s): %s. Calibrate on more healthy "
                    "scans, or %s.", len(subjects), thin, higher_rate)
    return entries


def _spread_line(record: Mapping[str, Any], persons: Sequence[Tuple[str, str]]) -> str:
    """The log line of how far the threshold at the default rate moves as each volume is left out (``record``: its
    engine/calibration.leave_one_out), said of each person's scans where a person has several (``persons``: each
    volume's group), as they are left out together."""
    spread, groups = record["threshold"], len(set(persons))
    left_out = ("each healthy volume moves" if groups == len(persons) else
                f"the healthy volumes of each of the {groups} persons (a person's scans together) move")
    return (f"Left out in turn, {left_out} the threshold at the default rate {record['fpr']:g} between "
            f"{min(spread):.4g} and {max(spread):.4g}.")


def _warn_of_mixed_acquisitions(subjects: Sequence[Subject], largest: Sequence[float], voxels: Sequence[int],
                                advice: str) -> None:
    """Warn when the healthy volumes are of different acquisitions by their largest voxel sides (other_acquisitions):
    their pooled voxels put the finer scans' tail in the thresholds, and the recorded range stops detection's warning
    for the coarser acquisition; ``advice``: what to do, in the caller's words."""
    coarse = other_acquisitions(largest)
    if not coarse:
        return
    thick, thin = int(np.argmax(largest)), int(np.argmin(largest))
    share = sum(voxels[j] for j in coarse) / sum(voxels)
    log.warning("The healthy volumes are of different acquisitions: %s has voxels up to %.3g mm, %s %.3g mm (more "
                "than %g times apart). The thresholds pool their voxels, and the %d with voxels over %.3g mm hold "
                "%.1f%% of them, so the threshold follows the finer scans and its rate on the coarser ones is not "
                "known; yet detection no longer warns about scans with voxels up to %.3g mm. %s",
                subjects[thick].image, largest[thick], subjects[thin].image, largest[thin], ACQUISITION_FACTOR,
                len(coarse), largest[thin] * ACQUISITION_FACTOR, 100 * share, largest[thick] * ACQUISITION_FACTOR,
                advice)


def recalibrate(bundle: Bundle, subjects: Sequence[Subject], out: Path, opts: ScoreOptions,
                post: PostprocessOptions, default_fpr: Optional[float] = None,
                source: str = CALIBRATE_SOURCE,
                progress: Optional[ProgressCallback] = None, scorers: Optional[Sequence[Bundle]] = None,
                run: RunOptions = RunOptions(), checksums: Optional[Mapping[Path, str]] = None,
                higher_rate: str = CALIBRATE_HIGHER_RATE, unlike_scan: str = CALIBRATE_UNLIKE_SCAN,
                unknown_persons: str = COMMAND_LINE_UNKNOWN_PERSONS,
                same_person: str = COMMAND_LINE_SAME_PERSON, read_checked: bool = False) -> Path:
    """Write ``bundle`` to ``out`` with new default scoring options and their calibration
    (``scorers``, ``run``: see :func:`calibrate_model`; ``checksums``: the images' file sha256 where the caller has
    them already, each image read once more otherwise; ``higher_rate``, ``unlike_scan``: see :func:`calibrate_model`;
    ``unknown_persons``, ``same_person``: where no scan's person is known, what would have named it and how to name
    one person's scans, in the caller's words: see errors.Wording; ``read_checked``: the caller's
    :func:`readable_subjects` named every scan and mask that cannot be read, so the masks are not read for it again).
    Every score type is calibrated; the default score type
    stays ``combi`` whatever ``opts.score_type`` is. The copy is named after ``out`` (its file stem) and records what
    it was made from, when, on which scans and with which options (:func:`_recalibration_record`).

    The bundle's default mode stays the one it had (``opts`` with the old default's test-time steps) and is
    always calibrated; ``opts.test_time_steps`` other than that (a thorough mode) is calibrated beside it,
    so that a site calibration keeps every mode the user asked for calibrated and changes no default.
    A volume of another contrast than the model's scans (a T2 for a T1 model) is warned about, naming it.
    Options a model file may not hold (:func:`~..options.check_calibratable`) are refused before any work.
    ``default_fpr`` (None: the bundle's) must be a rate the calibration covers; it is checked before any work, and
    a rate whose new threshold is 0 (engine/calibration.threshold_for_fpr) is refused before anything is written.
    """
    for value, cls, what in ((bundle, Bundle, "bundle"), (opts, ScoreOptions, "scoring options"),
                             (post, PostprocessOptions, "post-processing options")):
        if not isinstance(value, cls):
            raise CeVAEError(f"The {what} must be a {cls.__name__}, got {type(value).__name__}.")
    checked(progress)
    refuse_bundled_output(out)  # even where the caller would replace an existing file
    if default_fpr is not None:
        check_default_fpr(default_fpr)
    check_calibratable(opts, post)
    check_subjects(subjects)
    _warn_of_a_single_person(subjects)
    _note_unknown_persons(subjects, unknown_persons, same_person)
    old = bundle.header
    rate = old.default_fpr if default_fpr is None else float(default_fpr)
    default = opts.replace(score_type="combi", test_time_steps=old.score_options.test_time_steps)
    scoring = scaled(progress, 0.0, 1.0 - WRITE_SHARE)
    hashed = _hashed_before_scoring(subjects, checksums or {})
    if not read_checked:
        readable_subjects(subjects, hashed)
    calibration = calibrate_model(bundle, subjects, source, default, post, scoring, scorers, run,
                                  test_time_steps=[opts.test_time_steps], check_contrast=True, fpr=rate,
                                  higher_rate=higher_rate, unlike_scan=unlike_scan)
    refuse_changed(hashed.keys(), hashed)  # still the content hashed before it was scored, which the record says
    # each scan's name (Subject.name: the name Slicer gave it, else its file stem), led by its folders where names
    # repeat (a folder per person: sub-01/t1, sub-02/t1)
    given = {s.image: s.name for s in subjects}
    names = distinct_names(list(given), name_of=given.__getitem__)
    kept = {k: v for k, v in old.extra.items() if k != NAMES_REMOVED}  # (the new scans are named: not a shared copy)
    header = replace(old, name=Path(out).stem, score_options=default, postprocess=post, calibration=calibration,
                     default_fpr=rate,
                     extra=dict(kept, calibration_subjects=[names[s.image] for s in subjects],
                                recalibration=_recalibration_record(bundle, subjects, names, opts, post, rate,
                                                                    run, hashed)))
    try:  # a model whose own rate gets no threshold could not detect with its defaults
        header.threshold(default, post, ThresholdPolicy())
    except CeVAEError as exc:
        raise CeVAEError(f"The calibrated model was not written: its default rate gets no threshold. {exc}") from None
    report(progress, 1.0 - WRITE_SHARE, "Writing the calibrated model")
    path = save_bundle(out, bundle.model, header, half=old.weights_dtype == "float16")
    report(progress, 1.0, "Calibrated model written")
    return path


def _warn_of_a_single_person(subjects: Sequence[Subject]) -> None:
    """Warn where the healthy scans are a single scan, or scans of a single person (sessions: they share its anatomy
    and any lesion), which no scan of another person checks (engine/calibration.leave_one_out)."""
    if len(subjects) == 1:
        log.warning("Calibrating on a single healthy scan (%s): no other scan can show whether it is typical of the "
                    "protocol (a lesion or an artefact in it would raise the threshold unnoticed). Calibrate on 2 or "
                    "more healthy scans of the protocol.", subjects[0].image)
    elif len({s.group for s in subjects}) == 1:
        first = subjects[0]
        log.warning("Calibrating on healthy scans of a single person (%s: person %s): no scan of another person can "
                    "show whether they are typical of the protocol (a lesion or an artefact in them would raise the "
                    "threshold unnoticed). Calibrate on healthy scans of 2 or more persons of the protocol.",
                    ", ".join(str(s.image) for s in subjects), first.person or bids_person(first.image))


def _note_unknown_persons(subjects: Sequence[Subject], unknown: str, same_person: str) -> None:
    """Say, as ``adapt`` does, where nothing tells who was scanned (in the caller's words: ``unknown``,
    ``same_person``): each scan is then left out alone when checked against the others
    (engine/calibration.leave_one_out), and two sessions of one person hide each other."""
    note = unknown_persons_note(subjects, unknown, same_person)
    if note:
        log.info("%s", note)


def readable_subjects(subjects: Sequence[Subject], checksums: Mapping[Path, str]) -> Dict[Path, str]:
    """The voxel checksums of the subjects' images (``checksums``: each file's sha256), each brain mask read too:
    every image and mask that cannot be read is named in one error (UnreadVolumes) before any scan is scored."""
    from ..training.cache import UnreadVolumes, voxel_checksums_or_errors

    voxels, unread = voxel_checksums_or_errors([s.image for s in subjects], dict(checksums))
    problems = list(unread.values())
    masks = list(dict.fromkeys(s.mask for s in subjects if s.mask is not None))
    for mask in masks:
        try:
            read_image(mask, "brain mask")
        except CeVAEError as exc:
            problems.append(str(exc))
    if problems:  # (brain masks counted among the volumes where one is unreadable)
        raise UnreadVolumes(problems, len(voxels) + (len(masks) if len(problems) > len(unread) else 0),
                            "the others were read")
    return voxels


def _hashed_before_scoring(subjects: Sequence[Subject], checksums: Mapping[Path, str]) -> Dict[Path, str]:
    """sha256 of each scan's image (from ``checksums`` where the caller hashed it already) and brain mask, taken
    before they are scored; each file checked first, so that a missing one is refused by name."""
    hashed: Dict[Path, str] = {}
    for s in subjects:
        for path, what in ((s.image, "healthy scan"), (s.mask, "brain mask")):
            if path is not None and path not in hashed:
                check_volume_path(path, what)
                try:
                    hashed[path] = checksums.get(path) or sha256_of(path)
                except OSError as exc:
                    raise CeVAEError(f"The {what} {path} cannot be read ({exc}).") from None
    return hashed


def _recalibration_record(bundle: Bundle, subjects: Sequence[Subject], names: Dict[Path, str], opts: ScoreOptions,
                          post: PostprocessOptions, rate: float, run: RunOptions,
                          hashed: Mapping[Path, str]) -> Dict[str, Any]:
    """The ``recalibration`` section of the header of ``bundle`` calibrated on ``subjects``: the model it was made
    from (``parent``: name, file name, sha256), the first model of a chain of recalibrations (``original``: the parent
    unless it is a calibrated copy itself), when (UTC), on which scans (name as in ``names``, sha256 of the image and
    of its mask from ``hashed``, the content scored; None where the mask was computed), with which options
    (``opts`` and ``post`` as asked, the default rate, mixed precision, the batch size: sampled scores draw batch by
    batch) and with which versions of Python and the libraries that scored them (``software``)."""
    parent = {"name": bundle.header.name, "file": bundle.path.name, "sha256": bundle.sha256}
    earlier = bundle.header.extra.get("recalibration")
    original = earlier.get("original") if isinstance(earlier, dict) else None
    scans = [{"name": names[s.image], "sha256": hashed[s.image],
              "mask_sha256": None if s.mask is None else hashed[s.mask]} for s in subjects]
    return {"parent": parent, "original": original if isinstance(original, dict) else parent,
            "calibrated_utc": utc_now(), "scans": scans,
            "options": {"score_options": opts.to_dict(), "postprocess": post.to_dict(), "default_fpr": rate,
                        "amp": run.amp, "batch_size": run.batch_size},
            "software": software_versions()}
