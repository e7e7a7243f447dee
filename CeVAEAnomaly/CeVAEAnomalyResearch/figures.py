"""PNG overlays: image, anomaly heat map, labelmap contour and (optionally) ground truth."""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.engine.axes import canonical_axes, to_canonical
from CeVAEAnomalyLib.result import SIDE_WORDS, flagged_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from CeVAEAnomalyLib.result import Component, DetectionResult

LETTERS = ("RL", "AP", "IS")  # per LPS axis: the letter of its negative and of its positive direction
OBLIQUE = float(np.sin(np.radians(10.0)))  # a component this large (a tilt over 10 degrees) adds its letter
CONVENTION = "radiological view: the patient's right is on the viewer's left"


def _axial(image: sitk.Image) -> np.ndarray:
    """Canonical axial slices [slice, row, col]: rows run anterior to posterior (LPS y) and columns
    patient right to left (LPS x), so ``imshow`` gives the radiological view, anterior at the top."""
    perm, flips = canonical_axes(np.array(image.GetDirection()))
    return to_canonical(sitk.GetArrayViewFromImage(image), perm, flips)


def pixel_aspect(image: sitk.Image) -> float:
    """The height over the width (mm) of a pixel of ``image``'s canonical axial slices: ``imshow``'s aspect that
    draws them to scale (a sagittal-acquired volume's axial reformat has pixels as wide as its slices are thick)."""
    perm, _ = canonical_axes(np.array(image.GetDirection()))
    spacing = image.GetSpacing()
    return float(spacing[2 - perm[1]] / spacing[2 - perm[2]])


def best_slice(volume: sitk.Image) -> int:
    """Canonical axial slice with the largest sum of ``volume``'s finite values (a NaN or inf voxel does not win)."""
    axial = _axial(volume)
    return int(np.argmax(np.where(np.isfinite(axial), axial, 0).reshape(axial.shape[0], -1).sum(1)))


def letters(vector: Sequence[float]) -> str:
    """A viewer's orientation letters of an LPS direction: the letter of its largest component, then those of the
    other components over ``OBLIQUE`` (an oblique volume), largest first: (1, 0, 0) is "L", (0.87, -0.5, 0) "LA"."""
    v = np.asarray(vector, float)
    order = np.argsort(-np.abs(v), kind="stable")
    return "".join(LETTERS[a][int(v[a] > 0)] for n, a in enumerate(order) if n == 0 or abs(v[a]) > OBLIQUE)


def edge_letters(image: sitk.Image) -> Tuple[str, str, str, str]:
    """Letters at the left, right, top and bottom edges of ``image``'s canonical axial slices, from its direction
    matrix: the physical directions in which the pictured columns and rows run."""
    perm, flips = canonical_axes(np.array(image.GetDirection()))
    d = np.array(image.GetDirection(), float).reshape(3, 3)
    row, col = (d[:, 2 - perm[n]] * (-1.0 if flips[n] else 1.0) for n in (1, 2))
    return letters(-col), letters(col), letters(-row), letters(row)


def file_slice(image: sitk.Image, k: int) -> Tuple[str, int]:
    """The file's voxel axis ("i", "j" or "k") and index of canonical axial slice ``k``."""
    perm, flips = canonical_axes(np.array(image.GetDirection()))
    axis = 2 - perm[0]
    return "ijk"[axis], image.GetSize()[axis] - 1 - k if flips[0] else k


def canonical_slice(image: sitk.Image, axis: int, index: int) -> Optional[int]:
    """The canonical axial slice that is the file's voxel slice ``index`` along voxel ``axis`` (0, 1, 2: i, j, k);
    None where that axis is not the one the canonical axial slices are taken along (:func:`file_slice`'s inverse)."""
    perm, flips = canonical_axes(np.array(image.GetDirection()))
    if axis != 2 - perm[0]:
        return None
    index = min(max(int(index), 0), image.GetSize()[axis] - 1)
    return image.GetSize()[axis] - 1 - index if flips[0] else index


def slice_through(image: sitk.Image, point_lps: Sequence[float]) -> int:
    """The canonical axial slice nearest to an LPS point (mm; one outside the volume: its nearest edge slice)."""
    perm, flips = canonical_axes(np.array(image.GetDirection()))
    axis, size = 2 - perm[0], image.GetSize()[2 - perm[0]]
    index = min(max(round(image.TransformPhysicalPointToContinuousIndex(tuple(map(float, point_lps)))[axis]), 0),
                size - 1)
    return size - 1 - index if flips[0] else index


def key_picture_png(image: sitk.Image, score: sitk.Image, labelmap: Optional[sitk.Image], threshold: float,
                    components: Sequence[Component], top_slice: Optional[Tuple[int, int]], name: str) -> bytes:
    """A detection's key picture as a PNG (800 x 400 pixels): :func:`overlay_figure` of the canonical axial slice
    through the peak (its centroid where the peak is not known) of ``components[0]``, the top-ranked component, or
    without components through ``top_slice`` (the slice table's first row: IJK axis, index; :func:`best_slice` of
    the score where it is None or along another axis). Heat: the score above half of ``threshold`` (where that is a
    positive finite number). The title names ``name``, the slice in the file and the component's volume and side."""
    floor = threshold / 2 if math.isfinite(threshold) and threshold > 0 else None
    if components:
        top = components[0]
        k = slice_through(image, top.peak_lps if top.peak_lps is not None else top.centroid_lps)
        where = "peak" if top.peak_lps is not None else "centroid"
        what = (f"through the {where} of component 1 of {len(components)}: {flagged_text(top.volume_ml)} ml, "
                f"{SIDE_WORDS.get(top.side) or 'side not known'}")
    else:
        k = canonical_slice(image, *top_slice) if top_slice is not None else None
        k = best_slice(score) if k is None else k
        what = "no component: the most anomalous slice"
    axis, index = file_slice(image, k)
    title = f"{name}: axial slice {axis}={index} of the file\n{what}"
    return overlay_png_bytes(image, score, labelmap, slices=[k], title=title, floor=floor)


