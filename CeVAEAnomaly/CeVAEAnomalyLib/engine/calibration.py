"""Calibrated thresholds: healthy voxel score quantiles stored in the bundle.

A labelmap threshold is chosen from a target false-positive rate: the share of healthy brain
voxels allowed above it. Each calibration is keyed by the scoring and post-processing options
it was measured with, because a threshold only means something for the same score map. Options
that only decide which voxels above the threshold the labelmap keeps (:data:`LABELMAP_ONLY`) do not
change that map: a calibration serves every value of them.
"""
from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from dataclasses import Field, fields
from typing import Any, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CeVAEError
from ..options import PAPER, PostprocessOptions, ScoreOptions, flag_of

DEFAULT_FPR = 0.001
CALIBRATE_SOURCE = "healthy volumes given to calibrate"  # the calibration source of a copy that calibrate writes
SLICER_CALIBRATE_SOURCE = "healthy volumes of the site"  # ... that the Slicer module's Calibrate writes
FPR_GRID = np.unique(np.concatenate([np.logspace(-6, -1, 26), [0.2, 0.5]]))


def check_default_fpr(rate: Any, name: str = "default_fpr") -> None:
    """Refuse a default false-positive rate the calibration holds no threshold for (no loader takes a bundle with
    it); ``name`` is the option as the caller knows it."""
    low, high = float(FPR_GRID[0]), float(FPR_GRID[-1])
    number = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
    if not (number and low <= rate <= high):  # (also refuses NaN)
        raise CeVAEError(f"{name} must be a rate the calibration covers, from {low:g} to {high:g} (e.g. 0.001), "
                         f"got {format(rate, 'g') if number else repr(rate)}.")


# post-processing applied to the labelmap after the threshold (minimum component volume and peak; hysteresis
# grows components from voxels above the threshold), not to the score map that is calibrated
LABELMAP_ONLY = ("min_volume_mm3", "hysteresis", "min_peak")


def calibration_key(score: ScoreOptions, post: PostprocessOptions) -> str:
    """A stable key for the options a calibration applies to (every field written out)."""
    return json.dumps({"score": score.to_dict(), "post": post.to_dict()}, sort_keys=True)


def _key_options(key: str) -> Optional[Tuple[ScoreOptions, PostprocessOptions]]:
    """The options a stored key names; fields added since it was written take their defaults.

    None for a key this version cannot read (a removed option or an invalid value).
    """
    try:
        data = json.loads(key)
        return ScoreOptions.from_dict(data["score"]), PostprocessOptions.from_dict(data["post"])
    except (ValueError, TypeError, KeyError, RecursionError, CeVAEError):
        return None


# a scan whose largest voxel side is more than this factor from those of the scans a threshold was calibrated on is
# another acquisition: the threshold's false-positive rate on it is not known (docs/benchmark.md, Acquisitions).
# The slice plane is not recorded: 5 mm scans of another plane than the calibration's flagged at most 5.4 times the
# default rate on held-out heads, at most 3.0 times the same plane's (scripts/benchmark_slice_plane.py)
ACQUISITION_FACTOR = 1.5


def largest_side(spacing: Sequence[float]) -> float:
    """A scan's largest voxel side (mm, over its first three axes): a thick-sliced scan's slice thickness."""
    return float(max(spacing[:3]))


def other_acquisitions(sides: Sequence[float]) -> List[int]:
    """The scans of another acquisition than the finest one among them (indices into ``sides``, each scan's
    :func:`largest_side`): those whose side is more than ACQUISITION_FACTOR times the finest's; [] when all are alike.
    Calibrating, adapting and the Slicer panel's pre-check all warn of mixed acquisitions by this rule alone."""
    finest = min(sides, default=0.0)
    return [j for j, side in enumerate(sides) if side > finest * ACQUISITION_FACTOR]


# a scan whose bright tail (engine/modality.py) lies more than this above the calibration scans' highest looks
# post-contrast to them: with the bundled calibration's range it warns on 5 of 6 heads' 1 mm post-contrast scans and
# on none of their 13 plain variants (noise up to 7 %, bias, gamma, thick, partial), lesion cases included
# (scripts/benchmark_bright_tail.py, docs/benchmark.md)
BRIGHT_TAIL_MARGIN = 0.5


# a healthy scan that flags more than this many times the rate at the threshold the other calibration scans give is
# unlike them. Measured with the bundled model at its default rate (0.000218) on 1 and 2 mm scans of three heads and
# their noisy, biased and ghosted variants: up to 3.9 times against two other heads pooled, up to 10.7 times against a
# single scan with a strong bias field (8.8 times at the 99th percentile of such pairs); a 2 mm scan with 8.7 ml of
# inserted lesions flagged 32 times the rate, and pooled it raised the threshold from 5.1 to 29 (38 with one other scan)
UNLIKE_FACTOR = 10.0


