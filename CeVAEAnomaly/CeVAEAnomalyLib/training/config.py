"""Training settings: the one place their defaults are written (the command line reads them from here).

Torch-free, so ``cevae-anomaly --help`` stays instant.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import abc
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from ..data import refuse_bundled_output
from ..engine.config import LossConfig, ModelConfig
from ..errors import COMMAND_LINE_TRAIN, CeVAEError, Wording
from ..io.lock import refuse_if_held
from ..io.naming import refuse_misnamed
from ..io.targets import check_paths, lock_path
from ..options import ORIENTATIONS, parse_orientations

# OUT.log.csv: val_loss empty where not measured (between checkpoints, or no volume held out); checkpoint "1" on the
# row of a step that wrote one (earlier versions' logs lack that column; their checkpoint rows without a validation
# set hold val_loss "nan")
LOG_HEADER = ("step", "loss", "kl", "rec_vae", "rec_ce", "val_loss", "seconds", "slices_per_s", "checkpoint")


@dataclass(frozen=True)
class AugmentConfig:
    """MRI-suited augmentation strengths (0 disables a step); see README for the why."""

    flip: float = 0.5  # left-right flip probability (brains are near-symmetric)
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    elastic: float = 0.02  # displacement amplitude of a smooth random field (fraction of the side)
    gamma: float = 0.3  # log-uniform gamma in [exp(-g), exp(g)] (contrast changes between scanners)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    bias_field: float = 0.2  # amplitude of a smooth multiplicative field (coil inhomogeneity)
    noise: float = 0.03  # max std of Gaussian noise (scanner noise levels)
    slab: int = 0  # thick slices: each slice averaged with 0..slab neighbours on each side (0: off)

    def __post_init__(self) -> None:
        if not 0 <= self.slab <= MAX_SLAB:
            raise CeVAEError(f"The slab augmentation must average 0 to {MAX_SLAB} neighbours on each side, "
                             f"got {self.slab}.")


MAX_SLAB = 16  # neighbours on each side; 1 mm slices averaged over 33 mm are no acquisition


def recorded_augment(record: object, model: Path) -> AugmentConfig:
    """The augmentation a model's header records it was trained with (``training.augment``), for fine-tuning it
    the same way; the defaults of ``train`` for a model that records none. A record that is not such strengths (an
    unknown step, a number out of range: a damaged or foreign file) is refused, naming the model."""
    if record is None:
        return AugmentConfig()
    kinds = {f.name for f in fields(AugmentConfig)}
    problem = None
    if not isinstance(record, dict) or not record:
        problem = "is not an object of strengths"
    elif set(record) - kinds:
        problem = f"names steps this version does not know ({', '.join(sorted(map(str, set(record) - kinds)))})"
    else:
        for name, value in record.items():
            top = MAX_SLAB if name == "slab" else 180.0 if name == "rotate_deg" else 1.0
            whole = name == "slab"
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int))
                    or not math.isfinite(value) or not 0 <= value <= top):
                problem = f"gives {name} = {value!r} (expected {'a whole number' if whole else 'a number'} " \
                          f"from 0 to {top:g})"
                break
    if problem is not None:
        raise CeVAEError(f"The model {model} records an augmentation it was trained with that {problem}, so it "
                         "cannot be fine-tuned the way it was trained.")
    return AugmentConfig(**record)


NO_AUGMENT = AugmentConfig(flip=0, rotate_deg=0, scale=0, translate=0, elastic=0, gamma=0,
                           intensity_scale=0, intensity_shift=0, bias_field=0, noise=0)
# What scans of other scanners and protocols add (docs/benchmark.md, "The model's own levers": neutral there):
# slabs of up to 7 slices (7 mm from 1 mm scans), noise up to 7 %, a stronger bias field.
ACQUISITION_AUGMENT = AugmentConfig(slab=3, noise=0.07, bias_field=0.3)


MAX_LOADER_WORKERS = 64  # batch-reading processes per rank (thousands would exhaust the memory)

# Options a resumed run may change: where it runs, how long, how often it checkpoints, the learning
# rate (lowered after a NaN stop), the batch size (lowered after running out of memory, or raised to keep the
# effective batch on fewer ranks; an adaptation's runs keep theirs, see run_options), and how the bundle is
# stored. Every other option defines the run.
RESUME_MAY_CHANGE = ("out", "lr", "max_steps", "max_minutes", "checkpoint_every", "device", "resume",
                     "half_bundle", "cache_dir", "loader_workers", "batch_size")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data; ``validate()`` refuses unusable values."""

    out: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    orientations: Sequence[str] = ("axial",)
    batch_size: int = 64
    lr: float = 2e-4
    max_steps: int = 2000
    max_minutes: Optional[float] = None
    checkpoint_every: int = 200
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    half_bundle: bool = False
    amp: bool = False
    cache_dir: Optional[Path] = None  # preprocessed-slice cache; None: a temporary one for this run
    # DataLoader worker processes, at most the cores this process may use; None: 0 on the CPU, 4 on CUDA
    loader_workers: Optional[int] = None
    init_from: Optional[Path] = None  # a bundle whose weights the run starts from (fine-tuning)
    # an adaptation's steps and learning rate, which all its runs share: part of each run's identity, so that a
    # resume cannot give its runs different lengths (a train run may be resumed with other --max-steps and --lr)
    adaptation: Optional[Dict[str, Any]] = None

    def run_options(self, init_sha256: Optional[str] = None) -> Dict[str, Any]:
        """Every option that defines the run (all but :data:`RESUME_MAY_CHANGE`), to store in checkpoints; the
        bundle a fine-tuning starts from by its content (its SHA-256: ``init_sha256``, that of the file its weights
        were loaded from, or else the file's now), whatever path names it."""
        from ..io.checksum import sha256_of

        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RESUME_MAY_CHANGE}
        if self.adaptation is not None:  # its fold models calibrate the final one: all are trained alike
            options["batch_size"] = self.batch_size
        if self.init_from is not None:
            options["init_from"] = {"sha256": init_sha256 or sha256_of(Path(self.init_from))}
        return options

    @property
    def checkpoint_path(self) -> Path:
        return self.out.with_name(self.out.name + ".ckpt")

    @property
    def log_path(self) -> Path:
        return self.out.with_name(self.out.name + ".log.csv")

    def validate(self) -> None:
        """Raise :class:`SettingError` naming the setting for any value training cannot run with."""
        _at_least_one("batch_size", self.batch_size)
        _at_least_one("max_steps", self.max_steps)
        _at_least_one("checkpoint_every", self.checkpoint_every)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingError("{lr} must be a positive number, got %s." % self.lr, "lr")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise SettingError("{max_minutes} must be a positive number, got %s." % self.max_minutes, "max_minutes")
        if not 0.0 <= self.val_fraction < 1.0:  # also refuses NaN
            raise SettingError("{val_fraction} must lie in [0, 1) (the share of persons held out for validation "
                               "and calibration), got %s." % self.val_fraction, "val_fraction")
        train_orientations(self.orientations)
        if self.model.bottleneck_size < 1:
            layers = len(self.model.channels)
            raise SettingError(
                "%d encoder layers ({channels}) halve the input %d times, more than input size %d allows; use at "
                "most %d channel widths or a larger {input_size}." % (
                    layers, layers, self.model.input_size, int(math.log2(self.model.input_size))),
                "channels", "input_size")
        excess = self.model.cost_excess()  # the limits a model file is held to (engine/config.py)
        if excess is not None:
            raise SettingError(
                "The network of {channels} %s and {z_dim} %d at {input_size} %d %s, so no command could load the "
                "model; choose narrower {channels}, a smaller {z_dim} or {input_size}." % (
                    ",".join(map(str, self.model.channels)), self.model.z_dim, self.model.input_size, excess),
                "channels", "z_dim", "input_size")
        if self.loader_workers is not None and not 0 <= self.loader_workers <= MAX_LOADER_WORKERS:
            raise SettingError("{loader_workers} must be 0 to %d, got %s (each is a process with its own memory)."
                               % (MAX_LOADER_WORKERS, self.loader_workers), "loader_workers")
        if not 0 <= self.seed < 2**32:
            raise SettingError("{seed} must be a whole number from 0 to %d, got %s." % (2**32 - 1, self.seed), "seed")

    def check_outputs(self, inputs: Iterable[Optional[Path]], overwrite: bool,
                      wording: Wording = COMMAND_LINE_TRAIN) -> None:
        """Refuse, before training, outputs that cannot be written (:meth:`check_output_paths`), and existing ones
        unless ``overwrite`` (a resumed run continues its own checkpoint, log and bundle), saying what to do in
        ``wording``."""
        self.check_output_paths(inputs, wording)
        if overwrite or self.resume:
            return
        resumable = self.checkpoint_path.is_file()
        for path in self.earlier_outputs():
            refuse_if_held(self.out, "train")  # they may be those of a run writing them now: said so instead
            if path == self.out and resumable and self._kept_for_checkpoint():
                raise CeVAEError(f"{path} is the earlier model, kept until the unfinished run whose checkpoint is "
                                 f"{self.checkpoint_path} writes its own; {wording.resume} to continue that run, or "
                                 f"{wording.start_over} (the earlier model stays until the new one is written), or "
                                 f"choose another {wording.out}.")
            if resumable:
                raise CeVAEError(f"{path} already exists; {wording.resume} to continue the run that wrote it, or "
                                 f"{wording.start_over} to replace it.")
            raise CeVAEError(f"{path} already exists (there is no checkpoint of the run that wrote it to resume); "
                             f"{wording.replace_model}.")

    def check_output_paths(self, inputs: Iterable[Optional[Path]], wording: Wording = COMMAND_LINE_TRAIN) -> None:
        """Refuse outputs (bundle, checkpoint, log) that are a folder, under a file, an input (by path or hard link), a
        device, FIFO or socket, or too long a name, a bundle that is the bundled default model, and a slice cache that
        is one of them, naming options in ``wording``; whether they exist is left to :meth:`check_outputs` (no file is
        read here)."""
        if self.out.is_dir():
            raise CeVAEError(f"The {wording.out} {self.out} is a folder; give the bundle's file name, e.g. "
                             f"{self.out / 'model.cevae'}.")
        outputs = (self.out, self.checkpoint_path, self.log_path)
        check_paths(outputs, True, inputs)  # existing outputs are refused below, with the resume hint
        refuse_misnamed(self.out, "model", "a .cevae bundle", ".cevae")
        refuse_bundled_output(self.out)  # even with overwrite
        if self.cache_dir is not None:
            cache = Path(os.path.abspath(self.cache_dir))
            for path in (*outputs, lock_path(self.out)):
                if cache == Path(os.path.abspath(path)):
                    raise CeVAEError(f"The slice cache folder {self.cache_dir} is the run's output {path}; give "
                                     f"{wording.cache_dir} a folder of its own.")

    def _kept_for_checkpoint(self) -> bool:
        """Whether the bundle at ``out`` is the earlier model that the run of the checkpoint beside it replaces when
        it writes its own (a ``--overwrite`` run stopped after a checkpoint), not that run's model."""
        from ..io.checksum import sha256_of

        replaced = replaced_model(self.checkpoint_path)
        return replaced is not None and self.out.is_file() and sha256_of(self.out) == replaced

    def earlier_outputs(self) -> Tuple[Path, ...]:
        """The outputs of an earlier run that exist and that a new run may not replace unasked: all but a lone loss
        log (a run stopped before its first checkpoint), which a new run replaces."""
        outputs = (self.out, self.checkpoint_path, self.log_path)
        if not self.out.exists() and not self.checkpoint_path.exists() and _is_early_log(self.log_path):
            outputs = (self.out, self.checkpoint_path)
        return tuple(p for p in outputs if p.exists())


