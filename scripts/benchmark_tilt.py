"""Healthy heads tilted in the scanner: what the shipped default flags, and which of its terms flags it.

Each head (``<name>_t1.nii.gz`` in ``--data``; its ``_brainmask`` gives the centre of rotation only) is rotated
about its brain's centre by roll (about the front-back axis), yaw (about the vertical axis) and pitch (nodding,
about the left-right axis), one axis at a time, in two ways:
- *resampled*: the head turned inside the scanner's field of view, resampled onto the original grid (linear);
- *header*: the same voxels with a rotated direction matrix and origin (an oblique acquisition).
Every volume goes through the shipped model's default detection with its automatic brain mask, as a user without
a mask runs it (the detector's own steps, so that the two terms can be kept: the ceVAE's map averaged over the
slice orientations, and the asymmetry about the estimated mid-sagittal plane). Recorded per case: flagged ml,
labelmap components, the 99.9th percentile of the final map, of the asymmetry and of the ceVAE term in the brain,
how far the estimated mid-sagittal plane is from the unrotated head's plane rotated alike (degrees), and the median
percentile rank, within the brain, of each term at the flagged voxels (which term makes the false alarms).

    python scripts/benchmark_tilt.py --data DIR [--out runs/tilt] [--names cortex_s1,brainbrowser1]
        [--angles 0,5,10,15] [--maps]   # --maps: keep each case's terms (npz, float16, on the input grid)

Results are cached in ``--out/results.json`` (a rerun scores only the missing cases); the table is printed as
markdown.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap
from CeVAEAnomalyLib.engine.symmetry import MidPlane
from CeVAEAnomalyLib.io.images import read_image

# axis name -> index of the Euler angle (LPS: x left-right, y back-front, z up-down)
AXES = {"roll": 1, "yaw": 2, "pitch": 0}
VARIANTS = ("resampled", "header")


def brain_centre(mask: sitk.Image) -> Tuple[float, float, float]:
    """The physical centre (LPS mm) of the mask's voxels."""
    ijk = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].mean(0)
    return mask.TransformContinuousIndexToPhysicalPoint(ijk.tolist())


def rotation(centre: Sequence[float], axis: str, degrees: float) -> sitk.Euler3DTransform:
    """The rotation by ``degrees`` about ``axis`` (:data:`AXES`) through ``centre``."""
    angles = [0.0, 0.0, 0.0]
    angles[AXES[axis]] = float(np.radians(degrees))
    return sitk.Euler3DTransform(tuple(centre), *angles)


