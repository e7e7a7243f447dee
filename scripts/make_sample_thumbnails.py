#!/usr/bin/env python3
"""Render the Sample Data thumbnails of the module's sample scans (Resources/Icons, deterministic).

One axial slice of each sample, in the radiological view (the patient's right on the viewer's left, anterior up), grey
levels from 0 to the healthy scan's 99.5th percentile stretched to 0..255, 2.5 times enlarged (225x270 pixels, about the
size Slicer's extension template asks for). The slice is the same for all samples: the one where the lesioned scan
differs most from the healthy one. A labelmap sample (the lesions' truth) is drawn as its label 1 in Slicer's colour
for it (GenericAnatomyColors "tissue", 60 % opaque) over the lesioned scan's slice.

Needs Pillow (PIL), which the research extra brings with matplotlib: pip install 'cevae-anomaly[research]'
(scripts/setup.sh sets it up); without it the script refuses in one line naming what is missing.

Usage: python scripts/make_sample_thumbnails.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CeVAEAnomaly"))

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.system import require_research  # noqa: E402

if __name__ == "__main__":  # before the import below, which needs the research extra
    try:
        require_research("python scripts/make_sample_thumbnails.py", ("PIL",))
    except CeVAEError as exc:
        sys.exit(f"error: {exc}")

from PIL import Image  # noqa: E402

from CeVAEAnomalyLib.slicer.sample_data import SAMPLES  # noqa: E402

SCALE = 2.5
WHITE_PERCENTILE = 99.5
LABEL_RGB = (128, 174, 128)
LABEL_OPACITY = 0.6


def axial_slices(path: Path) -> np.ndarray:
    """The scan's voxels as (superior slice, anterior-to-posterior row, right-to-left column)."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")).astype(np.float32)


def thumbnail(slice_: np.ndarray, white: float) -> Image.Image:
    """A grey image of one axial slice (``white`` and above white), enlarged."""
    grey = np.rint(np.clip(slice_ * 255.0 / white, 0, 255)).astype(np.uint8)
    image = Image.fromarray(grey)
    return image.resize((round(image.width * SCALE), round(image.height * SCALE)), Image.LANCZOS)


def label_thumbnail(slice_: np.ndarray, labels: np.ndarray, white: float) -> Image.Image:
    """``slice_`` as ``thumbnail`` draws it, with the voxels of label 1 in ``labels`` coloured over it."""
    grey = np.asarray(thumbnail(slice_, white).convert("RGB"), dtype=np.float32)
    size = (grey.shape[1], grey.shape[0])
    inside = np.asarray(Image.fromarray((labels == 1).astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    grey[inside] = (1 - LABEL_OPACITY) * grey[inside] + LABEL_OPACITY * np.asarray(LABEL_RGB, np.float32)
    return Image.fromarray(np.rint(grey).astype(np.uint8))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "Resources" / "Icons")
    args = parser.parse_args(argv)
    volumes = {sample.file_name: axial_slices(sample.path()) for sample in SAMPLES}
    lesioned, healthy = volumes["colin27_lesions_t1_2mm.nii.gz"], volumes["colin27_t1_2mm.nii.gz"]
    k = int(np.argmax(np.abs(lesioned - healthy).sum(axis=(1, 2))))
    white = float(np.percentile(healthy, WHITE_PERCENTILE))
    for sample in SAMPLES:
        out = args.out_dir / sample.thumbnail
        volume = volumes[sample.file_name]
        image = label_thumbnail(lesioned[k], volume[k], white) if sample.labelmap else thumbnail(volume[k], white)
        image.save(out, optimize=True)
        print(f"wrote {out} (axial slice {k}, {out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
