#!/usr/bin/env python3
"""Build the bundled lesioned sample scan and its truth from the 2 mm Colin27 template (deterministic).

Reads ``colin27_t1_2mm.nii.gz`` and ``colin27_brainmask_2mm.nii.gz`` from the package data, inserts two
synthetic lesions of different kinds with ``CeVAEAnomalyResearch.lesions.insert_lesions`` (fixed seed) and writes
``colin27_lesions_t1_2mm.nii.gz`` (uint8, the template's grid and grey levels) and the lesions' ground truth
``colin27_lesions_truth_2mm.nii.gz`` (uint8 {0,1}, the same grid) beside them. Slicer's Sample Data module offers
both (category CeVAEAnomaly; the truth as a labelmap).

Needs the research code (CeVAEAnomalyResearch, in a source checkout) and scipy: pip install 'cevae-anomaly[research]'
(scripts/setup.sh sets it up); without them it refuses in one line naming what is missing.

Usage: python scripts/make_lesion_sample.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CeVAEAnomaly"))

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.system import require_research  # noqa: E402

if __name__ == "__main__":  # before the imports below, which need the research extra
    try:
        require_research("python scripts/make_lesion_sample.py", ("CeVAEAnomalyResearch", "scipy"))
    except CeVAEError as exc:
        sys.exit(f"error: {exc}")

from CeVAEAnomalyLib.data import template_dir  # noqa: E402
from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1  # noqa: E402
from CeVAEAnomalyResearch.lesions import Lesion, insert_lesions  # noqa: E402

LESION_SAMPLE = "colin27_lesions_t1_2mm.nii.gz"
LESION_TRUTH = "colin27_lesions_truth_2mm.nii.gz"
SEED = 3  # of seeds 0-3, the first two that draw both kinds both gave a finding; 3 the more even sizes
KINDS = ("hypo", "hyper")
RADIUS_MM = (8.0, 12.0)
MIN_SEPARATION_MM = 20.0


def make_lesion_sample(t1: sitk.Image, mask: sitk.Image) -> Tuple[sitk.Image, sitk.Image, List[Lesion]]:
    """The lesioned T1 (uint8, rounded and clipped to the template's type), its ground truth and its lesions."""
    lesioned, truth, lesions = insert_lesions(t1, mask, SEED, n=len(KINDS), kinds=KINDS, radius_mm=RADIUS_MM,
                                              min_separation_mm=MIN_SEPARATION_MM)
    values = np.rint(np.clip(sitk.GetArrayFromImage(lesioned), 0, 255)).astype(np.uint8)
    sample = sitk.GetImageFromArray(values)
    sample.CopyInformation(t1)
    return sample, truth, lesions


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=template_dir())
    args = parser.parse_args(argv)
    t1 = sitk.ReadImage(str(template_dir() / TEMPLATE_T1))
    mask = sitk.ReadImage(str(template_dir() / TEMPLATE_MASK))
    sample, truth, lesions = make_lesion_sample(t1, mask)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, image in ((LESION_SAMPLE, sample), (LESION_TRUTH, truth)):
        out = args.out_dir / name
        sitk.WriteImage(image, str(out), True)
        print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    for lesion in lesions:
        print(f"  {lesion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
