"""Every user-facing detection option, once: its range, command-line flag, help and default (torch-free).

Each option is a dataclass field whose metadata (:func:`option`) declares its range or choices,
its flag and its help. From that one declaration come the checks (the same refusal from every
entry point), the command line's flags (:func:`add_flags`), the bundle checks of
``engine/bundle_checks.py`` and the ranges of the Slicer panel (:func:`option_range`).

A detection is asked for with one :class:`DetectionRequest` (scoring and post-processing
overrides of the model's recommendation, threshold policy, run options); the command line,
batch, the Slicer logic, its worker and its script all build or read that object.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Type, TypeVar, Union

from .errors import CeVAEError

SCORE_TYPES = ("combi", "rec", "grad")
COMBI_MODES = ("product", "weighted", "geometric", "attribution")
GRAD_TARGETS = ("kl", "elbo")
GRAD_NORMS = ("slice", "volume", "none")
REC_KINDS = ("l1", "l2")
DEVICES = ("auto", "cpu", "cuda", "mps")
ORIENTATIONS = ("axial", "coronal", "sagittal")
# How ``normalise`` measures a brain's score spread (engine/postprocess.py); for normally distributed
# scores both are the standard deviation.
SPREADS = {"mad": "1.4826 x the median absolute deviation from the median",
           "tail": "(95th percentile - median) / 1.645, the upper tail's width"}

S = TypeVar("S", bound="Serialisable")


class Serialisable:
    """to_dict / from_dict / replace for the frozen option and configuration dataclasses."""

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict, which :meth:`from_dict` reads back."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: Type[S], data: Mapping[str, Any], what: Optional[str] = None) -> S:
        """Build from a mapping (lists become tuples); a missing field takes its default, an unknown
        one is refused by name."""
        if not isinstance(data, Mapping):
            raise CeVAEError(f"A {cls.__name__} must be built from a mapping, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        refuse_unknown(data, known, what or cls.__name__ + " field(s)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})  # type: ignore[call-arg]

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied (validated again); None values are ignored."""
        refuse_unknown(changes, {f.name for f in fields(self)}, type(self).__name__ + " field(s)")  # type: ignore
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore


