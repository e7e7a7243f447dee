"""The pixel metrics of CeVAEAnomalyResearch.evaluate against a second, pair-counting computation, on adversarial
arrays: ties, all-equal scores, one positive, no positive, infinite scores, labels 2 and 255, boolean and float
labels."""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import pytest

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.evaluate import auprc, auroc, best_dice, dice, pooled_metrics, slice_auroc

INF = math.inf


def by_hand(scores: List[float], lesion: List[bool]) -> Tuple[float, float, float, float]:
    """AUROC (every positive-negative pair: 1 if the positive scores higher, 1/2 if tied), average precision (a step
    at each distinct score, high to low: recall gained times precision there) and the best Dice of ``score >= t``
    over every distinct score t with its highest t. NaN where a class is missing."""
    pos = [s for s, y in zip(scores, lesion) if y]
    neg = [s for s, y in zip(scores, lesion) if not y]
    area = (sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
            if pos and neg else math.nan)
    if not pos:
        return area, math.nan, math.nan, math.nan
    precision_sum, recall_before, best, best_t = 0.0, 0.0, -1.0, math.nan
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s in pos if s >= t)
        flagged = sum(1 for s in scores if s >= t)
        precision_sum += (tp / len(pos) - recall_before) * tp / flagged
        recall_before = tp / len(pos)
        if 2 * tp / (flagged + len(pos)) > best:
            best, best_t = 2 * tp / (flagged + len(pos)), t
    return area, precision_sum, best, best_t


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) < 1e-12


def module(scores: np.ndarray, labels: np.ndarray) -> Tuple[float, float, float, float]:
    return (auroc(scores, labels), auprc(scores, labels), *best_dice(scores, labels))


ADVERSARIAL = [
    ([0.3] * 6, [0, 1, 0, 0, 1, 0]),  # all scores equal
    ([1.0, 1.0, 1.0, 0.0, 0.0], [1, 0, 1, 0, 1]),  # ties across classes
    ([0.2, 0.9, 0.9, 0.1], [0, 0, 1, 0]),  # a single positive, tied with a negative
    ([0.5], [1]),  # one voxel
    ([0.1, 0.4, 0.3], [0, 0, 0]),  # no positive
    ([0.1, 0.4, 0.3], [1, 1, 1]),  # no negative
    ([-INF, INF, 0.0, INF, -INF], [1, 1, 0, 0, 0]),  # infinite scores, tied
    ([INF, INF], [1, 0]),
    ([-INF, 0.0, -INF], [1, 0, 0]),
    ([0.0, -0.0, 1e-45, 1.0], [1, 0, 1, 0]),  # signed zeros are one score; the smallest subnormal is not
]


@pytest.mark.parametrize("scores, labels", ADVERSARIAL)
def test_adversarial_arrays_match_the_pair_count(scores: list, labels: list) -> None:
    expected = by_hand(scores, [y != 0 for y in labels])
    got = module(np.array(scores), np.array(labels))
    assert all(same(a, b) for a, b in zip(got, expected)), (got, expected)


def test_random_arrays_with_any_label_value_and_type_match_the_pair_count() -> None:
    """Labels 2 and 255 are lesion as 1 is; as bool, uint8, int64 or float32 they give the same figures."""
    rng = np.random.default_rng(11)
    for trial in range(400):
        n = int(rng.integers(1, 14))
        if trial % 2:
            scores = rng.choice([-INF, INF, -3.0, 0.0, 0.5, 1.0, 1.0, 2.0], n)
        else:
            scores = rng.integers(0, 3, n).astype(np.float32)
        values = rng.choice([0, 0, 1, 2, 255], n)
        expected = by_hand(scores.tolist(), (values != 0).tolist())
        for labels in (values != 0, values.astype(np.uint8), values, values.astype(np.float32)):
            got = module(scores, labels)
            assert all(same(a, b) for a, b in zip(got, expected)), (scores, labels, got, expected)


def test_float32_scores_are_ranked_as_float32() -> None:
    """Two float32 scores one ulp apart are two thresholds, not one."""
    low = np.float32(0.7)
    scores = np.array([low, np.nextafter(low, np.float32(1)), low], np.float32)
    labels = np.array([0, 1, 0])
    assert auroc(scores, labels) == 1.0 and auprc(scores, labels) == 1.0
    assert best_dice(scores, labels) == (1.0, float(scores[1]))


