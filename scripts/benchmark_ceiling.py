"""What any operating point could give on the cached acquisition maps: Dice ceilings with oracle choices.

The issue's labelmap target (Dice at the operating point >= 0.35, averaged over lesion cases) is a mean of
per-case Dice. The pooled best Dice of the acquisition tables is one threshold over all cases' voxels pooled,
so it does not bound that mean. Here, per lesion case (moved tissue apart, as in the averaged figures):

- *shipped*: the default labelmap (threshold from the other subjects' clean healthy scans at the bundled
  rate, components of at least 50 mm3 whose peak exceeds the bundled peak factor x t);
- *shipped t, oracle components*: the same threshold, keeping exactly the components (>= 50 mm3) that touch a
  lesion: a perfect false-component filter;
- *oracle threshold*: the best of 30 thresholds chosen for the case itself (components >= 50 mm3);
- *oracle threshold and components*: both at once, an upper bound for any labelmap cut from this map;
- *brain maximum in a lesion*: whether the highest score of the brain lies in a lesion (a bound on a lesion
  table ranked by peak).

    python scripts/benchmark_ceiling.py --maps runs/acquisition [--out docs] [--prefix benchmark_acquisition_ceiling]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

import benchmark_acquisition as ba
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyResearch.evaluate import dice

MIN_MM3 = 50.0
N_THRESHOLDS = 30  # per case: the brain's (1 - q) quantiles, q geometric from 1e-5 to 0.2
FIGURES = ("shipped", "shipped t, oracle components", "oracle threshold", "oracle threshold and components",
           "brain maximum in a lesion")


def touching(c: ba.Case, z: np.ndarray, t: float) -> Tuple[np.ndarray, np.ndarray]:
    """At threshold ``t``: (every component of at least 50 mm3, those of them that touch a lesion)."""
    comps, labels = ba.components(z, c, t, MIN_MM3)
    kept = [k for k, _ in comps]
    hit = np.unique(labels[c["gt"] & np.isin(labels, kept)])
    return np.isin(labels, kept), np.isin(labels, hit[hit > 0])


def case_figures(c: ba.Case, z: np.ndarray, t: float) -> Dict[str, float]:
    """The figures of :data:`FIGURES` for one lesion case with map ``z`` and the held-out threshold ``t``."""
    shipped, _, _ = ba.label_case(z, c, t, ba.DEFAULT_LABELS)
    best_plain = best_oracle = 0.0
    for q in np.quantile(z[c["brain"]], 1 - np.geomspace(1e-5, 0.2, N_THRESHOLDS)):
        every, lesion_only = touching(c, z, float(q))
        best_plain = max(best_plain, dice(every, c["gt"]))
        best_oracle = max(best_oracle, dice(lesion_only, c["gt"]))
    inside = np.where(c["brain"], z, -np.inf)
    return {"shipped": dice(shipped, c["gt"]), "shipped t, oracle components": dice(touching(c, z, t)[1], c["gt"]),
            "oracle threshold": best_plain, "oracle threshold and components": best_oracle,
            "brain maximum in a lesion": float(c["gt"].flat[int(np.argmax(inside))])}


def held_out_thresholds(files: Dict[Tuple[str, str], List[Path]]) -> Dict[str, float]:
    """The shipped rule *clean* for each subject: the bundled rate on the other subjects' clean healthy maps
    (the default chain, as the acquisition benchmark computes it)."""
    tops = {}
    for (s, v), paths in files.items():
        for p in paths:
            if v == "clean" and p.name.endswith("--healthy.npz"):
                c = ba.load(p)
                tops[s] = ba.healthy_top(ba.MAPS["default"](c)[c["brain"]])
    if len(tops) < 2:
        return {}
    return {s: ba.quantile_threshold([t for o, t in tops.items() if o != s], ba.SHIPPED_FPR) for s in tops}


def render(per_variant: Dict[str, Dict[str, float]], per_recipe: Dict[str, Dict[str, float]], n: int) -> str:
    head = "| | " + " | ".join(FIGURES) + " |\n|---|" + "---|" * len(FIGURES)
    lines = [f"Mean over the {n} lesion cases (moved tissue apart) of each figure, held-out threshold rule *clean*:", "",
             head]
    for name, figs in [*per_variant.items(), *per_recipe.items()]:
        lines.append(f"| {name} | " + " | ".join(f"{figs[f]:.3f}" for f in FIGURES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, default=Path("runs/acquisition"))
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--prefix", default="benchmark_acquisition_ceiling")
    args = p.parse_args()
    files = ba.index([args.maps])
    thresholds = held_out_thresholds(files)
    if len(thresholds) < 2:  # each subject's threshold comes from the others' clean healthy maps
        p.error(f"{args.maps} holds the clean healthy maps of fewer than two subjects; the held-out thresholds "
                "need at least two (run benchmark_acquisition_maps.py for every subject).")
    cases: List[Tuple[str, str, Dict[str, float]]] = []
    for (s, v), paths in sorted(files.items()):
        for path in paths:
            if path.name.endswith("--healthy.npz") or "--train-" in path.name:
                continue
            c = ba.load(path)
            if c["recipe"] == ba.TERMS_RECIPE or not c["gt"].any() or s not in thresholds:
                continue  # moved tissue, lesions cut off, or a subject without its clean healthy map
            cases.append((v, str(c["recipe"]), case_figures(c, ba.MAPS["default"](c), thresholds[s])))
    groups: Dict[str, List[Dict[str, float]]] = defaultdict(list)
    for v, recipe, figs in cases:
        for key in ("all variants", v, f"recipe: {recipe}"):
            groups[key].append(figs)
    means = {k: {f: float(np.mean([g[f] for g in rows])) for f in FIGURES} for k, rows in groups.items()}
    order = ["all variants", *[v for v in ba.VARIANTS if v in means]]
    text = render({k: means[k] for k in order}, {k: v for k, v in means.items() if k.startswith("recipe")}, len(cases))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.prefix}.json", json.dumps({"thresholds": thresholds, "means": means}, indent=1))
    atomic_write_text(args.out / f"{args.prefix}_tables.md", text)
    print(text)


if __name__ == "__main__":
    main()