# a rate whose threshold rests on fewer healthy voxels than this above it is not measured: the threshold is little
# more than the highest healthy scores (and neighbouring voxels of a smooth score map are not independent). With 2
# scans of 2 mm voxels (480 k brain voxels) the default rate rests on 104 voxels, 1e-5 on 5; the bundled model's 4.2 M
# voxels put 4 above the grid's lowest rate, 1e-6
MIN_TAIL_VOXELS = 10


def thin_tail(entry: Mapping[str, Any], fpr: float) -> Optional[str]:
    """Why the threshold at ``fpr`` of ``entry`` is not measured, in words: it rests on fewer than
    :data:`MIN_TAIL_VOXELS` of the healthy voxels calibrated on; None when it rests on more (or no count is kept)."""
    n = entry.get("n_voxels")
    if not isinstance(n, int) or n * fpr >= MIN_TAIL_VOXELS:
        return None
    return (f"the threshold at a false-positive rate of {fpr:g} rests on {n * fpr:.2g} of the {n} healthy brain voxels "
            f"calibrated on, fewer than {MIN_TAIL_VOXELS}, so that rate is not measured (the lowest that rests on "
            f"{MIN_TAIL_VOXELS} is {MIN_TAIL_VOXELS / n:.2g})")


def calibrate(healthy_scores: Iterable[np.ndarray], source: str, largest_voxel_mm: Sequence[float] = (),
              bright_tails: Sequence[Optional[float]] = (), fpr: Optional[float] = None,
              persons: Sequence[Hashable] = ()) -> Dict[str, Any]:
    """Quantiles of pooled healthy brain-voxel scores on the FPR grid; ``largest_voxel_mm``: each healthy
    volume's largest voxel side (its slice thickness, for thick slices), ``bright_tails``: each one's
    :func:`~.modality.bright_tail` (None: not measured), both recorded as their range. Each volume's voxel count is
    recorded, and with ``fpr`` (the model's default rate) and volumes of 2 or more persons (``persons``: each
    volume's; none given: a person each), :func:`leave_one_out` at it."""
    scores = [np.asarray(v, np.float32).ravel() for v in healthy_scores]
    values = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    if values.size == 0:
        raise CeVAEError("No healthy brain voxels to calibrate on.")
    thresholds = np.quantile(values, 1.0 - FPR_GRID)
    entry = {
        "fpr": [float(f) for f in FPR_GRID],
        "threshold": [float(t) for t in thresholds],
        "n_voxels": int(values.size),
        "source": source,
        "scan_voxels": [int(s.size) for s in scores],
    }
    if fpr is not None and len(set(_persons(persons, len(scores)))) > 1:
        entry["leave_one_out"] = leave_one_out(scores, fpr, persons)
    if len(largest_voxel_mm):
        entry["largest_voxel_mm"] = [round(float(min(largest_voxel_mm)), 3), round(float(max(largest_voxel_mm)), 3)]
    tails = [t for t in bright_tails if t is not None]
    if tails:
        entry["bright_tail"] = [round(float(min(tails)), 3), round(float(max(tails)), 3)]
    return entry


def _persons(persons: Sequence[Hashable], count: int) -> List[Hashable]:
    """The person of each of ``count`` volumes: ``persons`` where given, else a person of its own each."""
    if not len(persons):
        return list(range(count))
    if len(persons) != count:
        raise CeVAEError(f"Give the person of each of the {count} healthy volumes, got {len(persons)}.")
    return list(persons)


