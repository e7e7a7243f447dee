"""Figures of typical benchmark slices: image, score heat map, labelmap contour, ground truth.

    python scripts/benchmark_figures.py [--out docs/figures]

One PNG per lesion kind (of the real single-subject scan by default), with the ceVAE trained without the pictured subject (leave one subject
out), the default scoring and post-processing, and the threshold calibrated on its training
subjects (as in docs/benchmark.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk
from benchmark_eval import FPR, SUBJECTS, make_cases
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibration import calibrate, threshold_for_fpr
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyResearch.figures import overlay_png_bytes
from CeVAEAnomalyLib.io.atomic import write_all
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.engine.calibrate import healthy_scores
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.options import RECOMMENDED_POSTPROCESS as RECOMMENDED
from CeVAEAnomalyLib.options import ScoreOptions, ThresholdPolicy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark"))
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--subjects", default="robex", help="held-out subjects to picture (comma-separated)")
    args = p.parse_args()
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    opts = ScoreOptions()
    for subject in args.subjects.split(","):
        bundle = load_bundle(args.runs / "cevae" / f"without-{subject}.cevae")
        others = [Subject(args.data / f"{s}_t1.nii.gz", args.data / f"{s}_brainmask.nii.gz")
                  for s in SUBJECTS if s != subject]
        thr = threshold_for_fpr(calibrate(healthy_scores(bundle, others, opts, RECOMMENDED), "training"), FPR)
        mask = read_image(args.data / f"{subject}_brainmask.nii.gz", "brain mask")
        detect = Detector(bundle, opts, RECOMMENDED, ThresholdPolicy(threshold=thr))
        for name, image, gt in make_cases(args.data, subject, 1):
            res = detect(image, mask)
            truth = read_like(gt, image)
            write_all({args.out / f"{name}.png": overlay_png_bytes(
                image, res.score, res.labelmap, truth, title=f"{name} (model trained without {subject})")},
                overwrite=True)
            print(args.out / f"{name}.png")


def read_like(array, reference):
    """A uint8 image of ``array`` on the reference grid."""
    img = sitk.GetImageFromArray(array.astype("uint8"))
    img.CopyInformation(reference)
    return img


if __name__ == "__main__":
    main()
