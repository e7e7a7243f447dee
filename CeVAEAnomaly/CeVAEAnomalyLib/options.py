"""Every user-facing detection option, once: its choices, default and validation (torch-free).

The command line (argparse choices and help), the Slicer module (parameter node and combo boxes),
the Slicer script, batch and calibration all take their choices and defaults from here. Options
are frozen dataclasses that validate themselves; change one field with :meth:`replace`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple, Type, TypeVar

from .errors import CeVAEError

SCORE_TYPES = ("combi", "rec", "grad")
COMBI_MODES = ("product", "weighted", "geometric", "attribution")
GRAD_TARGETS = ("kl", "elbo")
GRAD_NORMS = ("slice", "volume", "none")
REC_KINDS = ("l1", "l2")
DEVICES = ("auto", "cpu", "cuda", "mps")
ORIENTATIONS = ("axial", "coronal", "sagittal")

O = TypeVar("O", bound="_Options")


class _Options:
    """Shared behaviour of the option dataclasses."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: Type[O], data: Mapping[str, Any], what: str = "options") -> O:
        """Build from a mapping; a missing field takes its default, an unknown one is refused by name."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise CeVAEError(f"Unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}.")
        return cls(**data)

    def replace(self: O, **changes: Any) -> O:
        """A copy with ``changes`` applied (validated again); None values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore


def _choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise CeVAEError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def _number(name: str, value: Any, low: float = 0.0, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < low:
        kind = "a whole number" if integer else "a finite number"
        raise CeVAEError(f"{name} must be {kind} of at least {low:g}, got {value!r}.")


@dataclass(frozen=True)
class ScoreOptions(_Options):
    """How pixel maps are made; the defaults are the project's best measured variant."""

    score_type: str = "combi"
    # product: rec*g; weighted: rec*(1+alpha*g); geometric: sqrt(rec*g);
    # attribution: max(0, dKL/dx * (x - decode(mu))), each pixel's first-order share of the KL
    combi: str = "product"
    alpha: float = 1.0
    grad_target: str = "kl"
    grad_sigma: float = 3.0  # Gaussian smoothing of |grad|, in model pixels (0: none)
    grad_norm: str = "slice"  # min-max normalisation per slice, over the volume, or none
    rec_sigma: float = 0.0  # optional smoothing of the reconstruction error
    mc_samples: int = 0  # 0: decode mu; N: mean error over N samples of z
    rec_kind: str = "l1"

    def __post_init__(self) -> None:
        _choice("score type", self.score_type, SCORE_TYPES)
        _choice("combination", self.combi, COMBI_MODES)
        _choice("gradient target", self.grad_target, GRAD_TARGETS)
        _choice("gradient normalisation", self.grad_norm, GRAD_NORMS)
        _choice("reconstruction error", self.rec_kind, REC_KINDS)
        _number("alpha", self.alpha)
        _number("grad_sigma", self.grad_sigma)
        _number("rec_sigma", self.rec_sigma)
        _number("mc_samples", self.mc_samples, integer=True)

    @property
    def needs_grad(self) -> bool:
        """Whether the map needs the KL gradient (one backward pass)."""
        return self.score_type in ("grad", "combi")


# The published ceVAE score (Zimmerer et al., 2019): rec × min-max normalised, smoothed |dKL/dx|.
PAPER = dict(combi="product", grad_target="kl", grad_sigma=3.0, grad_norm="volume", rec_sigma=0.0, mc_samples=0)


@dataclass(frozen=True)
class PostprocessOptions(_Options):
    """Optional steps, all off by default except what the bundle recommends.

    Order: asymmetry fusion, rim, median, robust normalisation, threshold (with hysteresis),
    minimum component volume.
    """

    rim_mm: float = 0.0  # zero scores within this distance of the brain's edge
    median_radius: int = 0  # 3D median filter radius in voxels
    min_volume_mm3: float = 0.0  # drop labelled components smaller than this
    # score^score_power × (asymmetry_floor + left-right intensity asymmetry smoothed with this sigma); 0: off
    asymmetry_mm: float = 0.0
    asymmetry_floor: float = 0.0
    # weight the asymmetry by min(1, 2 s / (s + s_mirror)) of the score s: the side that scores lower loses it
    # (no "ghost" at a lesion's healthy mirror position); off here so older bundles' calibrations still match
    asymmetry_side: bool = False
    score_power: float = 1.0
    normalise: bool = False  # scores in units of this brain's robust spread (median/MAD), negatives to 0
    hysteresis: float = 0.0  # grow labelled components down to this fraction of the threshold; 0: off

    def __post_init__(self) -> None:
        _number("rim_mm", self.rim_mm)
        _number("median_radius", self.median_radius, integer=True)
        _number("min_volume_mm3", self.min_volume_mm3)
        _number("asymmetry_mm", self.asymmetry_mm)
        _number("asymmetry_floor", self.asymmetry_floor)
        _number("score_power", self.score_power)
        if self.score_power <= 0:
            raise CeVAEError(f"score_power must be positive, got {self.score_power!r}.")
        if not isinstance(self.asymmetry_side, bool):
            raise CeVAEError(f"asymmetry_side must be true or false, got {self.asymmetry_side!r}.")
        if not isinstance(self.normalise, bool):
            raise CeVAEError(f"normalise must be true or false, got {self.normalise!r}.")
        _number("hysteresis", self.hysteresis)
        if self.hysteresis >= 1:
            raise CeVAEError(f"hysteresis is a fraction of the threshold below 1, got {self.hysteresis!r}.")


# The chain the subject-held-out benchmark favoured (docs/benchmark.md); new bundles use it:
# √score × (0.1 + asymmetry (σ 3 mm) × side weight), normalised per brain, outer 3 mm rim masked, components < 50 mm³
# dropped.
RECOMMENDED_POSTPROCESS = PostprocessOptions(rim_mm=3.0, min_volume_mm3=50.0, asymmetry_mm=3.0, asymmetry_floor=0.1,
                                             asymmetry_side=True, score_power=0.5, normalise=True)


@dataclass(frozen=True)
class ThresholdPolicy(_Options):
    """How the labelmap threshold is chosen: an absolute score, else a calibrated healthy
    false-positive rate (None: the model's default rate). ``threshold=inf`` makes no labelmap."""

    threshold: Optional[float] = None
    fpr: Optional[float] = None

    def __post_init__(self) -> None:
        thr = self.threshold
        if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or math.isnan(thr)
                                or thr == -math.inf):
            raise CeVAEError(f"The threshold must be a number, got {thr!r}.")
        if self.fpr is not None and not 0 < self.fpr < 1:
            raise CeVAEError(f"The false-positive rate is a rate between 0 and 1 (e.g. 0.001), got {self.fpr!r}.")


@dataclass(frozen=True)
class RunOptions(_Options):
    """Where and how the network runs."""

    device: str = "auto"
    batch_size: int = 64
    amp: bool = False

    def __post_init__(self) -> None:
        _choice("device", self.device.split(":")[0], DEVICES)
        _number("batch_size", self.batch_size, low=1, integer=True)


def parse_orientations(text: str) -> Tuple[str, ...]:
    """'axial,coronal' -> ('axial', 'coronal'); refuses unknown or no orientations."""
    names = tuple(o.strip() for o in text.split(",") if o.strip())
    if not names:
        raise CeVAEError(f"Give at least one slice orientation ({', '.join(ORIENTATIONS)}).")
    for name in names:
        _choice("orientation", name, ORIENTATIONS)
    return names
