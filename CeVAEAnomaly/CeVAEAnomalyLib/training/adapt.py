"""Adapting a trained model to a site: fine-tune it on the site's healthy scans, calibrate on held-out folds.

The scheme (k fold runs and a final run) is described in :mod:`.adapt_plan`. Every run is a
:class:`~.trainer.Trainer` run that starts from the base model's weights, with the base's
architecture, preprocessing and loss, so checkpoints, ``resume``, interrupts and the checks of
``train`` hold for each; a resumed adaptation skips the runs whose checkpoints are complete. The
bundle records its parent model (sha256), the site scans (sha256) and which scans each fold held out.
"""
from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import refuse_bundled_output
from ..engine.bundle import Bundle, load_bundle
from ..engine.calibrate import WRITE_SHARE
from ..engine.calibration import calibrated_test_time_steps
from ..engine.devices import DeviceUnavailable, resolve_device
from ..engine.bundle_checks import BASE_VOLUMES_KEY
from ..engine.header import CONTENT_KEY, BundleHeader, read_header, written_sections
from ..engine.model import CeVAE
from ..errors import COMMAND_LINE_ADAPT, CeVAEError, Wording
from ..io.checksum import FileMemo, first_changed
from ..io.lock import hold_output, refuse_if_held
from ..io.manifest import Subject, check_subjects, check_volume_path, distinct_names, unknown_persons_note
from ..io.naming import refuse_misnamed
from ..io.targets import Inputs
from ..options import ScoreOptions, option_field
from ..progress import ProgressCallback, checked, labelled, report, scaled
from ..system import command_word
from .adapt_plan import (MIN_SCANS, TIMED_STEPS, AdaptOptions, Pace, calibration_left, calibration_seconds,
                         describe_estimate, fine_tuning_left, fold_files, fold_plan, mixed_acquisitions, output_paths,
                         resumed_note, run_files, run_names, training_seconds)
from .checkpoint import read_checkpoint
from .cache import SliceCache, refuse_cache_among_inputs, temporary_cache, voxel_checksums_or_errors
from .config import TrainConfig, recorded_augment
from .data import person_groups, unique_subjects
from .distributed import DistInfo, file_checksums
from ..engine.modality import check_modality, depth_contrast
from .packaging import package, subject_records, training_header
from .said_once import each_warning_once
from .space import check_free_space
from .trainer import Trainer, content_order, header_largest_side

log = logging.getLogger(__name__)
PREPARE_SHARE = 0.05  # of the progress bar; calibration gets its estimated share, the runs the rest
# what the calibration advises for site scans of different acquisitions that the early warning could not tell
PER_ACQUISITION = f"With healthy scans of {MIN_SCANS} persons in each acquisition, adapt one model per acquisition."