def leave_one_out(scores: Sequence[np.ndarray], fpr: float, persons: Sequence[Hashable] = ()) -> Dict[str, Any]:
    """For each volume of ``scores`` (of 2 or more persons), the threshold at ``fpr`` that a calibration on the
    volumes of the other persons gives (:func:`calibrate`, then :func:`threshold_for_fpr`'s interpolation) and the
    share of its own voxels at or above it: how far the threshold rests on any one person, and how unlike the others
    each volume is. ``persons``: each volume's person (none given: a person each); a person's other scans are left
    out with it, as they share its anatomy and any lesion."""
    groups = _persons(persons, len(scores))
    sizes = [s.size for s in scores]
    at = np.searchsorted(FPR_GRID, fpr)
    rates = FPR_GRID[max(at - 1, 0):at + 1] if fpr not in FPR_GRID else np.array([fpr])  # the grid rates around it
    keep = min(max(sizes), int(math.ceil(rates[-1] * sum(sizes))) + 2)  # every top rank those quantiles read
    tops = [np.partition(s, s.size - min(keep, s.size))[s.size - min(keep, s.size):] for s in scores]
    # every volume's top values in one pool, highest first, sorted once: a person's others' pool is it without the
    # person's own values (sorting the others' pool for each person grew with the square of the volumes). The
    # others' values a threshold reads lie in the pool's top (keep, and the person's own tops above them)
    need = keep * (1 + max(Counter(groups).values()))
    pooled = np.concatenate(tops)
    if need < pooled.size:
        pooled.partition(pooled.size - need)
        tops = [t[t >= pooled[pooled.size - need]] for t in tops]
    del pooled
    person = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    owners = np.repeat([person[g] for g in groups], [t.size for t in tops])
    order = np.argsort(np.concatenate(tops), kind="stable")[::-1]
    pool, owners = np.concatenate(tops)[order], owners[order]
    counts = np.bincount(owners, minlength=len(person))
    by_person = np.split(np.argsort(owners, kind="stable"), np.cumsum(counts)[:-1])  # each one's places in the pool
    voxels = dict.fromkeys(person, 0)
    for g, n in zip(groups, sizes):
        voxels[g] += n
    thresholds, shares = [], []
    for i, own in enumerate(scores):
        places = by_person[person[groups[i]]]
        passed = places - np.arange(places.size)  # the others' values above each own value
        n_top = pool.size - places.size

        def value(rank: np.ndarray) -> np.ndarray:
            """The others' values at these ranks (0: their highest)."""
            return pool[rank + np.searchsorted(passed, rank, side="right")].astype(np.float64)

        ranks = (sum(voxels.values()) - voxels[groups[i]] - 1) * rates  # from the others' highest, as np.quantile's
        above = np.floor(ranks).astype(np.int64)  # (between two ranks: linear)
        upper, lower = value(above), value(np.minimum(above + 1, n_top - 1))
        grid = upper + (ranks - above) * (lower - upper)
        threshold = _at_rate(rates, grid, fpr)
        thresholds.append(threshold)
        shares.append(float(np.count_nonzero(own >= threshold) / own.size))
    return {"fpr": float(fpr), "threshold": thresholds, "rate": shares}


def unlike_scans(entry: Mapping[str, Any], names: Sequence[str], advice: str,
                 persons: Sequence[Hashable] = ()) -> List[str]:
    """A warning for each volume (named by ``names``, in the calibration's order; ``persons``: each one's person as
    :func:`leave_one_out` took them) that flags more than :data:`UNLIKE_FACTOR` times the rate at the threshold the
    others give (``entry``'s :func:`leave_one_out`), ending with what to do with it (``advice``). Fewer than
    :data:`MIN_TAIL_VOXELS` of its voxels above that threshold do not make a volume unlike the others: at a rate
    that rests on a few voxels (:func:`thin_tail`), the others' threshold is about their highest score, which one or
    two voxels of any healthy scan pass."""
    loo = entry.get("leave_one_out")
    if not loo:
        return []
    fpr, groups = loo["fpr"], _persons(persons, len(names))
    voxels = entry.get("scan_voxels") or [math.inf] * len(names)  # (not recorded: the rate alone tells)
    pooled = _at_rate(entry["fpr"], entry["threshold"], fpr)
    return [_unlike_scan(name, groups.count(group), len(names) - groups.count(group), without, rate, fpr, pooled,
                         advice)
            for name, group, without, rate, n in zip(names, groups, loo["threshold"], loo["rate"], voxels)
            if rate > UNLIKE_FACTOR * fpr and rate * n >= MIN_TAIL_VOXELS]


def _unlike_scan(name: str, own: int, others: int, without: float, rate: float, fpr: float, pooled: float,
                 advice: str) -> str:
    """The warning of :func:`unlike_scans` for one volume (``own``: its person's scans, itself included; ``others``:
    the scans of the other persons, whose threshold at ``fpr`` is ``without``)."""
    scans = f"{others} healthy scan{'s' if others > 1 else ''}"
    them = "them" if others > 1 else ("it" if own > 1 else "the other")
    return (f"{name}: at the threshold that the {f'{scans} of other persons' if own > 1 else f'other {scans}'} give "
            f"at the default false-positive rate {fpr:g} ({without:.4g}), it flags {rate:.3%} of its brain voxels, "
            f"{rate / fpr:.0f} times that rate: it is unlike {them} (a lesion, an artefact, another acquisition"
            f"{'; with two scans, either may be the odd one' if others == 1 and own == 1 else ''}), and pooled with "
            f"{'them' if others > 1 else 'it'} it sets that threshold to {pooled:.4g}. Check it, and {advice}.")


