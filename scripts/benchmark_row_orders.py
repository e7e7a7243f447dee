"""Lesion table and slice table orders on cached acquisition cases: how often the first row is a lesion.

Reads caches of ``scripts/benchmark_acquisition_maps.py`` (for heads no model has seen: scored by the shipped model),
labels each lesion case's detector map (the cached ``final``) with the shipped labelmap rule (components of the map
above the threshold, at least 50 mm³, peak above the bundled peak factor × threshold) and ranks the components by
each order of :data:`ORDERS`; the slices by each order of :func:`slice_orders`. Moved-tissue cases are left out, as
in ``benchmark_acquisition.py``. Thresholds: "bundled", the shipped model's own calibrated threshold (what a user of
the shipped model gets); "other head", the bundled false-positive rate on the other evaluated heads' clean healthy
maps (the acquisition benchmark's rule *clean*, calibrated without the head itself).

    python scripts/benchmark_row_orders.py --maps runs/acquisition-new --subjects cortex_s1,brainbrowser1 \
        [--out docs --prefix benchmark_row_orders]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from CeVAEAnomalyLib.engine.detector import slice_map_weight
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank, slice_excess, slice_quantile
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.options import ThresholdPolicy
from CeVAEAnomalyResearch.acquisition import VARIANTS
from benchmark_acquisition import (LABELS, DEFAULT_LABELS, SHIPPED, SHIPPED_FPR, TERMS_RECIPE, Case, case_asymmetry,
                                   components, healthy_top, index, lesion_rows, load, on_rows, quantile_threshold,
                                   top_row)

Stats = Dict[str, float]
# name -> the value a component is ranked by (highest first; ties: more voxels first, as the detector's table)
ORDERS: Dict[str, Callable[[Stats], float]] = {
    "summed score (the default)": lambda s: s["summed"],
    "max score (= peak over threshold)": lambda s: s["max"],
    "volume": lambda s: s["voxels"],
    "mean score": lambda s: s["mean"],
    "excess mass Σ(z − t)": lambda s: s["summed"] - s["t"] * s["voxels"],
    "summed score of the voxels above 1.5 t": lambda s: s["summed_above"],
    "mean asymmetry term (side-weighted)": lambda s: s["asymmetry"],
}


def component_stats(z: np.ndarray, labels: np.ndarray, kept: Sequence[int], t: float, asym: np.ndarray,
                    gt: np.ndarray) -> List[Stats]:
    """Per kept component label: voxels, summed / max / mean score, summed score of its voxels above 1.5 t, mean of
    the asymmetry term ``asym``, the threshold ``t`` and whether it touches the ground truth ``gt`` (1.0 / 0.0)."""
    idx = np.asarray(kept, int)
    voxels = ndimage.sum_labels(np.ones(z.shape), labels, idx)
    summed = ndimage.sum_labels(z, labels, idx)
    return [{"voxels": float(n), "summed": float(s), "max": float(m), "mean": float(s / n), "t": t,
             "summed_above": float(a), "asymmetry": float(q), "lesion": float(g)}
            for n, s, m, a, q, g in zip(voxels, summed, ndimage.maximum(z, labels, idx),
                                        ndimage.sum_labels(np.where(z > 1.5 * t, z, 0.0), labels, idx),
                                        ndimage.mean(asym, labels, idx), ndimage.maximum(gt, labels, idx))]


def first_rows(stats: List[Stats]) -> Dict[str, Optional[bool]]:
    """Per order of :data:`ORDERS`: whether the first row of the lesion table is a lesion (None: no row)."""
    out: Dict[str, Optional[bool]] = {}
    for name, key in ORDERS.items():
        first = min(stats, key=lambda s: (-key(s), -s["voxels"]), default=None)
        out[name] = None if first is None else bool(first["lesion"])
    return out


def slice_orders(c: Case, z: np.ndarray, t: float, weight: float) -> Dict[str, np.ndarray]:
    """Per slice order: each slice row's score (highest first; ties: the map max, the negative ELBO, the lower
    index, as the detector's slice table)."""
    axis = 2 - int(c["slice_axis"])
    map_max = on_rows(c, slice_quantile(z, c["brain"], axis, 1.0))
    excess = on_rows(c, slice_excess(z, c["brain"], axis, t))
    elbo = c["slice_neg_elbo"]
    return {
        f"the default: map max and −ELBO rank-fused (map weight {weight:g})": fused_slice_rank(map_max, elbo, weight),
        "map max alone": map_max,
        "negative ELBO alone": np.asarray(elbo, float),
        "summed excess over the threshold Σ(z − t)₊": excess,
        f"rank fusion of that excess and −ELBO (weight {weight:g})": fused_slice_rank(excess, elbo, weight),
    }


def top_slices(c: Case, z: np.ndarray, t: float, weight: float) -> Dict[str, bool]:
    """Per slice order of :func:`slice_orders`: whether the first slice holds lesion."""
    orders = slice_orders(c, z, t, weight)
    on = lesion_rows(c)
    return {name: bool(on[top_row(score, orders["map max alone"], c["slice_neg_elbo"], c)])
            for name, score in orders.items()}


