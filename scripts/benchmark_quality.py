"""Subject-held-out quality benchmark: score maps, operating points and slice scores a user lives with.

Needs ``scripts/benchmark_train.py --variants cevae`` (one model per held-out subject) and
``scripts/benchmark_quality_maps.py`` (cached raw maps). Every figure for subject S comes from the
model that never saw S, and every threshold used on S is chosen without S: either from the model's
own training subjects (what a bundle calibrated in-sample stores), from the other subjects'
held-out healthy scores at a false-positive rate, or tuned for Dice on the other subjects' lesion
cases under a flagged-volume limit on their healthy scans. Normalised variants are in units of each
brain's spread, measured as the library does (``spread``: ``mad`` or ``tail``); the shipped chain is
evaluated with both. For each normalised variant it also reports the operating threshold tuned over
all three subjects (not held out: what ``scripts/train_default_model.py`` ships as OPERATING_THRESHOLD).

    python scripts/benchmark_quality.py [--maps runs/quality] [--out docs]

Writes docs/benchmark_quality.json (raw figures) and docs/benchmark_quality_tables.md (all tables;
docs/benchmark.md summarises them).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from scipy import ndimage
from CeVAEAnomalyResearch.evaluate import auroc, dice, pooled_metrics
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.engine.postprocess import hysteresis, normalised, refine_scores
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank, slice_excess, slice_flags, slice_quantile
from CeVAEAnomalyLib.engine.symmetry import asymmetry, fuse, side_weight
from CeVAEAnomalyLib.options import PostprocessOptions

SUBJECTS = ("colin27", "mni152", "robex")
RIM = PostprocessOptions(rim_mm=3.0)  # the shipped rim (only this step of the options is used here)
MIN_VOLUME_MM3 = 50.0
MIN_PEAK = 0.0  # `--min-peak`: keep only components whose highest score exceeds this × t (0: all)
SLICE_FUSION_WEIGHTS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8)  # rank-fusion weights of the map score tried
SHIPPED_FPR = 0.0002  # the default operating point of the bundle before this benchmark
HEALTHY_ML_LIMIT = 1.0  # the tuned operating point keeps the other subjects' healthy scans below this
GRID = np.geomspace(1.0, 300.0, 40)  # normalised thresholds searched
CONN = np.ones((3, 3, 3), bool)
# threshold rules (nothing but SHIP is chosen with the subject it is used on)
TUNED = "tuned on the other subjects"
HELD_OUT_FPR = f"held-out FPR {SHIPPED_FPR:g}"
IN_SAMPLE_FPR = f"in-sample FPR {SHIPPED_FPR:g}"
SHIP = "tuned on all three (not held out)"

Case = Dict[str, np.ndarray]


def load(maps: Path) -> Dict[str, Case]:
    cases = {}
    for p in sorted(maps.glob("*.npz")):
        with np.load(p) as z:
            c = {k: z[k] for k in z.files}
        c["subject"] = p.stem.split("-")[0]
        c["kind"] = "train" if "-train-" in p.stem else ("healthy" if p.stem.endswith("healthy") else "lesion")
        # the brain without its outer rim, as the detector masks it
        c["keep"] = refine_scores(c["brain"].astype(np.float32), c["brain"], tuple(c["spacing"]), RIM) > 0
        c["both"] = c["brain"] & c["brain_m"]
        del c["brain_m"]
        c["voxel_ml"] = float(np.prod(c["spacing"])) / 1000.0
        cases[p.stem] = c
    return cases


def asym(c: Case, sigma: float = 2.0) -> np.ndarray:
    key = f"asym{sigma}"
    if key not in c:
        c[key] = asymmetry(c["image"], c["image_m"], c["both"], tuple(c["spacing"]), sigma)
    return c[key]


def ranks(a: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 1] of each brain voxel's value among the brain's values."""
    out = np.zeros(a.shape, np.float32)
    v = a[brain]
    out[brain] = np.argsort(np.argsort(v, kind="stable"), kind="stable") / max(v.size - 1, 1)
    return out