@each_warning_once()  # each scan is masked for its slices and for its scores: each warning said once
def adapt(base: Path, subjects: Sequence[Subject], out: Path, options: AdaptOptions = AdaptOptions(),
          progress: Optional[ProgressCallback] = None, inputs: Sequence[Optional[Path]] = (),
          wording: Wording = COMMAND_LINE_ADAPT) -> Path:
    """Fine-tune the bundle ``base`` on the healthy ``subjects`` of a site and write the calibrated bundle ``out``.

    ``inputs``: other files the caller read (a manifest), which no output may replace. ``progress``
    may raise :class:`~..progress.Cancelled`; the checkpoints written so far are kept for ``resume``.
    ``wording``: the caller's words for how its user stops, resumes or starts the run anew, for the warnings and
    errors that advise it (Slicer's: slicer.worker.PANEL_WORDING).
    """
    options.validate()
    device = _device(options.device, wording)  # what the runs use: a missing GPU is refused before any scan is read
    checked(progress)
    check_subjects(subjects)
    base, out = Path(base), Path(out)
    refuse_misnamed(out, "model", "a .cevae bundle", ".cevae")  # before the scans are hashed
    refuse_bundled_output(out)  # even with overwrite
    memo = FileMemo()  # each scan hashed once for all runs, again only where it changed on disk meanwhile
    header, parent = _read_base(base, memo)  # parent: the file every run starts from, as the bundle records it
    augment = recorded_augment(header.training.get("augment"), base)  # fine-tuned as the base was trained
    refuse_if_held(out, "adapt")  # an adaptation writing it now: said so, not taken for a finished or earlier one
    given = Inputs([base, *inputs, *(p for s in subjects for p in (s.image, s.mask))])
    _refuse_input(out, given, wording)  # before "exists"
    # a folder, an unwritable place: before any scan is read
    options.run_config(out, "final").check_output_paths(given, wording)
    if options.cache_dir is not None:
        refuse_cache_among_inputs(Path(options.cache_dir), subjects, wording)
    if out.is_file() and not (options.overwrite or options.resume) and not fold_files(out, ".ckpt"):
        raise _finished(out, wording)  # finished (as below): refused before hashing
    planned = run_names(len(person_groups(subjects)), options.folds)  # (a scan in two files counts twice here)
    check_free_space("This adaptation", [options.run_config(out, run).checkpoint_path for run in planned], out,
                     header.model, False, [s.image for s in subjects], len(header.trained_orientations()),
                     options.cache_dir, wording)
    checksums = _checksums(subjects, memo)
    # the unread keep their file sha256: named together (with the masks that do not fit) as the scans are prepared
    voxels, unread = voxel_checksums_or_errors([s.image for s in subjects], checksums)
    seen = [str(p) for p in header.trained_scans([s.image for s in subjects if s.image not in unread], checksums)]
    if seen:  # e.g. an adapted model adapted again on its own site scans
        log.warning("The site scan(s) %s %s among the training volumes of %s: a fold model fine-tuned from it has "
                    "seen them already, so they score lower than new scans and the calibration flags more of a new "
                    "scan. Adapt the model it came from, or use other scans.", ", ".join(seen),
                    "is" if len(seen) == 1 else "are", base.name)
    # the same scan in two files (another format, compressed or not) is one scan: by its voxels, not its bytes
    listed, subjects = subjects, unique_subjects(content_order(subjects, checksums), voxels)  # folds: not as listed
    persons = person_groups(subjects)  # a person's scans are held out together
    plan = fold_plan(persons, options.folds)  # refuses too few different scans or persons
    note = unknown_persons_note(subjects, wording.unknown_persons, wording.same_person)
    if note:
        log.info("%s", note)
    warned_of_mixed = _warn_of_mixed_acquisitions(subjects, wording.stop)
    modes = _adaptable_modes(calibrated_test_time_steps(header.calibration), base)  # the parent's, calibrated again
    thorough = len([steps for steps in modes if steps > 0])
    calibrating = calibration_seconds(len(subjects), thorough_modes=thorough)
    calibrate_share = min(0.8, calibrating / (calibrating + training_seconds(len(subjects), options,
                                                                             n_persons=len(persons))))
    runs = run_names(len(persons), options.folds)
    configs = {run: replace(options.run_config(out, run, init_from=base), device=str(device), augment=augment)
               for run in runs}
    earlier = _as_listed_by_earlier_folds(listed, subjects, plan, configs, checksums, options.folds, header, wording) \
        if options.resume else None
    if earlier is not None:
        log.info("The adaptation being resumed was begun by an earlier version, which made its folds in the order the "
                 "scans were listed (now by their content); it goes on with those folds.")
        subjects, persons = earlier, person_groups(earlier)
        plan = fold_plan(persons, options.folds)
    read = Inputs([base, *inputs, *checksums])
    for path in output_paths(out, len(persons), options):
        _refuse_input(path, read, wording)
    finished = out.is_file() and not any(cfg.checkpoint_path.is_file() for run, cfg in configs.items()
                                         if run != "final")  # fold checkpoints go once the model is written
    if finished and not (options.overwrite or options.resume):
        raise _finished(out, wording)
    for cfg in configs.values():
        cfg.check_outputs((), options.overwrite, wording)
    if options.resume and not any(cfg.checkpoint_path.is_file() for cfg in configs.values()):
        raise CeVAEError(f"{wording.resume_request} was given but there is no checkpoint of an adaptation to {out} "
                         f"(expected {configs['final'].checkpoint_path} or a fold's).")
    if options.resume and finished:
        raise CeVAEError(f"The adaptation to {out} is complete (its model file is written); there is nothing to "
                         f"resume: {wording.replace_model}.")
    log.info("%s", describe_estimate(len(subjects), device.type, options, len(persons), thorough))  # (now it runs)
    bundle = load_bundle(base, "cpu", memo)  # the weights checked once, before any run starts from them
    if bundle.sha256 != parent:
        raise _base_replaced(base)
    # one adaptation per --out at a time
    with hold_output(out, "adapt"), _cache_folder(options.cache_dir, wording) as root:
        cache = SliceCache(root, bundle.preprocess, wording, memo)
        training_part = scaled(progress, 0.0, 1.0 - calibrate_share)  # preparing, then the fine-tuning runs
        orientations = header.trained_orientations()
        # each scan read and masked once, in every orientation the runs train on (axial first: the contrast check's)
        entries = cache.prepare(subjects, checksums, _with_axial_first(orientations),
                                labelled(scaled(training_part, 0.0, PREPARE_SHARE), "Preparing the scans"))
        contrasts = [_contrast(s, e[0].path) for s, e in zip(subjects, entries)]
        check_modality([s.name for s in subjects], contrasts, header)  # before any run trains on them
        if options.overwrite and out.is_file():
            log.info("The earlier model %s stays in place, usable, until the new one is written.", out)
        models, final, seconds = _fine_tune(subjects, plan, runs, configs, header, bundle, root, orientations,
                                            options.resume, training_part, wording, memo, checksums, parent,
                                            options.folds, options.overwrite)
        calibrating_pace = Pace(len(subjects), 1)  # timed from the first scan calibrated
        scorers = [Bundle(models[runs[f]], header, base) for j in range(len(subjects))
                   for f, held in enumerate(plan) if j in held]
        new = training_header(out.stem, bundle.preprocess, header.loss, final.record(seconds))
        adapted = replace(new, score_options=header.score_options, postprocess=header.postprocess,
                          modality=header.modality, default_fpr=header.default_fpr,
                          extra=dict(new.extra, adaptation=_record(header, base, parent, subjects, checksums,
                                                                   plan, contrasts, options)))
        path = package(out, final.model, adapted, subjects, "site scans, each scored by the fold model fine-tuned "
                       "without it", final.device, half=False, scorers=scorers,
                       progress=_timed(labelled(scaled(progress, 1.0 - calibrate_share, 1.0 - WRITE_SHARE),
                                                "Calibrating"), calibrating_pace, len(subjects), calibration_left),
                       test_time_steps=modes, checksums=checksums, wording=wording, memo=memo,
                       per_acquisition=None if warned_of_mixed else PER_ACQUISITION)
    for run in runs[:-1]:  # fold checkpoints are only needed to resume an unfinished adaptation
        configs[run].checkpoint_path.unlink(missing_ok=True)
    report(progress, 1.0, "Adapted model written")
    log.info("Adapted model written to %s (%d site scans, %d folds). Its threshold at the default healthy "
             "false-positive rate is %s, calibrated on the site's scans; %s. %s", path, len(subjects), len(plan),
             threshold_said(read_header(path).default_threshold(), wording), compared_with_parent(header, base.name),
             wording.detect_with.format(path=command_word(str(path))))  # (a path with spaces pastes as one word)
    return path


