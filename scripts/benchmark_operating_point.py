"""Operating point on the acquisition benchmark: seed rate × hysteresis growth, or a peak filter, chosen held out.

The labelmap is the components of the map above ``grow`` × t that reach above t (hysteresis; grow 1: the plain
threshold), at least 50 mm³, where t is the healthy false-positive ``rate`` threshold pooled over the other
subjects' clean held-out healthy scans (as ``benchmark_acquisition.py``'s *clean* rule; the shipped rate is
the first). The peak filters keep, at the shipped rate's t, only the components whose maximum exceeds
``peak`` × t (the detector's ``--min-peak``). Per setting, over every subject and variant: mean Dice at the
operating point, the healthy scans' flagged ml and components, the share of healthy scans within the issue's targets (≤ 1 ml, ≤ 2
components), the lesion table's first row and the panel's jump (the first row, else the top slice) on a
lesion. Then, for each subject, the setting that is best on the other two subjects' cases (by two merits,
both reported) is applied to it: the held-out figure of choosing the operating point this way.

    python scripts/benchmark_operating_point.py --maps runs/acquisition --records runs/op/robex.json --subjects robex
    python scripts/benchmark_operating_point.py --render runs/op/*.json [--out docs]   # the tables
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import benchmark_acquisition as ba
from CeVAEAnomalyResearch.evaluate import dice

RATES = (ba.SHIPPED_FPR, 1e-4, 5e-5, 2e-5, 1e-5)
GROWS = (1.0, 0.85, 0.7, 0.6, 0.5)
PEAKS = (1.25, 1.5, 2.0, 3.0)  # at the shipped rate only
MAPS: Dict[str, Callable[[ba.Case], np.ndarray]] = {"default": ba.chain,
                                                    "score power 0.25": lambda c: ba.chain(c, power=0.25)}
Setting = Tuple[str, float, float, float]  # (map, rate, grow, peak factor; 1: no peak filter)
Record = Dict[str, object]


def case_records(c: ba.Case, z: np.ndarray, m: str, thresholds: Dict[float, float]) -> List[Record]:
    """One record per (rate, grow) and per peak factor (at the first rate) of map ``m``'s labelmap on case ``c``."""
    lesion = c["case"] != "healthy"
    top = ba.top_slice_on_lesion(c, z, ba.detector_slice_weight(c, m)) if lesion else None
    out = []
    first_rate = next(iter(thresholds))
    settings = [(rate, grow, 1.0) for rate in thresholds for grow in GROWS] + [(first_rate, 1.0, p) for p in PEAKS]
    for rate, grow, peak in settings:
        t = thresholds[rate]
        labelmap, n, first = ba.labelled(c, *ba.components(z, c, t, 50.0, peak=peak if peak > 1 else 0.0, grow=grow))
        r: Record = dict(subject=c["subject"], variant=c["variant"], case=c["case"], map=m, rate=rate, grow=grow,
                         peak=peak, threshold=t, components=n, ml=float(labelmap.sum()) * c["voxel_ml"])
        if lesion:
            r.update(dice=dice(labelmap, c["gt"]), first=bool(first), jump=top if first is None else first)
        out.append(r)
    return out


def records(maps: Path, subjects: Optional[Sequence[str]]) -> List[Record]:
    """Records of every lesion (not moved-tissue) and healthy case of ``subjects`` (None: all)."""
    files = ba.index([maps])
    tops: Dict[Tuple[str, str], Tuple[np.ndarray, int]] = {}
    for (s, v), paths in files.items():
        if v != "clean":
            continue
        c = ba.load(next(p for p in paths if "--healthy" in p.name))
        for m, fn in MAPS.items():
            tops[(m, s)] = ba.healthy_top(fn(c)[c["brain"]])
    out: List[Record] = []
    t0 = time.time()
    for (s, v), paths in files.items():
        if subjects and s not in subjects:
            continue
        for path in paths:
            if "--train-" in path.name:
                continue
            c = ba.load(path)
            if c["recipe"] == ba.TERMS_RECIPE or (c["case"] != "healthy" and not c["gt"].any()):
                continue
            for m, fn in MAPS.items():
                others = [t for (mm, o), t in tops.items() if mm == m and o != s]
                thresholds = {rate: ba.quantile_threshold(others, rate) for rate in RATES}
                out.extend(case_records(c, fn(c), m, thresholds))
            print(f"{path.name} ({time.time() - t0:.0f} s)", flush=True)
    return out


