"""A probe of the intensity scaling's upper anchor on post-contrast scans (docs/benchmark.md, *The intensity scaling's
upper anchor on post-contrast scans*).

The model's slices and the asymmetry scale a brain's intensities by its 1st and 99th percentiles. Enhancing vessels,
dura, sinuses and choroid plexus lift the 99th percentile of a post-contrast scan by 15-24 % (the acquisition
benchmark's simulation), so every tissue reaches the network darker than in training. This probe replaces the upper
anchor by p1 + k (p95 - p1), with k the median of (p99 - p1) / (p95 - p1) over the shipped model's three training
scans (what p99 is on a clean scan), at inference only: the shipped model, its bundled calibration, on the heads it
never saw (``scripts/fetch_data.py DEST --names cortex_s1 brainbrowser1``), the benchmark's lesion recipes and seeds
(``benchmark_acquisition_maps.lesion_case``) in the clean, post-contrast and clinical variants.

    python scripts/benchmark_intensity_anchor.py --heads DEST     # ~4 min on 2 cores

For the probe the anchor is swapped into ``preprocess.robust_range`` and ``symmetry._unit_scaled`` at run time; the
library is unchanged. Prints one row per variant and anchor.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CeVAEAnomaly"))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_acquisition_maps import RECIPES, SEED_ORDER, lesion_case  # noqa: E402
from CeVAEAnomalyLib.data import default_model_path  # noqa: E402
from CeVAEAnomalyLib.engine import preprocess, symmetry  # noqa: E402
from CeVAEAnomalyLib.engine.bundle import load_bundle  # noqa: E402
from CeVAEAnomalyLib.engine.detector import Detector  # noqa: E402
from CeVAEAnomalyResearch.acquisition import VARIANTS, derive  # noqa: E402
from CeVAEAnomalyResearch.sampledata import ensure_healthy_data  # noqa: E402

TRAINING = ("colin27", "mni152", "robex")
HEADS = ("cortex_s1", "brainbrowser1")
SHOWN = ("clean", "post-contrast", "clinical: post-contrast, 6.5 mm, noise 3 %")
LESION_RECIPES = ("mixed", "low contrast", "midline", "several small")
PLAIN = (preprocess.robust_range, symmetry._unit_scaled)


def read(folder: Path, name: str) -> Tuple[sitk.Image, sitk.Image]:
    return (sitk.ReadImage(str(folder / f"{name}_t1.nii.gz"), sitk.sitkFloat32),
            sitk.ReadImage(str(folder / f"{name}_brainmask.nii.gz")))


def span_ratio(image: sitk.Image, mask: sitk.Image) -> float:
    """(p99 - p1) / (p95 - p1) of the brain's intensities."""
    p1, p95, p99 = np.percentile(sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) > 0], [1, 95, 99])
    return float((p99 - p1) / (p95 - p1))


def use_anchor(k: float) -> None:
    """Scale by p1 and p1 + k (p95 - p1) instead of p1 and p99 (k 0: the library's own scaling)."""
    if k == 0:
        preprocess.robust_range, symmetry._unit_scaled = PLAIN
        return

    def robust_range(values: np.ndarray, cfg) -> Tuple[float, float]:
        lo, p95 = (float(v) for v in np.percentile(values[:: max(1, values.size // 200000)], [1, 95]))
        return lo, lo + k * (p95 - lo)

    def unit_scaled(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float32, copy=False)
        lo, p95 = np.percentile(values, [1, 95])
        return np.clip((values - lo) / float(k * (p95 - lo)), 0, 1.5).astype(np.float32, copy=False)

    preprocess.robust_range, symmetry._unit_scaled = robust_range, unit_scaled


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = truth[order]
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision * hits).sum() / hits.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=Path, required=True,
                   help="folder with cortex_s1 and brainbrowser1 (_t1, _brainmask)")
    args = p.parse_args()
    training = ensure_healthy_data()
    k = float(np.median([span_ratio(*read(training, n)) for n in TRAINING]))
    print(f"k = {k:.3f} (median (p99 - p1) / (p95 - p1) of the training scans)")
    detector = Detector.from_request(load_bundle(default_model_path()), None)
    names = list(VARIANTS)
    figures: Dict[Tuple[str, str], Dict[str, List]] = {}
    for head in HEADS:
        si = SEED_ORDER.index(head)
        image, mask = read(args.heads, head)
        empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(image)
        cases = [(image, empty)] + [lesion_case(image, mask, r, 100 * si + list(RECIPES).index(r))[:2]
                                    for r in LESION_RECIPES]
        for variant in SHOWN:
            vi = names.index(variant)
            for img, truth in cases:
                v_img, v_mask, v_truth = derive(VARIANTS[variant], img, mask, truth, seed=1000 * si + 10 * vi + 1)
                for anchor in ("p99", "anchor"):
                    use_anchor(k if anchor == "anchor" else 0)
                    result = detector(v_img, v_mask)
                    score = sitk.GetArrayViewFromImage(result.score)
                    label = sitk.GetArrayViewFromImage(result.labelmap) > 0
                    brain = sitk.GetArrayViewFromImage(result.brain_mask) > 0
                    gt = sitk.GetArrayViewFromImage(v_truth) > 0
                    f = figures.setdefault((variant, anchor), dict(scores=[], truth=[], dice=[], healthy=[]))
                    if gt.any():
                        f["scores"].append(score[brain].copy())
                        f["truth"].append(gt[brain].copy())
                        f["dice"].append(2 * (label & gt).sum() / (label.sum() + gt.sum()))
                    else:
                        ml = label.sum() * np.prod(v_img.GetSpacing()) / 1000
                        f["healthy"].append(f"{ml:.2f} ml / {len(result.components)}")
    use_anchor(0)
    print("| variant | upper anchor | pooled AUPRC | Dice @ op (mean) | healthy scans (ml / components) |")
    print("|---|---|---|---|---|")
    for (variant, anchor), f in figures.items():
        auprc = average_precision(np.concatenate(f["scores"]), np.concatenate(f["truth"]))
        print(f"| {variant} | {anchor} | {auprc:.3f} | {np.mean(f['dice']):.3f} | {'; '.join(f['healthy'])} |")


if __name__ == "__main__":
    main()