def acquisition_difference(entry: Mapping[str, Any], spacing: Sequence[float],
                           tail: Optional[float] = None) -> Optional[str]:
    """How a scan of voxel ``spacing`` (mm) and bright tail ``tail`` (None: not measured) differs from the healthy
    volumes ``entry`` was calibrated on, in words, or None: alike, finer (resampled to the model's slices, a 0.5 mm
    scan gives the 1 mm scan's labelmap), less bright, or the calibration does not record them."""
    differences = []
    sides = entry.get("largest_voxel_mm")
    if sides and max(spacing) > sides[1] * ACQUISITION_FACTOR:
        calibrated = f"{sides[0]:g} mm" if sides[0] == sides[1] else f"{sides[0]:g} to {sides[1]:g} mm"
        differences.append(f"its voxels are up to {max(spacing):.3g} mm (slice thickness), those of the healthy "
                           f"scans it was calibrated on {calibrated}")
    tails = entry.get("bright_tail")
    if tails and tail is not None and tail > tails[1] + BRIGHT_TAIL_MARGIN:
        differences.append(f"its brightest brain voxels lie further above its white matter than in the healthy "
                           f"scans it was calibrated on (bright tail {tail:.2f}, theirs up to {tails[1]:.2f}), as "
                           "after a contrast agent (enhancing vessels, dura, choroid plexus)")
    return "; ".join(differences) or None


def threshold_for_fpr(entry: Mapping[str, Any], fpr: float) -> float:
    """Threshold whose healthy false-positive rate is ``fpr`` (log-linear interpolation). A rate whose threshold is
    not above 0 is refused: no score map goes below 0 (normalised maps set half the brain to 0), so such a
    threshold would flag the whole brain, not that share of it."""
    grid = np.asarray(entry["fpr"], float)
    thr = np.asarray(entry["threshold"], float)
    if not grid[0] <= fpr <= grid[-1]:
        raise CeVAEError(
            f"False-positive rate {fpr:g} is outside the calibrated range [{grid[0]:g}, {grid[-1]:g}]."
        )
    threshold = _at_rate(grid, thr, fpr)
    if not threshold > 0:
        raise CeVAEError(_at_the_floor(fpr, grid, thr))
    return threshold


def _at_rate(rates: Sequence[float], thresholds: Sequence[float], fpr: float) -> float:
    """The threshold at ``fpr`` between calibrated ``rates`` and their ``thresholds``: linear in the log of the rate
    (one rate: its threshold)."""
    return float(np.interp(np.log(fpr), np.log(rates), thresholds))


def _at_the_floor(fpr: float, grid: np.ndarray, thr: np.ndarray) -> str:
    """Why the rate ``fpr`` (threshold 0 in the calibration ``grid``, ``thr``) gets no threshold, and which rates do."""
    zero = float(grid[~(thr > 0)][0])  # the lowest calibrated rate at 0: no rate from there on is above it
    above = grid[(thr > 0) & (grid < zero)]
    way_out = (f"Give a rate below {zero:g} (the highest calibrated rate with a threshold above 0 is "
               f"{above[-1]:g})." if above.size else
               "No rate has a threshold above 0 in it: give an absolute threshold (--threshold; threshold= in "
               "Python).")
    return (f"A healthy false-positive rate of {fpr:g} gets a threshold of 0 from the model's calibration for this "
            f"scoring: at least {1 - zero:.0%} of the healthy brain voxels it was measured on score 0, the lowest "
            f"score there is, so the labelmap would flag the whole brain. {way_out}")


def fpr_for_threshold(entry: Mapping[str, Any], threshold: float) -> float:
    """The healthy false-positive rate at ``threshold``: the inverse of :func:`threshold_for_fpr`
    (log-linear interpolation, clamped to the calibrated range)."""
    grid = np.log(np.asarray(entry["fpr"], float))
    thr = np.asarray(entry["threshold"], float)  # decreasing as the rate grows
    return float(np.exp(np.interp(threshold, thr[::-1], grid[::-1])))