def train_orientations(orientations: Sequence[str]) -> Tuple[str, ...]:
    """The slice orientations a model may be trained on (and a cache prepared for), checked: known ones, axial among
    them, each once; else :class:`SettingError`."""
    if isinstance(orientations, str) or not isinstance(orientations, abc.Sequence) \
            or not all(isinstance(o, str) for o in orientations):
        given = f"the {type(orientations).__name__} {orientations!r}"
        raise SettingError("{orientations} must be a sequence of orientation names (%s), e.g. ('axial', 'coronal'), "
                           "got %s." % (", ".join(ORIENTATIONS), given.replace("{", "{{").replace("}", "}}")),
                           "orientations")
    names = parse_orientations(",".join(orientations))  # (refuses none or unknown ones)
    if "axial" not in names:
        raise SettingError("{orientations} must include axial: a model is scored on axial slices first (the "
                           "slice scores are axial's), got %s." % ",".join(orientations), "orientations")
    if len(set(names)) != len(names):  # as detection's orientations (options.ScoreOptions) refuse it
        raise SettingError("{orientations} must name each orientation once, got %s." % ",".join(names),
                           "orientations")
    return names


class SettingError(CeVAEError):
    """An unusable training setting. The message names settings by :class:`TrainConfig`'s field names;
    :meth:`naming` says it with other names (the command line's flags)."""

    def __init__(self, template: str, *settings: str) -> None:
        self.template, self.settings = template, settings
        super().__init__(self.naming(lambda name: name))

    def naming(self, name_of: Callable[[str], str]) -> str:
        """The message with each setting called ``name_of(field name)``."""
        return self.template.format(**{name: name_of(name) for name in self.settings})