# name -> (map function, spread of the per-brain normalisation: "mad", "tail", or None for raw scores)
VARIANTS: Dict[str, Tuple[Callable[[Case], np.ndarray], Optional[str]]] = {
    "combi (raw)": (lambda c: c["combi"], None),
    "combi, normalised": (lambda c: c["combi"], "mad"),
    "rec, normalised": (lambda c: c["rec"], "mad"),
    "intensity asymmetry A (σ 3 mm) alone": (lambda c: asym(c, 3.0), "mad"),
    "combi × A (σ 2 mm)": (lambda c: fuse(c["combi"], asym(c, 2.0)), "mad"),
    "combi × A (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0)), "mad"),
    "combi × (0.05 + A) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0), 0.05), "mad"),
    "rec × A (σ 3 mm)": (lambda c: fuse(c["rec"], asym(c, 3.0)), "mad"),
    "√combi × A (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0), 0.0, 0.5), "mad"),
    "√combi × (0.02 + A) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0), 0.02, 0.5), "mad"),
    "√combi × (0.05 + A) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0), 0.05, 0.5), "mad"),
    "√combi × (0.1 + A) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0), 0.1, 0.5), "mad"),
    "√combi × (0.05 + A) (σ 4 mm)": (lambda c: fuse(c["combi"], asym(c, 4.0), 0.05, 0.5), "mad"),
    "√rec × (0.05 + A) (σ 3 mm)": (lambda c: fuse(c["rec"], asym(c, 3.0), 0.05, 0.5), "mad"),
    "rank fusion (combi, A σ 3 mm)": (lambda c: (ranks(c["combi"], c["brain"]) + ranks(asym(c, 3.0), c["brain"])) / 2, "mad"),
    "combi − mirrored combi (positive part)": (lambda c: np.maximum(c["combi"] - c["combi_m"], 0) * c["both"], "mad"),
    # the asymmetry attributed to the side the ceVAE finds abnormal (no ghost at the lesion's mirror position)
    "√combi × (0.1 + A·soft side) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0) * side(c, "combi", "soft"), 0.1, 0.5), "mad"),
    "√combi × (0.1 + A·hard side) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0) * side(c, "combi", "hard"), 0.1, 0.5), "mad"),
    "√combi × (0.1 + A·clipped side) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0) * side(c, "combi", "clip"), 0.1, 0.5), "mad"),
    "√combi × (0.1 + A·soft side of rec) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0) * side(c, "rec", "soft"), 0.1, 0.5), "mad"),
    "√combi × (0.1 + A·lower side damped) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0) * side(c, "combi", "damp"), 0.1, 0.5), "mad"),
    "√combi × (0.1 + A·lower side damped by rec) (σ 3 mm)": (lambda c: fuse(c["combi"], asym(c, 3.0) * side(c, "rec", "damp"), 0.1, 0.5), "mad"),
}


def side(c: Case, key: str, kind: str) -> np.ndarray:
    """How much of a voxel's asymmetry belongs to its side: from the map ``key`` here (s) and at the mirror (m):
    soft s / (s + m), hard 1[s > m], clipped max(0, (s − m) / (s + m)), damped min(1, 2 s / (s + m)) (only the lower side
    loses weight)."""
    s, m = np.maximum(c[key], 0), np.maximum(c[key + "_m"], 0)
    if kind == "hard":
        return (s > m).astype(np.float32)
    total = np.maximum(s + m, 1e-12)
    if kind == "damp":  # what the detector ships
        return side_weight(c[key], c[key + "_m"])
    return (s / total if kind == "soft" else np.clip((s - m) / total, 0, 1)).astype(np.float32)


DEFAULT = "√combi × (0.1 + A·lower side damped) (σ 3 mm)"  # the shipped default chain, MAD spread
DEFAULT_TAIL = DEFAULT + ", tail spread"  # the same chain normalised by the upper tail (RECOMMENDED_POSTPROCESS)
VARIANTS[DEFAULT_TAIL] = (VARIANTS[DEFAULT][0], "tail")