def figures(rs: Sequence[Record]) -> Dict[str, float]:
    healthy = [r for r in rs if r["case"] == "healthy"]
    lesion = [r for r in rs if r["case"] != "healthy"]
    return dict(
        dice=float(np.mean([r["dice"] for r in lesion])),
        within=float(np.mean([r["ml"] <= 1.0 and r["components"] <= 2 for r in healthy])),
        ml=float(np.mean([r["ml"] for r in healthy])), ml_max=float(max(r["ml"] for r in healthy)),
        components=float(np.mean([r["components"] for r in healthy])),
        components_max=int(max(r["components"] for r in healthy)),
        first=float(np.mean([r["first"] for r in lesion])), jump=float(np.mean([r["jump"] for r in lesion])),
        healthy_scans=len(healthy), lesion_cases=len(lesion))


# the baseline of the merits: the labelmap as it was when this grid chose the peak filter (no filter)
DEFAULT: Setting = ("default", RATES[0], 1.0, 1.0)
MERITS: Dict[str, Callable[[Dict[Setting, Dict[str, float]]], Setting]] = {
    "mean Dice + share of healthy scans within target":
        lambda f: max(f, key=lambda k: (f[k]["dice"] + f[k]["within"], k == DEFAULT)),
    "mean Dice, at least the default's share of healthy scans within target":
        lambda f: max((k for k in f if f[k]["within"] >= f[DEFAULT]["within"]),
                      key=lambda k: (f[k]["dice"], k == DEFAULT)),
}


def by_setting(recs: Sequence[Record]) -> Dict[Setting, List[Record]]:
    groups: Dict[Setting, List[Record]] = defaultdict(list)
    for r in recs:
        groups[(r["map"], r["rate"], r["grow"], r.get("peak", 1.0))].append(r)
    return groups


def setting_name(setting: Setting) -> str:
    m, rate, grow, peak = setting
    peak_filter = f" · peak > {peak:g} t" if peak > 1 else ""
    return f"{m} · {rate:.2g} · {'off' if grow == 1 else f'{grow:g} t'}{peak_filter}"


def held_out(recs: Sequence[Record]) -> Dict[str, dict]:
    """Per merit: the setting chosen for each subject on the other subjects' cases, and the chosen settings'
    figures on their own subjects together."""
    groups = by_setting(recs)
    subjects = sorted({r["subject"] for r in recs})
    out = {}
    for name, choose in MERITS.items():
        chosen = {s: choose({k: figures([r for r in rs if r["subject"] != s]) for k, rs in groups.items()})
                  for s in subjects}
        mine = [r for s, k in chosen.items() for r in groups[k] if r["subject"] == s]
        out[name] = {"chosen": {s: list(k) for s, k in chosen.items()}, "figures": figures(mine)}
    return out


def render(recs: Sequence[Record]) -> str:
    groups = by_setting(recs)
    head = ("| {0} | mean Dice @ op | healthy ml (mean / max) | healthy components (mean / max) | healthy scans "
            "within target | first row a lesion | jump on a lesion |")
    cells = ("{dice:.3f} | {ml:.2f} / {ml_max:.2f} | {components:.1f} / {components_max} | {within:.2f} | "
             "{first:.2f} | {jump:.2f} |")
    n = figures(recs)
    lines = [f"Every setting on every subject ({n['lesion_cases'] // len(groups)} lesion cases, "
             f"{n['healthy_scans'] // len(groups)} healthy scans each; not held out):", "",
             head.format("map · seed rate · grow to · peak filter"), "|---|---|---|---|---|---|---|"]
    for setting, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][3], -kv[0][2])):
        lines.append(f"| {setting_name(setting)} | " + cells.format(**figures(rs)))
    lines += ["", "Chosen on the other subjects, applied to each held-out subject:", "",
              head.format("merit (settings chosen per subject)"), "|---|---|---|---|---|---|---|"]
    for name, h in held_out(recs).items():
        chosen = "; ".join(f"{s}: {setting_name(tuple(k))}" for s, k in h["chosen"].items())
        lines.append(f"| {name} ({chosen}) | " + cells.format(**h["figures"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, default=Path("runs/acquisition"))
    p.add_argument("--subjects", help="comma-separated held-out subjects to score (default: all)")
    p.add_argument("--records", type=Path, help="write the records here (JSON)")
    p.add_argument("--render", type=Path, nargs="+", help="record files to merge into the tables instead")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--prefix", default="benchmark_operating_point")
    args = p.parse_args()
    if args.render:
        recs = [r for path in args.render for r in json.loads(path.read_text())]
        text = render(recs)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.prefix}_tables.md").write_text(text)
        print(text)
        return
    if args.records is None:
        p.error("give --records (where to write them) or --render")
    recs = records(args.maps, args.subjects.split(",") if args.subjects else None)
    args.records.parent.mkdir(parents=True, exist_ok=True)
    args.records.write_text(json.dumps(recs))


if __name__ == "__main__":
    main()
