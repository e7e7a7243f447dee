#!/usr/bin/env python3
"""Does the post-contrast warning fire where it should? The bright tail (engine/modality.scan_bright_tail) of every
acquisition variant of every head, healthy and with the benchmark's lesion cases, against the warning rule
(calibration.BRIGHT_TAIL_MARGIN above the highest tail of the calibration's healthy scans).

Calibration ranges, as a calibration records them (each clean healthy scan with its given mask): *shipped*, the three
subjects the bundled model is calibrated on (held out only for the further heads); *held out*, for each of the three
subjects the other two (the further heads keep the shipped range). Variants and lesion cases are the acquisition
benchmark's (``derive`` and ``lesion_case``, the same seeds).

    python scripts/benchmark_bright_tail.py [--data DIR] [--extra DIR] [--out docs/benchmark_bright_tail]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import SimpleITK as sitk
from CeVAEAnomalyLib.engine.calibration import BRIGHT_TAIL_MARGIN
from CeVAEAnomalyLib.engine.modality import scan_bright_tail
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyResearch.acquisition import VARIANTS, derive
from CeVAEAnomalyResearch.sampledata import find_healthy_data
from benchmark_acquisition_maps import RECIPES, SEED_ORDER, SUBJECTS, lesion_case

EXTRA = ("cortex_s1", "brainbrowser1", "brainbrowser2")


def head_tails(folder: Path, head: str) -> Dict[str, Dict[str, float]]:
    """variant -> case ("healthy" or a lesion recipe) -> bright tail."""
    si = SEED_ORDER.index(head)
    image = sitk.Cast(read_image(folder / f"{head}_t1.nii.gz"), sitk.sitkFloat32)
    mask = read_image(folder / f"{head}_brainmask.nii.gz", "brain mask")
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    cases = [("healthy", image, empty)]
    cases += [(recipe, *lesion_case(image, mask, recipe, 100 * si + ri)[:2]) for ri, recipe in enumerate(RECIPES)]
    out: Dict[str, Dict[str, float]] = {}
    for vi, variant in enumerate(VARIANTS):
        out[variant] = {}
        for name, img, gt in cases:
            v_img, v_mask, _ = derive(VARIANTS[variant], img, mask, gt, seed=1000 * si + 10 * vi + 1)
            out[variant][name] = scan_bright_tail(v_img, v_mask)
        print(head, variant, " ".join(f"{v:.2f}" for v in out[variant].values()), flush=True)
    return out


def limits(tails: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    """head -> {"shipped": warning limit, "held out": warning limit}."""
    clean = {s: tails[s]["clean"]["healthy"] for s in SUBJECTS if s in tails}
    shipped = max(clean.values()) + BRIGHT_TAIL_MARGIN
    return {h: {"shipped": shipped,
                "held out": max(v for s, v in clean.items() if s != h) + BRIGHT_TAIL_MARGIN if h in clean else shipped}
            for h in tails}


def table(tails: Dict[str, Dict[str, Dict[str, float]]], limit: Dict[str, Dict[str, float]]) -> List[str]:
    heads = list(tails)
    lines = [f"Warned: share of the {len(heads)} heads' scans whose bright tail exceeds the limit (held out / shipped "
             "calibration range); tails of the healthy scans per head.", "",
             "| variant | healthy warned | lesion cases warned | healthy tails (" + ", ".join(heads) + ") |",
             "|---|---|---|---|"]
    for variant in VARIANTS:
        cells = []
        for cases in (("healthy",), tuple(RECIPES)):
            shares = []
            for rule in ("held out", "shipped"):
                hits = [tails[h][variant][c] > limit[h][rule] for h in heads for c in cases]
                shares.append(f"{sum(hits)}/{len(hits)}")
            cells.append(" / ".join(shares))
        healthy = ", ".join(f"{tails[h][variant]['healthy']:.2f}" for h in heads)
        lines.append(f"| {variant} | {cells[0]} | {cells[1]} | {healthy} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="folder with the three subjects (default: find the sample data)")
    p.add_argument("--extra", type=Path, help="folder with the further heads (scripts/fetch_data.py DEST --names "
                                              + " ".join(EXTRA) + ")")
    p.add_argument("--out", type=Path, default=Path("docs/benchmark_bright_tail"))
    args = p.parse_args()
    data = args.data or find_healthy_data()
    if data is None:
        p.error("no sample data found; give --data")
    folders = {s: data for s in SUBJECTS}
    if args.extra:
        folders.update({h: args.extra for h in EXTRA})
    tails = {h: head_tails(folder, h) for h, folder in folders.items()}
    limit = limits(tails)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"margin": BRIGHT_TAIL_MARGIN, "limits": limit,
                                                                 "tails": tails}, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(["# Bright tail per acquisition variant", "",
                                                              f"Margin {BRIGHT_TAIL_MARGIN:g}; limits: " + ", ".join(
                                                                  f"{h} {v['held out']:.2f} / {v['shipped']:.2f}"
                                                                  for h, v in limit.items()), "",
                                                              *table(tails, limit)]) + "\n")
    print("\n".join(table(tails, limit)))


if __name__ == "__main__":
    main()
