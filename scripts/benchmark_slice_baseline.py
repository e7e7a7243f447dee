"""A healthy baseline by slice position for "most anomalous slice", measured held out on the cached acquisition maps.

Healthy brains score higher at some levels than at others (skull base, ventricles), so a slice's map maximum and
negative ELBO might say more divided by what healthy scans give at the same relative position in the brain. The
baseline of a subject comes from the other subjects' healthy scans (rule *clean*: their clean scans, as a bundle's
calibration would store it; rule *variant*: the same acquisition, as a site calibration would): each part's
median over the brain's slices in 20 bins of relative position, each scan scaled by its own median first. The
parts become part / baseline^lam before the detector's rank fusion; each subject gets the exponents (lam_map,
lam_elbo) best on the other two subjects' lesion cases.

    python scripts/benchmark_slice_baseline.py --maps runs/acquisition    # prints a Markdown table
"""
from __future__ import annotations

import argparse
from itertools import product
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

import benchmark_acquisition as ba
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank, slice_quantile

BINS = np.linspace(0.0, 1.0, 21)
EXPONENTS = (0.0, 0.5, 1.0)
Rows = Dict[str, np.ndarray]


def case_rows(c: ba.Case) -> Rows:
    """Per row of the case's slice scores: the default map's maximum, the negative ELBO, the relative position in
    the brain (0 at its lowest slice, 1 at its highest; NaN without brain) and whether it holds lesion."""
    axis = 2 - int(c["slice_axis"])
    z = ba.MAPS["default"](c)
    voxels = ba.on_rows(c, np.moveaxis(c["brain"], axis, 0).reshape(c["brain"].shape[axis], -1).sum(1))
    index = np.asarray(c["slice_index"], float)
    low, high = index[voxels > 0].min(), index[voxels > 0].max()
    return {"map": ba.on_rows(c, slice_quantile(z, c["brain"], axis, 1.0)),
            "elbo": np.asarray(c["slice_neg_elbo"], float), "index": index,
            "position": np.where(voxels > 0, (index - low) / max(high - low, 1.0), np.nan),
            "lesion": ba.lesion_rows(c) if c["case"] != "healthy" else np.zeros(len(index), bool),
            "weight": np.float64(ba.detector_slice_weight(c, "default"))}


def baseline(scans: List[Rows], part: str) -> Callable[[np.ndarray], np.ndarray]:
    """The healthy scans' median of ``part`` (each scan over its own median) by relative position."""
    x, y = [], []
    for r in scans:
        inside = np.isfinite(r["position"])
        x.append(r["position"][inside])
        y.append(r[part][inside] / np.median(r[part][inside]))
    x, y = np.concatenate(x), np.concatenate(y)
    centres = (BINS[:-1] + BINS[1:]) / 2
    values = [np.median(y[(x >= a) & (x <= b)]) if np.any((x >= a) & (x <= b)) else 1.0
              for a, b in zip(BINS[:-1], BINS[1:])]
    return lambda position: np.interp(position, centres, values)


def top_hit(r: Rows, bases: Tuple[Callable, Callable], lam: Tuple[float, float]) -> bool:
    """Whether the top slice holds lesion with each part divided by its baseline to the power ``lam``."""
    inside = np.isfinite(r["position"])
    parts = []
    for part, base, power in zip(("map", "elbo"), bases, lam):
        scale = np.ones(len(inside))
        scale[inside] = np.maximum(base(r["position"][inside]), 1e-3) ** power
        parts.append(r[part] / scale)
    anomaly = fused_slice_rank(parts[0], parts[1], float(r["weight"]))
    top = min(range(len(anomaly)), key=lambda i: (-anomaly[i], -parts[0][i], -parts[1][i], r["index"][i]))
    return bool(r["lesion"][top])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, required=True)
    args = p.parse_args()
    cases: Dict[Tuple[str, str, str], Rows] = {}
    for (s, v), paths in ba.index([args.maps]).items():
        for path in paths:
            c = ba.load(path)
            if "--train-" in path.name or c["recipe"] == ba.TERMS_RECIPE or (c["case"] != "healthy"
                                                                               and not c["gt"].any()):
                continue
            cases[(s, v, c["case"])] = case_rows(c)
    subjects = sorted({s for s, _, _ in cases})
    grid = list(product(EXPONENTS, EXPONENTS))
    print("| rule | (lam_map, lam_elbo) | top slice on a lesion | " + " | ".join(subjects) + " |")
    print("|---|---|---|" + "---|" * len(subjects))
    for rule in ("clean", "variant"):
        hits: Dict[Tuple[float, float], Dict[str, List[bool]]] = {lam: {s: [] for s in subjects} for lam in grid}
        for (s, v, case), r in cases.items():
            if case == "healthy":
                continue
            ref = "clean" if rule == "clean" else v
            scans = [cases[(o, ref, "healthy")] for o in subjects if o != s and (o, ref, "healthy") in cases]
            bases = (baseline(scans, "map"), baseline(scans, "elbo"))
            for lam in grid:
                hits[lam][s].append(top_hit(r, bases, lam))
        for lam in grid:
            per = [np.mean(hits[lam][s]) for s in subjects]
            print(f"| {rule} | {lam} | {np.mean([h for s in subjects for h in hits[lam][s]]):.3f} | "
                  + " | ".join(f"{x:.3f}" for x in per) + " |")
        held = [max(grid, key=lambda lam: np.mean([h for o in subjects if o != s for h in hits[lam][o]]))
                for s in subjects]
        rate = np.mean([h for s, lam in zip(subjects, held) for h in hits[lam][s]])
        print(f"| {rule}, chosen for each subject on the other two | {', '.join(map(str, held))} | {rate:.3f} | "
              + " | ".join(f"{np.mean(hits[lam][s]):.3f}" for s, lam in zip(subjects, held)) + " |")


if __name__ == "__main__":
    main()
