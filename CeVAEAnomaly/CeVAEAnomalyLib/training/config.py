"""Training settings: the one place their defaults are written (the command line reads them from here).

Torch-free, so ``cevae-anomaly --help`` stays instant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..engine.config import LossConfig, ModelConfig
from ..errors import CeVAEError
from ..options import parse_orientations



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


NO_AUGMENT = AugmentConfig(flip=0, rotate_deg=0, scale=0, translate=0, elastic=0, gamma=0,
                           intensity_scale=0, intensity_shift=0, bias_field=0, noise=0)


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
    loader_workers: Optional[int] = None  # DataLoader worker processes; None: 0 on the CPU, 4 on CUDA
    init_from: Optional[Path] = None  # a bundle whose weights the run starts from (fine-tuning)

    @property
    def checkpoint_path(self) -> Path:
        return self.out.with_name(self.out.name + ".ckpt")

    @property
    def log_path(self) -> Path:
        return self.out.with_name(self.out.name + ".log.csv")

    def validate(self) -> None:
        """Raise CeVAEError naming the option for any value training cannot run with."""
        _at_least_one("--batch-size", self.batch_size)
        _at_least_one("--max-steps", self.max_steps)
        _at_least_one("--checkpoint-every", self.checkpoint_every)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CeVAEError(f"--lr must be a positive number, got {self.lr}.")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise CeVAEError(f"--max-minutes must be a positive number, got {self.max_minutes}.")
        if not 0.0 <= self.val_fraction < 1.0:  # also refuses NaN
            raise CeVAEError(f"--val-fraction must lie in [0, 1) (the share of subjects held out for "
                             f"validation and calibration), got {self.val_fraction}.")
        parse_orientations(",".join(self.orientations))  # refuses none or unknown ones
        if self.model.bottleneck_size < 1:
            layers = len(self.model.channels)
            raise CeVAEError(f"{layers} encoder layers (--channels) halve the input {layers} times, more than "
                             f"input size {self.model.input_size} allows; use at most "
                             f"{int(math.log2(self.model.input_size))} channel widths or a larger --input-size.")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise CeVAEError(f"--loader-workers must be 0 or more, got {self.loader_workers}.")


    def check_outputs(self, inputs: Iterable[Optional[Path]], overwrite: bool) -> None:
        """Refuse, before training, outputs (bundle, checkpoint, log) that are a folder or an input, and
        existing ones unless ``overwrite`` (a resumed run continues its own checkpoint, log and bundle)."""
        if self.out.is_dir():
            raise CeVAEError(f"--out {self.out} is a folder; give the bundle's file name, e.g. "
                             f"{self.out / 'model.cevae'}.")
        read = {Path(p).resolve() for p in inputs if p is not None}
        outputs = (self.out, self.checkpoint_path, self.log_path)
        for path in outputs:
            if path.resolve() in read:
                raise CeVAEError(f"The output {path} is the same file as an input of the training; choose "
                                 "another --out.")
        if overwrite or self.resume:
            return
        for path in outputs:
            if path.exists():
                raise CeVAEError(f"{path} already exists; pass --overwrite to replace it, or --resume to "
                                 "continue the run that wrote it.")


def _at_least_one(option: str, value: int) -> None:
    if value < 1:
        raise CeVAEError(f"{option} must be at least 1, got {value}.")