def threshold_said(threshold: Optional[float], wording: Wording) -> str:
    """The adapted model's threshold at its default rate as its summary says it; None (0 there): what to detect with
    instead, in ``wording``."""
    if threshold is None:
        return f"none (it gets 0 there, which would flag the whole brain: {wording.lower_rate})"
    return f"{threshold:.3g}"


def compared_with_parent(parent: BundleHeader, name: str) -> str:
    """What the adapted model's summary says of the model it was adapted from (``parent``, file ``name``) at the same
    scoring, post-processing and default rate: its threshold there, or why it has none (its calibrated threshold there
    is 0, or it is not calibrated for them)."""
    before = parent.default_threshold()
    if before is not None:
        return f"the model it was adapted from, {name}, has {before:.3g} there"
    if parent.is_calibrated(parent.score_options, parent.postprocess):
        return f"the model it was adapted from, {name}, gets 0 there, which would flag the whole brain"
    return (f"the model it was adapted from, {name}, has no threshold to compare with: it is not calibrated for its "
            "own default settings")


def _fine_tune(subjects: Sequence[Subject], plan: List[List[int]], runs: List[str], configs: Dict[str, TrainConfig],
               header: BundleHeader, base: Bundle, cache: Path, orientations: Tuple[str, ...], resume: bool,
               progress: Optional[ProgressCallback], wording: Wording, memo: FileMemo,
               checksums: Dict[Path, str], parent: str, folds: int,
               replacing: bool) -> Tuple[Dict[str, CeVAE], Trainer, float]:
    """Each run in turn (fold N without its held-out scans, then the final one on all), each from the weights of
    ``base`` on the slices in ``orientations`` of the scans prepared in the folder ``cache``: the models by run, the
    final run's trainer and the seconds the folds spent training, in this session and before a resume, and the final
    run in this session. A run whose checkpoint exists resumes from it. The steps' progress messages end with the
    measured pace and the time left (:class:`~.adapt_plan.Pace`); their errors say what to do in ``wording``.
    ``memo``: the adaptation's, which hashed the scans (a scan unchanged since is not read again) to ``checksums``: a
    run whose scans no longer hold them is refused before it trains. ``parent``: the sha256 of the file ``base`` was
    loaded from, which every run's checkpoints record. ``folds``: the folds option (a resume begun with another one is
    refused naming it). ``replacing`` (--overwrite): the earlier adaptation's checkpoints and logs go once the first
    run's first checkpoint and log are written (:func:`_remove_earlier_runs`)."""
    start = base.model.state_dict()
    steps = configs["final"].max_steps
    pace = Pace(len(runs) * steps, TIMED_STEPS)
    models: Dict[str, CeVAE] = {}
    seconds = 0.0
    share = (1.0 - PREPARE_SHARE) / len(runs)

    def scans_of(n: int, run: str) -> List[Subject]:
        return [s for j, s in enumerate(subjects) if run == "final" or j not in plan[n]]

    def trainer_of(n: int, run: str) -> Trainer:
        held = plan[n] if run != "final" else []
        cfg = replace(configs[run], model=header.model, loss=header.loss,
                      orientations=orientations, cache_dir=cache,
                      resume=resume and configs[run].checkpoint_path.is_file())
        title = (f"Fine-tuning {n + 1}/{len(runs)} (without {', '.join(subjects[j].name for j in held)})"
                 if held else f"Fine-tuning {n + 1}/{len(runs)} (final model, all scans)")
        begin = PREPARE_SHARE + n * share
        timed = _timed(labelled(scaled(progress, begin, begin + share), title), pace, steps, fine_tuning_left,
                       n * steps)
        first = partial(_remove_earlier_runs, configs["final"].out, cfg.checkpoint_path, cfg.log_path) \
            if replacing and n == 0 else None
        return Trainer(cfg, scans_of(n, run), base.preprocess, timed, start_weights=start, wording=wording, memo=memo,
                       start_sha256=parent, on_first_checkpoint=first)

    # every checkpoint the resume continues from is checked first: one of another run (a final checkpoint of another
    # adaptation) is refused before any fold trains, not after all of them
    resumed = {run: trainer_of(n, run) for n, run in enumerate(runs)
               if resume and configs[run].checkpoint_path.is_file()}
    for run, trainer in resumed.items():
        if run != "final":
            _refuse_other_folds(trainer, runs.index(run), plan, subjects, checksums, folds, wording)
        trainer.check_resume()
    if resumed:  # the estimate said before counted every step
        done = sum(int(trainer.check_resume()["step"]) for trainer in resumed.values())  # type: ignore[call-overload]
        log.info("%s", resumed_note(done, len(runs), steps, configs["final"].batch_size, configs["final"].device))
    for n, run in enumerate(runs):
        trainer = resumed.pop(run, None)  # built before the first run (a resume's)
        # its scans as they are now (hashed again only where changed), before a run built now reads them
        changed = first_changed((p for s in scans_of(n, run) for p in (s.image, s.mask)), checksums, memo)
        if changed is None and trainer is None:
            trainer = trainer_of(n, run)  # (changed in between: it hashed other content)
            changed = next((p for p, digest in trainer.checksums.items() if checksums.get(p, digest) != digest), None)
        if changed is not None:
            kind = "brain mask" if any(changed == s.mask for s in subjects) else "scan"
            raise _changed_since_began(changed, configs, resume, wording, kind)
        pace.pause()  # the run's set-up (its slices, a checkpoint read) is not step time
        seconds += trainer.fit()
        if run != "final":  # a fold trained before a resume counts too (the final run's record adds its own)
            seconds += trainer.seconds_before
        models[run] = trainer.model.eval()
    return models, trainer, seconds