def test_a_nan_score_is_refused_not_ranked() -> None:
    with pytest.raises(CeVAEError, match="NaN"):
        auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 0]))


def test_pooled_metrics_are_those_of_every_voxel_together() -> None:
    """Healthy cases add negatives; a case with no negative adds positives only."""
    rng = np.random.default_rng(5)
    cases = [(rng.integers(0, 4, 9).astype(np.float32), rng.choice([0, 1, 255], 9)) for _ in range(3)]
    cases += [(rng.integers(0, 4, 5).astype(np.float32), np.zeros(5)), (np.full(3, 2.0), np.ones(3, bool))]
    scores = np.concatenate([s for s, _ in cases])
    lesion = np.concatenate([np.asarray(y) != 0 for _, y in cases])
    pooled = pooled_metrics(cases)
    expected = by_hand(scores.tolist(), lesion.tolist())
    got = (pooled["auroc"], pooled["auprc"], pooled["best_dice"], pooled["best_threshold"])
    assert all(same(a, b) for a, b in zip(got, expected)), (got, expected)
    assert (pooled["n_voxels"], pooled["n_positive"], pooled["n_cases"]) == (scores.size, lesion.sum(), 5)


def test_pooled_metrics_of_many_cases_search_each_voxel_once(monkeypatch) -> None:
    """The pooled metrics searched every case's negatives for all the pooled positives: the square of the cases
    (800 small cases: searchsorted 1.6 s of the run, 23 times that of 200 cases). Where the positives outnumber the
    negatives of a search, each negative is placed among them instead; the figures stay those of every voxel
    together."""
    rng = np.random.default_rng(6)
    cases = [(rng.integers(0, 50, 40).astype(np.float32), rng.random(40) < 0.3) for _ in range(60)]
    searched: List[int] = []
    real = np.searchsorted
    monkeypatch.setattr(np, "searchsorted", lambda a, v, *args, **kw: (searched.append(np.size(v)),
                                                                        real(a, v, *args, **kw))[1])
    pooled = pooled_metrics(cases)
    monkeypatch.undo()
    voxels = sum(s.size for s, _ in cases)
    assert sum(searched) <= 8 * voxels  # each voxel a few times, not the positives once per case
    scores = np.concatenate([s for s, _ in cases])
    lesion = np.concatenate([y for _, y in cases])
    expected = (auroc(scores, lesion), auprc(scores, lesion), *best_dice(scores, lesion))
    got = (pooled["auroc"], pooled["auprc"], pooled["best_dice"], pooled["best_threshold"])
    assert all(same(a, b) for a, b in zip(got, expected)), (got, expected)
    small = [(s[:8], y[:8]) for s, y in cases[:20]]  # and those of the pair count
    scores, lesion = np.concatenate([s for s, _ in small]), np.concatenate([y for _, y in small])
    pooled = pooled_metrics(small)
    got = (pooled["auroc"], pooled["auprc"], pooled["best_dice"], pooled["best_threshold"])
    assert all(same(a, b) for a, b in zip(got, by_hand(scores.tolist(), lesion.tolist())))


def test_slice_auroc_is_the_pair_count_over_slices() -> None:
    slice_scores, has_lesion = [0.4, 0.9, 0.4, 0.1, 0.9], [True, False, False, False, True]
    assert slice_auroc(np.array(slice_scores), np.array(has_lesion)) == by_hand(slice_scores, has_lesion)[0]


def test_array_labels_are_read_as_label_files_are() -> None:
    """Labels of -1 and 1 (healthy and lesion) counted every voxel as lesion (any non-zero was): AUPRC 1.0 and AUROC
    n/a where the lesion scores lowest (AP 1/3, AUROC 0); a ground-truth file's -1 is healthy. NaN is healthy too."""
    scores = np.array([0.9, 0.2, 0.5])
    for labels in (np.array([-1, 1, -1]), np.array([np.nan, 1.0, np.nan]), np.array([-1.0, 0.5, 0.0])):
        expected = by_hand(scores.tolist(), [bool(y > 0) for y in labels])
        assert expected[:2] == (0.0, pytest.approx(1 / 3))
        assert all(same(a, b) for a, b in zip(module(scores, labels), expected))
        assert pooled_metrics([(scores, labels)])["auroc"] == 0.0
    assert dice(np.array([1, -1, 0]), np.array([1, 1, np.nan])) == 2 / 3
