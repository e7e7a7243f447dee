"""Score the previous leave-one-subject-out benchmark (model and scoring ablation) into docs/benchmark_ablation.md.

The current benchmark is scripts/benchmark_quality.py (docs/benchmark.md). This one needs the
models of ``scripts/benchmark_train.py``. For every held-out subject it inserts
synthetic lesions of every kind (fixed seeds), runs ``detect`` with each model variant and
scoring variant, and pools pixel AUROC / AUPRC / best Dice over all cases and folds. It also
runs every model on the held-out healthy subject to measure the flagged volume at the
in-sample calibrated threshold, and the intensity baseline |z| inside the brain.

    python scripts/benchmark_eval.py [--cases-per-kind 2] [--out docs]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibration import calibrate, threshold_for_fpr
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyResearch.evaluate import dice, pooled_metrics, slice_auroc
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyResearch.lesions import LESION_KINDS, insert_lesions
from CeVAEAnomalyLib.engine.calibrate import healthy_scores
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.options import PostprocessOptions, ThresholdPolicy
from CeVAEAnomalyLib.options import PAPER, ScoreOptions

SUBJECTS = ("colin27", "mni152", "robex")
# scoring variants evaluated on the ceVAE (name -> options)
SCORINGS: Dict[str, ScoreOptions] = {
    "rec": ScoreOptions(score_type="rec"),
    "rec (smoothed σ=1)": ScoreOptions(score_type="rec", rec_sigma=1.0),
    "rec (MC, 4 samples)": ScoreOptions(score_type="rec", mc_samples=4),
    "grad: abs(dKL/dx) σ=3, per volume (paper)": ScoreOptions(**dict(PAPER, score_type="grad")),
    "grad: abs(dKL/dx) σ=1, per slice": ScoreOptions(score_type="grad", grad_sigma=1.0, grad_norm="slice"),
    "grad: abs(dELBO/dx) σ=1, per volume": ScoreOptions(score_type="grad", grad_target="elbo", grad_sigma=1.0, grad_norm="volume"),
    "combi: rec × grad (paper)": ScoreOptions(**PAPER),
    "combi: rec × grad, per-slice norm": ScoreOptions(combi="product", grad_sigma=3.0, grad_norm="slice"),
    "combi: rec × abs(dELBO/dx) σ=1": ScoreOptions(combi="product", grad_target="elbo", grad_sigma=1.0, grad_norm="volume"),
    "combi: rec σ=1 × (1 + grad)": ScoreOptions(**dict(PAPER, combi="weighted", alpha=1.0, rec_sigma=1.0)),
    "combi: √(rec σ=1 × abs(dELBO/dx) σ=1)": ScoreOptions(combi="geometric", grad_target="elbo", grad_sigma=1.0, grad_norm="volume", rec_sigma=1.0),
    "combi: rec × grad, no normalisation": ScoreOptions(combi="product", grad_sigma=3.0, grad_norm="none"),
    "combi: attribution (dKL/dx)·(x−x̂) σ=1": ScoreOptions(score_type="combi", combi="attribution", grad_sigma=1.0, grad_norm="none"),
    "combi: attribution (dKL/dx)·(x−x̂) σ=2": ScoreOptions(score_type="combi", combi="attribution", grad_sigma=2.0, grad_norm="none"),
    "combi: attribution (dELBO/dx)·(x−x̂) σ=1": ScoreOptions(score_type="combi", combi="attribution", grad_target="elbo", grad_sigma=1.0, grad_norm="none"),
}
# post-processing chains measured on these scorings
POST_SCORINGS = ("rec (smoothed σ=1)", "combi: rec × grad (paper)", "combi: rec × grad, per-slice norm")
POSTS = {
    "rim 3 mm": PostprocessOptions(rim_mm=3.0),
    "median r=1": PostprocessOptions(median_radius=1),
    "min 50 mm³": PostprocessOptions(min_volume_mm3=50.0),
    "rim 3 mm + median + min 50 mm³": PostprocessOptions(rim_mm=3.0, median_radius=1, min_volume_mm3=50.0),
}
MODEL_SCORINGS = ("rec", "grad: abs(dKL/dx) σ=3, per volume (paper)", "combi: rec × grad (paper)",
                  "combi: rec × grad, per-slice norm")
FPR = 0.001


def zscore_baseline(image: sitk.Image, brain: np.ndarray) -> np.ndarray:
    """|robust z-score| inside the brain: the intensity-only reference."""
    a = sitk.GetArrayViewFromImage(image).astype(np.float32)
    v = a[brain]
    med = np.median(v)
    mad = np.median(np.abs(v - med)) * 1.4826 + 1e-6
    return np.where(brain, np.abs(a - med) / mad, 0).astype(np.float32)


def make_cases(data: Path, subject: str, per_kind: int) -> List[Tuple[str, sitk.Image, np.ndarray]]:
    image = read_image(data / f"{subject}_t1.nii.gz")
    mask = read_image(data / f"{subject}_brainmask.nii.gz", "brain mask")
    cases = []
    for k, kind in enumerate(LESION_KINDS):
        for i in range(per_kind):
            seed = 1000 * SUBJECTS.index(subject) + 10 * k + i
            img, gt, _ = insert_lesions(image, mask, seed, n=2, kinds=(kind,), min_separation_mm=10.0)
            cases.append((f"{subject}-{kind}-{i}", img, sitk.GetArrayFromImage(gt) > 0))
    return cases


class Pool:
    """Brain-voxel scores and labels gathered across cases, per method."""

    def __init__(self) -> None:
        self.data: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {}
        self.slices: Dict[str, List[float]] = {}

    def add(self, method: str, score: np.ndarray, gt: np.ndarray, brain: np.ndarray) -> None:
        self.data.setdefault(method, []).append((score[brain].astype(np.float32), gt[brain]))

    def table(self) -> Dict[str, dict]:
        return {m: pooled_metrics(v) for m, v in self.data.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark"))
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--cases-per-kind", type=int, default=2)
    p.add_argument("--variants", default="cevae,vae,ce,ae")
    p.add_argument("--scorings", help="only the scorings whose names contain one of these comma-separated words")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    variants = [v for v in args.variants.split(",") if (args.runs / v).is_dir()]
    pool, healthy, slice_rows, dices = Pool(), {}, {}, {}
    t0 = time.time()
    for subject in SUBJECTS:
        mask_img = read_image(args.data / f"{subject}_brainmask.nii.gz", "brain mask")
        brain = sitk.GetArrayFromImage(mask_img) > 0
        cases = make_cases(args.data, subject, args.cases_per_kind)
        for name, img, gt in cases:
            pool.add("intensity baseline abs(z)", zscore_baseline(img, brain), gt, brain)
        healthy_img = read_image(args.data / f"{subject}_t1.nii.gz")
        for variant in variants:
            path = args.runs / variant / f"without-{subject}.cevae"
            if not path.exists():
                continue
            bundle = load_bundle(path)
            for method, opts, post in _methods(variant, args.scorings):
                thr = _in_sample_threshold(bundle, opts, post, args.data, subject)
                detect = Detector(bundle, opts, post, ThresholdPolicy(threshold=thr))
                for name, img, gt in cases:
                    res = detect(img, mask_img)
                    pool.add(method, sitk.GetArrayViewFromImage(res.score), gt, brain)
                    lab = sitk.GetArrayViewFromImage(res.labelmap) > 0
                    dices.setdefault(method, []).append(dice(lab & brain, gt & brain))
                    lesion_slices = gt.any(axis=(1, 2))  # slices along K (all subjects are axial)
                    # the slices the model scored only: slices without brain, given 0, ranked below every scored one
                    ne = np.array([r.neg_elbo for r in res.slices])
                    slice_rows.setdefault(method, []).append((ne, lesion_slices[[r.index for r in res.slices]]))
                # the held-out healthy subject at the in-sample calibrated threshold
                res = detect(healthy_img, mask_img)
                sc = sitk.GetArrayViewFromImage(res.score)[brain]
                healthy.setdefault(method, []).append(
                    {"subject": subject, "fpr": float((sc > thr).mean()), "flagged_ml": res.flagged_ml,
                     "threshold_for_target": float(np.quantile(sc, 1 - FPR)), "threshold": thr})
        print(f"{subject} done ({time.time() - t0:.0f} s)", flush=True)
    results = pool.table()
    for method, rows in slice_rows.items():
        s = np.concatenate([r[0] for r in rows])
        lab = np.concatenate([r[1] for r in rows])
        results[method]["slice_auroc"] = slice_auroc(s, lab)
    for method, values in dices.items():
        results[method]["dice_at_threshold"] = float(np.mean(values))
    for method, rows in healthy.items():
        results[method]["healthy_fpr"] = float(np.mean([r["fpr"] for r in rows]))
        results[method]["healthy_flagged_ml"] = float(np.mean([r["flagged_ml"] for r in rows]))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "benchmark_results.json", json.dumps({"results": results, "healthy": healthy}, indent=1))
    atomic_write_text(args.out / "benchmark_ablation.md", render(results, args))
    print(render(results, args))


_CALIB_CACHE: Dict[Tuple[str, str], float] = {}


def _methods(variant: str, scorings: Optional[str]) -> List[Tuple[str, ScoreOptions, PostprocessOptions]]:
    """(name, scoring, post-processing) to evaluate for one model variant."""
    names = list(SCORINGS) if variant == "cevae" else list(MODEL_SCORINGS)
    if scorings:
        names = [k for k in names if any(w in k for w in scorings.split(","))]
    out = [(f"{variant} · {k}", SCORINGS[k], PostprocessOptions()) for k in names]
    if variant == "cevae":
        out += [(f"{variant} · {b} + {k}", SCORINGS[b], post)
                for b in POST_SCORINGS if b in names for k, post in POSTS.items()]
    return out


def _in_sample_threshold(bundle, opts: ScoreOptions, post: PostprocessOptions, data: Path, held_out: str) -> float:
    """Threshold at FPR on the model's own training subjects (what a bundle's calibration stores)."""
    key = (str(bundle.path), json.dumps([opts.to_dict(), post.to_dict()], sort_keys=True))
    if key not in _CALIB_CACHE:
        training = [Subject(data / f"{s}_t1.nii.gz", data / f"{s}_brainmask.nii.gz") for s in SUBJECTS if s != held_out]
        values = healthy_scores(bundle, training, opts, post)
        _CALIB_CACHE[key] = threshold_for_fpr(calibrate(values, "training"), FPR)
    return _CALIB_CACHE[key]


def render(results: Dict[str, dict], args) -> str:
    lines = [
        "# Synthetic-lesion benchmark (leave one subject out)",
        "",
        f"Produced by `python scripts/benchmark_train.py && python scripts/benchmark_eval.py` "
        f"({args.cases_per_kind} cases per lesion kind per held-out subject, 2 lesions each, "
        f"kinds: {', '.join(LESION_KINDS)}; radius 3–15 mm; every model tested only on the subject it did not see).",
        "Pixel metrics pooled over all brain voxels of all cases and folds. Slice AUROC: negative ELBO per axial slice "
        "vs lesion present. Healthy FPR / flagged ml: the held-out healthy subject at the threshold calibrated "
        f"on the model's training subjects for a target FPR of {FPR:g} (flagged ml after post-processing). "
        "Dice at threshold: mean over lesion cases at that threshold.",
        "",
        "| method | AUROC | AUPRC | best Dice | Dice at threshold | slice AUROC | healthy FPR | healthy flagged ml |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        lines.append(
            f"| {m} | {r['auroc']:.3f} | {r['auprc']:.3f} | {r['best_dice']:.3f} | "
            f"{r.get('dice_at_threshold', float('nan')):.3f} | "
            f"{r.get('slice_auroc', float('nan')):.3f} | {r.get('healthy_fpr', float('nan')):.4f} | "
            f"{r.get('healthy_flagged_ml', float('nan')):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