def _as_listed_by_earlier_folds(listed: Sequence[Subject], subjects: List[Subject], plan: List[List[int]],
                                configs: Dict[str, TrainConfig], checksums: Dict[Path, str], folds: int,
                                header: BundleHeader, wording: Wording) -> Optional[List[Subject]]:
    """``subjects`` in the order they were ``listed``, where the fold checkpoints of the adaptation being resumed hold
    out what that order makes and not what ``plan`` (made in :func:`~.trainer.content_order`) does: an earlier version
    made its folds in the order listed. None otherwise (other differences are left to the runs' checks to name)."""
    def key(s: Subject) -> Tuple[str, Optional[str]]:
        return checksums[s.image], checksums[s.mask] if s.mask is not None else None

    trained: Dict[int, set] = {}  # fold -> the scans its checkpoint trains on
    for n, run in enumerate(r for r in configs if r != "final"):
        if configs[run].checkpoint_path.is_file():
            try:
                saved = read_checkpoint(configs[run].checkpoint_path, header.model.to_dict(), "", wording)["run"]
                trained[n] = {(v["image_sha256"], v["mask_sha256"]) for v in saved["train"]}
            except (CeVAEError, KeyError, TypeError):
                return None

    def fits(scans: Sequence[Subject], held: List[List[int]]) -> bool:
        return all(keys == {key(s) for j, s in enumerate(scans) if j not in held[n]} for n, keys in trained.items())

    position = {s.image: n for n, s in reversed(list(enumerate(listed)))}
    as_listed = sorted(subjects, key=lambda s: position[s.image])
    if fits(subjects, plan) or not fits(as_listed, fold_plan(person_groups(as_listed), folds)):
        return None
    return as_listed