def rotated(image: sitk.Image, turn: sitk.Euler3DTransform, variant: str) -> sitk.Image:
    """The head turned by ``turn``: resampled onto the original grid (float32: an 8-bit result would truncate the
    interpolated values), or the same voxels with a turned header."""
    if variant == "resampled":  # output point p shows the input at turn⁻¹(p): the content moves by ``turn``
        return sitk.Resample(image, image, turn.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matrix = np.array(turn.GetMatrix()).reshape(3, 3)
    centre = np.array(turn.GetCenter())
    out = sitk.Image(image)
    out.SetDirection(tuple((matrix @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    out.SetOrigin(tuple(centre + matrix @ (np.array(image.GetOrigin()) - centre)))
    return out


def plane_of(reflection: sitk.Transform) -> MidPlane:
    """The plane of a reflection p -> (I - 2nnᵀ) p + 2 d n."""
    m = np.array(reflection.GetMatrix()).reshape(3, 3)
    outer = (np.eye(3) - m) / 2
    n = outer[:, int(np.argmax(np.diag(outer)))]
    n = n / np.linalg.norm(n)
    return MidPlane(tuple(float(v) for v in n), float(np.array(reflection.GetTranslation()) @ n / 2))


def turned_plane(plane: MidPlane, turn: sitk.Euler3DTransform) -> MidPlane:
    """``plane`` moved by ``turn``."""
    matrix = np.array(turn.GetMatrix()).reshape(3, 3)
    centre = np.array(turn.GetCenter())
    n = np.asarray(plane.normal)
    normal = matrix @ n
    return MidPlane(tuple(float(v) for v in normal), float(normal @ centre + plane.offset - n @ centre))


def plane_error_deg(plane: MidPlane, expected: MidPlane) -> float:
    """The angle between the two planes' normals (degrees)."""
    cosine = min(1.0, abs(float(np.dot(plane.normal, expected.normal))))
    return float(np.degrees(np.arccos(cosine)))


def percentile_rank(values: np.ndarray, at: np.ndarray) -> float:
    """The median percentile rank among ``values`` of the values ``at`` (nan when there are none)."""
    if at.size == 0:
        return float("nan")
    ordered = np.sort(values)
    return float(np.median(np.searchsorted(ordered, at, side="right")) / ordered.size * 100)


def score_case(detector: Detector, image: sitk.Image,
               maps: Optional[Path] = None) -> Tuple[Dict[str, float], MidPlane]:
    """The default detection of ``image`` with its automatic mask, its terms as :meth:`Detector.terms` gives them,
    with both terms measured (``maps``: where to save them)."""
    terms = detector.terms(image)
    spacing = image.GetSpacing()
    inside = sitk.GetArrayViewFromImage(terms.brain_mask) > 0
    final, cevae, asym = (sitk.GetArrayViewFromImage(p) for p in (terms.score, terms.network, terms.asymmetry))
    post = detector.post
    label = threshold_labelmap(final, spacing, detector.threshold, post.min_volume_mm3, post.hysteresis,
                               post.min_peak) > 0
    count = sitk.ConnectedComponentImageFilter()
    count.SetFullyConnected(True)
    count.Execute(sitk.GetImageFromArray(label.view(np.uint8)))
    row = {
        "flagged_ml": float(label.sum() * np.prod(spacing) / 1000),
        "components": int(count.GetObjectCount()),
        "map_p999": float(np.percentile(final[inside], 99.9)),
        "asym_p999": float(np.percentile(asym[inside], 99.9)),
        "cevae_p999": float(np.percentile(cevae[inside], 99.9)),
        "flag_asym_rank": percentile_rank(asym[inside], asym[label]),
        "flag_cevae_rank": percentile_rank(cevae[inside], cevae[label]),
        "brain_ml": float(inside.sum() * np.prod(spacing) / 1000),
    }
    if maps is not None:
        np.savez_compressed(maps, final=final.astype(np.float16), cevae=cevae.astype(np.float16),
                            asymmetry=asym.astype(np.float16), brain=inside, labelmap=label)
    return row, plane_of(terms.reflection)


def cases(angles: Sequence[float]) -> List[Tuple[str, float, str]]:
    """(axis, degrees, variant) of every case: the unrotated head once, then each axis, angle and variant."""
    out = [("none", 0.0, "resampled")]
    for axis in AXES:
        for degrees in angles:
            if degrees != 0:
                out += [(axis, float(degrees), v) for v in VARIANTS]
    return out


def measure(data: Path, out: Path, names: Sequence[str], angles: Sequence[float], keep_maps: bool) -> dict:
    """Every case of every head, cached in ``out``/results.json."""
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    detector = Detector(load_bundle(default_model_path()))
    for name in names:
        image = read_image(data / f"{name}_t1.nii.gz")
        centre = brain_centre(read_image(data / f"{name}_brainmask.nii.gz", "brain mask"))
        reference = None
        for axis, degrees, variant in cases(angles):
            key = f"{name}|{axis}|{degrees:g}|{variant}"
            if key in results and reference is not None:
                continue
            turn = rotation(centre, "roll" if axis == "none" else axis, degrees)
            maps = out / f"{key.replace('|', '--')}.npz" if keep_maps else None
            row, plane = score_case(detector, image if axis == "none" else rotated(image, turn, variant), maps)
            if axis == "none":
                reference = plane
            row["plane_error_deg"] = plane_error_deg(plane, turned_plane(reference, turn))
            results[key] = row
            path.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(row), flush=True)
    order = [f"{n}|{a}|{d:g}|{v}" for n in names for a, d, v in cases(angles)]
    return {key: results[key] for key in order}


def table(results: dict) -> str:
    """The markdown table of ``results``."""
    lines = ["| head | rotation | variant | flagged ml | components | map p99.9 | asymmetry p99.9 | ceVAE p99.9 | "
             "plane error ° | flagged: asymmetry / ceVAE rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name, axis, degrees, variant = key.split("|")
        rotation_said = "none" if axis == "none" else f"{axis} {degrees}°"
        ranks = ("–" if r["components"] == 0 else
                 f"{r['flag_asym_rank']:.1f} / {r['flag_cevae_rank']:.1f}")
        lines.append(f"| {name} | {rotation_said} | {'–' if axis == 'none' else variant} | {r['flagged_ml']:.2f} | "
                     f"{r['components']} | {r['map_p999']:.2f} | {r['asym_p999']:.3f} | {r['cevae_p999']:.4f} | "
                     f"{r['plane_error_deg']:.1f} | {ranks} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with <name>_t1.nii.gz and <name>_brainmask.nii.gz")
    p.add_argument("--out", type=Path, default=Path("runs/tilt"), help="folder for results.json (and --maps)")
    p.add_argument("--names", default="cortex_s1,brainbrowser1", help="comma-separated head names")
    p.add_argument("--angles", default="0,5,10,15", help="comma-separated rotation angles (degrees)")
    p.add_argument("--maps", action="store_true", help="also save each case's final map and both terms (npz)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    angles = [float(a) for a in args.angles.split(",")]
    print(table(measure(args.data, args.out, args.names.split(","), angles, args.maps)))


if __name__ == "__main__":
    main()
