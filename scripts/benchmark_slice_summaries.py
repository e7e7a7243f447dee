"""Slice summaries of the map for "most anomalous slice", measured held out on the cached acquisition maps.

The detector ranks slices by w x rank(the slice's map maximum) + (1 - w) x rank(negative ELBO). A maximum over
more voxels is higher by chance alone, so near-full-brain healthy slices can outrank a lesion's. Candidates for
the map part: the maximum or the mean of the k highest voxels, minus b x ln(brain voxels of the slice) (the
expected rise of a maximum with the number of voxels under an exponential tail of scale b), at weights w. Each
subject gets the setting that puts the top slice on a lesion most often on the other two subjects' cases.

    python scripts/benchmark_slice_summaries.py --maps runs/acquisition [--out hits.json]   # prints a Markdown table
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

import benchmark_acquisition as ba
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank
from CeVAEAnomalyLib.io.atomic import atomic_write_text

SUMMARIES = {"maximum": 1, "mean of the 10 highest": 10, "mean of the 50 highest": 50}
AREA_SCALES = (0.0, 0.25, 0.5, 1.0)
WEIGHTS = (0.7, 0.8, 0.9)
Setting = Tuple[str, float, float]  # (summary, area scale b, weight w)


def slice_features(c: ba.Case, z: np.ndarray) -> Dict[str, np.ndarray]:
    """Per row of the case's slice scores: each summary of the map over the slice's brain, its brain voxel count
    and whether it holds lesion (0 / False for rows outside the cached box)."""
    axis = 2 - int(c["slice_axis"])
    zs = np.moveaxis(z, axis, 0).reshape(z.shape[axis], -1)
    bs = np.moveaxis(c["brain"], axis, 0).reshape(z.shape[axis], -1)
    n = bs.sum(1)
    per_slice = {name: np.zeros(len(n)) for name in SUMMARIES}
    for i in np.flatnonzero(n):
        values = -np.sort(-zs[i][bs[i]])
        for name, k in SUMMARIES.items():
            per_slice[name][i] = values[:k].mean()
    out = {name: ba.on_rows(c, v) for name, v in per_slice.items()}
    out.update(voxels=ba.on_rows(c, n), lesion=ba.lesion_rows(c))
    return out


def top_slice_hit(c: ba.Case, f: Dict[str, np.ndarray], setting: Setting) -> bool:
    """Whether the top slice under ``setting`` holds lesion (ties broken as the detector's table does)."""
    name, b, w = setting
    part = np.where(f["voxels"] > 0, f[name] - b * np.log(np.maximum(f["voxels"], 1)), 0.0)
    anomaly = fused_slice_rank(part, c["slice_neg_elbo"], w)
    return bool(f["lesion"][ba.top_row(anomaly, part, c["slice_neg_elbo"], c)])


def held_out_choice(hits: Dict[Setting, List[bool]], subjects: Sequence[str], subject: str) -> Setting:
    """The setting with the most hits on the other subjects' cases (fewer area correction, then the shipped
    weight, on ties)."""
    others = [i for i, s in enumerate(subjects) if s != subject]
    return max(hits, key=lambda k: (np.mean([hits[k][i] for i in others]), -k[1], k == ("maximum", 0.0, 0.8)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, default=Path("runs/acquisition"))
    p.add_argument("--out", type=Path, help="JSON with every setting's hits and the held-out choices")
    args = p.parse_args()
    settings = [(n, b, w) for n in SUMMARIES for b in AREA_SCALES for w in WEIGHTS]
    hits: Dict[Setting, List[bool]] = {k: [] for k in settings}
    subjects: List[str] = []
    for (s, _), paths in sorted(ba.index([args.maps]).items()):
        for path in paths:
            c = ba.load(path)
            if c["case"] == "healthy" or "--train-" in path.name or c["recipe"] == ba.TERMS_RECIPE or not c["gt"].any():
                continue
            f = slice_features(c, ba.MAPS["default"](c))
            subjects.append(s)
            for k in settings:
                hits[k].append(top_slice_hit(c, f, k))
    names = sorted(set(subjects))
    print("| summary | area scale b | weight w | top slice on a lesion | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for k in settings:
        per = [np.mean([h for h, s in zip(hits[k], subjects) if s == n]) for n in names]
        print(f"| {k[0]} | {k[1]:g} | {k[2]:g} | {np.mean(hits[k]):.3f} | " + " | ".join(f"{v:.2f}" for v in per) + " |")
    chosen = {n: held_out_choice(hits, subjects, n) for n in names}
    held = [hits[chosen[s]][i] for i, s in enumerate(subjects)]
    for n, k in chosen.items():
        print(f"{n}: chosen on the other subjects {k}")
    print(f"held out: {np.mean(held):.3f} over {len(held)} lesion cases")
    if args.out:
        atomic_write_text(args.out, json.dumps({"subjects": subjects, "hits": {" | ".join(map(str, k)): v for k, v in hits.items()},
                                                "chosen": chosen, "held_out": float(np.mean(held))}, indent=1))


if __name__ == "__main__":
    main()