def _refuse_other_folds(trainer: Trainer, fold: int, plan: List[List[int]], subjects: Sequence[Subject],
                        checksums: Dict[Path, str], folds: int, wording: Wording) -> None:
    """Refuse, naming the folds option (``folds`` now), the resume of fold ``fold`` whose checkpoint holds out other
    scans of these ``subjects`` than ``plan`` does, as another number of folds would: that was said as training
    volumes "in the checkpoint's run, not in this one", scans the user had not changed. Other differences are left to
    :meth:`~.trainer.Trainer.check_resume` to name."""
    def key(s: Subject) -> Tuple[str, Optional[str]]:
        return checksums[s.image], checksums[s.mask] if s.mask is not None else None

    saved = trainer.resume_checkpoint().get("run")
    try:
        trained = {(v["image_sha256"], v["mask_sha256"]) for v in saved["train"]}  # type: ignore[index]
    except (KeyError, TypeError):
        return
    keys = [key(s) for s in subjects]
    held = sorted(j for j, k in enumerate(keys) if k not in trained)
    persons = person_groups(subjects)
    if held == plan[fold] or not trained <= set(keys):
        return
    was = next((k for k in range(fold + 1, len(persons) + 1) if fold_plan(persons, k)[fold] == held), None)
    if was is None or was == len(plan):
        return
    name = dict(wording.option_names).get("folds")
    what = (f"its adaptation was begun with {name} {was}{' or more' if was == len(persons) else ''} ({was} folds of "
            f"these scans), this one with {name} {folds} ({len(plan)} folds)" if name else wording.other_settings)
    raise CeVAEError(f"{wording.resume_request} refused: the checkpoint {trainer.cfg.checkpoint_path} belongs to "
                     f"another run: {what}. {wording.same_run}, or {wording.start_anew}.")


