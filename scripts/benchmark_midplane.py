"""How far the estimated mid-sagittal plane moves when the same healthy brain is acquired differently.

For each healthy subject and acquisition variant (``CeVAEAnomalyResearch.acquisition.VARIANTS``): the plane
estimated on the variant vs on the clean scan, as the angle between their normals and how much farther one
lies from the clean brain's centre than the other (mm).

    python scripts/benchmark_midplane.py [--data DIR] [--variants clean,thick]
"""
from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.engine.symmetry import estimate_midplane
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyResearch.acquisition import VARIANTS, derive

SUBJECTS = ("colin27", "mni152", "robex")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=str, help="folder with <name>_t1/_brainmask.nii.gz (default: find or fetch)")
    p.add_argument("--variants", help="comma-separated substrings of variant names (default: all)")
    args = p.parse_args()
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = str(ensure_healthy_data())
    variants = [v for v in VARIANTS if not args.variants or any(w in v for w in args.variants.split(","))]
    print("| variant | " + " | ".join(f"{s}: angle ° / shift mm" for s in SUBJECTS) + " |")
    print("|---|" + "---|" * len(SUBJECTS))
    rows = {v: [] for v in variants}
    for si, s in enumerate(SUBJECTS):
        image = sitk.Cast(read_image(f"{args.data}/{s}_t1.nii.gz"), sitk.sitkFloat32)
        mask = read_image(f"{args.data}/{s}_brainmask.nii.gz", "brain mask")
        ref = estimate_midplane(image, mask)
        ijk = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].mean(0)
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
        empty = sitk.Cast(mask * 0, sitk.sitkUInt8)
        for v in variants:
            img, m, _ = derive(VARIANTS[v], image, mask, empty, seed=1000 * si + 10 * list(VARIANTS).index(v) + 1)
            plane = estimate_midplane(img, m)
            angle = np.degrees(np.arccos(min(1.0, abs(float(np.dot(plane.normal, ref.normal))))))
            shift = abs((float(np.dot(plane.normal, centre)) - plane.offset) - (float(np.dot(ref.normal, centre)) - ref.offset))
            rows[v].append(f"{angle:.1f} / {shift:.1f}")
    for v in variants:
        print(f"| {v} | " + " | ".join(rows[v]) + " |")


if __name__ == "__main__":
    main()
