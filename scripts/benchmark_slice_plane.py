"""Thick slices in another plane: does a threshold calibrated on 5 mm scans of one plane hold on another plane's?

Each head (``<name>_t1.nii.gz`` and ``<name>_brainmask.nii.gz`` in one of the ``--data`` folders) is slab-averaged
to 5 mm slices (float32, ``CeVAEAnomalyResearch.acquisition.slab_average``) along the index axis closest to each
physical axis: axial (superior-inferior), coronal (anterior-posterior), sagittal (left-right). Its brain mask goes
through the same averaging and is kept where at least half of a voxel was brain. Each volume is scored by the
shipped default (bundled model, default scoring and post-processing) with that mask, and its brain-voxel scores are
cached in ``--out`` (``<name>--<plane>.npy``; a rerun scores only the missing volumes).

Leave one head out: for each held-out head H, plane C (calibration) and plane T (test), the threshold is the pooled
quantile (as ``calibrate`` makes it) of the *other* heads' plane-C scores at the rate, and the table gives H's
plane-T false-positive rate at it, as a multiple of the rate. C = T is a site calibrated on the scans it detects;
C ≠ T one calibrated on another plane; C = the heads as stored (1-1.5 mm), for comparison, one the code already
warns of (``acquisition_difference``). The code calls a healthy scan unlike its calibration above
``UNLIKE_FACTOR`` times the rate (engine/calibration.py).

    python scripts/benchmark_slice_plane.py --data /tmp/heads /work/shared/data/healthy [--out runs/slice_plane]
        [--names cortex_s1,brainbrowser1,colin27,robex] [--fpr 0.000218,0.001]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibration import UNLIKE_FACTOR
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyResearch.acquisition import slab_average

PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}  # plane -> the physical (LPS) axis its slices are thick along
ORIGINAL = "original"  # the head as stored (1-1.5 mm): a calibration the code already tells 5 mm scans apart from
THICKNESS_MM = 5.0
Scores = Dict[Tuple[str, str], np.ndarray]


def slab_axis(image: sitk.Image, physical: int) -> int:
    """The SimpleITK index axis closest to the physical LPS axis ``physical``."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[physical])))


def thick(image: sitk.Image, mask: sitk.Image, plane: str) -> Tuple[sitk.Image, sitk.Image]:
    """``image`` and its brain ``mask`` in 5 mm slices of ``plane`` (the mask: voxels at least half brain;
    :data:`ORIGINAL`: both as they are)."""
    if plane == ORIGINAL:
        return image, mask
    axis = slab_axis(image, PLANES[plane])
    fraction = slab_average(sitk.Cast(mask > 0, sitk.sitkFloat32), axis, THICKNESS_MM)
    return slab_average(image, axis, THICKNESS_MM), sitk.Cast(fraction >= 0.5, sitk.sitkUInt8)


def head_files(data: Sequence[Path], name: str) -> Tuple[Path, Path]:
    """The head's scan and brain mask, from the first ``data`` folder that has both."""
    for folder in data:
        image, mask = folder / f"{name}_t1.nii.gz", folder / f"{name}_brainmask.nii.gz"
        if image.exists() and mask.exists():
            return image, mask
    raise SystemExit(f"No {name}_t1.nii.gz with its {name}_brainmask.nii.gz in {', '.join(map(str, data))}.")


def brain_scores(detector: Detector, image: sitk.Image, mask: sitk.Image) -> np.ndarray:
    """The shipped default's final score map of ``image`` at its brain voxels (float32)."""
    terms = detector.terms(image, mask)
    inside = sitk.GetArrayViewFromImage(terms.brain_mask) > 0
    return sitk.GetArrayViewFromImage(terms.score)[inside].astype(np.float32)


def measure(data: Sequence[Path], out: Path, names: Sequence[str]) -> Scores:
    """Every head's brain-voxel scores in every plane and as stored, cached in ``out``."""
    detector = None
    scores: Scores = {}
    for name in names:
        for plane in (*PLANES, ORIGINAL):
            path = out / f"{name}--{plane}.npy"
            if not path.exists():
                detector = detector or Detector(load_bundle(default_model_path()))
                image_path, mask_path = head_files(data, name)
                image, mask = thick(read_image(image_path), read_image(mask_path, "brain mask"), plane)
                np.save(path, brain_scores(detector, image, mask))
                print(f"scored {name} {plane}", flush=True)
            scores[name, plane] = np.load(path)
    return scores


def held_out_rate(scores: Scores, head: str, calibration: str, test: str, fpr: float) -> float:
    """``head``'s ``test``-plane false-positive rate at the threshold the other heads' ``calibration``-plane scans
    give at ``fpr`` (their pooled brain-voxel scores' quantile, as a calibration makes it)."""
    pooled = np.concatenate([s for (name, plane), s in scores.items() if name != head and plane == calibration])
    threshold = float(np.quantile(pooled, 1.0 - fpr))
    return float(np.mean(scores[head, test] > threshold))


def table(scores: Scores, names: Sequence[str], fpr: float) -> str:
    """Markdown: per test plane and calibration plane, each held-out head's rate as a multiple of ``fpr``, the
    largest, and the largest ratio of the other plane's rate to the same plane's on one head."""
    lines = [f"| test plane | calibrated on | {' | '.join(names)} | largest | largest vs. same plane (one head) |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for test in PLANES:
        same = {h: held_out_rate(scores, h, test, test, fpr) for h in names}
        for calibration in (*PLANES, ORIGINAL):
            rates = {h: held_out_rate(scores, h, calibration, test, fpr) for h in names}
            ratio = max(rates[h] / max(same[h], 1.0 / scores[h, test].size) for h in names)
            said = {test: "same plane", ORIGINAL: "original 1-1.5 mm (warned)"}.get(calibration, calibration)
            lines.append(f"| {test} | {said} | " + " | ".join(f"{rates[h] / fpr:.2f}" for h in names) +
                         f" | {max(rates.values()) / fpr:.2f} | {'–' if calibration == test else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="folders with <name>_t1.nii.gz and <name>_brainmask.nii.gz")
    p.add_argument("--out", type=Path, default=Path("runs/slice_plane"), help="folder for the cached scores")
    p.add_argument("--names", default="cortex_s1,brainbrowser1,colin27,robex", help="comma-separated head names")
    p.add_argument("--fpr", default="", help="comma-separated rates (default: the bundled model's default rate)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names: List[str] = args.names.split(",")
    scores = measure(args.data, args.out, names)
    rates = [float(r) for r in args.fpr.split(",")] if args.fpr else [read_header(default_model_path()).default_fpr]
    for fpr in rates:
        print(f"\nFalse-positive rate at the held-out threshold, × the rate {fpr:g} "
              f"(unlike above {UNLIKE_FACTOR:g}):\n")
        print(table(scores, names, fpr))


if __name__ == "__main__":
    main()