def _changed_since_began(changed: Path, configs: Dict[str, TrainConfig], resumed: bool, wording: Wording,
                         kind: str = "scan") -> CeVAEError:
    """The refusal of a run one of whose files, ``changed`` (a ``kind``: "scan" or "brain mask"), no longer holds the
    content the adaptation hashed as it began (removed, replaced or rewritten): it would train on other content than
    the runs before it, which only the final write would have told; what to do after the runs ``configs``
    (:func:`_what_to_do_then`)."""
    removed = not changed.exists()
    use = "train on it" if kind == "scan" else "train with it"
    what = (f"was removed during the adaptation, so its next run cannot {use}" if removed else
            "changed since the adaptation began (replaced or rewritten), so its next run would train on other content "
            "than the runs before it")
    return CeVAEError(f"{changed} {what}. {_what_to_do_then(configs, resumed, wording, removed, kind)}")


def _what_to_do_then(configs: Dict[str, TrainConfig], resumed: bool, wording: Wording, removed: bool = False,
                     kind: str = "scan") -> str:
    """What a user does after the adaptation of the runs ``configs`` stopped before a run for a changed file, a
    ``kind`` ("scan" or "brain mask"), or a ``removed`` one: with checkpoints, resume or start anew in ``wording``
    (start anew as fits a run that was ``resumed`` or not); without, run again."""
    checkpoints = any(cfg.checkpoint_path.is_file() for cfg in configs.values())
    anew = wording.start_anew if resumed else wording.start_over
    if removed:
        return (f"The checkpoints written so far are kept: with the {kind} put back, {wording.resume}, or leave it "
                f"out and {anew}." if checkpoints else
                f"No checkpoint was written yet: put the {kind} back, or leave it out, and {wording.run_again}.")
    if not checkpoints:
        return f"No checkpoint was written yet: {wording.run_again} once the {kind} is as it should be."
    return f"The checkpoints written so far are kept: with the {kind} as it was, {wording.resume}, or {anew}."


def _with_axial_first(orientations: Sequence[str]) -> Tuple[str, ...]:
    """``orientations`` led by axial (added if missing): the orientations adapt prepares, whose first entry the
    contrast check reads."""
    return ("axial", *(o for o in orientations if o != "axial"))


def _timed(progress: Optional[ProgressCallback], pace: Pace, units: float, said: Callable[[Pace], str],
           before: float = 0.0) -> Optional[ProgressCallback]:
    """``progress`` of a part of ``units`` units of ``pace`` (a run's steps, the scans to calibrate) that starts when
    ``before`` are done: each report ticks ``pace`` and its message ends with what ``said`` says of it."""
    if progress is None:
        return None

    def timed(fraction: float, message: str) -> None:
        pace.tick(before + fraction * units)
        progress(fraction, message + said(pace))
    return timed


