#!/usr/bin/env python3
"""The acquisition benchmark's healthy scans and lesion cases scored with the automatic brain mask, against the
same cases scored with the given (degraded reference) mask: what a user without a brain mask gets.

For each subject S, the fold model trained without S (``runs/benchmark-3o/cevae/without-S.cevae``, from
``benchmark_train.py --orientations axial,coronal,sagittal``) runs the full default :class:`Detector` on S's healthy
scan and on its lesion cases (``benchmark_acquisition_maps.lesion_case``, the same recipes and seeds), each turned into
the acquisition variants by ``derive`` (the same seeds as the acquisition benchmark). Threshold: the *clean* rule of
the acquisition benchmark, the shipped rate over the other subjects' clean healthy scans, each scored by its own fold
model with its given mask. Per variant: the healthy scan's flagged ml and components, and the labelmap's Dice over the
whole volume (a leak of the automatic mask that is flagged counts against it), with each mask; the automatic mask's
Dice against the reference.

    python scripts/benchmark_automask.py [--runs runs/benchmark-3o/cevae] [--variants clean,clinical]
        [--recipes mixed,low contrast] [--out docs/benchmark_automask]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.brainmask import compute_brain_mask
from CeVAEAnomalyLib.engine.calibration import calibrate, threshold_for_fpr
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.options import ThresholdPolicy
from CeVAEAnomalyResearch.acquisition import VARIANTS, derive
from CeVAEAnomalyResearch.evaluate import dice
from benchmark_acquisition_maps import RECIPES, SEED_ORDER, SUBJECTS, lesion_case

DEFAULT_VARIANTS = ("clean", "thick 6.5 mm", "top cut off", "bottom cut off", "noise 3 %", "post-contrast",
                    "clinical: post-contrast, 6.5 mm, noise 3 %", "2x2x3 mm, top cut off, bias, noise 3 %")


def _brain_scores(detector: Detector, image: sitk.Image, mask: sitk.Image) -> np.ndarray:
    result = detector(image, mask)
    return sitk.GetArrayViewFromImage(result.score)[sitk.GetArrayViewFromImage(result.brain_mask) > 0].copy()


def _case(detector: Detector, image: sitk.Image, mask: sitk.Image, gt: np.ndarray) -> dict:
    result = detector(image, mask)
    row = {"flagged_ml": float(result.flagged_ml), "components": len(result.components)}
    if gt.any():
        row["dice"] = float(dice(sitk.GetArrayViewFromImage(result.labelmap) > 0, gt))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark-3o/cevae"))
    p.add_argument("--data", type=Path, help="the healthy sample data (default: find or fetch)")
    p.add_argument("--variants", help="the variants whose names contain one of these comma-separated parts "
                   "(default: eight, from clean to the clinical ones)")
    p.add_argument("--recipes", default="mixed", help="lesion recipes (comma-separated; the published table: mixed)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmark_automask"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    parts = [part.strip() for part in args.variants.split(",")] if args.variants else []
    variants = [v for v in VARIANTS if any(part in v for part in parts)] if parts else list(DEFAULT_VARIANTS)
    recipes = [r.strip() for r in args.recipes.split(",")]
    rate = read_header(default_model_path()).default_fpr
    t0 = time.time()
    bundles = {s: load_bundle(args.runs / f"without-{s}.cevae") for s in SUBJECTS}
    data = {s: (sitk.Cast(read_image(args.data / f"{s}_t1.nii.gz"), sitk.sitkFloat32),
                read_image(args.data / f"{s}_brainmask.nii.gz", "brain mask")) for s in SUBJECTS}
    clean = {s: _brain_scores(Detector(bundles[s], policy=ThresholdPolicy(threshold=np.inf)), *data[s])
             for s in SUBJECTS}
    rows: List[dict] = []
    for subject in SUBJECTS:
        si = SEED_ORDER.index(subject)
        threshold = threshold_for_fpr(calibrate([clean[o] for o in SUBJECTS if o != subject], "others"), rate)
        detector = Detector(bundles[subject], policy=ThresholdPolicy(threshold=threshold))
        image, mask = data[subject]
        empty = sitk.Cast(mask * 0, sitk.sitkUInt8)
        cases = [("healthy", image, empty)]
        for recipe in recipes:
            lesioned, gt, _ = lesion_case(image, mask, recipe, 100 * si + list(RECIPES).index(recipe))
            cases.append((recipe, lesioned, gt))
        for variant in variants:
            vi = list(VARIANTS).index(variant)
            for name, img, gt in cases:
                v_img, v_mask, v_gt = derive(VARIANTS[variant], img, mask, gt, seed=1000 * si + 10 * vi + 1)
                truth = sitk.GetArrayFromImage(v_gt) > 0
                given = _case(detector, v_img, v_mask, truth)
                auto_mask = compute_brain_mask(v_img)  # what the detector computes when it is given no mask
                auto = _case(detector, v_img, auto_mask, truth)
                row = {"subject": subject, "variant": variant, "case": name, "threshold": threshold,
                       "given": given, "auto": auto,
                       "mask_dice": float(dice(sitk.GetArrayViewFromImage(auto_mask) > 0,
                                               sitk.GetArrayViewFromImage(v_mask) > 0))}
                rows.append(row)
                print(f"{subject} | {variant} | {name}: given {given}, auto {auto}, mask Dice {row['mask_dice']:.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    text = render(rows, variants)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"rate": rate, "rows": rows}, indent=1))
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


def render(rows: List[dict], variants: List[str]) -> str:
    """One table row per variant: healthy ml / components (mean, max over subjects) and the lesion cases' mean Dice
    at the operating point, given mask → automatic mask; the automatic mask's mean Dice."""
    lines = ["| variant | healthy ml, given → auto (mean / max) | healthy components, given → auto (mean / max) | "
             "Dice @ op, given → auto (mean over lesion cases) | automatic mask Dice (mean / min) |",
             "|---|---|---|---|---|"]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        healthy = [r for r in mine if r["case"] == "healthy"]
        lesion = [r for r in mine if r["case"] != "healthy"]

        def spread(values: List[float], fmt: str) -> str:
            return f"{np.mean(values):{fmt}} / {np.max(values):{fmt}}"

        ml: Dict[str, str] = {k: spread([r[k]["flagged_ml"] for r in healthy], ".2f") for k in ("given", "auto")}
        comp = {k: spread([r[k]["components"] for r in healthy], ".1f") for k in ("given", "auto")}
        dices = {k: f"{np.mean([r[k]['dice'] for r in lesion]):.3f}" for k in ("given", "auto")}
        masks = [r["mask_dice"] for r in mine]
        lines.append(f"| {variant} | {ml['given']} → {ml['auto']} | {comp['given']} → {comp['auto']} | "
                     f"{dices['given']} → {dices['auto']} | {np.mean(masks):.3f} / {np.min(masks):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
