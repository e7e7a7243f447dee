#!/usr/bin/env python3
"""Build the bundled 2 mm brain-mask template from colin27 (deterministic).

Reads ``colin27_t1.nii.gz`` and ``colin27_brainmask.nii.gz`` from the healthy sample data
(shared copy, ``$CEVAE_DATA_DIR`` or fetched) and writes to ``CeVAEAnomaly/CeVAEAnomalyLib/data``:

- ``colin27_t1_2mm.nii.gz``: Gaussian-smoothed (sigma 1 mm), resampled to 2 mm, intensities
  scaled to 0..63 (uint8; 64 grey levels are plenty for mutual information and keep the file small);
- ``colin27_brainmask_2mm.nii.gz``: brain fraction of each 2x2x2 block >= 0.5 (uint8 {0,1}).

Usage: python scripts/make_template.py [--data-dir DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CeVAEAnomaly"))

from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1, default_template_dir  # noqa: E402
from CeVAEAnomalyResearch.sampledata import ensure_healthy_data, subject_files  # noqa: E402

GREY_LEVELS = 64
SMOOTHING_MM = 1.0


def make_template(t1: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """2 mm template T1 (uint8, 0..63) and brain mask (uint8 {0,1}) on the same grid."""
    fraction = sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), [2, 2, 2])
    small_mask = sitk.Cast(fraction >= 0.5, sitk.sitkUInt8)
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(t1, sitk.sitkFloat32), SMOOTHING_MM)
    small = sitk.Resample(smooth, small_mask, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(small)
    scaled = np.rint(np.clip(values, 0, 255) * (GREY_LEVELS - 1) / 255.0).astype(np.uint8)
    small_t1 = sitk.GetImageFromArray(scaled)
    small_t1.CopyInformation(small_mask)
    return small_t1, small_mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="folder with colin27_t1/brainmask (default: find or fetch)")
    parser.add_argument("--out-dir", type=Path, default=default_template_dir())
    args = parser.parse_args(argv)
    t1_path, mask_path = subject_files(args.data_dir or ensure_healthy_data(), "colin27")
    small_t1, small_mask = make_template(sitk.ReadImage(str(t1_path)), sitk.ReadImage(str(mask_path)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for image, name in ((small_t1, TEMPLATE_T1), (small_mask, TEMPLATE_MASK)):
        sitk.WriteImage(image, str(args.out_dir / name), True)
        print(f"wrote {args.out_dir / name} ({(args.out_dir / name).stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