def _is_early_log(path: Path) -> bool:
    """Whether ``path`` is the loss log of a run stopped before its first checkpoint: it starts as a training run's
    log (its header's first columns, :data:`LOG_HEADER`; earlier versions had fewer after them) and no row is a
    checkpoint's (marked in its column; in an earlier version's log, which lacks it, a row with a validation loss,
    "nan" without a validation set), or it is empty (a run killed before it wrote its header). A finished run's log
    (its model and checkpoint moved away) or a file of another kind under its name is never replaced without
    ``--overwrite``."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096)
            if first == b"":
                return True
            names = first.rstrip(b"\r\n").split(b",")
            if names[:2] != [name.encode() for name in LOG_HEADER[:2]]:
                return False
            column = names.index(b"checkpoint") if b"checkpoint" in names else LOG_HEADER.index("val_loss")
            return all(len(cells) <= column or not cells[column].strip()
                       for cells in (line.split(b",") for line in fh))
    except OSError:
        return False


def replaced_model(path: Path) -> Optional[str]:
    """The sha256 of the earlier model that the run of the checkpoint at ``path`` replaces when it writes its own (its
    ``replaces``), or None: none recorded, or no readable checkpoint there."""
    import torch

    from .checkpoint import compressed_records

    try:
        if compressed_records(path):  # (unpacked whole, to any size)
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch's many kinds of errors for a file that is not a checkpoint
        return None
    replaced = state.get("replaces") if isinstance(state, dict) else None
    return replaced if isinstance(replaced, str) else None


def _at_least_one(setting: str, value: int) -> None:
    if value < 1:
        raise SettingError("{%s} must be at least 1, got %s." % (setting, value), setting)