def result_picture_png(image: sitk.Image, result: DetectionResult, name: str) -> bytes:
    """:func:`key_picture_png` of a detection ``result`` of ``image`` (detect --picture, batch --pictures)."""
    top = result.top_slice
    return key_picture_png(image, result.score, result.labelmap, result.threshold, result.components,
                           None if top is None else (top.axis, top.index), name)


def overlay_figure(
    image: sitk.Image,
    score: sitk.Image,
    labelmap: Optional[sitk.Image] = None,
    truth: Optional[sitk.Image] = None,
    slices: Optional[Sequence[int]] = None,
    title: str = "",
    floor: Optional[float] = None,
) -> Figure:
    """A matplotlib Figure: per chosen canonical axial slice (default: the one with most truth, else most score),
    the image and the score overlay with contours, radiologically and to scale, orientation letters at the edges;
    each row's title gives the slice's voxel index in ``image``'s file. Heat where the score exceeds ``floor`` (said
    in the panel's title, which names the labelmap and truth where their contours are drawn on its slice; None: 2 %
    of the 99.9th percentile of its finite positive values). ``title`` is drawn as
    written (no mathtext), smaller where it is wider than the figure."""
    try:  # a Figure of its own on an Agg canvas: no pyplot, so the caller's backend and figures are left alone
        import matplotlib.patheffects as effects
        from matplotlib import rc_context
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CeVAEError("Figures need matplotlib: pip install 'cevae-anomaly[research]'.") from None
    with rc_context({"text.usetex": False}):  # plain texts: a user's usetex sent "_" and "%" to LaTeX
        img, sc = _axial(image), _axial(score)
        lab = _axial(labelmap) if labelmap is not None else None
        gt = _axial(truth) if truth is not None else None
        if slices is None:
            slices = [best_slice(truth if truth is not None else score)]
        positive = sc[np.isfinite(sc) & (sc > 0)]  # the colour scale of the finite scores (NaN, inf: drawn, not scaled)
        vmax = float(np.percentile(positive, 99.9)) if positive.size else 1.0
        vmax = vmax if floor is None else max(vmax, 2 * floor)
        heat_floor = 0.02 * vmax if floor is None else floor
        scored = "score (heat)" if floor is None else f"score > {floor:.3g} (heat)"
        left, right, top, bottom = edge_letters(image)
        places = ((left, 0.02, 0.5, "left", "center"), (right, 0.98, 0.5, "right", "center"),
                  (top, 0.5, 0.98, "center", "top"), (bottom, 0.5, 0.02, "center", "bottom"))
        outline = [effects.withStroke(linewidth=2.5, foreground="black")]
        fig = Figure(figsize=(8, 4 * len(slices)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(slices), 2, squeeze=False)
        aspect = pixel_aspect(image)
        for row, k in zip(axes, slices):
            base = np.asarray(img[k], float)
            lo, hi = np.percentile(base, [1, 99.5])
            row[0].imshow(base, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            axis, index = file_slice(image, k)
            row[0].set_title(f"image, axial slice {axis}={index} of the file")
            row[1].imshow(base, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            heat = np.ma.masked_less_equal(np.asarray(sc[k], float), heat_floor)
            im = row[1].imshow(heat, cmap="inferno", vmin=0, vmax=vmax, alpha=0.75, aspect=aspect)
            legend = [scored]  # what this slice's panel draws
            if lab is not None and lab[k].any():
                row[1].contour(np.asarray(lab[k]), levels=[0.5], colors="cyan", linewidths=1.2)
                legend.append("labelmap (cyan)")
            if gt is not None and gt[k].any():
                row[1].contour(np.asarray(gt[k]), levels=[0.5], colors="lime", linewidths=1.2, linestyles="--")
                legend.append("truth (green dashed)")
            row[1].set_title(", ".join(legend), fontsize=9)
            fig.colorbar(im, ax=row[1], fraction=0.046)
            for ax in row:
                ax.axis("off")
                for text, x, y, ha, va in places:
                    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=11,
                            fontweight="bold", path_effects=outline)
        if title:
            text = fig.suptitle(title, parse_math=False)  # plain text: a file named 'a$b$.nii' is no mathtext
            wide = text.get_window_extent(fig.canvas.get_renderer()).width / (0.95 * fig.bbox.width)
            if wide > 1:  # a long name (a DICOM series folder named by its 64-character UID) smaller, not cut off
                text.set_fontsize(text.get_fontsize() / wide)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.text(0.5, 0.01, CONVENTION, ha="center", va="bottom", fontsize=9)
        return fig


def overlay_png_bytes(
    image: sitk.Image,
    score: sitk.Image,
    labelmap: Optional[sitk.Image] = None,
    truth: Optional[sitk.Image] = None,
    slices: Optional[Sequence[int]] = None,
    title: str = "",
    floor: Optional[float] = None,
) -> bytes:
    """``overlay_figure`` as a PNG."""
    buffer = io.BytesIO()
    overlay_figure(image, score, labelmap, truth, slices, title, floor).savefig(buffer, dpi=100, format="png")
    return buffer.getvalue()