def _adaptable_modes(modes: Sequence[int], base: Path) -> List[int]:
    """The test-time step counts of the base's calibrated modes (0: plain) that the adapted model is calibrated for
    again: those a model may recommend (``test_time_steps``' ``model_high``: a model's thorough mode of more steps
    would make the calibration take hours), the others said and left out."""
    high = option_field(ScoreOptions, "test_time_steps").metadata["model_high"]
    dropped = [n for n in modes if n > high]
    if dropped:
        log.warning("The model %s is calibrated for thorough modes of %s test-time steps, more than a model may "
                    "recommend (%d): the adapted model is not calibrated for %s.", base,
                    ", ".join(map(str, dropped)), high, "it" if len(dropped) == 1 else "them")
    return [n for n in modes if n <= high]


def _remove_earlier_runs(out: Path, *written: Path) -> None:
    """--overwrite: the checkpoints and logs of an earlier adaptation (or training) to ``out`` go once the new
    one's first run has written its first checkpoint and log (``written``, which replaced that run's earlier ones),
    as train --overwrite replaces its earlier checkpoint and log at its first checkpoint: a new adaptation stopped
    or failed before that leaves them as they were, and none of them sits beside the new run's checkpoints after
    (a --resume would take an old one for the new run's). The earlier model at ``out`` stays in place, usable, until
    the new one replaces it in one rename; the new run's fold checkpoints say that it is not finished, so neither a
    --resume nor a plain run takes it for the new one."""
    removed = [p for p in run_files(out, ".ckpt") + run_files(out, ".log.csv") if p not in written]
    for path in removed:
        path.unlink()
    if removed:
        log.info("--overwrite: removed the earlier run's %s at the new one's first checkpoint.",
                 ", ".join(p.name for p in removed))


def _read_base(base: Path, memo: FileMemo) -> Tuple[BundleHeader, str]:
    """The header of the model file ``base``, checked adaptable, and the sha256 of the content it was read from
    (hashed before and after the reads, by ``memo``): a file replaced meanwhile is refused, not taken for the weights
    loaded later."""
    try:
        before: Optional[str] = memo.sha256(base)
    except OSError:  # not a readable file: read_header says why
        before = None
    header = read_header(base)
    _check_adaptable(header, base)
    parent = memo.sha256(base)
    if parent != before:
        raise _base_replaced(base)
    return header, parent


def _base_replaced(base: Path) -> CeVAEError:
    return CeVAEError(f"The model file {base} was replaced while the adaptation read it (by another run writing "
                      "it?); adapt again once that run has finished.")


def _check_adaptable(header: BundleHeader, path: Path) -> None:
    """Refuse a base model that records no training run: how it was trained (objective, slice orientations)
    is then unknown, and fine-tuning it with guessed settings would silently change what it models."""
    if not isinstance(header.training, dict):
        raise CeVAEError(f"The model {path} records no training run (its header has no 'training' section), so "
                         "it cannot be fine-tuned the way it was trained; adapt a model written by "
                         "`cevae-anomaly train` or `adapt`.")
    if "loss" not in written_sections(path):  # (the typed header fills in the default loss)
        raise CeVAEError(f"The model {path} records no training objective (its header has no 'loss' section), so "
                         "it cannot be fine-tuned the way it was trained, and the adapted model would claim a loss "
                         "it was never trained with; adapt a model written by `cevae-anomaly train` or `adapt`.")


def _contrast(subject: Subject, slices: Path) -> float:
    """The depth contrast of a site scan's prepared axial slices; a scan whose contrast cannot be told is refused by
    name."""
    try:
        return depth_contrast(np.load(slices))
    except CeVAEError as exc:
        raise CeVAEError(f"{subject.image}: {exc} Give scans that show the whole brain, or check this scan's brain "
                         "mask.") from None


