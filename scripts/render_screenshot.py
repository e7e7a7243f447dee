"""Render docs/screenshot.png: the module's result on sample data, laid out like Slicer's slice views.

A stand-in for a screen capture of Slicer until one is taken: a real detection with the bundled
model through the module's logic (on a slicer-core MRML scene) on the MNI152 T1 with one inserted
synthetic lesion (hypointense, seed 3, by default), drawn with matplotlib the way the module shows
it: the input as background, the score volume as foreground (Inferno, opacity 0.5, transparent under the threshold, window from
the score volume's display node), the "Anomaly" segment outlined in cyan and a colour legend.

    PYTHONPATH=CeVAEAnomaly python scripts/render_screenshot.py [--data DIR] [--out docs/screenshot.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import slicer  # noqa: E402
from matplotlib import colors  # noqa: E402

from CeVAEAnomalyLib.slicer import mrml, nodes  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402
from CeVAEAnomalyResearch.lesions import insert_lesions  # noqa: E402

VIEW_COLOURS = {"Axial": "#f34a33", "Sagittal": "#edd54c", "Coronal": "#6eb04b"}  # Slicer's red/yellow/green
SEGMENT_COLOUR = tuple(mrml.SEGMENT_COLOR)


def detect(data: Path, seed: int, kind: str):
    image = sitk.ReadImage(str(data / "mni152_t1.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(data / "mni152_brainmask.nii.gz"), sitk.sitkUInt8)
    lesioned, _truth, lesions = insert_lesions(image, brain, seed, n=1, kinds=(kind,), radius_mm=(11.0, 13.0))
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MNI152 with a lesion")
    mrml.update_volume_from_image(volume, lesioned)
    mask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "brain mask")
    mrml.update_volume_from_image(mask, brain)
    result = CeVAEAnomalyLogic().process(volume, mask, device="cpu", createLabelmap=True)
    return scene, volume, result, lesions[0]  # the caller keeps the scene alive


def views(volume_node, result, centre_index):
    """(name, background, score, labelmap) 2D arrays per view, oriented as Slicer shows them."""
    arrays = [sitk.GetArrayFromImage(mrml.image_from_volume(n)) for n in
              (volume_node, result.nodes.score, result.nodes.labelmap)]
    i, j, k = centre_index
    # This volume's IJK axes point to R, A and S (checked below): Slicer shows the patient's right
    # on the left of axial and coronal views and the nose on the left of sagittal views.
    assert np.allclose(np.sign(np.diag(nodes.ijk_to_ras(volume_node))[:3]), 1.0)
    return [("Axial", [a[k, :, ::-1] for a in arrays], f"S: {k}"),
            ("Sagittal", [a[:, ::-1, i] for a in arrays], f"R: {i}"),
            ("Coronal", [a[:, j, ::-1] for a in arrays], f"A: {j}")]


def view_centre(result, lesion):
    """IJK index of the detected component nearest to the lesion (the lesion centre if none)."""
    score = result.detection.score
    if not result.detection.components:
        return lesion.center_index
    nearest = min(result.detection.components,
                  key=lambda c: np.linalg.norm(np.subtract(c.centroid_lps, lesion.center_mm)))
    return score.TransformPhysicalPointToIndex(nearest.centroid_lps)


def render(volume_node, result, lesion, out: Path) -> None:
    display = result.nodes.score.GetDisplayNode()
    lower, upper = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    cmap = plt.get_cmap("inferno")
    norm = colors.Normalize(lower, upper)
    background = sitk.GetArrayFromImage(mrml.image_from_volume(volume_node))
    grey_low, grey_high = np.percentile(background[background > 0], [1, 99.5])

    fig = plt.figure(figsize=(12.8, 5.0), dpi=100, facecolor="#1e1e1e")
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.06], left=0.01, right=0.94, top=0.9, bottom=0.12,
                            wspace=0.03)
    panels = views(volume_node, result, view_centre(result, lesion))
    for column, (name, (bg, score, labels), position) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        ax.set_facecolor("black")
        ax.imshow(bg, cmap="gray", vmin=grey_low, vmax=grey_high, origin="lower", interpolation="bilinear")
        overlay = cmap(norm(score))
        overlay[..., 3] = np.where(score >= lower, 0.5, 0.0)  # foreground opacity 0.5, transparent below
        ax.imshow(overlay, origin="lower", interpolation="nearest")
        if labels.any():
            ax.contour(labels, levels=[0.5], colors=[SEGMENT_COLOUR], linewidths=1.2, origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(VIEW_COLOURS[name])
            spine.set_linewidth(2)
        ax.set_title(f"  {name}   {position}", loc="left", color="black", fontsize=10,
                     backgroundcolor=VIEW_COLOURS[name])
    legend = fig.add_subplot(grid[0, 3])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=legend)
    legend.set_title("Anomaly\nscore", color="white", fontsize=9)
    legend.tick_params(colors="white", labelsize=8)
    summary = result.summary
    fig.text(0.01, 0.015, f"CeVAE Anomaly, bundled model, on the MNI152 T1 with one synthetic {lesion.kind}intense "
             f"lesion ({lesion.volume_ml:.1f} ml), views through the detected component nearest to it "
             f"(cyan: the \"Anomaly\" segment).\n{summary} "
             "Rendered with matplotlib from the module's output nodes; "
             "not a Slicer screen capture.", color="#cccccc", fontsize=8.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/healthy")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/screenshot.png")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--kind", default="hypo", help="lesion kind (see CeVAEAnomalyResearch.lesions)")
    args = parser.parse_args()
    _scene, volume, result, lesion = detect(args.data, args.seed, args.kind)
    render(volume, result, lesion, args.out)
    print(f"{args.out}: {result.summary}")


if __name__ == "__main__":
    main()
