"""What adapting a model to a site will do, decided before anything runs (torch-free).

Adapting fine-tunes a trained model on a site's healthy scans and calibrates it without letting a
scan calibrate a model that was trained on it (nor on another scan of the same person): the scans
are split into k folds by person (k = the number of persons, at most :attr:`AdaptOptions.folds`; a
scan of unknown person counts as a person of its own); for each fold a model is fine-tuned on the other
folds and scores the fold's scans, and those held-out scores calibrate the final model, which is
fine-tuned on all the scans. That is k + 1 fine-tuning runs of :attr:`AdaptOptions.steps` steps each.
"""
from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from ..errors import CeVAEError
from ..options import plain_number
from .config import SettingError, TrainConfig

MIN_SCANS = 2  # one to train on and one held out, in each direction
# Measured on the development machine while other jobs shared its 2 CPU cores (torch 2.13, default
# architecture, batch 64 at 64 px): 300 fine-tuning steps of 2 site scans took 685 s, and preparing and
# calibrating them about 5 s per 1 mm scan with its mask given; an automatic brain mask adds about 10 s
# (docs/adapt.md). Unshared, the same machine trains about 1.7 steps/s.
CPU_STEPS_PER_S = 0.45
MEASURED_BATCH = 64  # the batch size CPU_STEPS_PER_S was measured with; a step's time grows with the batch
SECONDS_PER_SCAN_CPU = 15.0  # preparing a scan (automatic mask included) and scoring it for calibration
# Scoring a scan once more in a thorough mode for calibration: its test-time fine-tuning makes it ~6 times a plain
# scoring (an audit of the adaptation flow measured 56 s against 9.5 s per scan on this machine, lightly loaded).
THOROUGH_SECONDS_PER_SCAN_CPU = 50.0
TIMED_STEPS = 5  # fine-tuning steps timed before their pace and the time left are said