def evaluate_case(c: Case, t: float) -> Tuple[Dict[str, Optional[bool]], Dict[str, bool], int, Optional[bool]]:
    """(first rows by order, top slices by order, number of rows, whether any row is a lesion: the ceiling of every
    order; None without rows) of one lesion case at threshold ``t``."""
    z = c["final"]
    min_fn, peak, _, _ = LABELS[DEFAULT_LABELS]
    kept, labels = components(z, c, t, min_fn(c), peak)
    asym = case_asymmetry(c, sided=True) if kept else z
    stats = component_stats(z, labels, [k for k, _ in kept], t, asym, c["gt"])
    weight = slice_map_weight(3 if "combi_axial" in c else 1)
    return first_rows(stats), top_slices(c, z, t, weight), len(kept), any(s["lesion"] for s in stats) if stats else None


def thresholds(files: Dict[Tuple[str, str], List[Path]], subjects: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """rule -> subject -> threshold: "bundled" (the shipped model's own) and "other head" (the bundled rate on the
    other subjects' clean healthy maps; NaN with one subject)."""
    bundled = SHIPPED.threshold(SHIPPED.score_options, SHIPPED.postprocess, ThresholdPolicy())[0]
    tops = {}
    for s in subjects:
        c = load(next(p for p in files[(s, "clean")] if p.name.endswith("--healthy.npz")))
        tops[s] = healthy_top(c["final"][c["brain"]])
    other = {s: quantile_threshold([tops[o] for o in subjects if o != s], SHIPPED_FPR) if len(subjects) > 1
             else float("nan") for s in subjects}
    return {"bundled": {s: bundled for s in subjects}, "other head": other}


def _share(hits: List[Optional[bool]]) -> str:
    marked = [h for h in hits if h is not None]
    return (f"{np.mean([bool(h) for h in hits]):.2f}; "
            + (f"{np.mean(marked):.2f} (n={len(marked)})" if marked else "– (n=0)"))


def render(result: dict) -> str:
    """Markdown tables of ``result`` (see :func:`main`)."""
    lines = [f"Subjects {', '.join(result['subjects'])}; variants {', '.join(result['variants'])}; "
             f"{result['cases']} lesion cases (moved tissue left out)."]
    for rule, per in result["rules"].items():
        ts = ", ".join(f"{s} {t:.3f}" for s, t in per["thresholds"].items())
        lines += ["", f"Threshold rule *{rule}* ({ts}):", "",
                  "| lesion table order | first row a lesion (all cases; cases with a row) | jump on a lesion |",
                  "|---|---|---|"]
        top = next(iter(per["top_slice"].values()))  # the detector's slice order: where a jump without rows lands
        for name, hits in [*per["first_rows"].items(), ("any row a lesion (the ceiling of every order)",
                                                        per["ceiling"])]:
            jump = [h if h is not None else s for h, s in zip(hits, top)]
            lines.append(f"| {name} | {_share(hits)} | {np.mean(jump):.2f} |")
        counts = np.bincount(per["rows"])
        lines += ["", "Cases by number of rows: " + ", ".join(f"{k}: {n}" for k, n in enumerate(counts) if n)]
        lines += ["", "| slice table order | top slice on a lesion |", "|---|---|"]
        for name, hits in per["top_slice"].items():
            lines.append(f"| {name} | {np.mean(hits):.2f} (n={len(hits)}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, nargs="+", required=True, help="cache folder(s)")
    p.add_argument("--subjects", required=True, help="comma-separated subjects")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--prefix", default="benchmark_row_orders", help="output names: <prefix>.json, <prefix>_tables.md")
    args = p.parse_args()
    t0 = time.time()
    subjects = args.subjects.split(",")
    files = {k: v for k, v in index(args.maps).items() if k[0] in subjects}
    variants = [v for v in VARIANTS if any(w == v for _, w in files)]
    rules = thresholds(files, subjects)
    per_rule: Dict[str, dict] = {r: {"thresholds": ts, "first_rows": defaultdict(list), "top_slice": defaultdict(list),
                                     "rows": [], "ceiling": [], "cases": []} for r, ts in rules.items()}
    for (s, v), paths in sorted(files.items()):
        for path in paths:
            c = load(path)
            if c["case"] == "healthy" or c["recipe"] == TERMS_RECIPE or not c["gt"].any():
                continue
            for rule, per in per_rule.items():
                rows, slices, n, ceiling = evaluate_case(c, per["thresholds"][s])
                for name, hit in rows.items():
                    per["first_rows"][name].append(hit)
                for name, hit in slices.items():
                    per["top_slice"][name].append(hit)
                per["rows"].append(n)
                per["ceiling"].append(ceiling)
                per["cases"].append(f"{s} / {v} / {c['recipe']}")
        print(f"{s} / {v} ({time.time() - t0:.0f} s)", flush=True)
    result = {"subjects": subjects, "variants": variants, "cases": len(per_rule["bundled"]["cases"]),
              "rules": {r: {k: dict(x) if isinstance(x, defaultdict) else x for k, x in per.items()}
                        for r, per in per_rule.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.prefix}.json", json.dumps(result, indent=1))
    text = render(result)
    atomic_write_text(args.out / f"{args.prefix}_tables.md", text)
    print(text)


if __name__ == "__main__":
    main()
