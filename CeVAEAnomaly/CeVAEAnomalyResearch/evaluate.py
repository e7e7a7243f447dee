"""Detection metrics for anomaly score maps: pixel AUROC / AUPRC / Dice, slice AUROC, flagged volume and, with a
labelmap, lesion-wise counts (:mod:`CeVAEAnomalyResearch.lesionwise`).

All pixel metrics come from the positive and negative scores sorted separately: AUROC counts,
by binary search, the negatives below each positive; average precision and Dice only change at
thresholds equal to a positive score. So they are exact (equal scores form one threshold) in
O(n log n) time and one copy of the scores in memory. No subsampling is done. Pooled over cases, each case's
negatives stay sorted apart (their counts add up): a case keeps its evaluated scores once, in their type, and no
labels (a float32 map: 4 bytes a voxel, 1.5 million brain voxels of a 1 mm case 6 MB).
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import numbers
import os
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.axes import canonical_axes
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.io.images import (
    MAX_LABELS, grid_difference, looks_like_an_image, read_header, read_image, voxel_volume_ml,
)
from CeVAEAnomalyLib.io.manifest import distinct_names
from CeVAEAnomalyLib.io.naming import UNICODE_TWINS, one_form, table_delimiter
from CeVAEAnomalyLib.io.spreadsheet import written_row
from CeVAEAnomalyLib.result import threshold_text
from CeVAEAnomalyResearch.lesionwise import LesionCounts, lesion_counts, pooled_lesion_figures

log = logging.getLogger(__name__)

GRID_TOLERANCE = 1e-4
GRID_RELATIVE_TOLERANCE = 1e-5  # with GRID_TOLERANCE, detect's (io.images.same_grid): a mask it used as on the scan's
# grid is on its score map's; the closest grids refused differ in the 6 digits the refusal shows
ROLES = {"score": "score map", "gt": "ground truth", "mask": "mask", "labelmap": "label map"}


@dataclass
class CaseMetrics:
    """Metrics of one case. NaN: undefined (e.g. AUROC of a healthy case); None: input not given."""

    name: str
    auroc: float
    auprc: float
    best_dice: float
    best_threshold: float
    dice_at_threshold: Optional[float]  # Dice of the label map vs the ground truth
    slice_auroc: Optional[float]
    flagged_ml: Optional[float]  # label map volume
    n_voxels: int  # evaluated voxels (inside the mask if given)
    n_positive: int  # ground-truth voxels among them
    # lesion-wise, with a label map (CeVAEAnomalyResearch.lesionwise); the pooled row: sums, means and shares
    n_lesions: Optional[int] = None  # ground-truth lesions (26-connected components inside the evaluated voxels)
    lesions_detected: Optional[int] = None  # lesions at least one label-map voxel overlaps
    lesion_sensitivity: Optional[float] = None  # lesions_detected / n_lesions (a lesion case)
    false_components: Optional[float] = None  # label-map components overlapping no lesion (pooled: mean per case)
    healthy_false_components: Optional[float] = None  # a healthy case's components (pooled: mean per healthy case)
    first_is_lesion: Optional[float] = None  # a lesion case: 1 if the lesion table's first component overlaps a
    # lesion, else 0 (no component: 0); pooled: the share of lesion cases


@dataclass(frozen=True)
class _Split:
    """Scores of positive voxels, sorted ascending, and of negative ones in one or more parts (pooled: one a case),
    each sorted ascending."""

    positive: np.ndarray
    negatives: tuple[np.ndarray, ...]

    @property
    def n_negative(self) -> int:
        return sum(part.size for part in self.negatives)

    def negatives_below(self, values: np.ndarray, side: str) -> np.ndarray:
        """How many negative scores are below each of ``values`` (sorted ascending; ``side`` "right": below or
        equal). Where there are more values than negatives in all (the pooled positives, once searched in every
        case's negatives: the square of the cases), each negative is placed among the values instead."""
        if values.size * len(self.negatives) <= self.n_negative:
            counts = np.zeros(np.shape(values), np.int64)
            for part in self.negatives:
                counts += np.searchsorted(part, values, side=side)
            return counts
        starts = np.zeros(values.size + 1, np.int64)  # how many negatives lie below values from each place on
        for part in self.negatives:
            at = np.searchsorted(values, part, side="right" if side == "left" else "left")  # (ascending: part is)
            first = np.flatnonzero(np.diff(at, prepend=-1))  # the first negative at each place
            starts[at[first]] += np.diff(first, append=at.size)
        return np.cumsum(starts)[:-1]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN if only one class. Labels above 0 are lesion
    (NaN and negative ones healthy: -1/1 labels, as a ground-truth file is read); so in every metric here."""
    return _auroc(_split(scores, labels))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision, sum of (R_t - R_t-1) * P_t over thresholds (scikit-learn's definition,
    equal scores form one threshold); NaN without positives."""
    return _auprc(_split(scores, labels))


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best Dice of ``scores >= t`` over all thresholds, and that ``t`` (the highest if tied).

    Exact: lowering the threshold between two positive scores only adds false positives, so
    the best is at a positive score. (NaN, NaN) without positives.
    """
    return _best_dice(_split(scores, labels))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap of two binary arrays (> 0 = foreground); 1.0 if both are empty."""
    pred, gt = _positive(pred), _positive(gt)
    if pred.shape != gt.shape:
        raise CeVAEError(f"Cannot compute Dice: shapes differ, {pred.shape} vs {gt.shape}.")
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def slice_auroc(slice_scores: np.ndarray, slice_has_lesion: np.ndarray) -> float:
    """AUROC of per-slice scores against per-slice lesion presence; NaN if only one class."""
    return auroc(slice_scores, slice_has_lesion)


def pooled_metrics(cases: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Pixel AUROC, AUPRC and best Dice over the voxels of all ``(scores, labels)`` cases together."""
    return _pooled([_split(scores, labels) for scores, labels in cases])


def _pooled(splits: list[_Split]) -> dict:
    """:func:`pooled_metrics` of the cases' splits (their negatives are not copied)."""
    if not splits:
        raise CeVAEError("No cases to pool metrics over.")
    positive = np.concatenate([s.positive for s in splits])
    positive.sort()
    split = _Split(positive, tuple(part for s in splits for part in s.negatives))
    dice_value, threshold = _best_dice(split)
    return {
        "auroc": _auroc(split),
        "auprc": _auprc(split),
        "best_dice": dice_value,
        "best_threshold": threshold,
        "n_voxels": int(positive.size + split.n_negative),
        "n_positive": int(positive.size),
        "n_cases": len(splits),
    }


Grid = Union[sitk.Image, sitk.ImageFileReader]  # an image, or a reader holding a file's header (io.images.read_header)


def check_same_grid(reference: Grid, other: Grid, reference_name: str, other_name: str) -> None:
    """Raise CeVAEError naming the first difference unless both images (or headers) share one voxel grid
    (same size; spacing, origin and direction within ``GRID_TOLERANCE`` plus ``GRID_RELATIVE_TOLERANCE`` of each
    value, as ``detect`` compares a brain mask with the scan)."""
    what = grid_difference(reference, other, atol=GRID_TOLERANCE, rtol=GRID_RELATIVE_TOLERANCE)
    if what is not None:
        a, b = getattr(reference, f"Get{what}")(), getattr(other, f"Get{what}")()
        raise CeVAEError(
            f"The {other_name} is not on the {reference_name}'s voxel grid: {what.lower()} "
            f"{_fmt(a)} vs {_fmt(b)}. Resample the {other_name} onto the {reference_name} first."
        )


def evaluate_case(
    score: sitk.Image,
    gt: Optional[sitk.Image] = None,
    mask: Optional[sitk.Image] = None,
    labelmap: Optional[sitk.Image] = None,
    slice_axis: Union[int, str, None] = "axial",
    name: str = "",
) -> CaseMetrics:
    """Metrics of one score map over the voxels inside ``mask`` (all voxels if None).

    ``mask``, ``gt`` and ``labelmap`` count their voxels above 0 (NaN and negative values are background).
    ``gt`` None (or one without lesion voxels inside the mask) means a healthy case: ranking metrics are NaN. NaN or
    infinite scores inside the mask are refused.
    ``labelmap`` (the thresholded detection) gives ``flagged_ml`` (all its voxels above 0), for a lesion case
    ``dice_at_threshold`` (inside the mask), and the lesion-wise counts (:mod:`CeVAEAnomalyResearch.lesionwise`: a
    lesion is detected where at least one labelmap voxel overlaps it); the score map must then be finite at every
    labelmap voxel (it ranks the labelmap's components as detect's lesion table). Slice AUROC uses slices along numpy
    axis ``slice_axis`` ("axial": the axis of the axial slices, :func:`axial_axis`, in any voxel order; None skips
    it), slice score = max score in the slice's mask voxels.
    """
    if slice_axis == "axial":
        axis: Optional[int] = axial_axis(score)
    elif slice_axis is None:
        axis = None
    elif isinstance(slice_axis, numbers.Integral) and not isinstance(slice_axis, bool) and (
            -score.GetDimension() <= slice_axis < score.GetDimension()):  # (NumPy's integers too)
        axis = int(slice_axis)
    else:
        raise CeVAEError(f"slice_axis {slice_axis!r} names no axis of the {score.GetDimension()}D score map: give "
                         "'axial', a numpy axis (0 to 2, or -3 to -1, for a volume) or None.")
    return _evaluate(score, gt, mask, labelmap, axis, name)[0]


def axial_axis(image: sitk.Image) -> int:
    """The numpy axis of ``image``'s axial slices (the image axis closest to superior-inferior), as ``detect``'s
    slice table counts them, whatever the voxel order."""
    return canonical_axes(np.array(image.GetDirection()))[0][0]


def evaluate_files(rows: list[dict]) -> tuple[list[CaseMetrics], dict]:
    """Evaluate each row's files and pool all voxels; return (per-case metrics, pooled metrics). Slice AUROC
    is over axial slices (:func:`axial_axis`).

    Row keys: ``score`` (required), ``gt`` (missing or empty: healthy case), ``mask``,
    ``labelmap``, ``name`` (default: the score file name, led by its folders where names repeat; two cases of one
    name are refused), ``where`` (where the row was read, e.g. ``cases.csv, line 3``: named in its errors). Every
    file's header, and its grid against the score map's, is checked before the first case is scored, so that an
    unreadable file, a .nii.gz cut short or another grid costs no scoring. A case listed again (the same score map,
    mask and labelmap, and a ground truth of the same lesion voxels: an all-zero one is none) is evaluated once, with
    a warning, so that it does not weigh twice in the pooled metrics. A healthy case's voxels count as healthy ones in
    the pooled metrics (its false alarms lower the pooled AUPRC); one without a mask is warned about where its zero
    background lifts the pooled AUROC. Cases without a lesion voxel alone are warned of: every figure is undefined.
    The pooled lesion-wise figures (:func:`~CeVAEAnomalyResearch.lesionwise.pooled_lesion_figures`) are over the
    cases with a labelmap (the cases without one are warned of where others have one).
    """
    cases, splits, unmasked_healthy, counts = [], [], [], []
    unique = _unique_cases(rows)
    evaluated: dict[tuple, str] = {}  # (score, mask, labelmap content, lesion voxels) -> the case's name
    named = list(zip(unique, _case_names([row for row, _ in unique])))
    for (row, _), name in named:
        _check_headers(row, name)
    for (row, files), name in named:
        try:
            images = {key: read_image(row[key], role) if row.get(key) else None for key, role in ROLES.items()}
            _warn_of_a_scan(images["score"], row["score"])
            metrics, split, labels, lesionwise = _evaluate(
                images["score"], images["gt"], images["mask"], images["labelmap"], axial_axis(images["score"]), name,
                row.get("gt") or ""
            )
        except CeVAEError as exc:
            raise _case_error(row, name, exc) from None
        lesions = hashlib.sha256(np.packbits(labels)).hexdigest()
        first = evaluated.setdefault((files["score"], files["mask"], files["labelmap"], lesions), name)
        if first != name:  # another ground truth file of the same lesion voxels (or none, as an all-zero one)
            log.warning("%s repeats the case of %s: the same score map, mask and labelmap, and %s; it is evaluated "
                        "once.", name, first, "the same lesion voxels" if metrics.n_positive else
                        "no lesion voxel (an all-zero ground truth is none)")
            continue
        cases.append(metrics)
        splits.append(split)
        counts.append(lesionwise)
        if metrics.n_positive == 0 and images["mask"] is None:  # no truth, or one without lesion voxels
            unmasked_healthy.append((split.negatives[0], name))  # (all its scores)
        log.info("Evaluated %s: AUROC %s, AUPRC %s", name, *(figure(v) for v in (metrics.auroc, metrics.auprc)))
    pooled = dict(_pooled(splits), **pooled_lesion_figures(counts))
    if pooled["n_positive"] == 0:
        log.warning("None of the %d case%s has a lesion voxel (a ground truth marking one inside the mask): every case "
                    "counts as healthy, so AUROC, AUPRC and best Dice are undefined (n/a, nan in the table).",
                    len(cases), "" if len(cases) == 1 else "s")
    without = [case.name for case, lesionwise in zip(cases, counts) if lesionwise is None]
    if 0 < len(without) < len(cases):  # (the pooled row's other figures are of every case)
        log.warning("The pooled lesion-wise figures (n_lesions to first_is_lesion) are of the %d of %d cases with a "
                    "labelmap; %s, without one, %s not counted in them.", len(cases) - len(without), len(cases),
                    ", ".join(f"'{name}'" for name in without), "is" if len(without) == 1 else "are")
    if not math.isnan(pooled["auroc"]):  # a healthy case's voxels count in the pooled figures only
        for scores, name in unmasked_healthy:
            _warn_of_easy_negatives(scores, name, "the pooled AUROC comes out")
    return cases, pooled


def _check_headers(row: dict, name: str) -> None:
    """Refuse a case (naming it) whose file's header cannot be read, or whose ground truth, mask or labelmap is on
    another grid than its score map by their headers (3D ones; a DICOM series or another dimension is checked when
    the case is read)."""
    try:
        headers = {key: read_header(row[key], role) if row.get(key) else None for key, role in ROLES.items()}
        score = headers["score"]
        for key, header in headers.items():
            if key != "score" and header is not None and score is not None \
                    and header.GetDimension() == score.GetDimension() == 3:
                check_same_grid(score, header, ROLES["score"], ROLES[key])
    except CeVAEError as exc:
        raise _case_error(row, name, exc) from None


def _case_error(row: dict, name: str, exc: CeVAEError) -> CeVAEError:
    """``exc`` led by where its case was read (the row's ``where``), its name and its files (a message names roles,
    not paths)."""
    files = ", ".join(f"{ROLES[key]} {row[key]}" for key in ROLES if row.get(key))
    return CeVAEError(f"{row['where'] + ': case' if row.get('where') else 'Case'} {name} ({files}): {exc}")


def _unique_cases(rows: list[dict]) -> list[tuple[dict, dict]]:
    """The rows without repeats of a case already listed (same content in every role), in their order, each with
    what identifies its file of each role (:func:`_content`), each file hashed once (a mask shared by many cases)."""
    seen: dict[tuple, tuple[dict, dict]] = {}
    hashed: dict[str, str] = {}
    for row in rows:
        if not row.get("score"):
            raise CeVAEError(f"A row of the evaluation list has no score file: {row}.")
        for role in ROLES:
            if row.get(role) and os.fspath(row[role]) not in hashed:
                hashed[os.fspath(row[role])] = _content(row[role])
        files = {role: hashed[os.fspath(row[role])] if row.get(role) else "" for role in ROLES}
        first = seen.setdefault(tuple(files.values()), (row, files))[0]
        if first is not row:
            log.warning("%s repeats the case of %s (the same files); it is evaluated once.",
                        row.get("name") or row["score"], first.get("name") or first["score"])
    return list(seen.values())


def _case_names(rows: list[dict]) -> list[str]:
    """Each case's name: its ``name``, else its score file's name led by as many of its folders as tell it from the
    other score files (``sub-01/score.nii.gz``). A name given to two cases (in any Unicode form: 'café' with its
    accent as one character or as a combining mark reads the same), or ``pooled`` (the metrics table's last row), is
    refused: the table's rows could not be told apart."""
    defaults = distinct_names([Path(row["score"]) for row in rows], name_of=lambda path: path.name)
    names = [row.get("name") or defaults[Path(row["score"])] for row in rows]
    first: dict[str, tuple[dict, str]] = {}
    for row, name in zip(rows, names):
        if name == "pooled":
            raise CeVAEError(f"The case of score map {row['score']} is named 'pooled', the name of the metrics "
                             "table's last row (all cases together); give it another name in a 'name' column.")
        twin, twin_name = first.setdefault(one_form(name), (row, name))
        if twin is not row:
            other = " and ".join(ROLES[key] for key in ROLES if (twin.get(key) or "") != (row.get(key) or ""))
            cases = (f"score maps {twin['score']} and {row['score']}" if twin["score"] != row["score"] else
                     f"both of the score map {row['score']}, with another {other}")
            forms = f", {UNICODE_TWINS}" if twin_name != name else ""
            raise CeVAEError(f"Two cases are named {name!r} ({cases}{forms}): their rows of the metrics table could "
                             "not be told apart; give each its own 'name'.")
    return names


def _content(path: Union[str, os.PathLike, None]) -> str:
    """What identifies a case's file: its sha256, or its name where it is not a plain file or folder (missing,
    a FIFO: never opened here; reading it says what is wrong)."""
    try:
        return sha256_of(Path(path)) if path else ""
    except OSError:
        return str(path)


def write_metrics_csv(path: Union[str, os.PathLike], cases: list[CaseMetrics], pooled: dict,
                      overwrite: bool = False) -> None:
    """Write one row per case plus a final ``pooled`` row, tab-separated under a ``.tsv`` name as ``detect``'s tables,
    else comma-separated; atomic (temporary file + rename); an existing file is refused unless ``overwrite``.
    ``best_threshold`` is written exactly (:func:`threshold_text`), the other figures to 7 significant digits; a name
    a spreadsheet would take for a formula is quoted (:mod:`CeVAEAnomalyLib.io.spreadsheet`)."""
    columns = [f.name for f in fields(CaseMetrics)]
    pooled_row = [pooled.get(column) for column in columns]
    pooled_row[0] = "pooled"
    text = io.StringIO()
    writer = csv.writer(text, delimiter=table_delimiter(Path(path)), lineterminator="\n")
    writer.writerow(columns)
    for row in [astuple(case) for case in cases] + [pooled_row]:
        writer.writerow(written_row(threshold_text(value) if column == "best_threshold" else _cell(value)
                                    for column, value in zip(columns, row)))
    atomic_write_text(path, text.getvalue(), overwrite)


def _labelled(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores and boolean labels, checked."""
    scores, labels = np.asarray(scores).ravel(), _positive(labels).ravel()
    if scores.size != labels.size:
        raise CeVAEError(f"Scores and labels differ in size: {scores.size} vs {labels.size}.")
    if np.isnan(scores).any():
        raise CeVAEError("The anomaly scores contain NaN values.")
    return scores, labels


def _split(scores: np.ndarray, labels: np.ndarray) -> _Split:
    scores, labels = _labelled(scores, labels)
    positive, negative = scores[labels], scores[~labels]  # (copies, sorted in place)
    positive.sort()
    negative.sort()
    return _Split(positive, (negative,))


def _auroc(split: _Split) -> float:
    positive, n_negative = split.positive, split.n_negative
    if positive.size == 0 or n_negative == 0:
        return math.nan
    below = split.negatives_below(positive, "left").sum(dtype=np.float64)
    below_or_tied = split.negatives_below(positive, "right").sum(dtype=np.float64)
    return float((below + below_or_tied) / 2 / positive.size / n_negative)


def _thresholds(split: _Split) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct positive scores t (ascending), #positives equal to t, TP(>= t), FP(>= t)."""
    values, counts = np.unique(split.positive, return_counts=True)
    true_positive = split.positive.size - (np.cumsum(counts) - counts)
    false_positive = split.n_negative - split.negatives_below(values, "left")
    return values, counts, true_positive, false_positive


def _auprc(split: _Split) -> float:
    if split.positive.size == 0:
        return math.nan
    _, counts, tp, fp = _thresholds(split)
    return float(np.sum(counts / split.positive.size * tp / (tp + fp)))


def _best_dice(split: _Split) -> tuple[float, float]:
    if split.positive.size == 0:
        return math.nan, math.nan
    values, _, tp, fp = _thresholds(split)
    dices = 2.0 * tp / (tp + fp + split.positive.size)
    best = dices.size - 1 - int(np.argmax(dices[::-1]))
    return float(dices[best]), float(values[best])


def _truth(gt: sitk.Image, inside: np.ndarray, name: str, gt_file: str = "") -> np.ndarray:
    """The lesion voxels of a ground truth (> 0). A score map or an image given as the truth (swapped arguments)
    is refused, for every voxel above 0 would count as lesion: non-zero in over a tenth of the evaluated voxels
    (``inside``; a detection map is above 0 in half the brain), and like an image there (io.images.
    looks_like_an_image: many values, no plateau). Lesion masks resampled linearly have many values at their edges
    but cover a few per cent of the brain. ``gt_file``: its file, named where its values are said."""
    values = sitk.GetArrayViewFromImage(gt)
    truth = _above_zero(gt)  # a background of -1 or NaN is no lesion
    if np.count_nonzero(truth & inside) > _MAX_TRUTH_SHARE * np.count_nonzero(inside) and looks_like_an_image(values):
        raise CeVAEError(f"The ground truth of {name or 'the case'} holds more than {MAX_LABELS} different "
                         "values over much of the evaluated voxels: it looks like a score map or an image, not a mask "
                         "of the lesions (> 0 is lesion). Check the order of --score and --gt.")
    lesion_values = values[truth]
    if _fractional(lesion_values):
        _warn_of_fractions(values, truth & inside, name, gt_file)
    else:
        _say_labels(lesion_values, name)
    return truth


def _fractional(lesion_values: np.ndarray) -> bool:
    """Whether a ground truth's values above 0 include fractions (a probability map, a mask resampled linearly)."""
    return lesion_values.dtype.kind == "f" and bool(np.any(lesion_values != np.floor(lesion_values)))


def _warn_of_fractions(values: np.ndarray, lesion: np.ndarray, name: str, gt_file: str) -> None:
    """Warn that a ground truth of fractional values counts every evaluated voxel above 0 (``lesion``) as lesion,
    saying how many are at 0.5 or more and how to count only those: a probability map's or a linearly resampled
    mask's halo of small values made 2,337 lesion voxels of 402, and the AUROC 0.717 of 0.998."""
    half = int(np.count_nonzero(lesion & (values >= _HALF)))
    log.warning("%s: the ground truth %sholds fractional values (a probability map, or a lesion mask resampled "
                "linearly): all %d evaluated voxels above 0 count as lesion, %d of them at %g or more. To count only "
                "those, threshold it first (in SimpleITK: truth >= %g), or resample a lesion mask with "
                "nearest-neighbour interpolation.", name or "case", f"{gt_file} " if gt_file else "",
                int(np.count_nonzero(lesion)), half, _HALF, _HALF)


def _say_labels(lesion_values: np.ndarray, name: str) -> None:
    """Say that a ground truth of several values above 0 (labels 1, 2, 4 of lesion parts) counts every voxel above 0
    as lesion, whatever its value."""
    labels = np.unique(lesion_values)
    if labels.size > 1:
        held = (f"the label values {', '.join(f'{v:g}' for v in labels)}" if labels.size <= 8 else
                f"{labels.size} different values above 0 ({labels[0]:g} to {labels[-1]:g})")
        log.info("%s: the ground truth holds %s; every voxel above 0 counts as lesion. To evaluate one label alone, "
                 "give a ground truth of that label only.", name or "case", held)


_MAX_TRUTH_SHARE = 0.1  # of the evaluated voxels
_HALF = 0.5  # where a fractional ground truth (a probability) is said to be lesion
_MAX_ZERO_SHARE = 0.2  # of a map evaluated without a mask: more at exactly 0 is the background of a detect map


def _warn_of_easy_negatives(score: np.ndarray, name: str, lifted: str = "the pixel and slice AUROC come out") -> None:
    """Warn where a map evaluated without a mask is 0 over much of the volume (detect's map outside the brain): those
    voxels, and the slices without brain, rank below every scored one, so the AUROCs (``lifted``: which ones) come
    out higher than over the brain (0.67 over the brain read 0.92 over the volume; a healthy case pooled so lifted
    0.76 to 0.89)."""
    zero = float(np.mean(score == 0))
    if zero > _MAX_ZERO_SHARE:
        log.warning("%s: evaluated without a mask, so the %.0f %% of the voxels where the score map is 0 (outside the "
                    "brain in a map of detect) count as healthy voxels ranked below every scored one: %s higher "
                    "than over the brain. Give the brain mask with --mask (a mask column in --cases).",
                    name or "case", 100 * zero, lifted)


_FEWEST_SCAN_VALUES = 32  # different whole values of a scan (an 8-bit one at 2 mm holds some 60): fewer may be labels
_SAMPLED_VALUES = 2_000_000  # values sampled (strided) to tell a scan from a score map


def _warn_of_a_scan(score: sitk.Image, file: str) -> None:
    """Warn where the score map ``file`` looks like a scan (the scan given for its score map): its values are whole
    numbers, of an integer type or a float file, many different ones, as an MRI's are; a score map's (detect's float32
    map, another method's) are fractional. A warning, not a refusal: a method may write whole-number scores."""
    values = sitk.GetArrayViewFromImage(score).ravel()
    values = values[:: max(1, values.size // _SAMPLED_VALUES)]
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
        if np.any(values != np.round(values)):
            return
    elif values.dtype.kind not in "iu":
        return
    distinct = len(np.unique(values))
    if distinct > _FEWEST_SCAN_VALUES:
        log.warning("The score map %s looks like a scan, not a score map: its values are whole numbers (%g to %g, %d "
                    "different ones sampled), as an MRI's are, where a score map (detect's, or another method's) holds "
                    "fractional scores. Check that it is the score map and not the scan it was made from: its "
                    "figures rank the voxels by intensity.", file, values.min(), values.max(), distinct)


def _above_zero(image: sitk.Image) -> np.ndarray:
    """The voxels of a mask, ground truth or label map above 0, as ``detect`` reads a brain mask (NaN and negative
    values are background: a mask with NaN or -1 outside is not all foreground)."""
    return _positive(sitk.GetArrayViewFromImage(image))


def _positive(values: np.ndarray) -> np.ndarray:
    """Where ``values`` are above 0 (NaN is not; a complex value by its real part)."""
    values = np.asarray(values)
    return values > 0 if values.dtype.kind != "c" else values.real > 0


def _evaluate(
    score: sitk.Image,
    gt: Optional[sitk.Image],
    mask: Optional[sitk.Image],
    labelmap: Optional[sitk.Image],
    slice_axis: Optional[int],
    name: str,
    gt_file: str = "",
) -> tuple[CaseMetrics, _Split, np.ndarray, Optional[LesionCounts]]:
    """The case's metrics, its evaluated scores split by the labels (for pooling), the boolean labels and its
    lesion-wise counts (None without a labelmap); ``gt_file``: the ground truth's file, named where its values are
    warned of."""
    if score.GetNumberOfComponentsPerPixel() != 1:
        raise CeVAEError(f"The score map of {name or 'the case'} must have one value per voxel.")
    for image, key in ((gt, "gt"), (mask, "mask"), (labelmap, "labelmap")):
        if image is not None:
            check_same_grid(score, image, ROLES["score"], ROLES[key])
    for image, key, instead in ((mask, "mask", "a mask of the brain (> 0 is brain)"),
                                (labelmap, "labelmap", "detect's labelmap (> 0 is flagged)")):
        if image is not None and looks_like_an_image(sitk.GetArrayViewFromImage(image)):  # as detect's brain mask
            raise CeVAEError(f"The {ROLES[key]} of {name or 'the case'} holds more than {MAX_LABELS} different values "
                             f"and no plateau: it looks like an image or a score map, not a {ROLES[key]}; give "
                             f"{instead}.")
    score_array = sitk.GetArrayViewFromImage(score)
    inside = np.ones(score_array.shape, bool) if mask is None else _above_zero(mask)  # as detect: > 0 is brain
    if not inside.any():
        raise CeVAEError(f"The mask of {name or 'the case'} is empty: nothing to evaluate.")
    truth = np.zeros(score_array.shape, bool) if gt is None else _truth(gt, inside, name, gt_file)
    if gt is not None and mask is None and looks_like_an_image(sitk.GetArrayViewFromImage(gt)):
        # without a mask the evaluated voxels are the whole volume, of which a score map covers only a few per cent:
        # too little to refuse it as the truth (many small lesions resampled linearly can look alike), so say it
        log.warning("%s: the ground truth holds more than %d different values and no plateau, like a score map or "
                    "an image; check the order of --score and --gt (with --mask such a truth is refused).",
                    name or "case", MAX_LABELS)
    if (truth & ~inside).any():
        log.warning("%s: ground-truth voxels outside the mask are not evaluated.", name or "case")
    scores, labels = score_array[inside], truth[inside]
    if np.isnan(scores).any():
        raise CeVAEError(f"The score map of {name or 'the case'} contains NaN values inside the evaluated "
                         "voxels; it is not a map written by detect.")
    if np.isinf(scores).any():  # the best threshold could be inf, which --threshold takes for "label nothing"
        raise CeVAEError(f"The score map of {name or 'the case'} contains infinite values inside the evaluated voxels "
                         "(detect never writes them): its best threshold could be infinite, which detect --threshold "
                         "takes for an empty labelmap; replace them with finite values first.")
    if labels.all():
        log.warning("%s: the ground truth covers every evaluated voxel, so there are no healthy voxels to rank "
                    "against: AUROC is undefined (n/a); %s", name or "case",
                    "give the brain mask so the healthy brain counts." if mask is None
                    else "the mask lies inside the lesion; give the brain mask.")
    lesion_case = gt is not None and bool(labels.any())
    if lesion_case and mask is None:  # (a healthy case's figures are lifted only where pooled: evaluate_files)
        _warn_of_easy_negatives(score_array, name)
    if gt is not None and not lesion_case:
        log.info("%s: the ground truth marks no lesion voxel among the evaluated ones: a healthy case, as one without "
                 "a ground truth (no Dice at the labelmap, no slice AUROC).", name or "case")
    split = _split(scores, labels)
    dice_value, threshold = _best_dice(split)

    flagged_ml = dice_at_threshold = counts = None
    if labelmap is not None:
        flagged = _above_zero(labelmap)
        flagged_ml = int(flagged.sum()) * voxel_volume_ml(score)
        if lesion_case:
            dice_at_threshold = dice(flagged[inside], labels)
        if not np.isfinite(score_array[flagged]).all():  # (the ITK statistics that rank components hang on NaN)
            raise CeVAEError(f"The score map of {name or 'the case'} is NaN or infinite at voxels of the labelmap "
                             "(outside the evaluated voxels): it cannot rank the labelmap's components as detect's "
                             "lesion table does; a labelmap thresholded from the map holds no such voxel.")
        counts = lesion_counts(truth & inside, flagged, score)
    case_slice_auroc = None
    if slice_axis is not None and lesion_case:
        case_slice_auroc = slice_auroc(*_slice_arrays(score_array, truth, inside, slice_axis))

    metrics = CaseMetrics(
        name=name,
        auroc=_auroc(split),
        auprc=_auprc(split),
        best_dice=dice_value,
        best_threshold=threshold,
        dice_at_threshold=dice_at_threshold,
        slice_auroc=case_slice_auroc,
        flagged_ml=flagged_ml,
        n_voxels=int(scores.size),
        n_positive=int(labels.sum()),
        **_lesion_columns(counts),
    )
    return metrics, split, labels, counts


def _lesion_columns(counts: Optional[LesionCounts]) -> dict:
    """A case's lesion-wise columns of :class:`CaseMetrics` (none without a labelmap)."""
    if counts is None:
        return {}
    healthy = counts.n_lesions == 0
    return {
        "n_lesions": counts.n_lesions,
        "lesions_detected": counts.lesions_detected,
        "lesion_sensitivity": None if healthy else counts.lesions_detected / counts.n_lesions,
        "false_components": counts.false_components,
        "healthy_false_components": counts.false_components if healthy else None,
        "first_is_lesion": None if healthy else int(bool(counts.first_is_lesion)),
    }


def _slice_arrays(
    scores: np.ndarray, truth: np.ndarray, inside: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice max score and lesion presence, over slices that contain mask voxels (taken in place: no copy of
    the volume)."""
    others = tuple(a for a in range(scores.ndim) if a != axis % scores.ndim)
    low = -np.inf if np.issubdtype(scores.dtype, np.floating) else np.iinfo(scores.dtype).min  # (no kept slice's)
    slice_max = np.max(scores, axis=others, where=inside, initial=low)
    has_lesion = np.any(truth, axis=others, where=inside)
    keep = inside.any(axis=others)
    return slice_max[keep], has_lesion[keep]


def figure(value: float) -> str:
    """A metric as the console and the log show it: 4 decimals, or n/a where it is undefined (no lesion, or no
    healthy voxel)."""
    return "n/a" if math.isnan(value) else f"{value:.4f}"


LESION_COLUMNS = ("n_lesions", "lesions_detected", "lesion_sensitivity", "false_components",
                  "healthy_false_components", "first_is_lesion")


def lesion_text(figures: Mapping[str, object]) -> str:
    """The lesion-wise figures of a case (its :class:`CaseMetrics` fields) or of the pooled metrics, as the console
    says them after the others: each given one (not None) under its column's name, a count whole, a figure as
    :func:`figure` shows it."""
    given = [(column, figures.get(column)) for column in LESION_COLUMNS if figures.get(column) is not None]
    return "".join(f"  {column} {value if isinstance(value, int) else figure(value)}" for column, value in given)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.7g}"
    return str(value)


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
