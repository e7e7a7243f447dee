"""The slice-score fusion weight chosen on the other heads, for every cached head (top slice on a lesion, held out).

Reads the cached default maps of ``scripts/benchmark_acquisition_maps.py`` (several cache folders: the folds' and
the heads no model saw) and, for each lesion case and each weight of the rank fusion (map maximum against the
negative ELBO), whether the most anomalous slice holds lesion. Each head's weight is the best on the *other*
people's cases (a rescan of a person counts as that person), ties going to the shipped weight; the figure is that
weight's top-slice rate on the head itself.

    python scripts/benchmark_slice_weight.py --maps runs/acquisition runs/acquisition-new \\
        --same-person brainbrowser2=brainbrowser1 [--out docs/benchmark_slice_weight.json]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np
from CeVAEAnomalyLib.engine.detector import SLICE_MAP_WEIGHT_FUSED
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from benchmark_acquisition import FUSION_WEIGHTS, load, top_slice_on_lesion


def hits_by_head(folders: List[Path]) -> Dict[str, Dict[float, List[bool]]]:
    """head -> weight -> top slice on a lesion, per lesion case (cases whose lesions were all cut off left out)."""
    hits: Dict[str, Dict[float, List[bool]]] = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        for path in sorted(folder.glob("*--*--lesion-*.npz")):
            case = load(path)
            if not case["gt"].any():
                continue
            for w in FUSION_WEIGHTS:
                hits[path.name.split("--")[0]][w].append(top_slice_on_lesion(case, case["final"], w))
    return hits


def held_out_choice(hits: Dict[str, Dict[float, List[bool]]], person: Dict[str, str]) -> Dict[str, dict]:
    """For each head: the weight with the best top-slice rate on the other people's cases (ties: the shipped
    weight's side) and the rates on the head itself, with that weight and with the shipped one."""
    result = {}
    for head in sorted(hits):
        others = [o for o in hits if person.get(o, o) != person.get(head, head)]
        merit = {w: float(np.mean([h for o in others for h in hits[o][w]])) for w in FUSION_WEIGHTS}
        chosen = max(FUSION_WEIGHTS, key=lambda w: (merit[w], -abs(w - SLICE_MAP_WEIGHT_FUSED)))
        result[head] = {"cases": len(hits[head][chosen]), "chosen_on_others": chosen,
                        "held_out_top_slice": float(np.mean(hits[head][chosen])),
                        "shipped_weight_top_slice": float(np.mean(hits[head][SLICE_MAP_WEIGHT_FUSED])),
                        "by_weight": {str(w): float(np.mean(hits[head][w])) for w in FUSION_WEIGHTS}}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, nargs="+", required=True, help="cache folder(s)")
    p.add_argument("--same-person", default="", help="comma-separated RESCAN=HEAD pairs (one person)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmark_slice_weight.json"))
    args = p.parse_args()
    person = dict(pair.split("=") for pair in args.same_person.split(",") if pair)
    result = held_out_choice(hits_by_head(args.maps), person)
    for head, r in result.items():
        print(f"{head}: weight {r['chosen_on_others']} chosen on the others, top slice {r['held_out_top_slice']:.3f} "
              f"(shipped {SLICE_MAP_WEIGHT_FUSED}: {r['shipped_weight_top_slice']:.3f}; {r['cases']} cases)")
    atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