def refuse_unknown(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """Refuse names in ``given`` that are not ``known``, naming them and the known ones."""
    names = set(known)
    unknown = sorted(set(given) - names)
    if unknown:
        raise CeVAEError(f"Unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}.")


# ---- one declaration per option ------------------------------------------------------------------
def option(default: Any, help: str, *, low: float = 0.0, high: float = math.inf, open_low: bool = False,
           open_high: bool = False, whole: bool = False, choices: Optional[Tuple[str, ...]] = None,
           label: Optional[str] = None, flag: Optional[str] = None, model_high: Optional[float] = None) -> Any:
    """A dataclass field with its range ([low, high]; ``open_*`` excludes a bound), or its ``choices``
    (``label`` names them in errors), its command-line ``flag`` (default ``--name-with-dashes``) and help.
    ``model_high``: a lower upper bound for the value a model file recommends (None: ``high``), for options whose
    cost grows with the value: a plain detection uses the model's value, a user asks for more explicitly."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, open_low=open_low,
                                                open_high=open_high, whole=whole, choices=choices, label=label,
                                                flag=flag, model_high=model_high))


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of the option ``f`` (its declared ``flag``, else ``--name-with-dashes``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _range_text(m: Mapping[str, Any], high: float) -> str:
    return f"{'(' if m['open_low'] else '['}{m['low']:g}, {high:g}{')' if m['open_high'] else ']'}"


def check_value(f: dataclasses.Field, value: Any, where: Optional[str] = None, in_model: bool = False) -> None:
    """Refuse ``value`` for field ``f`` with one message naming the option (``where``: e.g. the header
    section) and its command-line flag; ``in_model``: a value a model file holds, within the option's
    ``model_high``."""
    m = f.metadata
    if value is None and f.default is None:
        return
    name = where or f"{f.name} ({flag_of(f)})"
    if isinstance(f.default, str) and m["choices"] is None:  # free text (the device), checked by its class
        if not isinstance(value, str):
            raise CeVAEError(f"{name} must be text, got {value!r}.")
        return
    if m["choices"] is not None:
        if value in m["choices"]:
            return
        if where:
            raise CeVAEError(f"{where} must be one of {', '.join(m['choices'])}, got {value!r}.")
        raise CeVAEError(f"Unknown {m['label'] or f.name} {value!r}; choose one of {', '.join(m['choices'])}.")
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise CeVAEError(f"{name} must be true or false, got {value!r}.")
        return
    number = real_number(value) and (isinstance(value, int) or not m["whole"])  # (compared with floats below)
    high = m["model_high"] if in_model and m["model_high"] is not None else m["high"]
    inside = number and (
        (value > m["low"]) or (value == m["low"] and not m["open_low"])) and (
        (value < high) or (value == high and not m["open_high"]))
    if not inside:
        kind = "a whole number" if m["whole"] else "a number"
        model = f" in a model file (a detection may ask for up to {m['high']:g} with {flag_of(f)})" \
            if high != m["high"] else ""
        raise CeVAEError(f"{name} must be {kind} in {_range_text(m, high)}{model}, got {value!r}.")


def real_number(value: Any, finite: bool = False) -> bool:
    """Whether ``value`` is an int or float (not a bool) that compares as a float does: not NaN (``finite``: nor
    infinite), and an int within the floats' range (JSON's 1 followed by 400 zeros is not: float() overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= sys.float_info.max
    return math.isfinite(value) if finite else not math.isnan(value)


def plain_number(value: Any) -> Any:
    """A number as a plain Python int or float (a NumPy scalar such as ``np.int64(8)`` from a script)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_fields(obj: Any) -> None:
    """Check each option of the frozen dataclass ``obj``, a NumPy number kept as the plain Python one."""
    for f in fields(obj):
        if "help" in f.metadata:
            value = plain_number(getattr(obj, f.name))
            object.__setattr__(obj, f.name, value)
            check_value(f, value)


def option_field(cls: type, name: str) -> dataclasses.Field:
    """The declaration of the option ``name`` of the options class ``cls`` (its metadata: :func:`option`)."""
    return {f.name: f for f in fields(cls)}[name]


def option_range(cls: type, name: str) -> Tuple[float, float]:
    """(low, high) of a numeric option, e.g. for a panel's spin box."""
    m = option_field(cls, name).metadata
    return m["low"], m["high"]


# ---- the options -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreOptions(Serialisable):
    """How pixel maps are made. The defaults are those of a model that recommends none: a model's own
    recommendation (``bundle.header.score_options``; the bundled model's fuses three orientations) differs, so to
    change one option start from it (``.replace(score_type="rec")``) or name the option in a request
    (:meth:`DetectionRequest.of`, ``detect(..., score_type="rec")``), which keeps the rest of the model's."""

    score_type: str = option("combi", "pixel score", choices=SCORE_TYPES, label="score type")
    combi: str = option("product", "how combi joins rec and grad: product rec*g, weighted rec*(1+alpha*g), "
                        "geometric sqrt(rec*g), attribution max(0, dKL/dx * (x - decode(mu)))",
                        choices=COMBI_MODES, label="combination")
    alpha: float = option(1.0, "weight of grad in --combi weighted: rec*(1+alpha*grad)", high=1000)
    grad_target: str = option("kl", "gradient of the KL term or of the whole ELBO", choices=GRAD_TARGETS,
                              label="gradient target")
    grad_sigma: float = option(3.0, "Gaussian smoothing of |grad| in model pixels; 0: none", high=1000)
    grad_norm: str = option("slice", "min-max normalisation of grad per slice, over the volume, or none",
                            choices=GRAD_NORMS, label="gradient normalisation")
    rec_sigma: float = option(0.0, "Gaussian smoothing of the reconstruction error in model pixels; 0: none",
                              high=1000)
    mc_samples: int = option(0, "average the reconstruction over N samples of z; 0: decode mu", whole=True,
                             high=10000, model_high=100)  # a model's 100: about a minute more per scan on 2 cores
    rec_kind: str = option("l1", "reconstruction error", choices=REC_KINDS, label="reconstruction error")
    test_time_steps: int = option(0, "thorough mode: score with a copy of the model fine-tuned on this scan's own "
                                  "slices for N steps; 0: off, 100 adds about 13 to 50 s per scan on 2 CPU cores",
                                  whole=True, high=100000, model_high=1000)  # 10 x the thorough mode's
    orientations: str = option("axial", "average the maps of the volume sliced in these orientations, axial first "
                               "(e.g. axial,coronal,sagittal; the model must have been trained on each, and each "
                               "adds a network pass)")

    def __post_init__(self) -> None:
        _check_fields(self)  # (orientations: text)
        names = parse_orientations(self.orientations)
        if not names or names[0] != "axial" or len(set(names)) != len(names):
            raise CeVAEError(f"Orientations must start with axial (the slice scores are axial's) and name each "
                             f"orientation once, got {self.orientations!r}.")
        object.__setattr__(self, "orientations", ",".join(names))  # one spelling, so calibrations match

    @property
    def orientation_list(self) -> Tuple[str, ...]:
        """The slice orientations whose maps are averaged (axial first)."""
        return tuple(self.orientations.split(","))

    @property
    def needs_grad(self) -> bool:
        """Whether the map needs the KL gradient (one backward pass)."""
        return self.score_type in ("grad", "combi")


# The thorough mode's test-time adaptation steps (about 13 to 50 s more per scan on 2 CPU cores, by load and brain
# size; docs/benchmark.md measures it).
THOROUGH_STEPS = 100

# The published ceVAE score (Zimmerer et al., 2019): rec × min-max normalised, smoothed |dKL/dx|.
PAPER = dict(combi="product", grad_target="kl", grad_sigma=3.0, grad_norm="volume", rec_sigma=0.0, mc_samples=0)


@dataclass(frozen=True)
class PostprocessOptions(Serialisable):
    """Optional steps, all off by default except what the bundle recommends.

    Order: asymmetry fusion, rim, median, robust normalisation (its ``spread``), threshold (with
    hysteresis), minimum component volume and peak. A step's parameters are ignored while the step is off
    (e.g. ``spread`` without ``normalise``, ``asymmetry_floor`` with ``asymmetry_mm`` 0).
    """

    rim_mm: float = option(0.0, "ignore scores within this distance of the brain edge (mm)", high=50)
    # a model's radius 3 (a box of 7^3 voxels): about 6 s and 0.6 GB on a 1 mm brain on one core; 10: 90 s, 10 GB
    median_radius: int = option(0, "3D median filter radius (voxels)", whole=True, high=10, model_high=3)
    min_volume_mm3: float = option(0.0, "drop components smaller than this (mm^3)", high=1e6, flag="--min-volume")
    asymmetry_mm: float = option(0.0, "fuse the score with the left-right intensity asymmetry smoothed with "
                                 "this sigma (mm): score^power x (floor + asymmetry); 0: off", high=100)
    asymmetry_floor: float = option(0.0, "score^power x (floor + asymmetry): a floor > 0 keeps part of "
                                    "midline/bilateral scores", high=1000)
    # off here so older bundles' calibrations still match
    asymmetry_side: bool = option(False, "weight the asymmetry by min(1, 2 s / (s + s_mirror)) of the score s: "
                                  "the side that scores lower loses it (no ghost at a lesion's mirror position)")
    score_power: float = option(1.0, "power of the model's score in the asymmetry fusion", high=10, open_low=True)
    normalise: bool = option(False, "express scores in units of this brain's robust spread, (score - median) / "
                             "spread, negatives set to 0, before thresholding")
    # mad here so older bundles' headers and calibrations (written without it) still match
    spread: str = option("mad", "how --normalise measures this brain's spread: "
                         + "; ".join(f"{k}: {v}" for k, v in SPREADS.items()) + " (ignored without --normalise)",
                         choices=tuple(SPREADS), label="spread")
    hysteresis: float = option(0.0, "grow labelled components down to this fraction of the threshold; 0: off",
                               high=1, open_high=True)
    min_peak: float = option(1.0, "keep only components whose highest score reaches this multiple of the threshold;"
                             " 1: every component", low=1.0, high=100)

    def __post_init__(self) -> None:
        _check_fields(self)


# The chain the subject-held-out benchmarks favoured (docs/benchmark.md); new bundles use it:
# √score × (0.1 + asymmetry (σ 3 mm) × side weight), outer 3 mm rim masked, normalised per brain by the upper
# tail's spread (the acquisition benchmark's lever), components < 50 mm³ or peaking below 2 × the threshold
# dropped (the peak filter the acquisition benchmark chose held out).
RECOMMENDED_POSTPROCESS = PostprocessOptions(rim_mm=3.0, min_volume_mm3=50.0, asymmetry_mm=3.0, asymmetry_floor=0.1,
                                             asymmetry_side=True, score_power=0.5, normalise=True, spread="tail",
                                             min_peak=2.0)


@dataclass(frozen=True)
class ThresholdPolicy(Serialisable):
    """How the labelmap threshold is chosen: an absolute score, else a calibrated healthy
    false-positive rate (None: the model's default rate). ``threshold=inf`` makes no labelmap."""

    threshold: Optional[float] = option(None, "absolute score threshold, in the map's units (overrides --fpr; inf: an "
                                        "empty labelmap; 0 or less: the whole brain; default: the calibrated one at "
                                        "--fpr)",
                                        low=-math.inf, open_low=True)
    fpr: Optional[float] = option(None, "healthy false-positive rate for the calibrated threshold, from 1e-06 to "
                                  "0.5 (default: the model's)", low=1e-6, high=0.5)

    def __post_init__(self) -> None:
        _check_fields(self)


def check_calibratable(score: ScoreOptions, post: PostprocessOptions) -> None:
    """Refuse scoring and post-processing a model file may not hold (above an option's ``model_high``): calibrate
    writes them into the model as its recommendation and calibrated modes. Entry points call it before any work."""
    for options in (score, post):
        for f in fields(options):
            try:
                check_value(f, getattr(options, f.name), in_model=True)
            except CeVAEError as exc:
                raise CeVAEError(f"Cannot calibrate a model with these options, which it would hold: {exc}") from None


DEFAULT_BATCH_SIZE = 64  # slices per network pass, everywhere


@dataclass(frozen=True)
class RunOptions(Serialisable):
    """Where and how the network runs."""

    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda or mps; cuda:N picks a GPU")
    batch_size: int = option(DEFAULT_BATCH_SIZE, "slices per network pass", whole=True, low=1, high=4096)
    amp: bool = option(False, "mixed precision: faster on GPUs, but the calibration is in full precision (on the "
                              "CPU maps were measured up to 10 %% of their maximum off) (default: off)")

    def __post_init__(self) -> None:
        name, colon, index = self.device.partition(":") if isinstance(self.device, str) else ("", "", "")
        if name not in DEVICES or (colon and (name == "auto" or not (index.isascii() and index.isdigit()))):
            raise CeVAEError(f"Unknown device {self.device!r}; choose one of {', '.join(DEVICES)} "
                             "(cuda:N picks a GPU).")
        _check_fields(self)


# ---- one detection request ---------------------------------------------------------------------
_PARTS: Tuple[type, ...] = (ScoreOptions, PostprocessOptions, ThresholdPolicy, RunOptions)
_OWNER: Dict[str, type] = {f.name: cls for cls in _PARTS for f in fields(cls)}
_BY_NAME = frozenset(["paper", *_OWNER])  # every name DetectionRequest.of takes: paper, then the parts' options


def _checked_overrides(cls: type, values: Mapping[str, Any], what: str, part: str) -> Dict[str, Any]:
    if not isinstance(values, Mapping):
        raise CeVAEError(f"The request's {part} must be a mapping of option names to values, got "
                         f"{type(values).__name__}.")
    by_name = {f.name: f for f in fields(cls)}
    refuse_unknown(values, by_name, what)
    out = {k: plain_number(v) for k, v in values.items() if v is not None}
    for k, v in out.items():
        check_value(by_name[k], v)
    return out


@dataclass(frozen=True)
class DetectionRequest(Serialisable):
    """What one detection is asked to do, from any entry point.

    ``score`` and ``post`` override the model's recommended scoring and post-processing (only the
    options given; ``paper`` first switches to the published score); ``policy`` chooses the
    labelmap threshold; ``run`` says where the network runs. Build one from keyword options with
    :meth:`of` (``DetectionRequest.of(score_type="rec", rim_mm=2.0, fpr=0.01, batch_size=8)``).
    """

    score: Dict[str, Any] = field(default_factory=dict)
    post: Dict[str, Any] = field(default_factory=dict)
    paper: bool = False
    policy: ThresholdPolicy = ThresholdPolicy()
    run: RunOptions = RunOptions()

    def __new__(cls, *args: Any, **kwargs: Any) -> "DetectionRequest":
        """Refuse option names given as the request's fields (``DetectionRequest(fpr=0.01)``), naming :meth:`of`."""
        parts = [f.name for f in fields(cls)]
        refuse_options_by_name(kwargs, parts, f"DetectionRequest({', '.join(parts)}) takes its parts",
                               "DetectionRequest.of({})")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        score = _checked_overrides(ScoreOptions, self.score, "score option(s)", "score")
        if "orientations" in score:  # checked (axial first, each once) and spelled as the options spell it
            score["orientations"] = ScoreOptions(orientations=score["orientations"]).orientations
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "post", _checked_overrides(PostprocessOptions, self.post,
                                                            "post-processing option(s)", "post"))
        if not isinstance(self.paper, bool):
            raise CeVAEError(f"paper must be true or false, got {self.paper!r}.")
        for name, cls in (("policy", ThresholdPolicy), ("run", RunOptions)):
            value = getattr(self, name)
            if isinstance(value, Mapping):  # from JSON
                object.__setattr__(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise CeVAEError(f"The request's {name} must be a {cls.__name__}, got {value!r}.")

    @classmethod
    def of(cls, paper: bool = False, **options: Any) -> "DetectionRequest":
        """A request from option names (None: the model's or the default), each routed to its part."""
        refuse_unknown(options, _BY_NAME, "detection option(s)")
        parts: Dict[type, Dict[str, Any]] = {c: {} for c in _PARTS}
        for name, value in options.items():
            if value is not None:
                parts[_OWNER[name]][name] = value  # (every part takes a NumPy number as the plain one)
        return cls(score=parts[ScoreOptions], post=parts[PostprocessOptions], paper=paper,
                   policy=ThresholdPolicy(**parts[ThresholdPolicy]), run=RunOptions(**parts[RunOptions]))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DetectionRequest":
        """The request the command-line flags of :func:`add_flags` ask for."""
        return cls.of(paper=bool(getattr(args, "paper", False)),
                      **{name: getattr(args, name, None) for name in _OWNER})

    @classmethod
    def given(cls, request: Union["DetectionRequest", Mapping[str, Any], None], **options: Any) -> "DetectionRequest":
        """What an entry point's ``request`` argument asks for: a request, its :meth:`to_dict` form or None (the
        model's options), with the named ``options`` on top (:meth:`with_options`)."""
        if isinstance(request, Mapping):
            flat = sorted(set(request) & set(_OWNER))
            if flat:
                raise CeVAEError(f"The request dict holds option names ({', '.join(flat)}): give them by name "
                                 "(fpr=0.01) or as DetectionRequest.of(...); a request dict is "
                                 "DetectionRequest.to_dict()'s form (score, post, paper, policy, run).")
            request = cls.from_dict(request, "request field(s)")
        elif request is not None and not isinstance(request, DetectionRequest):
            raise CeVAEError(f"The request must be a DetectionRequest or its dict form, not a "
                             f"{type(request).__name__}; detection options can also be given by name, e.g. fpr=0.01.")
        return (request or cls()).with_options(**options)

    def with_options(self, **options: Any) -> "DetectionRequest":
        """A copy with more options (None values are ignored; ``paper`` among them switches the published score).
        A false-positive rate given here replaces the request's absolute threshold (which would otherwise win)."""
        paper = options.pop("paper", None)
        policy = {k: v for k, v in self.policy.to_dict().items() if v is not None}
        if options.get("fpr") is not None and options.get("threshold") is None:
            policy.pop("threshold", None)
        given = dict(self.score, **self.post, **policy, **self.run.to_dict())
        return DetectionRequest.of(paper=self.paper if paper is None else paper,
                                   **dict(given, **{k: v for k, v in options.items() if v is not None}))

    def options(self, score: ScoreOptions, post: PostprocessOptions) -> Tuple[ScoreOptions, PostprocessOptions]:
        """The scoring and post-processing to use, starting from the model's recommended ``score`` and ``post``."""
        if self.paper:
            score = score.replace(**PAPER)
        return score.replace(**self.score), post.replace(**self.post)

    def costly_recommendation(self, score: ScoreOptions,
                              post: PostprocessOptions) -> Optional[Tuple[dataclasses.Field, Any, float]]:
        """(option, value, its ``model_high``) of the first value the model recommends (``score``, ``post``) beyond
        what a model may recommend that this request would use without asking for it; None if there is none."""
        for recommended, given in ((score, self.score), (post, self.post)):
            for f in fields(recommended):
                high, value = f.metadata["model_high"], getattr(recommended, f.name)
                if high is not None and value > high and f.name not in given and not (self.paper and f.name in PAPER):
                    return f, value, high
        return None

    def checked_options(self, score: ScoreOptions,
                        post: PostprocessOptions) -> Tuple[ScoreOptions, PostprocessOptions]:
        """:meth:`options` for a detection: a value the model recommends beyond what a model may recommend (an
        option's ``model_high``: a plain detection with it could take very long) is refused unless the request asks
        for it itself (:meth:`costly_recommendation`), naming the flag that does."""
        costly = self.costly_recommendation(score, post)
        if costly is not None:
            f, value, _ = costly
            raise CeVAEError(f"{too_costly(*costly)} Give {flag_of(f)} {value} to use it anyway, or a lower value.")
        return self.options(score, post)


def refuse_options_by_name(given: Mapping[str, Any], takes: Iterable[str], call: str, how: str) -> None:
    """Refuse, in one line, the keyword arguments ``given`` that are not among ``takes``, where ``call`` says what
    is taken (e.g. "Detector(bundle, score, ...) takes options objects"): detection option names (``fpr=0.01``) are
    told the call that takes them by name (``how``, its ``{}`` filled with them as given), other names are unknown."""
    taken = set(takes)
    extra = {k: v for k, v in given.items() if k not in taken}
    unknown = sorted(set(extra) - _BY_NAME)
    if unknown:
        raise CeVAEError(f"Unknown argument(s) {', '.join(map(repr, unknown))}: {call}; detection options by name: "
                         f"{how.format('...')}.")
    if extra:
        named = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise CeVAEError(f"{call}, not options by name: use {how.format(named)}.")


def too_costly(f: dataclasses.Field, value: Any, high: float) -> str:
    """What is wrong with a model recommending ``value`` for option ``f`` beyond its ``model_high`` ``high``
    (:meth:`DetectionRequest.costly_recommendation`), for every front end's refusal."""
    return (f"The model recommends {f.name} {value}, more than a model may recommend ({high:g}): a detection with it "
            "could take very long.")


# ---- the command line --------------------------------------------------------------------------
class HelpWithDefaults(argparse.HelpFormatter):
    """Help that shows each option's default (when it has a value to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text and "default" not in text
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def add_flags(parser: argparse.ArgumentParser, cls: type, model_default: bool = False,
              only: Optional[Tuple[str, ...]] = None) -> None:
    """One flag per option of ``cls`` (or those named in ``only``); ``model_default``: the flags default
    to None (the model's own). The values are checked when the request is built (one message everywhere)."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        m = f.metadata
        default = None if model_default or f.default is None else f.default
        help_text = m["help"] + (" (default: the model's)" if model_default else "")
        if m["choices"] is None and isinstance(f.default, bool):
            switch(parser, flag_of(f), help_text, dest=f.name, default=default)
            continue
        kwargs: Dict[str, Any] = dict(dest=f.name, default=default, help=help_text)
        if m["choices"] is not None:
            kwargs["choices"] = m["choices"]
        elif not isinstance(f.default, str):  # numbers (the device is free text)
            kwargs["type"] = int if m["whole"] else float
        parser.add_argument(flag_of(f), **kwargs)


def switch(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: Any) -> None:
    """A ``--X``/``--no-X`` flag with ``help`` as given (argparse of Python 3.9 and 3.10 appends "(default: ...)" to
    it, a second default where the help says one)."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help, **kwargs).help = help


def path_value(text: str) -> Path:
    """A path option's value (argparse ``type``); an empty one (``--cache-dir ""``) would mean the current
    folder, so it is refused. A leading ``~`` is the home folder, also where the shell left it (``--out=~/m.cevae``),
    not a folder named "~"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text).expanduser()


def output_path_value(text: str) -> Path:
    """An output file's path (argparse ``type``), as :func:`path_value`; one ending in a path separator names a
    folder, a slash that ``Path`` drops (``--out results/`` wrote a file named results), so it is refused."""
    path = path_value(text)
    if text.endswith(tuple(sep for sep in (os.sep, os.altsep, "/") if sep)):
        raise argparse.ArgumentTypeError(f"{text} names a folder (it ends in a slash); give a file name, such as "
                                         f"{text}NAME")
    return path


def parse_orientations(text: str) -> Tuple[str, ...]:
    """'axial,coronal' -> ('axial', 'coronal'); refuses unknown or no orientations."""
    names = tuple(o.strip() for o in text.split(",") if o.strip())
    if not names:
        raise CeVAEError(f"Give at least one slice orientation ({', '.join(ORIENTATIONS)}).")
    for name in names:
        if name not in ORIENTATIONS:
            raise CeVAEError(f"Unknown orientation {name!r}; choose one of {', '.join(ORIENTATIONS)}.")
    return names
