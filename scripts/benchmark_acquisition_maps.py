"""Stage 1 of the acquisition benchmark: cache the maps of every held-out case in every acquisition variant.

For each healthy subject S (held out in turn) and the model trained without S
(``runs/benchmark/cevae/without-S.cevae`` from ``scripts/benchmark_train.py``): S itself and one case per
lesion recipe (mixed, low contrast, across the midline, several small, moved tissue; fixed seeds), inserted into the
clean scan, then degraded with its mask and ground truth into each acquisition variant
(``CeVAEAnomalyResearch.acquisition.VARIANTS``). Each variant volume goes through the model's
:class:`Detector` once without post-processing (the raw map and the slice ELBOs); the default
post-processing chain is then applied with the detector's own steps on the detector's region. Cached per
case, on that region: the default final map, the raw map and its mirror image about the detector's
mid-sagittal plane, the scaled intensities and their mirror image, the brain and its mirror, the ground
truth and the slice scores; so the post-processing levers can be re-evaluated without the network. Moved-tissue
cases also keep the ceVAE's reconstruction error and KL gradient maps on their own (``rec``, ``grad``); with
``--restoration`` every case keeps the restoration error (``restore``, ``CeVAEAnomalyResearch.restoration``).
With ``--orientations`` the raw map is the mean of the maps of the volume sliced in each orientation (for
fold models trained on those orientations: ``train --orientations``); the slice scores stay axial, and the
axial map alone is kept too (``combi_axial``, with its mirror image).

    python scripts/benchmark_acquisition_maps.py [--out runs/acquisition] [--variants clean,thick]
    [--check]   # also run the full default Detector on each variant's first case and record the agreement
    [--test-time-steps 100]   # the thorough mode (each volume scored by a copy of the model adapted to it)
    [--restoration 0.1]   # also cache the restoration error with this L1 weight
    [--orientations axial,coronal,sagittal]   # three-orientation fusion of the raw map
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.postprocess import refine_reach
from CeVAEAnomalyLib.engine.preprocess import Region, brain_region, invert_region, prepare, region_image
from CeVAEAnomalyLib.engine.scoring import gaussian_blur, pixel_map
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import atomic_path
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.options import PostprocessOptions, ThresholdPolicy, parse_orientations
from CeVAEAnomalyResearch.acquisition import VARIANTS, derive
from CeVAEAnomalyResearch.lesions import insert_lesions
from CeVAEAnomalyResearch.restoration import restoration_change

SUBJECTS = ("colin27", "mni152", "robex")
# the benchmark's further heads (CeVAEAnomalyResearch.sampledata.EXTRA_NAMES, the shipped model never saw them): their
# seeds follow the three subjects'
SEED_ORDER = SUBJECTS + ("cortex_s1", "brainbrowser1", "brainbrowser2")
NON_MOVED = ("hypo", "hyper", "ring", "texture", "shift")
# name -> (lesion count range, insert_lesions keyword arguments)
RECIPES: Dict[str, Tuple[Tuple[int, int], dict]] = {
    "mixed": ((1, 3), dict(kinds=NON_MOVED, radius_mm=(4.0, 15.0), sites=("any", "cortex", "ventricles"))),
    "low contrast": ((1, 3), dict(kinds=("hypo", "hyper", "ring", "shift"), radius_mm=(5.0, 15.0), strength=(0.3, 0.6),
                                  contrast_sd=(0.5, 1.0))),
    "midline": ((1, 2), dict(kinds=NON_MOVED, radius_mm=(5.0, 15.0), sites=("midline",))),
    "several small": ((5, 8), dict(kinds=("hypo", "hyper", "ring", "shift"), radius_mm=(2.5, 5.0))),
    # normal intensities, wrong structure: what intensity and symmetry cannot see (rec and grad cached too)
    "moved tissue": ((1, 2), dict(kinds=("moved",), radius_mm=(8.0, 15.0))),
}
TERMS_RECIPES = ("moved tissue",)


def lesion_case(image: sitk.Image, mask: sitk.Image, recipe: str, seed: int):
    """One lesion case of ``recipe`` (fewer lesions when the brain has no room for that many)."""
    (low, high), kwargs = RECIPES[recipe]
    rng = np.random.default_rng(seed)
    n = int(rng.integers(low, high + 1))
    while True:
        try:
            return insert_lesions(image, mask, rng, n=n, min_separation_mm=5.0, **kwargs)
        except CeVAEError:
            n -= 1


def orientation_mean(detector: Detector, image: sitk.Image, brain: np.ndarray, region: Region,
                     orientations: Sequence[str], axial: Optional[np.ndarray] = None) -> np.ndarray:
    """The detector's raw map (its scoring, no post-processing) on ``region``, averaged over the volume sliced
    in each of ``orientations`` (``axial``: that map of the axial slicing, when the detector made it already)."""
    total = np.zeros(tuple(r.stop - r.start for r in region), np.float32)
    for orientation in orientations:
        if orientation == "axial" and axial is not None:
            total += axial
            continue
        stack = prepare(image, brain, detector.bundle.preprocess, orientation)
        raw = detector._network(detector.bundle.model, stack, [detector.score], None)
        total += invert_region(stack.record, pixel_map(raw, detector.score), region)
    return total / len(orientations)


def cache_case(path: Path, image: sitk.Image, mask: sitk.Image, gt: sitk.Image, raw_detector: Detector,
               default: Detector, meta: dict, terms: bool = False, restoration: Optional[float] = None,
               orientations: Sequence[str] = ("axial",)) -> None:
    """Cache one case on the default detector's region (``terms``: also the rec and grad maps;
    ``restoration``: also the restoration error with this L1 weight, blurred as the reconstruction error is;
    ``orientations``: the raw map averaged over these slice orientations)."""
    t0 = time.perf_counter()
    res = raw_detector(image, mask)
    brain = sitk.GetArrayViewFromImage(res.brain_mask) > 0
    region = brain_region(brain, refine_reach(default.post, image.GetSpacing()) + 1)
    inside = brain[region].copy()
    combi = sitk.GetArrayFromImage(res.score)[region].astype(np.float32)  # the detector slices axially
    axial = None
    if tuple(orientations) != ("axial",):
        axial = combi  # kept on its own: the same model's single-orientation map, as the detector makes it
        combi = orientation_mean(raw_detector, image, brain, region, orientations, axial=combi)
    t_net = time.perf_counter() - t0
    asym = default._asymmetry(image, inside, region)
    final = default._refine(combi.copy(), inside, image, region, asym)  # the detector's own post-processing chain
    values = sitk.GetArrayViewFromImage(image)[region][inside].astype(np.float32)
    lo, hi = np.percentile(values, [1, 99])
    scaled = np.zeros(inside.shape, np.float32)
    scaled[inside] = np.clip((values - lo) / max(float(hi - lo), 1e-6), 0, 1.5)

    def mirrored(arr: np.ndarray, nearest: bool = False) -> np.ndarray:
        img = region_image(arr, image, region)
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        return sitk.GetArrayFromImage(sitk.Resample(img, img, asym.reflection, interp, 0.0, img.GetPixelID()))

    extra = {} if axial is None else {"combi_axial": axial, "combi_axial_m": mirrored(axial).astype(np.float16)}
    if terms:  # the ceVAE's two terms on their own (one more network pass), scattered onto the region's brain
        for name, vals in raw_detector.brain_scores(image, mask, ("rec", "grad")).items():
            arr = np.zeros(inside.shape, np.float32)
            arr[inside] = vals
            extra[name] = arr
    if restoration is not None:
        stack, _ = raw_detector._prepare(image, mask, None)
        bundle = raw_detector.bundle
        err = restoration_change(bundle.model, torch.from_numpy(stack.slices), torch.from_numpy(stack.brain),
                                 bundle.header.loss.beta, weight=restoration).abs()
        extra["restore"] = invert_region(stack.record, gaussian_blur(err, raw_detector.score.rec_sigma)[:, 0], region)
    rows = res.slices
    with atomic_path(path) as part:  # a full disk leaves no damaged case under the final name
        np.savez(
            part,
            final=np.asarray(final, np.float32),
            combi=combi,
            combi_m=mirrored(combi).astype(np.float16),
            image=scaled.astype(np.float16),
            image_m=mirrored(scaled).astype(np.float16),
            brain=inside,
            brain_m=mirrored(inside.astype(np.uint8), nearest=True) > 0,
            gt=sitk.GetArrayViewFromImage(gt)[region] > 0,
            spacing=np.array(image.GetSpacing()),
            box_start=np.array([r.start for r in region]),
            slice_axis=np.array(rows[0].axis),
            slice_index=np.array([r.index for r in rows]),
            slice_neg_elbo=np.array([r.neg_elbo for r in rows]),
            seconds=np.array([t_net, time.perf_counter() - t0 - t_net]),
            meta=np.array(json.dumps(meta)),
            **extra,
        )


def check_case(image: sitk.Image, mask: sitk.Image, full: Detector, path: Path) -> dict:
    """The full default Detector on the same volume vs the cached chain: largest map difference."""
    res = full(image, mask)
    with np.load(path) as z:
        start, final = z["box_start"], z["final"]
    region = tuple(slice(int(a), int(a) + n) for a, n in zip(start, final.shape))
    detector_map = sitk.GetArrayViewFromImage(res.score)[region]
    return {"max_abs_difference": float(np.abs(detector_map - final).max()),
            "map_max": float(detector_map.max()), "components": len(res.components)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark/cevae"))
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/acquisition"))
    p.add_argument("--variants", help="comma-separated substrings of variant names (default: all)")
    p.add_argument("--subjects", default=",".join(SUBJECTS))
    p.add_argument("--check", action="store_true", help="compare with the full Detector on each variant's first case")
    p.add_argument("--test-time-steps", type=int, default=0,
                   help="score with test-time adaptation (the thorough mode) of this many steps")
    p.add_argument("--train-subjects", action="store_true",
                   help="only the healthy variants of each model's training subjects (for in-sample calibration)")
    p.add_argument("--restoration", type=float, default=None, metavar="WEIGHT",
                   help="also cache the restoration error with this L1 weight")
    p.add_argument("--orientations", default="axial",
                   help="comma-separated slice orientations whose raw maps are averaged (default: axial)")
    args = p.parse_args()
    orientations = parse_orientations(args.orientations)
    if args.check and orientations != ("axial",):
        p.error("--check compares with the detector, which slices axially: leave it out with --orientations")
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if not args.variants or any(w in v for w in args.variants.split(","))]
    checks = {}
    t0 = time.time()
    for subject in args.subjects.split(","):
        si = SEED_ORDER.index(subject)
        model = args.runs / f"without-{subject}.cevae"
        if not model.exists():
            print(f"skip {subject}: no {model}", flush=True)
            continue
        bundle = load_bundle(model)
        score = bundle.header.score_options.replace(test_time_steps=args.test_time_steps)
        raw = Detector(bundle, score, post=PostprocessOptions(), policy=ThresholdPolicy(threshold=math.inf))
        default = Detector(bundle, score, policy=ThresholdPolicy(threshold=math.inf))
        image = sitk.Cast(read_image(args.data / f"{subject}_t1.nii.gz"), sitk.sitkFloat32)
        mask = read_image(args.data / f"{subject}_brainmask.nii.gz", "brain mask")
        empty = sitk.Cast(mask * 0, sitk.sitkUInt8)
        cases: List[Tuple[str, sitk.Image, sitk.Image, sitk.Image, dict]] = [
            ("healthy", image, mask, empty, {"recipe": "healthy"})]
        if args.train_subjects:
            cases = []
            for other in SUBJECTS:
                if other != subject:
                    img = sitk.Cast(read_image(args.data / f"{other}_t1.nii.gz"), sitk.sitkFloat32)
                    m = read_image(args.data / f"{other}_brainmask.nii.gz", "brain mask")
                    cases.append((f"train-{other}", img, m, sitk.Cast(m * 0, sitk.sitkUInt8), {"recipe": "healthy"}))
        for ri, recipe in enumerate(RECIPES if not args.train_subjects else ()):
            img, gt, lesions = lesion_case(image, mask, recipe, 100 * si + ri)
            cases.append((f"lesion-{recipe.replace(' ', '_')}", img, mask, gt,
                          {"recipe": recipe, "lesions": [[l.kind, round(l.volume_ml, 3)] for l in lesions]}))
        for variant in variants:
            vi = list(VARIANTS).index(variant)
            tag = variant.split(":")[0].replace(" ", "_").replace("%", "pc").replace(",", "")
            for ci, (name, img, m, gt, meta) in enumerate(cases):
                path = args.out / f"{subject}--{tag}--{name}.npz"
                if path.exists():
                    continue
                v_img, v_mask, v_gt = derive(VARIANTS[variant], img, m, gt, seed=1000 * si + 10 * vi + 1)
                cache_case(path, v_img, v_mask, v_gt, raw, default,
                           dict(meta, subject=subject, variant=variant, case=name),
                           terms=meta["recipe"] in TERMS_RECIPES, restoration=args.restoration,
                           orientations=orientations)
                if args.check and ci == 1 and not args.train_subjects:
                    checks[f"{subject} / {variant}"] = check_case(v_img, v_mask, default, path)
                print(f"{path.name} ({time.time() - t0:.0f} s)", flush=True)
    if checks:
        (args.out / f"check-{int(time.time())}.json").write_text(json.dumps(checks, indent=1))
        print(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
