"""PNG overlays: image, anomaly heat map, labelmap contour and (optionally) ground truth."""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.engine.axes import canonical_axes, to_canonical


def _axial(image: sitk.Image) -> np.ndarray:
    """Canonical axial slices [slice, row, col]: rows run anterior to posterior (LPS y) and columns
    patient right to left (LPS x), so ``imshow`` gives the radiological view, anterior at the top."""
    perm, flips = canonical_axes(np.array(image.GetDirection()))
    return to_canonical(sitk.GetArrayViewFromImage(image), perm, flips)


def best_slice(volume: sitk.Image) -> int:
    """Canonical axial slice with the largest sum of ``volume``."""
    return int(np.argmax(_axial(volume).reshape(_axial(volume).shape[0], -1).sum(1)))


def overlay_png_bytes(
    image: sitk.Image,
    score: sitk.Image,
    labelmap: Optional[sitk.Image] = None,
    truth: Optional[sitk.Image] = None,
    slices: Optional[Sequence[int]] = None,
    title: str = "",
) -> bytes:
    """A PNG: per chosen axial slice, the image and the score overlay with contours."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CeVAEError("Figures need matplotlib: pip install 'cevae-anomaly[research]'.") from None
    img, sc = _axial(image), _axial(score)
    lab = _axial(labelmap) if labelmap is not None else None
    gt = _axial(truth) if truth is not None else None
    if slices is None:
        slices = [best_slice(truth if truth is not None else score)]
    vmax = float(np.percentile(sc[sc > 0], 99.9)) if (sc > 0).any() else 1.0
    fig, axes = plt.subplots(len(slices), 2, figsize=(8, 4 * len(slices)), squeeze=False)
    for row, k in zip(axes, slices):
        base = np.asarray(img[k], float)
        lo, hi = np.percentile(base, [1, 99.5])
        row[0].imshow(base, cmap="gray", vmin=lo, vmax=hi)
        row[0].set_title(f"image, axial slice {k}")
        row[1].imshow(base, cmap="gray", vmin=lo, vmax=hi)
        heat = np.ma.masked_less_equal(np.asarray(sc[k], float), 0.02 * vmax)
        im = row[1].imshow(heat, cmap="inferno", vmin=0, vmax=vmax, alpha=0.75)
        if lab is not None and lab[k].any():
            row[1].contour(np.asarray(lab[k]), levels=[0.5], colors="cyan", linewidths=1.2)
        if gt is not None and gt[k].any():
            row[1].contour(np.asarray(gt[k]), levels=[0.5], colors="lime", linewidths=1.2, linestyles="--")
        row[1].set_title("score (heat), labelmap (cyan), truth (green dashed)", fontsize=9)
        fig.colorbar(im, ax=row[1], fraction=0.046)
        for ax in row:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    return buffer.getvalue()
