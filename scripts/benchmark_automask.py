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
Dice against the reference. The automatic mask is the one the detector scores (``SCORED_MARGIN_MM``); ``--margins``
adds it at other margins (e.g. 2, ``MARGIN_MM``, the mask of ``compute_brain_mask``'s default), ``--erode`` the
detector's eroded by these radii (mm, a ball on the scan's grid): candidates against its rim of non-brain tissue.
Every row also records, for each mask, the share of the flagged volume outside the reference mask.

    python scripts/benchmark_automask.py [--runs runs/benchmark-3o/cevae] [--variants clean,clinical]
        [--recipes mixed,low contrast] [--margins 2] [--erode 3,5] [--out docs/benchmark_automask]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.brainmask import SCORED_MARGIN_MM, compute_brain_mask
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


def _case(detector: Detector, image: sitk.Image, mask: sitk.Image, gt: np.ndarray, reference: np.ndarray) -> dict:
    result = detector(image, mask)
    flagged = sitk.GetArrayViewFromImage(result.labelmap) > 0
    row = {"flagged_ml": float(result.flagged_ml), "components": len(result.components),
           "outside_reference": float(np.mean(~reference[flagged])) if flagged.any() else 0.0}
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
    p.add_argument("--margins", default="", help="comma-separated margins (mm) of other automatic masks to add")
    p.add_argument("--erode", default="", help="comma-separated radii (mm) of eroded automatic masks to add")
    p.add_argument("--out", type=Path, default=Path("docs/benchmark_automask"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    parts = [part.strip() for part in args.variants.split(",")] if args.variants else []
    variants = [v for v in VARIANTS if any(part in v for part in parts)] if parts else list(DEFAULT_VARIANTS)
    recipes = [r.strip() for r in args.recipes.split(",")]
    radii = [float(r) for r in args.erode.split(",") if r.strip()]
    margins = [float(m) for m in args.margins.split(",") if m.strip()]
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
                reference = sitk.GetArrayFromImage(v_mask) > 0
                auto_mask = compute_brain_mask(v_img, margin_mm=SCORED_MARGIN_MM)  # what the detector computes
                row = {"subject": subject, "variant": variant, "case": name, "threshold": threshold,
                       "given": _case(detector, v_img, v_mask, truth, reference),
                       "auto": _case(detector, v_img, auto_mask, truth, reference),
                       "mask_dice": float(dice(sitk.GetArrayViewFromImage(auto_mask) > 0, reference))}
                for margin in margins:
                    other = compute_brain_mask(v_img, margin_mm=margin)
                    row[f"auto margin {margin:g} mm"] = _case(detector, v_img, other, truth, reference)
                    row[f"mask_dice margin {margin:g} mm"] = float(dice(sitk.GetArrayViewFromImage(other) > 0,
                                                                        reference))
                for radius in radii:
                    eroded = _eroded(auto_mask, radius)
                    row[f"auto eroded {radius:g} mm"] = _case(detector, v_img, eroded, truth, reference)
                rows.append(row)
                print(f"{subject} | {variant} | {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                      if isinstance(v, dict)) + f", mask Dice {row['mask_dice']:.3f} ({time.time() - t0:.0f} s)",
                      flush=True)
    others = [f"auto margin {m:g} mm" for m in margins] + [f"auto eroded {r:g} mm" for r in radii]
    text = render(rows, variants, others)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"rate": rate, "rows": rows}, indent=1))
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


def _eroded(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """``mask`` eroded by a ball of ``radius_mm`` on its own grid (no erosion along an axis whose spacing is more than
    twice the radius)."""
    radius = [int(round(radius_mm / s)) for s in mask.GetSpacing()]
    return sitk.BinaryErode(sitk.Cast(mask > 0, sitk.sitkUInt8), radius, sitk.sitkBall, 0, 1)


def _cases(rows: List[dict], variant: str) -> Tuple[List[dict], List[dict], List[dict]]:
    """The variant's rows: all, the healthy scans', the lesion cases'."""
    mine = [r for r in rows if r["variant"] == variant]
    return mine, [r for r in mine if r["case"] == "healthy"], [r for r in mine if r["case"] != "healthy"]


def _spread(values: List[float], fmt: str) -> str:
    return f"{np.mean(values):{fmt}} / {np.max(values):{fmt}}"


def render(rows: List[dict], variants: List[str], others: List[str]) -> str:
    """One table row per variant: healthy ml / components (mean, max over subjects) and the lesion cases' mean Dice
    at the operating point, given mask → automatic mask; the automatic mask's mean Dice. With ``others`` (other
    automatic masks), a second table: the same figures for each mask."""
    lines = ["| variant | healthy ml, given → auto (mean / max) | healthy components, given → auto (mean / max) | "
             "Dice @ op, given → auto (mean over lesion cases) | automatic mask Dice (mean / min) |",
             "|---|---|---|---|---|"]
    for variant in variants:
        mine, healthy, lesion = _cases(rows, variant)
        ml = {k: _spread([r[k]["flagged_ml"] for r in healthy], ".2f") for k in ("given", "auto")}
        comp = {k: _spread([r[k]["components"] for r in healthy], ".1f") for k in ("given", "auto")}
        dices = {k: f"{np.mean([r[k]['dice'] for r in lesion]):.3f}" for k in ("given", "auto")}
        masks = [r["mask_dice"] for r in mine]
        lines.append(f"| {variant} | {ml['given']} → {ml['auto']} | {comp['given']} → {comp['auto']} | "
                     f"{dices['given']} → {dices['auto']} | {np.mean(masks):.3f} / {np.min(masks):.3f} |")
    if others:
        lines += ["", "| variant | mask | healthy ml (mean / max) | healthy components (mean / max) | "
                  "flagged outside the reference (healthy, mean) | Dice @ op (lesion cases) |",
                  "|---|---|---|---|---|---|"]
        for variant in variants:
            _, healthy, lesion = _cases(rows, variant)
            for key in ("given", "auto", *others):
                lines.append(f"| {variant} | {key} | {_spread([r[key]['flagged_ml'] for r in healthy], '.2f')} | "
                             f"{_spread([r[key]['components'] for r in healthy], '.1f')} | "
                             f"{np.mean([r[key]['outside_reference'] for r in healthy]):.2f} | "
                             f"{np.mean([r[key]['dice'] for r in lesion]):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