def score_map(c: Case, name: str) -> np.ndarray:
    fn, spread = VARIANTS[name]
    m = np.where(c["keep"], fn(c), 0).astype(np.float32)
    return normalised(m, c["brain"], spread) * c["keep"] if spread else m


def labelmap(z: np.ndarray, c: Case, t: float, hyst: Optional[float] = None) -> np.ndarray:
    """score > t (or hysteresis from t down to hyst·t) without components below MIN_VOLUME_MM3 or peaking at
    MIN_PEAK × t or below."""
    lab = hysteresis(z, hyst * t, t) if hyst else z > t
    if not lab.any():
        return lab
    labels, n = ndimage.label(lab, structure=CONN)
    if n == 0:
        return lab
    sizes = np.bincount(labels.ravel())
    small = sizes * c["voxel_ml"] * 1000.0 < MIN_VOLUME_MM3
    if MIN_PEAK > 0:
        small[1:] |= np.asarray(ndimage.maximum(z, labels, np.arange(1, n + 1))) <= MIN_PEAK * t
    small[0] = True
    return ~small[labels]


def _dice_curve(scores: np.ndarray, gt: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Dice of (scores > t) against gt for every t in grid."""
    pos = np.sort(scores[gt])
    every = np.sort(scores)
    tp = pos.size - np.searchsorted(pos, grid, side="right")
    pred = every.size - np.searchsorted(every, grid, side="right")
    return 2 * tp / np.maximum(pos.size + pred, 1)


def evaluate(cases: Dict[str, Case], name: str, hyst: Optional[float] = None, median: bool = False) -> dict:
    """All pixel figures of one variant, plus the maps and per-threshold Dice for later steps."""
    t0 = time.perf_counter()
    maps = {}
    for k, c in cases.items():
        z = score_map(c, name)
        if median:  # the bundle's former 3D median filter (radius 1)
            z = ndimage.median_filter(z, size=3) * c["keep"]
        maps[k] = z
    seconds = (time.perf_counter() - t0) / len(cases)
    lesion = [k for k, c in cases.items() if c["kind"] == "lesion"]
    healthy = [k for k, c in cases.items() if c["kind"] == "healthy"]
    pooled = pooled_metrics([(maps[k][cases[k]["brain"]], cases[k]["gt"][cases[k]["brain"]]) for k in lesion])
    grid = GRID if VARIANTS[name][1] else None
    out = dict(pooled, seconds_per_volume=seconds, spread=VARIANTS[name][1])
    out["per_subject"], out["rules"] = {}, {}
    for s in SUBJECTS:
        m = pooled_metrics([(maps[k][cases[k]["brain"]], cases[k]["gt"][cases[k]["brain"]])
                            for k in lesion if cases[k]["subject"] == s])
        out["per_subject"][s] = {"auroc": m["auroc"], "auprc": m["auprc"], "best_dice": m["best_dice"]}
    if grid is not None:
        # Dice of plain thresholding for every grid value (from sorted scores); the healthy volume
        # with the minimum component size, as the labelmap has it
        if hyst:  # hysteresis labelmaps need the components; every second threshold to save time
            grid = grid[::2]
            d = {k: np.array([dice(labelmap(maps[k], cases[k], t, hyst), cases[k]["gt"]) for t in grid]) for k in lesion}
        else:
            d = {k: _dice_curve(maps[k][cases[k]["brain"]], cases[k]["gt"][cases[k]["brain"]], grid) for k in lesion}
        ml = {k: np.array([labelmap(maps[k], cases[k], t, hyst).sum() * cases[k]["voxel_ml"] for t in grid])
              for k in healthy}
        tuned, fpr_rule = {}, {}
        for s in SUBJECTS:
            others_l = [k for k in lesion if cases[k]["subject"] != s]
            others_h = [k for k in healthy if cases[k]["subject"] != s]
            mean_d = np.mean([d[k] for k in others_l], 0)
            worst = np.max([ml[k] for k in others_h], 0)
            ok = worst <= HEALTHY_ML_LIMIT
            i = int(np.argmax(np.where(ok, mean_d, -1))) if ok.any() else len(grid) - 1
            tuned[s] = float(grid[i])
            pooled_h = np.concatenate([maps[k][cases[k]["brain"]] for k in others_h])
            fpr_rule[s] = float(np.quantile(pooled_h, 1 - SHIPPED_FPR))
        out["rules"] = {TUNED: tuned, HELD_OUT_FPR: fpr_rule}
        # the operating point a shipped model uses: tuned over all three subjects (so not held out)
        mean_all = np.mean([d[k] for k in lesion], 0)
        worst_all = np.max([ml[k] for k in healthy], 0)
        ok = worst_all <= HEALTHY_ML_LIMIT
        out["ship_threshold"] = float(grid[int(np.argmax(np.where(ok, mean_all, -1)))]) if ok.any() else float(grid[-1])
        out["rules"][SHIP] = {s: out["ship_threshold"] for s in SUBJECTS}
        out["grid"] = [float(g) for g in grid]
        out["grid_mean_dice"] = [float(v) for v in mean_all]
        out["grid_worst_healthy_ml"] = [float(v) for v in worst_all]
    in_sample = {}  # what a bundle calibrated on its own training subjects stores
    for s in SUBJECTS:
        train = [k for k, c in cases.items() if c["kind"] == "train" and c["subject"] == s]
        pooled_t = np.concatenate([maps[k][cases[k]["brain"]] for k in train])
        in_sample[s] = float(np.quantile(pooled_t, 1 - SHIPPED_FPR))
    out["rules"][IN_SAMPLE_FPR] = in_sample
    for rule, thr in out["rules"].items():
        dices = [dice(labelmap(maps[k], cases[k], thr[cases[k]["subject"]], hyst), cases[k]["gt"]) for k in lesion]
        labels = [ndimage.label(labelmap(maps[k], cases[k], thr[cases[k]["subject"]], hyst), structure=CONN)
                  for k in healthy]
        mls = [float((lab > 0).sum() * cases[k]["voxel_ml"]) for k, (lab, _) in zip(healthy, labels)]
        per_subject = {s: {"dice": float(np.mean([v for k, v in zip(lesion, dices) if cases[k]["subject"] == s])),
                           "healthy_ml": [v for k, v in zip(healthy, mls) if cases[k]["subject"] == s]}
                       for s in SUBJECTS}
        out.setdefault("at_op", {})[rule] = {"dice": float(np.mean(dices)), "dice_per_case": [float(v) for v in dices],
                                             "healthy_ml": mls, "healthy_components": [int(n) for _, n in labels],
                                             "per_subject": per_subject}
    out["_maps"] = maps
    return out


def slice_study(cases: Dict[str, Case], maps: Dict[str, np.ndarray], thr: Dict[str, float]) -> dict:
    """Slice scores per lesion case: AUROC (lesion slice vs not), top slice on a lesion, rank of the first lesion slice."""
    def slice_axis(c: Case) -> int:
        return 2 - int(c["slice_axis"])

    def profile(c: Case, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        ax = slice_axis(c)
        has = np.moveaxis(c["brain"], ax, 0).reshape(c["brain"].shape[ax], -1).any(1)
        idx = np.flatnonzero(has)
        pos = (np.arange(len(has)) - idx[0]) / max(idx[-1] - idx[0], 1)
        return pos, values

    def elbo(c: Case, key: str = "slice_neg_elbo") -> np.ndarray:
        ax = slice_axis(c)
        out = np.full(c["brain"].shape[ax], np.nan)
        i = c["slice_index"] - int(c["box_start"][ax])
        ok = (i >= 0) & (i < len(out))
        out[i[ok]] = c[key][ok]
        return out

    healthy_profiles = {s: profile(c, elbo(c)) for k, c in cases.items() if c["kind"] == "healthy" for s in [c["subject"]]}

    def elbo_vs_healthy(c: Case) -> np.ndarray:
        pos, _ = profile(c, None)
        refs = [np.interp(pos, *healthy_profiles[s]) for s in healthy_profiles if s != c["subject"]]
        ref = np.nanmean(refs, 0)
        return elbo(c) / np.maximum(ref, 1e-6)

    def has_brain(c: Case) -> np.ndarray:
        ax = slice_axis(c)
        return np.moveaxis(c["brain"], ax, 0).reshape(c["brain"].shape[ax], -1).any(1)

    def lesion_slices(c: Case) -> np.ndarray:
        ax = slice_axis(c)
        return np.moveaxis(c["gt"], ax, 0).reshape(c["gt"].shape[ax], -1).any(1)

    def measure(fn: Callable[[Case, np.ndarray], np.ndarray], use: Callable[[Case], bool] = lambda c: True) -> dict:
        """Slice metrics of one scorer over the lesion cases (and held-out healthy scans) ``use`` keeps."""
        aurocs, top, first = [], [], []
        healthy_flag, lesion_flag = [], []  # slices scoring above the subject's operating threshold
        for k, c in cases.items():
            if c["kind"] not in ("lesion", "healthy") or not use(c):
                continue
            s = np.asarray(fn(c, maps[k]), float)
            ok = has_brain(c) & np.isfinite(s)
            on_map = fn in map_scale
            if c["kind"] == "healthy":
                healthy_flag.append(np.mean(s[ok] > thr[c["subject"]]) if on_map else np.nan)
                continue
            s, lesion = s[ok], lesion_slices(c)[ok]
            aurocs.append(auroc(s, lesion))
            lesion_flag.append(np.mean(s[lesion] > thr[c["subject"]]) if on_map else np.nan)
            order = np.argsort(-s, kind="stable")
            top.append(bool(lesion[order[0]]))
            first.append(int(np.flatnonzero(lesion[order])[0]) + 1)
        return {"slice_auroc": float(np.mean(aurocs)), "top_on_lesion": float(np.mean(top)),
                "healthy_slices_above_threshold": float(np.mean(healthy_flag)),
                "lesion_slices_above_threshold": float(np.mean(lesion_flag)),
                "first_lesion_rank_mean": float(np.mean(first)), "first_lesion_rank_median": float(np.median(first))}

    def map_max(c: Case, z: np.ndarray) -> np.ndarray:
        return slice_quantile(z, c["brain"], slice_axis(c), 1.0)

    def fusion(c: Case, z: np.ndarray, weight: float) -> np.ndarray:
        """The detector's rank fusion over the slices the model scored (NaN elsewhere)."""
        e = elbo(c)
        ok = np.isfinite(e)
        out = np.full(e.shape, np.nan)
        out[ok] = fused_slice_rank(map_max(c, z)[ok], e[ok], weight)
        return out

    def flags(c: Case, z: np.ndarray) -> np.ndarray:
        return slice_flags(labelmap(z, c, thr[c["subject"]]), slice_axis(c))

    def labelled_first(c: Case, z: np.ndarray) -> np.ndarray:
        """Highest labelled score in flagged slices; elsewhere the highest score squashed below the threshold."""
        t, m = thr[c["subject"]], map_max(c, z)
        lab = np.moveaxis(np.where(labelmap(z, c, t), z, 0), slice_axis(c), 0)
        return np.where(flags(c, z), lab.reshape(lab.shape[0], -1).max(1), t * m / (m + t))

    scorers = {
        "negative ELBO (paper)": lambda c, z: elbo(c),
        "KL": lambda c, z: elbo(c, "slice_kl"),
        "negative ELBO / healthy ELBO at that position": lambda c, z: elbo_vs_healthy(c),
        "max of the map (previous default)": lambda c, z: slice_quantile(z, c["brain"], slice_axis(c), 1.0),
        "99.9th percentile of the map": lambda c, z: slice_quantile(z, c["brain"], slice_axis(c), 0.999),
        "99th percentile of the map": lambda c, z: slice_quantile(z, c["brain"], slice_axis(c), 0.99),
        "excess of the map over the threshold": lambda c, z: slice_excess(z, c["brain"], slice_axis(c), thr[c["subject"]]),
        "excess of the map over half the threshold": lambda c, z: slice_excess(z, c["brain"], slice_axis(c), thr[c["subject"]] / 2),
        "labelled slices first (highest labelled map score), then the max squashed below the threshold":
            labelled_first,
        "max of the map, mean over 5 slices": lambda c, z: ndimage.uniform_filter1d(map_max(c, z), 5, mode="nearest"),
        "max of the map, median over 5 slices": lambda c, z: ndimage.median_filter(map_max(c, z), 5, mode="nearest"),
        "product of the ranks of max and negative ELBO": lambda c, z: fusion(c, z, 0.0) * fusion(c, z, 1.0),
        **{f"rank fusion {w:g} × rank(max) + {1 - w:g} × rank(negative ELBO)": (lambda c, z, w=w: fusion(c, z, w))
           for w in SLICE_FUSION_WEIGHTS},
    }
    # scores on the map's scale, which the operating threshold applies to (a summed excess is map units x voxels)
    map_scale = {fn for name, fn in scorers.items() if "map" in name and "rank" not in name and "excess" not in name}
    results = {name: measure(fn) for name, fn in scorers.items()}
    # the fusion weight each subject would get from the other two (slice AUROC + top-slice rate)
    chosen = {}
    for s in SUBJECTS:
        def merit(w: float) -> float:
            r = measure(lambda c, z: fusion(c, z, w), lambda c: c["subject"] != s)
            return r["slice_auroc"] + r["top_on_lesion"]
        chosen[s] = max(SLICE_FUSION_WEIGHTS, key=merit)
    results["rank fusion, weight chosen on the other two subjects " + str(chosen)] = measure(
        lambda c, z: fusion(c, z, chosen[c["subject"]]))
    # the flag rule: a slice is "anomalous" when it holds a labelmap voxel at the operating point
    healthy = [float(np.mean(flags(c, maps[k])[has_brain(c)])) for k, c in cases.items() if c["kind"] == "healthy"]
    lesion_cases = [(c, maps[k]) for k, c in cases.items() if c["kind"] == "lesion"]
    results["_flag_rule"] = {
        "healthy_slices_flagged": float(np.mean(healthy)), "healthy_slices_flagged_per_volume": healthy,
        "lesion_slices_flagged": float(np.mean([np.mean(flags(c, z)[has_brain(c) & lesion_slices(c)]) for c, z in lesion_cases])),
        "other_slices_of_lesion_cases_flagged": float(np.mean([np.mean(flags(c, z)[has_brain(c) & ~lesion_slices(c)])
                                                               for c, z in lesion_cases]))}
    return results


def component_study(cases: Dict[str, Case], maps: Dict[str, np.ndarray], thr: Dict[str, float]) -> dict:
    """At the operating point: how often the top component of each ordering overlaps a lesion."""
    keys = {"volume": lambda v, n: n, "max score": lambda v, n: v.max(), "mean score": lambda v, n: v.mean(),
            "summed score": lambda v, n: v.sum()}
    hits = {k: [] for k in keys}
    n_cases = sum(c["kind"] == "lesion" for c in cases.values())
    for k, c in cases.items():
        if c["kind"] != "lesion":
            continue
        labels, n = ndimage.label(labelmap(maps[k], c, thr[c["subject"]]), structure=CONN)
        if n == 0:
            continue
        objs = ndimage.find_objects(labels)
        comps = []
        for i, sl in enumerate(objs, 1):
            sel = labels[sl] == i
            comps.append((maps[k][sl][sel], int(sel.sum()), bool(c["gt"][sl][sel].any())))
        for key, fn in keys.items():
            best = max(comps, key=lambda t: fn(t[0], t[1]))
            hits[key].append(best[2])
    return {k: {"top_is_lesion": float(np.mean(v)) if v else float("nan"), "cases_with_components": len(v),
                "top_is_lesion_all_cases": float(np.sum(v)) / max(n_cases, 1)} for k, v in hits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, default=Path("runs/quality"))
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--variants", help="comma-separated substrings: only these variants")
    p.add_argument("--study", action="append",
                   help="a variant whose maps the slice-score and component studies use (repeatable; the first also "
                        "gets the hysteresis rows); default: the shipped chain with each spread")
    p.add_argument("--min-peak", type=float, default=0.0,
                   help="labelmaps keep only components peaking above this × the threshold (the detector's --min-peak)")
    args = p.parse_args()
    cases = load(args.maps)
    global SUBJECTS, MIN_PEAK
    MIN_PEAK = args.min_peak
    SUBJECTS = tuple(s for s in SUBJECTS if any(c["subject"] == s for c in cases.values()))
    if len(SUBJECTS) < 2:  # every threshold of a subject comes from the others' healthy scans
        p.error(f"{args.maps} holds the maps of {len(SUBJECTS)} held-out subject(s) ({', '.join(SUBJECTS) or 'none'}); "
                "the held-out thresholds need at least two: train and map the folds of the other subjects too.")
    print(f"{sum(c['kind'] == 'lesion' for c in cases.values())} lesion cases, "
          f"{sum(c['kind'] == 'healthy' for c in cases.values())} healthy held-out volumes", flush=True)
    rows: Dict[str, dict] = {}
    names = [n for n in VARIANTS if not args.variants or any(w in n for w in args.variants.split(","))]
    if not args.variants:
        rows["combi (raw) + median r=1 (shipped before)"] = evaluate(cases, "combi (raw)", median=True)
    study = args.study or [DEFAULT, DEFAULT_TAIL]
    for name in names + [n for n in study if n not in names]:
        rows[name] = evaluate(cases, name)
        print(name, {k: round(v, 3) for k, v in rows[name].items() if isinstance(v, float)},
              {r: round(v["dice"], 3) for r, v in rows[name]["at_op"].items()}, flush=True)
    for h in (0.5, 0.7):
        rows[f"{study[0]} + hysteresis to {h}·t"] = evaluate(cases, study[0], hyst=h)
    studies = {}
    for name in study:
        thr = rows[name]["rules"][TUNED]
        studies[name] = {"slice_scores": slice_study(cases, rows[name]["_maps"], thr),
                         "components": component_study(cases, rows[name]["_maps"], thr)}
        print(f"operating threshold tuned over all three subjects, {name}: {rows[name]['ship_threshold']:.4g}",
              flush=True)
    for r in rows.values():
        r.pop("_maps", None)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"variants": rows, "studies": studies, "min_peak": MIN_PEAK}
    atomic_write_text(args.out / "benchmark_quality.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "benchmark_quality_tables.md", render(result))
    print(render(result))


def render(result: dict) -> str:
    def ml(v: dict) -> str:
        return f"{np.mean(v['healthy_ml']):.2f} / {np.max(v['healthy_ml']):.2f}"

    lines = ["Threshold rules: tuned = maximises mean Dice on the other subjects' lesion cases with their healthy "
             f"scans ≤ {HEALTHY_ML_LIMIT:g} ml; held-out FPR = the 1 − {SHIPPED_FPR:g} quantile of the other subjects' "
             "held-out healthy scores; in-sample FPR = the same on the model's own training subjects; all three = "
             "tuned over all three subjects (not held out: the operating threshold a shipped bundle uses)." +
             (f" Labelmaps keep only components peaking above {result['min_peak']:g} × the threshold."
              if result.get("min_peak") else ""), "",
             "| variant | spread | AUROC | AUPRC | best Dice | Dice @ tuned | healthy ml @ tuned (mean / max) "
             "| healthy components @ tuned (mean / max) | Dice @ held-out FPR | healthy ml @ held-out FPR "
             "| Dice @ in-sample FPR | healthy ml @ in-sample FPR | threshold tuned on all three | Dice @ it "
             "| healthy ml @ it | s / volume |", "|" + "---|" * 16]
    for name, r in result["variants"].items():
        cells = [name, r["spread"] or "raw", f"{r['auroc']:.3f}", f"{r['auprc']:.3f}", f"{r['best_dice']:.3f}"]
        ops = r["at_op"]
        if TUNED in ops:
            t = ops[TUNED]
            cells += [f"{t['dice']:.3f}", ml(t), f"{np.mean(t['healthy_components']):.1f} / {np.max(t['healthy_components'])}",
                      f"{ops[HELD_OUT_FPR]['dice']:.3f}", ml(ops[HELD_OUT_FPR])]
        else:
            cells += ["–"] * 5
        cells += [f"{ops[IN_SAMPLE_FPR]['dice']:.3f}", ml(ops[IN_SAMPLE_FPR])]
        if SHIP in ops:
            cells += [f"{r['ship_threshold']:.3f}", f"{ops[SHIP]['dice']:.3f}", ml(ops[SHIP])]
        else:
            cells += ["–"] * 3
        lines.append("| " + " | ".join(cells + [f"{r['seconds_per_volume']:.2f}"]) + " |")
    lines += ["", "Per held-out subject (AUPRC / Dice @ tuned / healthy ml @ tuned; Dice / healthy ml at the threshold "
              "tuned on all three):", "", "| variant | " + " | ".join(SUBJECTS) + " |", "|---|" + "---|" * len(SUBJECTS)]
    for name in result["studies"]:
        r = result["variants"][name]
        t, a = r["at_op"][TUNED]["per_subject"], r["at_op"][SHIP]["per_subject"]
        lines.append(f"| {name} | " + " | ".join(
            f"{r['per_subject'][s]['auprc']:.3f} / {t[s]['dice']:.3f} / {np.sum(t[s]['healthy_ml']):.2f}; "
            f"{a[s]['dice']:.3f} / {np.sum(a[s]['healthy_ml']):.2f}" for s in SUBJECTS) + " |")
    for name, study in result["studies"].items():
        lines += ["", f"Slice scores (pixel maps of: {name}; thresholds tuned on the other subjects)", "",
                  "| slice score | slice AUROC | top slice on a lesion | rank of first lesion slice (mean / median) "
                  "| healthy slices above the threshold | lesion slices above it |",
                  "|---|---|---|---|---|---|"]
        for score, r in study["slice_scores"].items():
            if score.startswith("_"):
                continue
            lines.append(f"| {score} | {r['slice_auroc']:.3f} | {r['top_on_lesion']:.2f} | "
                         f"{r['first_lesion_rank_mean']:.1f} / {r['first_lesion_rank_median']:.0f} | "
                         f"{r['healthy_slices_above_threshold']:.3f} | {r['lesion_slices_above_threshold']:.2f} |")
        f = study["slice_scores"]["_flag_rule"]
        lines += ["", f"Slices holding a labelmap voxel: held-out healthy {f['healthy_slices_flagged']:.3f} "
                  f"(per volume {', '.join(f'{v:.3f}' for v in f['healthy_slices_flagged_per_volume'])}), "
                  f"lesion slices {f['lesion_slices_flagged']:.2f}, "
                  f"other slices of lesion cases {f['other_slices_of_lesion_cases_flagged']:.3f}"]
        lines += ["", f"Lesion table order (maps of: {name}; thresholds tuned on the other subjects)", "",
                  "| component order | top component is a lesion (cases with components) | cases with components "
                  "| first row a lesion over all lesion cases (none = miss) |", "|---|---|---|---|"]
        for order, r in study["components"].items():
            lines.append(f"| {order} | {r['top_is_lesion']:.2f} | {r['cases_with_components']} "
                         f"| {r['top_is_lesion_all_cases']:.2f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
