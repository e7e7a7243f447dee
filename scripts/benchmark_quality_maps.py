"""Stage 1 of the subject-held-out quality benchmark: cache every case's raw maps.

For each healthy subject S (held out in turn) it uses the model trained without S
(``runs/benchmark/cevae/without-S.cevae`` from ``scripts/benchmark_train.py``) on:
- S itself (healthy, never seen by the model),
- ``--cases`` synthetic-lesion versions of S (fixed seeds; 1-5 lesions, radius 2-20 mm, all six kinds,
  at any place, next to the cortex or next to the ventricles),
- the model's two training subjects (for the in-sample calibration a bundle stores today).
Per volume it stores, cropped to the brain's box: scaled intensities and their mirror image about the
estimated mid-sagittal plane, the brain mask and its mirror, the ground truth, the raw (not
post-processed) combi and rec maps and the combi map's mirror, and the slice scores (KL, negative ELBO).

    python scripts/benchmark_quality_maps.py [--cases 10] [--out runs/quality] [--orientations axial,coronal,sagittal]
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import atomic_path
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyResearch.lesions import LESION_KINDS, insert_lesions
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions, ThresholdPolicy
from CeVAEAnomalyLib.engine.symmetry import estimate_midplane, mirror

SUBJECTS = ("colin27", "mni152", "robex")
# this benchmark's sites (fixed: the library's later "midline" site would redraw every case; lesions across the
# midline have their own recipe in scripts/benchmark_acquisition_maps.py)
SITES = ("any", "cortex", "ventricles")
RADIUS_MM = (2.0, 20.0)
CONTRAST_SD = (0.5, 3.0)


def lesion_case(image: sitk.Image, mask: sitk.Image, seed: int):
    """One benchmark case: 1-5 lesions of every kind and site, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    while True:
        try:
            return insert_lesions(image, mask, rng, n=n, kinds=LESION_KINDS, radius_mm=RADIUS_MM,
                                  min_separation_mm=5.0, contrast_sd=CONTRAST_SD, sites=SITES)
        except CeVAEError:  # no room for that many large lesions: one fewer
            n -= 1


def scaled(arr: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Intensities scaled by the brain's 1st-99th percentiles, clipped to [0, 1.5] (as the model sees them)."""
    lo, hi = np.percentile(arr[brain], [1, 99])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1.5).astype(np.float32)


def cache_volume(path: Path, image: sitk.Image, mask: sitk.Image, gt: np.ndarray, bundle,
                 orientations: str = "axial") -> None:
    """Cache one volume's maps (``orientations``: each map the mean over these slicings, as the detector's)."""
    t0 = time.perf_counter()
    image = sitk.Cast(image, sitk.sitkFloat32)
    none = PostprocessOptions()
    maps, slices = {}, None
    for name, opts in (("combi", ScoreOptions(orientations=orientations)),
                       ("rec", ScoreOptions(score_type="rec", orientations=orientations))):
        res = Detector(bundle, opts, none, ThresholdPolicy(threshold=float("inf")))(image, mask)
        maps[name] = res.score
        if slices is None:
            slices = res.slices
    t_net = time.perf_counter() - t0
    t0 = time.perf_counter()
    plane = estimate_midplane(image, mask)
    t_plane = time.perf_counter() - t0
    arr = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayFromImage(mask) > 0
    norm = sitk.GetImageFromArray(np.where(brain, scaled(arr, brain), 0).astype(np.float32))
    norm.CopyInformation(image)
    mirrored = {
        "image_m": sitk.GetArrayFromImage(mirror(norm, plane)),
        "brain_m": sitk.GetArrayFromImage(mirror(sitk.Cast(mask > 0, sitk.sitkUInt8), plane, sitk.sitkNearestNeighbor)) > 0,
        "combi_m": sitk.GetArrayFromImage(mirror(maps["combi"], plane)),
        "rec_m": sitk.GetArrayFromImage(mirror(maps["rec"], plane)),
    }
    box = tuple(slice(max(0, a.min() - 2), a.max() + 3) for a in np.nonzero(brain))
    out = {
        "image": sitk.GetArrayFromImage(norm)[box].astype(np.float16),
        "brain": brain[box],
        "gt": gt[box],
        "combi": sitk.GetArrayFromImage(maps["combi"])[box],
        "rec": sitk.GetArrayFromImage(maps["rec"])[box],
        "image_m": mirrored["image_m"][box].astype(np.float16),
        "brain_m": mirrored["brain_m"][box],
        "combi_m": mirrored["combi_m"][box],
        "rec_m": mirrored["rec_m"][box],
        "spacing": np.array(image.GetSpacing()),
        "box_start": np.array([b.start for b in box]),
        "slice_axis": np.array(slices[0].axis),
        "slice_index": np.array([r.index for r in slices]),
        "slice_kl": np.array([r.kl for r in slices]),
        "slice_neg_elbo": np.array([r.neg_elbo for r in slices]),
        "plane": np.array([*plane.normal, plane.offset]),
        "seconds": np.array([t_net / 2, t_plane]),
    }
    with atomic_path(path) as part:  # a killed run leaves no damaged case under the final name (it is skipped)
        np.savez(part, **out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark/cevae"))
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--orientations", default="axial",
                   help="comma-separated slice orientations whose maps are averaged (models trained on them)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for si, subject in enumerate(SUBJECTS):
        model = args.runs / f"without-{subject}.cevae"
        if not model.exists():
            print(f"skip {subject}: no {model}")
            continue
        bundle = load_bundle(model)
        image = read_image(args.data / f"{subject}_t1.nii.gz")
        mask = read_image(args.data / f"{subject}_brainmask.nii.gz", "brain mask")
        empty = np.zeros(sitk.GetArrayViewFromImage(mask).shape, bool)
        jobs = [(f"{subject}-healthy", lambda: (image, empty))]
        for i in range(args.cases):
            def make(i=i):
                img, gt, _ = lesion_case(image, mask, 1000 * si + i)
                return img, sitk.GetArrayFromImage(gt) > 0
            jobs.append((f"{subject}-lesion{i:02d}", make))
        for other in SUBJECTS:
            if other != subject:
                def train_subject(other=other):
                    img = read_image(args.data / f"{other}_t1.nii.gz")
                    return img, np.zeros(img.GetSize()[::-1], bool)
                jobs.append((f"{subject}-train-{other}", train_subject))
        for name, make in jobs:
            path = args.out / f"{name}.npz"
            if path.exists():
                continue
            img, gt = make()
            m = mask if "-train-" not in name else read_image(args.data / f"{name.split('-train-')[1]}_brainmask.nii.gz", "brain mask")
            cache_volume(path, img, m, gt, bundle, args.orientations)
            print(f"{name} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