def _warn_of_mixed_acquisitions(subjects: Sequence[Subject], how_to_stop: str) -> bool:
    """Warn before any run when the site scans' largest voxel sides (from their headers, unrounded as calibrating
    reads them; a series folder is left out) are of different acquisitions (:func:`~.adapt_plan.mixed_acquisitions`):
    the calibration then pools them, which was said only once the fine-tuning was done. Whether it warned (the
    calibration then does not again; where it could not tell, the calibration says it, in adapt's words)."""
    sides = {str(s.image): side for s in subjects for side in [header_largest_side(s.image)] if side is not None}
    mixed = mixed_acquisitions(sides)
    if mixed:
        log.warning("%s With healthy scans of %d persons in each acquisition, stop now (%s) and adapt one model per "
                    "acquisition.", mixed, MIN_SCANS, how_to_stop)
    return mixed is not None


def _device(name: str, wording: Wording) -> torch.device:
    """The device ``name`` resolves to for training (engine.devices.resolve_device, strict); a missing accelerator is
    refused offering the CPU in ``wording``."""
    try:
        return resolve_device(name, strict=True)
    except DeviceUnavailable as exc:
        raise exc.offering(wording.cpu_choice) from None


def _refuse_input(path: Path, read: Inputs, wording: Wording) -> None:
    """Refuse an output ``path`` that is one of the files ``read`` (by path, link or inode), saying in ``wording``
    how to choose another."""
    if read.which(path) is not None:
        raise CeVAEError(f"The output {path} is the same file as the input {read.which(path)}; choose another "
                         f"{wording.out}.")


def _finished(out: Path, wording: Wording) -> CeVAEError:
    """The refusal of an ``out`` a finished adaptation wrote, saying what to do in ``wording``."""
    return CeVAEError(f"{out} already exists (a finished adaptation keeps no fold checkpoints to resume); "
                      f"{wording.replace_model}.")


def _checksums(subjects: Sequence[Subject], memo: FileMemo) -> Dict[Path, str]:
    """sha256 of every image and mask (a DICOM series folder too) by ``memo``, each volume checked first and refused
    by name."""
    for s in subjects:
        check_volume_path(s.image, "scan")
        check_volume_path(s.mask, "brain mask")
    return file_checksums(subjects, DistInfo(), memo)


def _record(header: BundleHeader, base: Path, parent: str, subjects: Sequence[Subject], checksums: Dict[Path, str],
            plan: List[List[int]], contrasts: Sequence[float], options: AdaptOptions) -> Dict[str, Any]:
    """The ``adaptation`` section of the adapted bundle's header (``parent``: the base model file's sha256)."""
    distinct = distinct_names([s.image for s in subjects], {s.image: s.name for s in subjects}.__getitem__)
    names = [distinct[s.image] for s in subjects]
    return {
        "parent": {"name": header.name, "file": base.name, "sha256": parent},
        "site_scans": subject_records(subjects, checksums, distinct),
        BASE_VOLUMES_KEY: _base_volumes(header),
        "folds": [{"held_out": [names[j] for j in held],
                   "trained_on": [n for j, n in enumerate(names) if j not in held]} for held in plan],
        "calibration": "each site scan scored by the fold model fine-tuned without it; the final model is "
                       "fine-tuned on all site scans",
        "steps_per_run": options.steps, "lr": options.lr,
        "depth_contrast": round(float(np.mean(contrasts)), 4),
        "scan_depth_contrast": list(contrasts),  # in the order of site_scans (names may repeat)
    }


def _base_volumes(header: BundleHeader) -> List[Dict[str, Any]]:
    """Name, sha256 (and content_sha256, where recorded) of each volume the base model (``header``) learned from,
    once each: the adapted model learned from them too (a base adapted itself: its site scans and its own base's).
    Persons are left out: each record numbers its own."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in header.learned_from():
        out.setdefault(r.get("sha256"), {k: r[k] for k in ("name", "sha256", CONTENT_KEY) if r.get(k) is not None})
    return list(out.values())


@contextmanager
def _cache_folder(folder: Optional[Path], wording: Wording) -> Iterator[Path]:
    """The slice cache shared by every run: ``folder``, or a temporary one removed at the end."""
    if folder is not None:
        yield Path(folder)
        return
    temp = temporary_cache("cevae-adapt-", wording)
    try:
        yield Path(temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
