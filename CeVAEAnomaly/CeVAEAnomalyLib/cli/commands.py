"""Implementations of the command-line subcommands (imported lazily by main.py, so --help stays instant)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from ..errors import COMMAND_LINE_ADAPT, COMMAND_LINE_TRAIN, CeVAEError, RunFailed
from ..io.naming import file_stem, refuse_misnamed
from ..system import command_word, require_research, torchrun_number
from .console import print_result

if TYPE_CHECKING:
    from ..engine.header import BundleHeader
    from ..io.manifest import Row

log = logging.getLogger("cevae_anomaly")

def _healthy_subjects(args: argparse.Namespace, use: str = "training") -> list:
    """The volumes of --manifest and the image arguments, every one checked before any is read. As ``batch``
    reads a folder: a folder of image files gives its images, and ``NAME_mask.*`` (or ``NAME_brainmask.*``,
    FSL's ``NAME_brain_mask.*``) beside ``NAME.*`` is NAME's brain mask, in a folder or among the files given
    (``site/*.nii.gz``), where FSL's skull-stripped copy ``NAME_brain.*`` is left out; a folder without image files
    is one DICOM series."""
    from ..io.manifest import Subject, check_volume_path, read_manifest
    from .batch import (collect_folder, leave_out_detection_results, leave_out_stripped_copies, mask_key, owner,
                        pair_masks)

    subjects = list(read_manifest(args.manifest)) if args.manifest else []
    files: List[Path] = []
    for p in map(Path, args.images):
        try:
            check_volume_path(p, "image")
        except CeVAEError:
            if p.is_dir():  # without files of its own: its subfolders may hold the cohort
                _refuse_nested_cohort(p)
            raise
        items = collect_folder(p) if p.is_dir() else []
        if items:
            _warn_unread_subfolders(p, use)
        for item in items:  # a folder's files too: a link to a file not fetched is said so, not hashed
            check_volume_path(item.image, "image")
            check_volume_path(item.mask, "brain mask")
        subjects += [Subject(item.image, item.mask) for item in items]
        if not items:  # a file, or a DICOM series folder
            if p.is_dir():
                _refuse_nested_cohort(p)
            files.append(p)
    images: Dict[Tuple[Path, str], Path] = {}  # (folder, stem) -> the image file; masks: (folder, mask stem)
    masks: Dict[Tuple[Path, str], Path] = {}
    for p in leave_out_detection_results(files, "among the files given"):
        of = mask_key(file_stem(p))
        found, key, kind = (images, file_stem(p), "image") if of is None else (masks, of, "brain mask")
        where = (p.parent.resolve(), key)
        first = found.setdefault(where, p)
        if not _same(first, p):
            raise CeVAEError(f"{first} and {p} are both the {kind} of {owner(key)}; give one of them.")
        if first is not p:
            said = "is given twice" if first == p else f"is the {kind} {first} given again"
            log.warning("%s %s; it is used once.", f"The brain mask {p}" if of is not None else p, said)
    mask_of: Dict[Path, Optional[Path]] = {}  # image file kept -> its mask file (None: none given)
    for folder in sorted({f for f, _ in [*images, *masks]}):
        here = leave_out_stripped_copies({k: p for (f, k), p in images.items() if f == folder},
                                         "among the files given")
        paired = pair_masks(here, {k: p for (f, k), p in masks.items() if f == folder}, "among the files given",
                            "give one of them")
        mask_of.update((p, paired.get(k)) for k, p in here.items())
    subjects += [Subject(p, mask_of[p]) for p in images.values() if p in mask_of]
    if not subjects:
        raise CeVAEError(f"No healthy volumes for {use}: give --manifest CSV and/or image paths.")
    return subjects


def _warn_unread_subfolders(folder: Path, use: str) -> None:
    """Warn where a cohort folder of image files has subfolders with scans (a DICOM series folder, a person's
    folder): they are not searched, so their scans are not part of the cohort unless given too."""
    from ..io.dicom import holds_dicom_series
    from ..io.naming import image_stem

    def holds_scans(sub: Path) -> bool:
        for root, dirs, names in os.walk(sub):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if any(image_stem(n) and not n.startswith(".") for n in names):
                return True
        return holds_dicom_series(sub)  # (a series folder itself, as DICOM exports hold one per series)

    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unread = [p.name for p in subfolders if holds_scans(p)]
    if unread:
        log.warning("%s: its subfolder(s) %s hold scans that are not read (subfolders are not searched); to use them "
                    "for %s too, give those folders as well (a DICOM series folder is one scan) or list every scan "
                    "in a --manifest CSV.", folder, ", ".join(unread), use)


def _refuse_nested_cohort(folder: Path) -> None:
    """Refuse a folder that holds neither image files nor a DICOM series of its own but image files in its
    subfolders (a BIDS dataset, a folder per person), which are not searched: say to list the scans instead."""
    from ..io.dicom import holds_dicom_series
    from ..io.naming import image_stem

    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        nested = next((n for n in sorted(names) if image_stem(n) and not n.startswith(".")), None)
        if nested is not None and Path(root) != folder:
            if holds_dicom_series(folder):
                return
            raise CeVAEError(f"{folder} holds no image files of its own, and its subfolders (such as "
                             f"{Path(root, nested).relative_to(folder)}) are not searched: list the scans, with their "
                             "brain masks, in a --manifest CSV (columns image,mask,subject), or give the image files, "
                             "or the folders that hold them (one per person: its scan and a mask named mask.*).")


def _same(a: Path, b: Path) -> bool:
    """Whether two given paths name one file (the same file given twice is used once, with a warning)."""
    return a.resolve() == b.resolve()


def _inputs(args: argparse.Namespace, subjects: list) -> list:
    """Every file the command reads: no output may replace one."""
    return [args.manifest] + [p for s in subjects for p in (s.image, s.mask)]


def run_train(args: argparse.Namespace) -> Path:
    from .console import ConsoleProgress
    from ..engine.config import LossConfig, ModelConfig
    from ..options import parse_orientations
    from ..training.config import ACQUISITION_AUGMENT, NO_AUGMENT, AugmentConfig, SettingError, TrainConfig
    from ..training.space import check_free_space
    from ..training.trainer import Trainer
    from ..io.lock import hold_output

    subjects = _healthy_subjects(args)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise CeVAEError(f"--channels must be comma-separated integers, got {args.channels!r}.") from None
    cfg = TrainConfig(
        out=args.out,
        model=ModelConfig(input_size=args.input_size, channels=channels, z_dim=args.z_dim),
        loss=LossConfig(ce_weight=args.ce_weight, beta=args.beta, rec=args.rec_loss),
        augment=NO_AUGMENT if args.no_augment else ACQUISITION_AUGMENT if args.acquisition_augment else AugmentConfig(),
        orientations=parse_orientations(args.orientations), batch_size=args.batch_size, lr=args.lr,
        max_steps=args.max_steps, max_minutes=args.max_minutes, checkpoint_every=args.checkpoint_every,
        val_fraction=args.val_fraction, seed=args.seed, device=args.device, resume=args.resume,
        half_bundle=args.half, amp=args.amp, cache_dir=args.cache_dir, loader_workers=args.loader_workers,
    )
    try:
        cfg.validate()
    except SettingError as exc:  # the library names settings by field; here they are flags
        raise CeVAEError(exc.naming(lambda name: "--" + name.replace("_", "-"))) from None
    cfg.check_outputs(_inputs(args, subjects), args.overwrite, COMMAND_LINE_TRAIN)
    check_free_space("This training", [cfg.checkpoint_path], cfg.out, cfg.model, cfg.half_bundle,
                     [s.image for s in subjects], len(cfg.orientations), cfg.cache_dir, COMMAND_LINE_TRAIN)
    rank0 = torchrun_number("WORLD_SIZE", 1) <= 1 or torchrun_number("RANK", 0) == 0  # (a lone run is rank 0)
    with hold_output(cfg.out, "train") if rank0 else contextlib.nullcontext():  # one run per --out at a time
        trainer = Trainer(cfg, subjects, progress=ConsoleProgress("train") if rank0 else None,
                          wording=COMMAND_LINE_TRAIN)
        path = trainer.run()
    if path is not None:
        log.info("Model bundle written to %s (log: %s).", path, cfg.log_path)
    return path


def _model(args: argparse.Namespace) -> Tuple[Path, "BundleHeader"]:
    """The --model bundle (default: the bundled one) and its header, read first: a folder or another file given
    as the model is said so at once, not taken for an input folder by the output checks."""
    from ..data import default_model_path
    from ..engine.header import read_header

    path = Path(args.model or default_model_path())
    return path, read_header(path)


def run_adapt(args: argparse.Namespace) -> Path:
    """Fine-tune a model on a site's healthy scans and calibrate it (training/adapt.py)."""
    from .console import ConsoleProgress
    from ..training.adapt import adapt
    from ..training.adapt_plan import AdaptOptions
    from ..training.config import SettingError

    options = AdaptOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, folds=args.folds,
                           checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
                           resume=args.resume, overwrite=args.overwrite, amp=args.amp, cache_dir=args.cache_dir)
    try:
        options.validate()
    except SettingError as exc:  # the library names settings by field; here they are flags
        raise CeVAEError(exc.naming(lambda name: "--" + name.replace("_", "-"))) from None
    subjects = _healthy_subjects(args, "adapting")
    return adapt(_model(args)[0], subjects, args.out, options, ConsoleProgress("adapt"),
                 inputs=[args.manifest], wording=COMMAND_LINE_ADAPT)


def run_prepare(args: argparse.Namespace) -> None:
    from .console import ConsoleProgress
    from ..engine.config import PreprocessConfig
    from ..options import parse_orientations
    from ..training.config import SettingError, train_orientations
    from ..training.prepare import prepare_cohort

    if args.workers < 1:
        raise CeVAEError(f"--workers must be at least 1, got {args.workers}.")
    try:  # train's refusal, in its words: a cache train would refuse is no use
        orientations = train_orientations(parse_orientations(args.orientations))
    except SettingError as exc:
        raise CeVAEError(exc.naming(lambda name: "--" + name.replace("_", "-"))) from None
    pre = PreprocessConfig(input_size=args.input_size)
    summary = prepare_cohort(_healthy_subjects(args), args.cache_dir, pre, orientations, args.workers,
                             ConsoleProgress("prepare"))
    log.info("%s", summary)


def run_detect(args: argparse.Namespace) -> None:
    from ..engine.bundle import load_bundle
    from .console import ConsoleProgress
    from ..engine.devices import resolve_device
    from ..io.images import read_image
    from ..io.atomic import remove_abandoned_temporaries, write_all
    from ..io.lock import hold_outputs
    from ..io.targets import check_paths
    from ..engine.detector import Detector, warnings_logged
    from ..options import DetectionRequest
    from ..io.images import refuse_image_as_mask
    from ..io.nifti_codes import nifti_codes
    from ..result import (PICTURE_MODULES, PICTURE_OUTPUT, REPORT_OUTPUT, components_summary, input_files,
                          refuse_unwritable_names, result_files)
    from ..report import report_picture, result_report_html

    started = time.time()
    if args.picture:  # before anything is read: the picture is drawn by the research extra (matplotlib)
        require_research("cevae-anomaly detect --picture", PICTURE_MODULES)
    refuse_image_as_mask(args.image, args.mask)
    request = DetectionRequest.from_args(args)  # refuses impossible values before any file is read
    device = resolve_device(request.run.device)  # a missing GPU said (or its index refused) before the scan is read
    targets = {"score": args.score, "labelmap": args.labelmap, "slices": args.slice_scores,
               "components": args.components, "record": args.record, PICTURE_OUTPUT: args.picture,
               REPORT_OUTPUT: args.report}
    model, header = _model(args)
    inputs = (args.image, args.mask, model)
    wanted = [p for p in targets.values() if p is not None]
    check_paths(wanted, args.overwrite, inputs)
    refuse_unwritable_names(targets)
    with hold_outputs(wanted, "detect"):  # another detect writing one of them is refused now, not after its work
        remove_abandoned_temporaries(wanted, started)  # of killed runs
        header.threshold_of(request)  # torch-free: a threshold the model cannot give is refused unread
        with warnings_logged() as read:  # (a DICOM series that may lack slices), recorded with the detection's
            image = read_image(args.image)
            mask = read_image(args.mask, "brain mask") if args.mask else None
        sources = input_files(image=args.image, mask=args.mask) if args.record or args.report else {}  # just read
        detector = Detector.from_request(load_bundle(model, device), request)
        result = detector(image, mask, progress=ConsoleProgress("detect"))
        result.record = dataclasses.replace(result.record, inputs=sources,
                                            warnings=tuple(read) + result.record.warnings)
        files = result_files(result, {r: p for r, p in targets.items() if r not in (PICTURE_OUTPUT, REPORT_OUTPUT)},
                             nifti_codes(args.image))
        # the report embeds the picture where the research extra can draw it, and says so otherwise
        picture = report_picture(image, result, file_stem(args.image)) if args.picture or args.report else None
        if args.picture:
            files[args.picture] = picture
        if args.report:
            files[args.report] = result_report_html(args.image.name, result, picture)
        write_all(files, args.overwrite, inputs, command="detect")
    top = result.top_slice
    log.info("Threshold %.4g (%s); %s; most anomalous slice: %s.", result.threshold, result.threshold_source,
             components_summary(result.components),
             f"index {top.index} on axis {top.axis} ({'IJK'[top.axis]})" if top else "none")
    log.info("Wrote %s.", ", ".join(str(p) for p in files))


def run_calibrate(args: argparse.Namespace) -> Path:
    """Calibrate a bundle on healthy volumes with the chosen scoring; write it to --out."""
    from ..engine.bundle import load_bundle, read_header
    from ..engine.devices import resolve_device
    from ..engine.calibrate import readable_subjects, recalibrate, warn_of_training_scans
    from .console import ConsoleProgress
    from ..data import refuse_bundled_output
    from ..engine.calibration import check_default_fpr
    from ..io.checksum import sha256_of
    from ..training.data import unique_subjects
    from ..io.lock import hold_output
    from ..io.targets import check_paths
    from ..options import DetectionRequest, PostprocessOptions, ScoreOptions, ThresholdPolicy, check_calibratable

    request = DetectionRequest.from_args(args)
    check_calibratable(*request.options(ScoreOptions(), PostprocessOptions()))  # the values asked for, at once
    if args.default_fpr is not None:  # before the volumes are listed
        check_default_fpr(args.default_fpr, "--default-fpr")
    device = resolve_device(request.run.device)  # a missing GPU said (or its index refused) before any volume is read
    subjects = _healthy_subjects(args, "calibration")
    src = _model(args)[0]
    refuse_bundled_output(args.out)  # even with --overwrite, so before "exists; pass --overwrite"
    check_paths([args.out], args.overwrite,  # before hashing the volumes: an existing --out is refused at once
                [src, args.manifest, *(s.image for s in subjects), *(s.mask for s in subjects)])
    refuse_misnamed(args.out, "model", "a .cevae bundle", ".cevae")
    checksums = {s.image: sha256_of(s.image) for s in subjects}
    # a repeat counts once: the same scan in two files (another format, compressed or not) too, by its voxels (every
    # scan and brain mask that cannot be read named in one error)
    subjects = unique_subjects(subjects, readable_subjects(subjects, checksums))
    with hold_output(args.out, "calibrate"):  # against a train, adapt or calibrate writing the same --out
        check_paths([args.out], args.overwrite, [src])  # again: one of them may have written it since
        bundle = load_bundle(src, device)
        warn_of_training_scans(bundle.header, [s.image for s in subjects], checksums)
        opts, post = request.options(bundle.header.score_options, bundle.header.postprocess)
        path = recalibrate(bundle, subjects, args.out, opts, post, args.default_fpr,
                           progress=ConsoleProgress("calibrate"), run=request.run, checksums=checksums,
                           read_checked=True)
    new = read_header(path)
    try:  # the source model's threshold for the same scoring at the same rate, where it has one
        source: Optional[float] = bundle.header.threshold(new.score_options, new.postprocess,
                                                          ThresholdPolicy(fpr=new.default_fpr))[0]
        before = f"{source:.4g}"
    except CeVAEError:  # not calibrated for it, or its threshold there is 0 (threshold_for_fpr)
        source = None
        calibrated = bundle.header.is_calibrated(new.score_options, new.postprocess)
        before = "0, which flags the whole brain" if calibrated else "not calibrated for this scoring"
    now = new.default_threshold()
    log.info("Calibrated bundle written to %s (%d healthy volume(s)). Its default scoring: %s, orientations %s. Its "
             "threshold at the default healthy false-positive rate %g is %s (%s at that rate: %s). Detect with it: "
             "cevae-anomaly detect SCAN --model %s%s", path, len(subjects),
             _default_score_type(new.score_options.score_type, opts.score_type), new.score_options.orientations,
             new.default_fpr, "none" if now is None else f"{now:.4g}", src.name, before, command_word(str(path)),
             "" if opts.score_type == new.score_options.score_type else f" --score-type {opts.score_type}")
    _say_what_changed(bundle.header, new, path, source)
    return path


def _default_score_type(default: str, asked: str) -> str:
    """The calibrated model's default score type, as calibrate's last line says it; where the user asked for another
    (``asked``: calibrated too, but a calibration keeps the default), that detect uses it only when asked to."""
    if asked == default:
        return f"score type {default}"
    return (f"score type {default} (a calibration keeps it; {asked} is calibrated too: detect uses it only with "
            f"--score-type {asked})")


THRESHOLD_RISE = 1.25  # a site calibration this much stricter than the model's is explained to the user
SUGGESTED_RATES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # examples of a higher --fpr


def _a_higher_rate(default: float) -> float:
    """A rate to suggest for more sensitivity: the first of :data:`SUGGESTED_RATES` above the model's ``default``."""
    return next((rate for rate in SUGGESTED_RATES if rate > default), SUGGESTED_RATES[-1])


def _say_what_changed(old: BundleHeader, new: BundleHeader, path: Path, before: Optional[float]) -> None:
    """After ``calibrate``: warn of thorough modes the source model is calibrated for and the new one is not (detection
    refuses them), and explain a threshold that rose much above ``before``, the source's for the new default scoring
    at the new default rate (None: it has none there): lesions must score higher to be marked."""
    from ..engine.calibration import lost_thorough_modes

    for steps in lost_thorough_modes(old.calibration, new.calibration):
        log.warning("The source model is also calibrated for the thorough mode (%d test-time steps); %s is not, so "
                    "detection with it refuses --test-time-steps %d (Slicer: Thorough) until it is: calibrate again "
                    "with --test-time-steps %d (each scan then takes longer).", steps, path, steps, steps)
    now = new.default_threshold()
    if before is not None and now is not None and now > THRESHOLD_RISE * before:
        peak = new.postprocess.min_peak
        kept = f" (and a component must peak at {peak:g} times the threshold to be kept)" if peak > 1 else ""
        both = peak > 1  # (calibrate has no --fpr: detect's, or the model's default, --default-fpr)
        rate = _a_higher_rate(new.default_fpr)
        log.info("The site's healthy scans score higher than those the source model was calibrated on: at the same "
                 "false-positive rate its threshold rose from %.4g to %.4g, so a lesion must now score higher to be "
                 "marked%s. For more sensitivity, at the cost of more false alarms: detect with a higher --fpr (e.g. "
                 "%g)%s, or calibrate again with --default-fpr %g%s to make %s.", before, now, kept, rate,
                 " or --min-peak 1" if both else "", rate, " --min-peak 1" if both else "",
                 "them this model's defaults" if both else "it this model's default")


def run_evaluate(args: argparse.Namespace) -> None:
    """Print (and optionally write) metrics of score maps against ground truth."""
    require_research("cevae-anomaly evaluate", ("CeVAEAnomalyResearch",))
    from CeVAEAnomalyResearch.evaluate import ROLES, evaluate_files, figure, lesion_text, write_metrics_csv
    from ..io.manifest import read_rows
    from ..io.targets import check_paths
    from ..result import flagged_text

    if args.cases and any((args.score, args.gt, args.mask, args.labelmap)):
        raise CeVAEError("Give either --cases CSV or --score (with --gt, --mask, --labelmap) for one case, not both.")
    if args.cases:
        listed = read_rows(args.cases, "score", tuple(ROLES), "cases CSV", others=("name",))
        _check_case_files(args.cases, listed, ROLES)
        rows = [dict({k: str(v or "") for k, v in r.files.items()}, name=r.cells["name"], where=f"{args.cases}, line "
                     f"{r.line}") for r in listed]
        if not rows:
            raise CeVAEError(f"The cases CSV {args.cases} lists no cases (no row with a score file).")
    elif args.score:
        rows = [{"score": str(args.score), "gt": str(args.gt or ""), "mask": str(args.mask or ""),
                 "labelmap": str(args.labelmap or ""), "name": args.score.name}]
    else:
        raise CeVAEError("Give --cases CSV or --score (with --gt for a lesion case).")
    if args.out:
        check_paths([args.out], args.overwrite, [args.cases, *(Path(r[k]) for r in rows for k in ROLES if r[k])])
        refuse_misnamed(args.out, "metrics table", "CSV text", ".csv")
    cases, pooled = evaluate_files(rows)
    if args.out:  # before the console lines, which a reader that stops early (`| head`) cuts short
        write_metrics_csv(args.out, cases, pooled, args.overwrite)
    print_result("\n".join(  # each figure named as its column in the --out table
        [f"{c.name}: auroc {figure(c.auroc)}  auprc {figure(c.auprc)}  best_dice {figure(c.best_dice)}"
         + (f"  dice_at_threshold {c.dice_at_threshold:.4f}" if c.dice_at_threshold is not None else "")
         + (f"  slice_auroc {figure(c.slice_auroc)}" if c.slice_auroc is not None else "")
         + (f"  flagged_ml {flagged_text(c.flagged_ml)}" if c.flagged_ml is not None else "")
         + lesion_text(vars(c)) for c in cases]
        + [f"pooled: auroc {figure(pooled['auroc'])}  auprc {figure(pooled['auprc'])}  "
           f"best_dice {figure(pooled['best_dice'])}" + lesion_text(pooled)]))
    if args.out:
        log.info("Metrics written to %s.", args.out)


def _check_case_files(cases: Path, rows: Sequence[Row], roles: Dict[str, str]) -> None:
    """Refuse, before any case is read, a missing or unreadable file of the cases CSV, naming its line; where the
    CSV lies in another folder than the current one, a missing file given by a relative path (read as one below
    that folder) is said to be read from there."""
    from ..io.manifest import check_volume_path

    folder = Path(cases).parent
    elsewhere = folder.resolve() != Path.cwd().resolve()
    for row in rows:
        for role, what in roles.items():
            path = row.files[role]
            try:
                check_volume_path(path, what, f"{cases}, line {row.line}: ")
            except CeVAEError as exc:
                if not elsewhere or path is None or path.exists() or not path.is_relative_to(folder):
                    raise
                raise CeVAEError(f"{exc} Relative paths in the list are read from its folder, "
                                 f"{folder}.") from None


def run_info(args: argparse.Namespace) -> None:
    """Print what a model bundle is (engine/model_info.py), from its header (its weights only checked against it;
    no torch)."""
    from ..data import default_model_path
    from ..engine.model_info import describe_model, model_info
    from ..io.strict_json import dumps

    info = model_info(args.model or default_model_path())
    print_result(dumps(info, indent=2) if args.json else describe_model(info))


def run_share(args: argparse.Namespace) -> Path:
    """Write a copy of a model without the names of its scans (engine/sharing.py)."""
    from ..engine.header import read_header
    from ..engine.sharing import NAMES_REMOVED, share_model

    path = share_model(args.model, args.out, args.overwrite)
    scans = read_header(path).extra[NAMES_REMOVED]["scans"]
    log.info("Shareable copy written to %s: the %d scan(s) it records are called scan 1, scan 2, ..., each with its "
             "sha256 (a training volume also with the digest of its voxels, which tells it in any format); its weights "
             "and calibration are those of %s. Share it alone: the checkpoints beside a trained or adapted model hold "
             "the scans' paths.", path, scans, args.model)
    return path


def run_demo(args: argparse.Namespace) -> None:
    """The README's first command: detection on a healthy sample scan with synthetic lesions."""
    require_research("cevae-anomaly demo", ("CeVAEAnomalyResearch", "scipy", "matplotlib"))
    from .console import ConsoleProgress
    from CeVAEAnomalyResearch.demo import run_demo as demo

    report = demo(args.out_dir, args.model, args.seed, auto_mask=args.auto_mask, device=args.device,
                  overwrite=args.overwrite, progress=ConsoleProgress("demo"), sample=args.sample)
    print_result("\n".join([f"  {key:<30} {value:.4f}" if isinstance(value, float) else f"  {key:<30} {value}"
                            for key, value in report.metrics.items()] + ([report.note] if report.note else [])
                           + [f"Done in {report.seconds:.1f} s. Outputs in {report.out_dir}/:"]
                           + [f"  {f}" for f in report.files]))


def run_batch(args: argparse.Namespace) -> None:
    """Detection over a folder or CSV list: per-volume outputs and a summary CSV in --out-dir."""
    from .batch import (DetectSettings, check_outputs_apart, collect_inputs, parse_shard, select_shard, summary_name,
                        unique_items)
    from .batch import run_batch as process
    from ..io.targets import refuse_unsearchable, resolved
    from .console import ConsoleProgress
    from ..engine.devices import resolve_device
    from ..options import DetectionRequest

    if args.pictures:  # before anything is read: the pictures are drawn by the research extra (matplotlib)
        from ..result import PICTURE_MODULES

        require_research("cevae-anomaly batch --pictures", PICTURE_MODULES)
    request = DetectionRequest.from_args(args)
    if args.workers < 1:  # as every impossible value: before any file is read
        raise CeVAEError(f"--workers must be 1 or more, got {args.workers}.")
    device = resolve_device(request.run.device)  # said (or refused) once, before any work; the workers use it
    request = dataclasses.replace(request, run=dataclasses.replace(request.run, device=str(device)))
    refuse_unsearchable(args.inputs, "input")
    if resolved(args.inputs) == resolved(args.out_dir):
        raise CeVAEError("--out-dir must differ from the input folder (outputs would be taken for inputs).")
    shard = parse_shard(args.shard) if args.shard else None
    listed = collect_inputs(args.inputs)
    every = unique_items(listed)  # before sharding: every shard drops the same repeats
    items = select_shard(every, *shard) if shard else every
    if shard:
        log.info("Shard %d of %d: %d of %d volumes.", shard[0], shard[1], len(items), len(every))
    model, header = _model(args)  # torch-free: a missing calibration is refused before any volume
    # (a repeat left out is still an input: no output may replace it)
    check_outputs_apart(items, listed, args.inputs, model, args.out_dir, args.out_dir / summary_name(shard),
                        args.pictures, args.reports)
    score, post = request.checked_options(header.score_options, header.postprocess)
    threshold, source = header.threshold(score, post, request.policy)
    log.info("Score %s; threshold %.4g (%s).", score.score_type, threshold, source)
    settings = DetectSettings(model=model, request=request, out_dir=args.out_dir, overwrite=args.overwrite,
                              pictures=args.pictures, reports=args.reports)
    summary = process(items, settings, args.out_dir / summary_name(shard), args.workers, ConsoleProgress("batch"))
    failed = summary.count("error")
    failure = CeVAEError if summary.refused_only() else RunFailed  # (exit 2, or 1: out of memory, a bug)
    if failed == 1 == len(items):
        raise failure(f"The volume failed; the reason is in the 'error' column of {summary.path}. Nothing is done, "
                      "and a rerun retries it.")
    if failed and failed == len(items):
        raise failure(f"All {failed} volumes failed; the reasons are in the 'error' column of {summary.path}. "
                      "None is done, and a rerun retries them all.")
    if failed:
        raise failure(f"{failed} of {len(items)} volume(s) failed; the reasons are in the 'error' column of "
                      f"{summary.path}. The others are done, and a rerun retries only the failed ones.")