def find_calibration(calibration: Mapping[str, Dict[str, Any]], score: ScoreOptions,
                     post: PostprocessOptions) -> Dict[str, Any]:
    """The table of ``calibration`` (a header's section) stored for these options, or an error that names the
    options no calibration has and says how to get a threshold."""
    wanted = (score, _score_map_options(post))
    calibrated = []
    for setting, entry in _stored_settings(calibration):
        if setting == wanted:
            return entry
        calibrated.append(setting)
    differences = [_differing_flags(wanted, setting) for setting in calibrated]  # only for the message
    nearest = f" (these differ from the nearest calibrated setting: {', '.join(min(differences, key=len))})" \
        if differences else ""
    raise CeVAEError(
        f"The model has no calibration for these scoring/post-processing options{nearest}; give an absolute "
        "threshold (--threshold; threshold= in Python), calibrate a copy of the model with the same options on "
        "healthy scans (cevae-anomaly calibrate; in Slicer, Calibrate on healthy scans), or use the options the "
        "model was calibrated with."
    )


def calibrated_settings(calibration: Mapping[str, Dict[str, Any]], score: ScoreOptions,
                        post: PostprocessOptions) -> List[Tuple[List[str], Dict[str, Any]]]:
    """Each table of ``calibration`` (a header's section) with the flags that ask detection for it instead of the
    default ``score`` and ``post`` (e.g. ``["--test-time-steps 100"]``; none for the default's own), fewest flags
    first; tables under keys this version cannot read are left out."""
    default = (score, _score_map_options(post))
    found = [(_asking_flags(default, setting), entry) for setting, entry in _stored_settings(calibration)]
    return sorted(found, key=lambda item: len(item[0]))


def _asking_flags(default: Tuple[ScoreOptions, PostprocessOptions],
                  setting: Tuple[ScoreOptions, PostprocessOptions]) -> List[str]:
    """The flags that ask detection for ``setting`` instead of ``default``; ``--paper`` for the published pixel
    score's options where the setting has them all and the default does not."""
    changed = _changed(default, setting)
    paper = all(getattr(setting[0], k) == v for k, v in PAPER.items()) and any(f.name in PAPER for f, _, _ in changed)
    return ["--paper"] * paper + [_as_flag(f, theirs) for f, _, theirs in changed if not (paper and f.name in PAPER)]


def _stored_settings(calibration: Mapping[str, Dict[str, Any]]
                     ) -> Iterator[Tuple[Tuple[ScoreOptions, PostprocessOptions], Dict[str, Any]]]:
    """Each table of ``calibration`` (a header's section) with the (scoring, score-map post-processing) setting it is
    for; tables under keys this version cannot read are left out."""
    for key, entry in calibration.items():
        stored = _key_options(key)
        if stored is not None:
            yield (stored[0], _score_map_options(stored[1])), entry


def _differing_flags(options: Tuple[ScoreOptions, PostprocessOptions],
                     other: Tuple[ScoreOptions, PostprocessOptions]) -> List[str]:
    """Where two (scoring, score-map post-processing) settings differ: each flag with the value of ``options``
    and, in brackets, the value of ``other`` (the calibrated one)."""
    return [f"{_as_flag(f, mine)} (calibrated: {_as_flag(f, theirs)})" for f, mine, theirs in _changed(options, other)]


def _changed(options: Tuple[ScoreOptions, PostprocessOptions],
             other: Tuple[ScoreOptions, PostprocessOptions]) -> List[Tuple[Field, Any, Any]]:
    """(field, value in ``options``, value in ``other``) of every option the two settings set differently."""
    return [(f, getattr(mine, f.name), getattr(theirs, f.name)) for mine, theirs in zip(options, other)
            for f in fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)]


def _as_flag(f: Field, value: Any) -> str:
    flag = flag_of(f)
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def calibrated_test_time_steps(calibration: Mapping[str, Dict[str, Any]]) -> List[int]:
    """The test-time adaptation step counts (0: the plain mode) that a header's calibrations are for."""
    return sorted({opts[0].test_time_steps for opts in map(_key_options, calibration) if opts is not None})


def lost_thorough_modes(before: Mapping[str, Dict[str, Any]], after: Mapping[str, Dict[str, Any]]) -> List[int]:
    """The thorough modes (test-time step counts over 0) that the calibrations ``before`` are for and ``after`` are
    not (a recalibration that left them out)."""
    now = calibrated_test_time_steps(after)
    return [n for n in calibrated_test_time_steps(before) if n > 0 and n not in now]


def _score_map_options(post: PostprocessOptions) -> PostprocessOptions:
    """``post`` with the :data:`LABELMAP_ONLY` options at their defaults: the options the score map depends on."""
    defaults = PostprocessOptions()
    return post.replace(**{name: getattr(defaults, name) for name in LABELMAP_ONLY})