@dataclass(frozen=True)
class AdaptOptions:
    """How to fine-tune and calibrate (defaults: docs/adapt.md, measured on a handful of scans)."""

    steps: int = 100  # per fine-tuning run
    lr: float = 1e-4
    batch_size: int = 64
    folds: int = 5  # at most; never more than the scans
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    amp: bool = False
    cache_dir: Optional[Path] = None  # preprocessed-slice cache kept between runs; None: a temporary one

    def __post_init__(self) -> None:
        for f in fields(self):  # a NumPy number from a script as the plain one (checkpoints and headers store them)
            object.__setattr__(self, f.name, plain_number(getattr(self, f.name)))

    def validate(self) -> None:
        """Raise :class:`~.config.SettingError` naming the setting (by field name) adapting cannot run with."""
        for name in ("steps", "folds", "batch_size", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingError("{%s} must be a whole number, got %s." % (name, _literal(value)), name)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise SettingError("{lr} must be a positive number, got %s." % _literal(self.lr), "lr")
        for name in ("resume", "overwrite", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError("{%s} must be true or false, got %s." % (name, _literal(getattr(self, name))), name)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise SettingError("{cache_dir} must be a folder path, got %s." % _literal(self.cache_dir), "cache_dir")
        if self.steps < 1:
            raise SettingError("{steps} must be at least 1, got %s." % self.steps, "steps")
        if self.resume and self.overwrite:
            raise SettingError("{resume} continues an adaptation and {overwrite} starts anew; give one of them.",
                               "resume", "overwrite")
        if self.folds < 2:
            raise SettingError("{folds} must be at least 2 (one fold held out while the others train), got %s."
                               % self.folds, "folds")
        self.run_config(Path("site.cevae"), "final").validate()

    def run_config(self, out: Path, run: str, init_from: Optional[Path] = None) -> TrainConfig:
        """The training settings of one fine-tuning run (``run``: "final" or "fold<N>") writing next to ``out``."""
        target = out if run == "final" else out.with_name(f"{out.name}.{run}")
        return TrainConfig(out=target, batch_size=self.batch_size, lr=self.lr, max_steps=self.steps,
                           checkpoint_every=min(self.checkpoint_every, self.steps), val_fraction=0.0, seed=self.seed,
                           device=self.device, resume=self.resume, amp=self.amp, cache_dir=self.cache_dir,
                           init_from=init_from, adaptation={"steps": self.steps, "lr": self.lr})


def _literal(value: Any) -> str:
    """``repr(value)`` for a :class:`~.config.SettingError` template (its braces doubled)."""
    return repr(value).replace("{", "{{").replace("}", "}}")


def fold_plan(persons: Sequence[Sequence[int]], max_folds: int) -> List[List[int]]:
    """The scan indices each fold holds out, given the scans of each person (``persons``, e.g.
    :func:`~.data.person_groups`): person i's scans go to fold i mod k, k = min(persons, max_folds)."""
    if len(persons) < MIN_SCANS:
        scans = sum(len(p) for p in persons)
        raise CeVAEError(f"Adapting needs at least {MIN_SCANS} different healthy scans of {MIN_SCANS} persons (each "
                         f"person's scans are held out from the model that calibrates them), got {scans} scan(s)"
                         + (f" of {len(persons)} person" if scans > len(persons) else "") + ".")
    k = min(len(persons), max_folds)
    return [sorted(j for i in range(f, len(persons), k) for j in persons[i]) for f in range(k)]


def run_names(n_persons: int, max_folds: int) -> List[str]:
    """The fine-tuning runs in order: one per fold, then the final one."""
    return [f"fold{i + 1}" for i in range(min(max(n_persons, MIN_SCANS), max_folds))] + ["final"]


def estimate_seconds(n_scans: int, options: AdaptOptions = AdaptOptions(), steps_per_s: float = CPU_STEPS_PER_S,
                     seconds_per_scan: float = SECONDS_PER_SCAN_CPU, n_persons: Optional[int] = None,
                     thorough_modes: int = 0) -> float:
    """How long adapting ``n_scans`` scans (of ``n_persons`` persons; default: one each) takes at ``steps_per_s``
    (default: the measured CPU rate at batch :data:`MEASURED_BATCH`, scaled to the options' batch size), with the
    calibration of ``thorough_modes`` thorough modes (those the base model is calibrated for)."""
    return training_seconds(n_scans, options, steps_per_s, n_persons) + calibration_seconds(
        n_scans, seconds_per_scan, thorough_modes)


def training_seconds(n_scans: int, options: AdaptOptions = AdaptOptions(), steps_per_s: float = CPU_STEPS_PER_S,
                     n_persons: Optional[int] = None) -> float:
    """The fine-tuning runs' part of :func:`estimate_seconds`."""
    runs = len(run_names(n_scans if n_persons is None else n_persons, options.folds))
    return runs * options.steps * options.batch_size / MEASURED_BATCH / steps_per_s


def calibration_seconds(n_scans: int, seconds_per_scan: float = SECONDS_PER_SCAN_CPU, thorough_modes: int = 0) -> float:
    """Preparing and calibrating's part of :func:`estimate_seconds`."""
    return n_scans * (seconds_per_scan + thorough_modes * THOROUGH_SECONDS_PER_SCAN_CPU)


def mixed_acquisitions(sides: Mapping[str, float],
                       pools: str = "The adapted model's calibration pools") -> Optional[str]:
    """What to say when the site scans' largest voxel sides (mm, engine.calibration.largest_side, by the name each
    scan is called) are of different acquisitions by calibrating's rule (engine.calibration.other_acquisitions;
    ``pools`` them: the adapted model's calibration, or the panel's calibrated model's thresholds); None when they
    are not. The adaptation says it before its first step, the panel before Adapt or Calibrate is pressed; each adds
    what to do."""
    from ..engine.calibration import ACQUISITION_FACTOR, other_acquisitions  # (numpy: not at --help)

    if not other_acquisitions(list(sides.values())):
        return None
    thick, thin = max(sides, key=sides.__getitem__), min(sides, key=sides.__getitem__)
    return (f"The site scans are of different acquisitions: {thick} has voxels up to {sides[thick]:.3g} mm, {thin} "
            f"{sides[thin]:.3g} mm (more than {ACQUISITION_FACTOR:g} times apart). {pools} them, so its "
            "threshold follows the finer scans and its rate on the coarser ones is not known.")


def describe_estimate(n_scans: int, device: str, options: AdaptOptions = AdaptOptions(),
                      n_persons: Optional[int] = None, thorough_modes: int = 0, device_words: str = "") -> str:
    """The estimate in words, for the command line and the Slicer panel, before a run starts; ``device_words``: how
    to name an accelerator ``device`` (default: its option value, as the command line's --device)."""
    runs = len(run_names(n_scans if n_persons is None else n_persons, options.folds))
    seconds = estimate_seconds(n_scans, options, n_persons=n_persons, thorough_modes=thorough_modes)
    minutes = max(1, int(math.ceil(seconds / 60)))
    where = f"; on {device_words or device} expect much less" if device not in ("cpu", "auto") else ""
    of = f" of {n_persons} persons" if n_persons is not None and n_persons < n_scans else ""
    modes = f" (plain and {thorough_modes} thorough mode{'s' if thorough_modes > 1 else ''})" if thorough_modes else ""
    return (f"{runs} fine-tuning runs of {options.steps} steps on {n_scans} scan(s){of}, then calibration{modes}: "
            f"roughly {minutes} min on a 2-core CPU busy with other jobs (a rough estimate, often less){where}. "
            "Once fine-tuning runs, its progress says the measured pace and the time left.")


def resumed_note(done: int, runs: int, steps: int, batch_size: int, device: str = "cpu") -> str:
    """What a resumed adaptation says once its checkpoints are read: the fine-tuning steps they hold (``done``, of
    ``runs`` runs of ``steps`` steps at ``batch_size``) and the rest of the fine-tuning at the estimate's pace (the
    estimate before it counted every step)."""
    total = runs * steps
    if done >= total:
        rest = "the fine-tuning is done; the calibration takes its estimated time"
    else:
        seconds = (total - done) * batch_size / MEASURED_BATCH / CPU_STEPS_PER_S  # as training_seconds
        where = f", on {device} much less" if device not in ("cpu", "auto") else ""
        rest = (f"the rest of the fine-tuning takes roughly {max(1, int(math.ceil(seconds / 60)))} min on a 2-core CPU "
                f"busy with other jobs{where}; then the calibration takes its estimated time")
    return (f"Resuming: the checkpoints hold {done} of the {total} fine-tuning steps ({runs} runs of {steps}), so "
            f"{rest}.")


class Pace:
    """How fast one part of an adaptation goes, timed as it runs, and the seconds it has left.

    ``total``: the units of work of the part (fine-tuning steps, scans to calibrate); :meth:`tick` is told how many
    are done. Only the time between two ticks of growing work counts, and :meth:`pause` starts a new interval (what
    runs between fine-tuning runs, such as loading a run's slices, is not taken for step time). ``after``: the units
    timed before a pace is said; ``clock``: seconds (tests give their own).
    """

    def __init__(self, total: float, after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.after, self.clock = total, after, clock
        self.done = self.timed = self.seconds = 0.0
        self._last: Optional[Tuple[float, float]] = None  # (time, units done) of the last tick since a pause

    def pause(self) -> None:
        """The next tick starts a new interval."""
        self._last = None

    def tick(self, done: float) -> None:
        """``done`` units of the part are done now."""
        now = self.clock()
        if self._last is not None and done == self._last[1]:
            return  # no more work done (another message of the same step or scan): the interval goes on
        if self._last is not None and done > self._last[1]:
            self.timed += done - self._last[1]
            self.seconds += now - self._last[0]
        self._last, self.done = (now, done), done

    def rate(self) -> Optional[float]:
        """Units per second, once ``after`` units are timed."""
        return self.timed / self.seconds if self.timed >= self.after and self.seconds > 0 else None

    def seconds_left(self) -> Optional[float]:
        """The seconds the rest of the part takes at :meth:`rate`; None before it is measured."""
        rate = self.rate()
        return None if rate is None else max(0.0, self.total - self.done) / rate


def fine_tuning_left(pace: Pace) -> str:
    """What a fine-tuning step's progress message ends with: the measured pace and the fine-tuning time left (the
    calibration after it is timed once it runs); "" before enough steps are timed."""
    left = pace.seconds_left()
    if left is None:
        return ""
    rate = pace.rate() or 0.0
    return f" ({rate:.{1 if rate >= 1 else 2}f} steps/s; fine-tuning ends in {_duration(left)})"


def calibration_left(pace: Pace) -> str:
    """What a calibration progress message ends with: the time left, measured on the scans calibrated so far; ""
    before the first is."""
    left = pace.seconds_left()
    return "" if left is None else f" ({_duration(left)} left)"


def _duration(seconds: float) -> str:
    """``seconds`` in words, to the minute."""
    return "under a minute" if seconds < 60 else f"about {int(round(seconds / 60))} min"


def adapt_options(given: Mapping[str, Any], **fixed: Any) -> AdaptOptions:
    """:class:`AdaptOptions` from the fields ``given`` by name (an unknown one refused by name) and ``fixed`` (the
    caller's own: device, overwrite), checked (:meth:`AdaptOptions.validate`)."""
    from ..options import refuse_unknown

    refuse_unknown(given, {f.name for f in fields(AdaptOptions)} - set(fixed), "adaptation option(s)")
    options = AdaptOptions(**dict(given, **fixed))
    options.validate()
    return options


def earlier_outputs(out: Path, n_persons: int, options: AdaptOptions) -> List[Path]:
    """The files of an earlier adaptation to ``out`` that a new one would replace and may not unasked: every output
    that exists but a run's lone loss log (:meth:`TrainConfig.earlier_outputs`)."""
    runs = [options.run_config(out, run) for run in run_names(n_persons, options.folds)]
    return list(dict.fromkeys(p for cfg in runs for p in cfg.earlier_outputs()))


def resumable(earlier: Sequence[Path]) -> bool:
    """Whether the files of an earlier adaptation (:func:`earlier_outputs`) are an interrupted one that can be resumed:
    a checkpoint, and not a finished model (a finished adaptation keeps only its final checkpoint)."""
    checkpoints = [p for p in earlier if p.name.endswith(".ckpt")]
    finished = any(not p.name.endswith((".ckpt", ".log.csv")) for p in earlier)
    return bool(checkpoints) and (not finished or any(".fold" in p.name for p in checkpoints))


def fold_files(out: Path, suffix: str) -> List[Path]:
    """The files an adaptation's fold runs to ``out`` left (``OUT.foldN<suffix>``, any N; ``suffix``: ".ckpt" or
    ".log.csv"), by name."""
    return sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}.fold*{suffix}") if p.is_file())


def run_files(out: Path, suffix: str) -> List[Path]:
    """The files every run writing ``out`` left, a training's or an adaptation's: the final run's ``OUT<suffix>``,
    then :func:`fold_files`."""
    final = out.with_name(out.name + suffix)
    return ([final] if final.is_file() else []) + fold_files(out, suffix)


def output_paths(out: Path, n_persons: int, options: AdaptOptions) -> List[Path]:
    """Every file an adaptation of the scans of ``n_persons`` persons to ``out`` writes: the bundle, and each
    run's checkpoint and loss log."""
    configs = [options.run_config(out, run) for run in run_names(n_persons, options.folds)]
    return [out] + [p for cfg in configs for p in (cfg.checkpoint_path, cfg.log_path)]
