"""How far the estimated mid-sagittal plane moves when the same healthy brain is acquired differently.

For each healthy subject and acquisition variant (``CeVAEAnomalyResearch.acquisition.VARIANTS``): the plane
estimated on the variant vs on the clean scan, as the angle between their normals and how much farther one
lies from the clean brain's centre than the other (mm).

With ``--turned`` it also turns each clean scan (about the vertical axis) and rolls it (about the front-back
axis), as a patient's head lies in the scanner, and compares the plane found with the clean plane turned alike.

    python scripts/benchmark_midplane.py [--data DIR] [--variants clean,thick] [--turned]
"""
from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.engine.symmetry import MidPlane, estimate_midplane
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyResearch.acquisition import VARIANTS, derive

SUBJECTS = ("colin27", "mni152", "robex")
TURNS = {"turned 10°": (10.0, 0.0), "turned 20°": (20.0, 0.0), "rolled 10°": (0.0, 10.0), "rolled 15°": (0.0, 15.0),
         "turned and rolled 12°": (12.0, 12.0)}  # (degrees about the vertical axis, about the front-back axis)


def turned(image: sitk.Image, mask: sitk.Image, yaw: float, roll: float):
    """(image, mask, transform): the head turned and rolled about the image centre (the transform maps the
    turned grid's points to the clean scan's)."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler3DTransform(centre, 0.0, np.radians(roll), np.radians(yaw))
    return (sitk.Resample(image, turn, sitk.sitkLinear, 0.0), sitk.Resample(mask, turn, sitk.sitkNearestNeighbor, 0),
            turn)


def compared(plane, ref, centre: np.ndarray) -> str:
    """Angle between the normals (°) / difference of the distances to ``centre`` (mm)."""
    angle = np.degrees(np.arccos(min(1.0, abs(float(np.dot(plane.normal, ref.normal))))))
    shift = abs((float(np.dot(plane.normal, centre)) - plane.offset) - (float(np.dot(ref.normal, centre)) - ref.offset))
    return f"{angle:.1f} / {shift:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=str, help="folder with <name>_t1/_brainmask.nii.gz (default: find or fetch)")
    p.add_argument("--variants", help="comma-separated substrings of variant names (default: all)")
    p.add_argument("--turned", action="store_true", help="also the clean scans turned and rolled (TURNS)")
    args = p.parse_args()
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = str(ensure_healthy_data())
    variants = [v for v in VARIANTS if not args.variants or any(w in v for w in args.variants.split(","))]
    print("| variant | " + " | ".join(f"{s}: angle ° / shift mm" for s in SUBJECTS) + " |")
    print("|---|" + "---|" * len(SUBJECTS))
    rows = {v: [] for v in [*variants, *(TURNS if args.turned else ())]}
    for si, s in enumerate(SUBJECTS):
        image = sitk.Cast(read_image(f"{args.data}/{s}_t1.nii.gz"), sitk.sitkFloat32)
        mask = read_image(f"{args.data}/{s}_brainmask.nii.gz", "brain mask")
        ref = estimate_midplane(image, mask)
        ijk = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].mean(0)
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
        empty = sitk.Cast(mask * 0, sitk.sitkUInt8)
        for v in variants:
            img, m, _ = derive(VARIANTS[v], image, mask, empty, seed=1000 * si + 10 * list(VARIANTS).index(v) + 1)
            rows[v].append(compared(estimate_midplane(img, m), ref, centre))
        for name, (yaw, roll) in TURNS.items() if args.turned else ():
            img, m, turn = turned(image, mask, yaw, roll)
            matrix = np.array(turn.GetMatrix()).reshape(3, 3)
            normal = matrix.T @ np.asarray(ref.normal)  # the clean plane on the turned grid
            point = np.array(turn.GetInverse().TransformPoint(tuple(centre - (np.dot(ref.normal, centre) - ref.offset)
                                                                    * np.asarray(ref.normal))))
            expected = MidPlane(tuple(float(v) for v in normal), float(normal @ point))
            rows[name].append(compared(estimate_midplane(img, m), expected,
                                       np.array(turn.GetInverse().TransformPoint(tuple(centre)))))
    for v in rows:
        print(f"| {v} | " + " | ".join(rows[v]) + " |")


if __name__ == "__main__":
    main()
