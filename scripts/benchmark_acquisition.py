"""Acquisition benchmark: what the default detector and its post-processing levers give on each acquisition variant.

Needs ``scripts/benchmark_acquisition_maps.py`` (cached maps; each held-out subject scored by the model that
never saw it). Every threshold used on subject S comes from the other subjects' held-out healthy scans
(the default: the bundled model's healthy false-positive rate on their clean scans, as a held-out bundle
calibration stores it; levers: the same rate on their scans of the same acquisition class, or of the same
variant: a site calibration on two healthy scans). "default" is the shipped chain (tail normalisation); the
MAD normalisation is the chain as it was before. Per variant it reports
pooled AUPRC and best Dice, mean Dice at the operating point (moved-tissue lesions apart: for them the
ceVAE's own terms are compared with the fused maps), the healthy scan's flagged ml and number of
components, the top slice on a lesion, the lesion table's first row being a lesion, and where the panel's
"jump to the most anomalous" lands (the first row when the labelmap has one, else the top slice) being a
lesion. Map levers whose term a cache lacks (the restoration error of ``benchmark_acquisition_maps.py
--restoration``) are left out.

    python scripts/benchmark_acquisition.py [--maps runs/acquisition] [--out docs] [--prefix benchmark_acquisition]

Heads the models never saw, scored by the shipped model (``benchmark_acquisition_maps.py --subjects cortex_s1,...``
into a folder of their own) are evaluated beside the folds' caches, each calibrated only on the bundled subjects:

    python scripts/benchmark_acquisition.py --maps runs/acquisition runs/acquisition-new \
        --subjects cortex_s1,brainbrowser1 --calibration-subjects colin27,mni152,robex --maps-levers NONE \
        --prefix benchmark_acquisition_new_subjects

Many map levers over every variant take long on two cores: runs over disjoint ``--variants`` (each reads every
cached healthy scan for its thresholds, so its rows are those of one run) can go side by side, then
``--merge A.json B.json ...`` joins them into one result and its tables.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.detector import slice_map_weight
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.engine.postprocess import normalised, refine_scores
from CeVAEAnomalyLib.engine.slicescores import fused_slice_rank, slice_quantile
from CeVAEAnomalyLib.engine.symmetry import asymmetry, fuse, side_weight
from CeVAEAnomalyLib.options import RECOMMENDED_POSTPROCESS, PostprocessOptions
from CeVAEAnomalyResearch.acquisition import VARIANTS
from CeVAEAnomalyResearch.evaluate import dice, pooled_metrics
from CeVAEAnomalyResearch.lesionwise import lesion_counts, lesion_hits
from acquisition_cases import case_files

SHIPPED = read_header(default_model_path())
SHIPPED_FPR = SHIPPED.default_fpr  # the bundled model's operating point
SHIPPED_PEAK = SHIPPED.postprocess.min_peak  # and its labelmap's peak filter
CONN = np.ones((3, 3, 3), bool)
FUSION_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
Case = Dict[str, object]


def thickness_class(variant: str) -> str:
    """The acquisition class a per-class calibration would store: by slice thickness."""
    t = VARIANTS[variant].thickness_mm
    return "thin (≤ 1.5 mm)" if t <= 1.5 else ("medium (2-3 mm)" if t <= 3.5 else "thick (≥ 5 mm)")


# ---- score maps: the default chain and its variations, from a cached case ----

def chain(c: Case, sigma: float = 3.0, floor: float = 0.1, power: float = 0.5, use_asymmetry: bool = True,
          tail: bool = True, mirror: str = "plane", term: str = "combi", background_mm: float = 0.0) -> np.ndarray:
    """The detector's post-processing (asymmetry fusion, rim, normalisation) with other parameters
    (``tail``: the default spread; False: the median absolute deviation, the cached ``final`` map's;
    ``mirror``, ``background_mm``: see :func:`case_asymmetry`; ``term``: the network map fused, the ceVAE's
    ``combi`` or the restoration error ``restore``)."""
    combi = c[term]
    if use_asymmetry:
        s = fuse(combi, case_asymmetry(c, sigma, sided=True, mirror=mirror, background_mm=background_mm), floor, power)
    else:
        s = np.power(np.maximum(combi, 0), power).astype(np.float32)
    return rimmed(c, s, "tail" if tail else "mad")


def case_asymmetry(c: Case, sigma: float = 3.0, sided: bool = False, mirror: str = "plane",
                   background_mm: float = 0.0) -> np.ndarray:
    """The case's smoothed left-right intensity asymmetry (``sided``: weighted by the combi map's side weight;
    ``background_mm`` > 0: relative to its regional level, the asymmetry smoothed with that σ, a × median
    level / (0.05 + level), so that focal asymmetry counts more where the brain is symmetric around it).

    ``mirror``: "plane", the image mirrored about the detector's mid-sagittal plane (the default);
    "demons", that mirror image deformably aligned to the image first (smooth demons field, σ 3 mm, on a
    2× coarser grid), so that the shape differences of two healthy hemispheres drop out; "tolerant", the
    distance of each intensity to the range of the mirror image's 3 × 3 × 3 neighbourhood (a lesion stands
    out, a fold shifted by a voxel does not); "csf", the plain difference left out where CSF on one side faces
    tissue within :data:`CSF_SHIFT_MM` of CSF on the other (:func:`displaced_csf`: one ventricle larger, a sulcus
    shifted); "ventricles", the same deeper than :data:`VENTRICLE_DEPTH_MM` inside the brain only."""
    image_m, combi_m = c["image_m"], c["combi_m"]
    both, spacing = c["brain"] & c["brain_m"], tuple(float(v) for v in c["spacing"])
    if mirror == "demons":
        image_m, combi_m = demons_aligned(c, (image_m, combi_m))
    if mirror == "tolerant":
        m = np.where(c["brain_m"], image_m, np.nan).astype(np.float32)
        hi = ndimage.maximum_filter(np.nan_to_num(m, nan=-np.inf), size=3)
        lo = ndimage.minimum_filter(np.nan_to_num(m, nan=np.inf), size=3)
        x = c["image"].astype(np.float32)
        d = np.nan_to_num(np.maximum(0, np.maximum(x - hi, lo - x)), nan=0.0, posinf=0.0, neginf=0.0)
        a = asymmetry(d, np.zeros_like(d), both, spacing, sigma)
    elif mirror in ("csf", "ventricles"):
        d = np.abs(c["image"].astype(np.float32) - image_m.astype(np.float32))
        displaced = displaced_csf(c["image"], image_m, c["brain"], both, spacing)
        if mirror == "ventricles":  # deep in the brain only: the ventricles, not the sulci
            displaced &= ndimage.distance_transform_edt(c["brain"], sampling=spacing[::-1]) > VENTRICLE_DEPTH_MM
        d[displaced] = 0.0
        a = asymmetry(d, np.zeros_like(d), both, spacing, sigma)
    else:
        a = asymmetry(c["image"], image_m, both, spacing, sigma)
    if background_mm > 0:
        level = asymmetry(c["image"], image_m, both, spacing, background_mm)
        a = a * (float(np.median(level[both])) / (0.05 + level))
    return a * side_weight(c["combi"], combi_m) if sided else a


CSF_SHIFT_MM = 3.0  # fixed before any run of this benchmark, on the healthy scans of three other heads
VENTRICLE_DEPTH_MM = 20.0  # the second try, after the first's result: sulci lie shallower, ventricles deeper


def displaced_csf(image: np.ndarray, mirrored: np.ndarray, brain: np.ndarray, both: np.ndarray,
                  spacing: Sequence[float]) -> np.ndarray:
    """Where CSF-dark intensity on one side faces, on the other, tissue that lies within :data:`CSF_SHIFT_MM` of
    that side's CSF: a CSF boundary displaced (ventricles of two sizes), not tissue replaced. CSF-dark: below the
    lower of two 3-class Otsu thresholds of the brain's intensities."""
    values = sitk.GetImageFromArray(image[brain].astype(np.float32).reshape(1, 1, -1))
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(values)
    cut = float(otsu.GetThresholds()[0])
    dark, dark_m = both & (image < cut), both & (mirrored < cut)
    sampling = tuple(float(v) for v in spacing)[::-1]  # (k, j, i) arrays of SimpleITK spacing (x, y, z)

    def near(mask: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(~mask, sampling=sampling) <= CSF_SHIFT_MM if mask.any() else mask

    return (dark & near(dark_m)) | (dark_m & near(dark))


def demons_aligned(c: Case, arrays: Tuple[np.ndarray, ...]) -> List[np.ndarray]:
    """``arrays`` (on the mirror image's grid) warped by the demons field that aligns the mirror image to the image."""
    spacing = tuple(float(v) for v in c["spacing"])

    def img(a: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(np.ascontiguousarray(a, np.float32))
        out.SetSpacing(spacing)
        return out

    fixed, moving = img(c["image"] * c["brain"]), img(c["image_m"] * c["brain_m"])
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(30)
    demons.SetStandardDeviations(3.0 / (2 * min(spacing)))  # in voxels of the coarser grid
    field = demons.Execute(sitk.Shrink(fixed, [2, 2, 2]), sitk.Shrink(moving, [2, 2, 2]))
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    warp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return [sitk.GetArrayFromImage(sitk.Resample(img(a), fixed, warp, sitk.sitkLinear, 0.0)) for a in arrays]


def rimmed(c: Case, arr: np.ndarray, spread: str = "tail") -> np.ndarray:
    """``arr`` with the default chain's outer rim masked, normalised per brain (as every fused map is)."""
    s = refine_scores(arr.astype(np.float32), c["brain"], tuple(float(v) for v in c["spacing"]),
                      PostprocessOptions(rim_mm=RECOMMENDED_POSTPROCESS.rim_mm))
    return normalised(s, c["brain"], spread)


_LAST_CASE: Dict[object, object] = {}  # "case" -> the case last asked for; asymmetry σ -> its chain's map


def chain_at(c: Case, sigma: float) -> np.ndarray:
    """:func:`chain` with the asymmetry smoothed with ``sigma``, kept for the case asked for last, so that the
    two-scale maps reuse the single-scale maps of the same case (read only: the same array is returned again)."""
    if _LAST_CASE.get("case") is not c:
        _LAST_CASE.clear()
        _LAST_CASE["case"] = c
    if sigma not in _LAST_CASE:
        _LAST_CASE[sigma] = chain(c, sigma=sigma)
    return _LAST_CASE[sigma]


MAD = "mad normalisation (the default before)"
RESTORE = "restoration error instead of rec × grad"
NO_CEVAE = "intensity asymmetry alone (no ceVAE term)"
SIDED = "side-weighted asymmetry alone (the ceVAE term only picks the side)"
AXIAL = "axial map alone (of a three-orientation model)"
BACKGROUND = "asymmetry relative to its regional level (σ 20 mm)"
CSF = "asymmetry without displaced CSF boundaries (3 mm)"
VENTRICLES = "asymmetry without displaced CSF boundaries deeper than 20 mm"
# the asymmetry's smoothing σ (default 3 mm); two scales: the mean or maximum of two whole chains, each normalised
SIGMA_15, SIGMA_2, SIGMA_45 = "asymmetry σ 1.5 mm", "asymmetry σ 2 mm", "asymmetry σ 4.5 mm"
TWO_SCALE_MEAN = "two-scale asymmetry: mean of the σ 2 and σ 4.5 mm maps"
TWO_SCALE_MAX = "two-scale asymmetry: maximum of the σ 2 and σ 4.5 mm maps"
MAPS: Dict[str, Callable[[Case], np.ndarray]] = {
    "default": chain,  # tail normalisation
    MAD: lambda c: chain(c, tail=False),
    "asymmetry σ = max(3 mm, slice thickness)": lambda c: chain(c, sigma=max(3.0, c["thickness"])),
    "no asymmetry (√combi only)": lambda c: chain(c, use_asymmetry=False),
    "asymmetry floor 0.3 (more weight to the ceVAE score)": lambda c: chain(c, floor=0.3),
    "asymmetry floor 1.0": lambda c: chain(c, floor=1.0),
    "asymmetry against a demons-aligned mirror": lambda c: chain(c, mirror="demons"),
    "tolerant asymmetry (mirror's 3 × 3 × 3 range)": lambda c: chain(c, mirror="tolerant"),
    CSF: lambda c: chain(c, mirror="csf"),
    VENTRICLES: lambda c: chain(c, mirror="ventricles"),
    RESTORE: lambda c: chain(c, term="restore"),
    "score power 0.25 (the asymmetry has more say)": lambda c: chain(c, power=0.25),
    BACKGROUND: lambda c: chain(c, background_mm=20.0),
    AXIAL: lambda c: chain({**c, "combi": c["combi_axial"], "combi_m": c["combi_axial_m"]}),
    NO_CEVAE: lambda c: rimmed(c, case_asymmetry(c)),
    SIDED: lambda c: rimmed(c, case_asymmetry(c, sided=True)),
    SIGMA_15: lambda c: chain(c, sigma=1.5),
    SIGMA_2: lambda c: chain_at(c, 2.0),
    SIGMA_45: lambda c: chain_at(c, 4.5),
    TWO_SCALE_MEAN: lambda c: (chain_at(c, 2.0) + chain_at(c, 4.5)) / 2,
    TWO_SCALE_MAX: lambda c: np.maximum(chain_at(c, 2.0), chain_at(c, 4.5)),
}

# maps compared on the moved-tissue cases only (normal intensities, wrong structure); the single terms
# with the same rim and normalisation as the fused maps, so that only the terms differ
TERMS: Dict[str, Callable[[Case], np.ndarray]] = {
    "default (tail normalisation)": chain,
    MAD: MAPS[MAD],
    "asymmetry floor 1.0": lambda c: chain(c, floor=1.0),
    "ceVAE combi (rec × grad) alone": lambda c: rimmed(c, c["combi"]),
    "ceVAE reconstruction error alone": lambda c: rimmed(c, c["rec"]),
    "ceVAE KL gradient alone": lambda c: rimmed(c, c["grad"]),
    "restoration error alone": lambda c: rimmed(c, c["restore"]),
    "score power 0.25": MAPS["score power 0.25 (the asymmetry has more say)"],
    RESTORE: MAPS[RESTORE],
    "intensity asymmetry alone": MAPS[NO_CEVAE],
    "side-weighted asymmetry alone": MAPS[SIDED],
}
TERMS_RECIPE = "moved tissue"
# maps made from a term only some caches hold (benchmark_acquisition_maps.py --restoration)
NEEDS = {RESTORE: "restore", "restoration error alone": "restore", AXIAL: "combi_axial"}


# ---- labelmaps ----

def components(z: np.ndarray, c: Case, t: float, min_mm3: float, peak: float = 0.0, opening: bool = False,
               grow: float = 1.0, mass: Optional[float] = None, big_ml: float = np.inf
               ) -> Tuple[List[Tuple[int, float]], np.ndarray]:
    """Components (26-connected) of z > ``grow``·t with at least ``min_mm3`` and a maximum above ``peak``·t
    (``grow`` < 1: hysteresis, the components of z > grow·t that reach above t, as the detector's
    ``--hysteresis grow``; ``opening``: the thresholded map first opened in each slice plane by a 3 × 3
    cross, which removes structures one or two voxels wide such as enhancing vessels; ``mass``: only those
    whose excess Σ(z − t) exceeds it; ``big_ml``: a component at least this large is kept whatever its peak):
    ([(label, summed score)], largest summed score first; the label array)."""
    peak = max(peak, 1.0) if grow < 1 else peak
    above = z > grow * t
    if opening:
        cross = np.zeros((3, 3, 3), bool)
        cross[1] = ndimage.generate_binary_structure(2, 1)
        cross = np.moveaxis(cross, 0, 2 - int(c["slice_axis"]))  # in the acquisition's slice planes
        above = ndimage.binary_opening(above, structure=cross)
    labels, n = ndimage.label(above, structure=CONN)
    if n == 0:
        return [], labels
    min_voxels = int(np.ceil(min_mm3 / float(np.prod(c["spacing"])))) if min_mm3 > 0 else 0
    idx = np.arange(1, n + 1)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    sums = ndimage.sum_labels(z, labels, idx)
    peaks = ndimage.maximum(z, labels, idx) if peak > 0 else np.full(n, np.inf)
    excess = sums - t * sizes if mass is not None else np.full(n, np.inf)
    big_voxels = big_ml * 1000.0 / float(np.prod(c["spacing"]))
    keep = [(int(i), float(s)) for i, n_vox, s, p, e in zip(idx, sizes, sums, peaks, excess)
            if n_vox >= min_voxels and (p > peak * t or n_vox >= big_voxels) and (mass is None or e > mass)]
    return sorted(keep, key=lambda k: -k[1]), labels


# name -> (minimum component volume (case -> mm³), peak factor, in-plane opening, hysteresis grow fraction)
DEFAULT_LABELS = f"min 50 mm³, peak > {SHIPPED_PEAK:g} t (default)"  # the bundled model's labelmap
LABELS: Dict[str, Tuple[Callable[[Case], float], float, bool, float]] = {
    DEFAULT_LABELS: (lambda c: 50.0, SHIPPED_PEAK if SHIPPED_PEAK > 1 else 0.0, False, 1.0),
    "min 50 mm³ (the default before)": (lambda c: 50.0, 0.0, False, 1.0),
    "min 100 mm³": (lambda c: 100.0, 0.0, False, 1.0),
    "min 200 mm³": (lambda c: 200.0, 0.0, False, 1.0),
    "min 50 mm³ × slice thickness / 1 mm": (lambda c: 50.0 * c["thickness"], 0.0, False, 1.0),
    "min 50 mm³, peak > 1.5 t": (lambda c: 50.0, 1.5, False, 1.0),
    "min 50 mm³, in-plane opening": (lambda c: 50.0, 0.0, True, 1.0),
    "min 50 mm³, grown to 0.7 t (hysteresis)": (lambda c: 50.0, 0.0, False, 0.7),
}
# cluster-level calibration: keep a component only if its excess mass Σ(z − t) exceeds that of every component
# (≥ 50 mm³) the same map and threshold give on the calibration scans (the other subjects' clean healthy scans)
MASS = "min 50 mm³, heavier than every component of the healthy calibration scans"
LABELS[MASS] = (lambda c: 50.0, 0.0, False, 1.0)
# the peak filter with an escape for large components (a lesion whose peak lies just under 2 t, as at 0.5 mm)
BIG: Dict[str, float] = {f"{DEFAULT_LABELS[:-len(' (default)')]}, or ≥ {ml:g} ml": ml for ml in (0.5, 1.0, 2.0)}
for _rule in BIG:
    LABELS[_rule] = LABELS[DEFAULT_LABELS]


MIN50, SCALED, PEAK, OPEN = ("min 50 mm³ (the default before)", "min 50 mm³ × slice thickness / 1 mm",
                              "min 50 mm³, peak > 1.5 t", "min 50 mm³, in-plane opening")
# the levers measured: (map, threshold rule, labelmap rule); the first is the shipped default
LEVERS: List[Tuple[str, str, str]] = [
    ("default", "clean", DEFAULT_LABELS),
    ("default", "variant", DEFAULT_LABELS),
    ("default", "class", DEFAULT_LABELS),
    ("default", "clean", MIN50),
    ("default", "variant", MIN50),
    ("default", "class", MIN50),
    ("default", "class", SCALED),
    ("default", "clean", "min 100 mm³"),
    ("default", "clean", "min 200 mm³"),
    ("default", "clean", SCALED),
    ("default", "clean", PEAK),
    ("default", "clean", OPEN),
    ("default", "clean", "min 50 mm³, grown to 0.7 t (hysteresis)"),
    ("default", "clean", MASS),
    *[("default", "clean", rule) for rule in BIG],
    (MAD, "clean", MIN50),
    (MAD, "variant", MIN50),
    (MAD, "class", SCALED),
    ("asymmetry σ = max(3 mm, slice thickness)", "clean", MIN50),
    ("no asymmetry (√combi only)", "clean", MIN50),
    ("asymmetry floor 0.3 (more weight to the ceVAE score)", "clean", MIN50),
    ("asymmetry floor 1.0", "clean", MIN50),
    ("asymmetry against a demons-aligned mirror", "clean", MIN50),
    ("tolerant asymmetry (mirror's 3 × 3 × 3 range)", "clean", MIN50),
    ("tolerant asymmetry (mirror's 3 × 3 × 3 range)", "clean", DEFAULT_LABELS),
    (CSF, "clean", MIN50),
    (CSF, "clean", DEFAULT_LABELS),
    (CSF, "variant", DEFAULT_LABELS),
    (VENTRICLES, "clean", DEFAULT_LABELS),
    (RESTORE, "clean", MIN50),
    ("score power 0.25 (the asymmetry has more say)", "clean", MIN50),
    ("score power 0.25 (the asymmetry has more say)", "clean", PEAK),
    ("score power 0.25 (the asymmetry has more say)", "clean", MASS),
    ("score power 0.25 (the asymmetry has more say)", "clean", DEFAULT_LABELS),
    (AXIAL, "clean", MIN50),
    (AXIAL, "clean", DEFAULT_LABELS),
    (NO_CEVAE, "clean", MIN50),
    (SIDED, "clean", MIN50),
    (BACKGROUND, "clean", MIN50),
    *[(m, "clean", DEFAULT_LABELS) for m in (SIGMA_15, SIGMA_2, SIGMA_45, TWO_SCALE_MEAN, TWO_SCALE_MAX)],
]


# the levers whose lesions are also counted one by one (evaluate's lesion-wise figures: CeVAEAnomalyResearch.lesionwise)
LESIONWISE = (f"default | clean | {DEFAULT_LABELS}", f"default | clean | {MIN50}")
LESION_SIZES_ML = (0.5, 4.0)  # lesions by volume: below 0.5 ml, 0.5-4 ml, above 4 ml


def count_lesions(fig: Dict[str, list], z: np.ndarray, c: Case, labelmap: np.ndarray) -> None:
    """Add to ``fig`` each lesion of lesion case ``c`` (its ml, whether ``labelmap`` overlaps it) and the labelmap's
    components on no lesion, as ``evaluate`` counts them."""
    if not np.isfinite(z[labelmap]).all():
        raise ValueError(f"{c['case']}: the map is not finite on the labelmap")
    like = sitk.GetImageFromArray(z.astype(np.float32))
    truth = c["gt"].astype(bool)
    hits = lesion_hits(truth, labelmap, like)
    fig["lesion_ml"] += [voxels * c["voxel_ml"] for voxels, _ in hits]
    fig["lesion_found"] += [found for _, found in hits]
    fig["false_components"].append(lesion_counts(truth, labelmap, like).false_components)


def label_case(z: np.ndarray, c: Case, t: float, rule: str, mass: Optional[float] = None
               ) -> Tuple[np.ndarray, int, Optional[bool]]:
    """:func:`labelled` by the labelmap rule ``rule`` of :data:`LABELS` at threshold ``t`` (``mass``: see
    :func:`components`)."""
    min_fn, peak, opening, grow = LABELS[rule]
    return labelled(c, *components(z, c, t, min_fn(c), peak, opening, grow, mass, BIG.get(rule, np.inf)))


def largest_excess(scans: List[Tuple[np.ndarray, Case]], t: float) -> float:
    """The largest excess mass Σ(z − t) of any component (≥ 50 mm³) of the maps ``scans`` at threshold ``t``
    (0 when they have none): the null a component must exceed under the calibrated-mass rule."""
    out = 0.0
    for z, c in scans:
        comps, labels = components(z, c, t, 50.0)
        if comps:
            idx = [k for k, _ in comps]
            sizes = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)[idx]
            out = max(out, float(np.max(np.array([s for _, s in comps]) - t * sizes)))
    return out


def labelled(c: Case, comps: List[Tuple[int, float]], labels: np.ndarray) -> Tuple[np.ndarray, int, Optional[bool]]:
    """(labelmap of the kept ``comps``, their number, whether the lesion table's first row is a lesion (None: no
    row)), from :func:`components`' output."""
    if not comps:
        return np.zeros(labels.shape, bool), 0, None
    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[[k for k, _ in comps]] = True
    return keep[labels], len(comps), bool(c["gt"][labels == comps[0][0]].any())


# ---- slices ----

def detector_slice_weight(c: Case, m: str) -> float:
    """The slice-score weight the detector gives map ``m`` of case ``c`` (a cache of several orientations keeps
    its single-orientation map as ``combi_axial``)."""
    return slice_map_weight(1 if m == AXIAL or "combi_axial" not in c else 3)


def on_rows(c: Case, per_slice: np.ndarray) -> np.ndarray:
    """Values of the cached box's slices (along the case's slice axis) on the rows of its slice scores; 0 for
    rows outside the box."""
    rel = c["slice_index"] - int(c["box_start"][2 - int(c["slice_axis"])])
    inside = (rel >= 0) & (rel < len(per_slice))
    return np.where(inside, per_slice[np.clip(rel, 0, len(per_slice) - 1)], 0)


def lesion_rows(c: Case) -> np.ndarray:
    """Whether each row of the case's slice scores holds lesion."""
    axis = 2 - int(c["slice_axis"])
    return on_rows(c, np.moveaxis(c["gt"], axis, 0).reshape(c["gt"].shape[axis], -1).any(1)).astype(bool)


def top_row(anomaly: np.ndarray, part: np.ndarray, neg_elbo: np.ndarray, c: Case) -> int:
    """The row the detector's slice table puts first: highest ``anomaly``, ties broken by the map part, the
    negative ELBO, then the lower slice index."""
    return min(range(len(anomaly)), key=lambda r: (-anomaly[r], -part[r], -neg_elbo[r], c["slice_index"][r]))


def top_slice_on_lesion(c: Case, z: np.ndarray, weight: float) -> bool:
    """Whether the detector's most anomalous slice (rank fusion of map_max and negative ELBO) holds lesion."""
    map_max = on_rows(c, slice_quantile(z, c["brain"], 2 - int(c["slice_axis"]), 1.0))
    anomaly = fused_slice_rank(map_max, c["slice_neg_elbo"], weight)
    return bool(lesion_rows(c)[top_row(anomaly, map_max, c["slice_neg_elbo"], c)])


# ---- loading ----

def load(path: Path) -> Case:
    with np.load(path) as z:
        c = {k: z[k] for k in z.files}
    c.update(json.loads(str(c.pop("meta"))))
    c["image"] = c["image"].astype(np.float32)
    c["image_m"] = c["image_m"].astype(np.float32)
    c["combi_m"] = c["combi_m"].astype(np.float32)
    c["thickness"] = float(c["spacing"][int(c["slice_axis"])])
    c["voxel_ml"] = float(np.prod(c["spacing"])) / 1000.0
    return c


def index(folders: Sequence[Path]) -> Dict[Tuple[str, str], List[Path]]:
    """(subject, variant) -> case files (held-out healthy first, the model's training subjects last)."""
    out: Dict[Tuple[str, str], List[Path]] = defaultdict(list)
    for p in (case for folder in folders for case in case_files(folder)):
        with np.load(p) as z:
            meta = json.loads(str(z["meta"]))
        out[(meta["subject"], meta["variant"])].append(p)
    for k in out:
        out[k].sort(key=lambda p: (0 if "healthy" in p.name else 2 if "--train-" in p.name else 1, p.name))
    return out


def healthy_top(values: np.ndarray) -> Tuple[np.ndarray, int]:
    """A healthy scan's brain scores as :func:`quantile_threshold` needs them: its top 1 % (at least 10),
    sorted, and its voxel count."""
    k = max(int(0.01 * values.size), 10)
    return np.sort(np.partition(values, values.size - k)[-k:]), values.size


def quantile_threshold(tops: List[Tuple[np.ndarray, int]], rate: float) -> float:
    """The (1 - rate) quantile of pooled healthy scores, from each scan's top values and its voxel count."""
    n = sum(k for _, k in tops)
    values = np.sort(np.concatenate([v for v, _ in tops]))[::-1]
    rank = rate * n
    i = int(np.floor(rank))
    return float(values[min(i, len(values) - 1)])


def threshold_for(tops: Dict[Tuple[str, str, str, str], Tuple[np.ndarray, int]], m: str, s: str, v: str, rule: str,
                  calibration: Sequence[str]) -> float:
    """The threshold of map ``m`` for subject S in variant ``v``: the bundled rate on the held-out healthy scans
    (``tops``: (map, subject, variant, case) -> :func:`healthy_top`) of the ``calibration`` subjects other than S
    ("clean", "class", "variant": a site calibration on two healthy scans of the same acquisition), or on the
    training subjects of S's model scored by it ("in-sample ...")."""
    same = {"clean": lambda w: w == "clean", "variant": lambda w: w == v,
            "class": lambda w: thickness_class(w) == thickness_class(v)}[rule.replace("in-sample ", "")]
    if rule.startswith("in-sample"):
        pool = [t for (mm, o, w, case), t in tops.items() if mm == m and o == s and case.startswith("train-") and same(w)]
    else:
        pool = [t for (mm, o, w, case), t in tops.items()
                if mm == m and o != s and o in calibration and case == "healthy" and same(w)]
    return quantile_threshold(pool, SHIPPED_FPR) if pool else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, nargs="+", default=[Path("runs/acquisition")], help="cache folder(s)")
    p.add_argument("--subjects", help="comma-separated subjects to evaluate (default: all of the caches)")
    p.add_argument("--calibration-subjects",
                   help="comma-separated subjects whose healthy scans set the thresholds (default: all; never S itself)")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--prefix", default="benchmark_acquisition", help="output names: <prefix>.json, <prefix>_tables.md")
    p.add_argument("--maps-levers", help="comma-separated substrings of MAPS names (default: all)")
    p.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="variants to evaluate, each a quoted name (some hold commas; default: all of the caches); the "
                        "healthy scans of every cached variant still set the thresholds, so runs over disjoint "
                        "variants give the rows one run gives (join them with --merge)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="join the .json results of runs over disjoint variants into one result and its tables "
                        "(no cache is read)")
    args = p.parse_args()
    if args.merge:
        try:
            result = merge_results([json.loads(f.read_text()) for f in args.merge])
        except ValueError as e:
            p.error(str(e))
        write_result(result, args.out, args.prefix)
        return
    t0 = time.time()
    files = index(args.maps)
    cached_subjects = {s for s, _ in files}
    subjects = sorted(args.subjects.split(",") if args.subjects else cached_subjects)
    calibration = sorted(args.calibration_subjects.split(",") if args.calibration_subjects else cached_subjects)
    missing = sorted(set(subjects + calibration) - cached_subjects)
    if missing:
        p.error(f"no cached cases of {missing} in {[str(f) for f in args.maps]}")
    files = {(s, v): paths for (s, v), paths in files.items() if s in subjects or s in calibration}
    variants = [v for v in VARIANTS if any((s, v) in files for s in subjects)]
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            p.error(f"no cached cases of variants {unknown}; cached: {variants}")
        variants = [v for v in variants if v in args.variants]
    with np.load(next(iter(files.values()))[0]) as z:
        cached = set(z.files)
    levers = [lv for lv in LEVERS if (not args.maps_levers or lv[0] == "default"
                                      or any(w in lv[0] for w in args.maps_levers.split(",")))
              and NEEDS.get(lv[0], "combi") in cached]
    terms_maps = {name: fn for name, fn in TERMS.items() if NEEDS.get(name, "combi") in cached}
    map_names = list(dict.fromkeys(m for m, _, _ in levers))
    # pass 1: healthy scans -> top scores (for calibrated thresholds)
    tops: Dict[Tuple[str, str, str], Tuple[np.ndarray, int]] = {}
    checks: Dict[str, float] = {}
    calibration_maps: Dict[Tuple[str, str], Tuple[np.ndarray, Case]] = {}  # (map, subject) -> clean healthy map
    for (s, v), paths in files.items():
        for path in paths:
            c = load(path)
            if c["case"] != "healthy" and not c["case"].startswith("train-"):
                continue
            if c["case"] == "healthy" and len(map_names) > 1:
                # the chain here vs the detector's map, with the spread the fold model's header names (older folds: mad)
                checks[f"{s} / {v}"] = min(float(np.abs(chain(c, tail=t) - c["final"]).max())
                                           for t in (True, False))
            for m in map_names:
                z = MAPS[m](c)
                tops[(m, s, v, c["case"])] = healthy_top(z[c["brain"]])
                if v == "clean" and c["case"] == "healthy" and (m, "clean", MASS) in levers:
                    calibration_maps[(m, s)] = (z, {k: c[k] for k in ("spacing", "slice_axis")})
    print(f"healthy pass {time.time() - t0:.0f} s", flush=True)

    null_mass: Dict[Tuple[str, str, float], float] = {}  # (map, subject, threshold) -> largest healthy excess mass
    rows: Dict[str, Dict[str, dict]] = defaultdict(dict)  # lever -> variant -> figures
    fusion: Dict[str, Dict[float, list]] = defaultdict(lambda: defaultdict(list))  # subject -> w -> top-slice hits
    terms: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))  # variant -> map -> cases
    for v in variants:
        per_lever: Dict[str, dict] = defaultdict(lambda: defaultdict(list))
        pooled: Dict[str, list] = defaultdict(list)
        for s in subjects:
            for path in files.get((s, v), []):
                if "--train-" in path.name:
                    continue
                c = load(path)
                if c["recipe"] == TERMS_RECIPE:
                    if c["gt"].any():
                        for name, fn in terms_maps.items():
                            terms[v][name].append((fn(c)[c["brain"]], c["gt"][c["brain"]]))
                    continue
                for m in map_names:
                    z = MAPS[m](c)
                    if c["case"] != "healthy":
                        if not c["gt"].any():
                            continue  # the lesions were cut off with the part of the brain not covered
                        pooled[m].append((z[c["brain"]], c["gt"][c["brain"]]))
                        top = top_slice_on_lesion(c, z, detector_slice_weight(c, m))
                    for mm, rule, lab in levers:
                        if mm != m:
                            continue
                        t = threshold_for(tops, m, s, v, rule, calibration)
                        key = f"{m} | {rule} | {lab}"
                        mass = None
                        if lab == MASS:  # the calibration scans of rule "clean": the other subjects' clean healthy scans
                            if (m, s, t) not in null_mass:
                                null_mass[(m, s, t)] = largest_excess(
                                    [z_c for (mc, o), z_c in calibration_maps.items()
                                     if mc == m and o != s and o in calibration], t)
                            mass = null_mass[(m, s, t)]
                        labelmap, n, first = label_case(z, c, t, lab, mass)
                        if c["case"] == "healthy":
                            per_lever[key]["healthy_ml"].append(float(labelmap.sum()) * c["voxel_ml"])
                            per_lever[key]["healthy_components"].append(n)
                        else:
                            per_lever[key]["dice"].append(dice(labelmap, c["gt"]))
                            per_lever[key]["first_row_lesion"].append(bool(first))
                            if first is not None:
                                per_lever[key]["first_row_when_marked"].append(bool(first))
                            per_lever[key]["jump_lesion"].append(top if first is None else first)
                            if key in LESIONWISE:
                                count_lesions(per_lever[key], z, c, labelmap)
                            per_lever[key]["recipe"].append(c["recipe"])
                            per_lever[key]["subject"].append(s)
                        per_lever[key]["thresholds"].append(t)
                    if c["case"] != "healthy":
                        per_lever[m]["top_slice"].append(top)
                        if m == "default":
                            for w in FUSION_WEIGHTS:
                                fusion[s][w].append((v, top_slice_on_lesion(c, z, w)))
        for key, fig in per_lever.items():
            if " | " not in key or not np.all(np.isfinite(fig["thresholds"])):
                continue  # not a lever, or no scans to calibrate it on
            m = key.split(" | ")[0]
            pm = pooled_metrics(pooled[m]) if pooled[m] else {"auprc": float("nan"), "best_dice": float("nan")}
            rows[key][v] = {
                "auprc": pm["auprc"], "best_dice": pm["best_dice"], "dice": float(np.mean(fig["dice"])),
                "dice_per_case": fig["dice"], "recipes": fig["recipe"], "case_subjects": fig["subject"],
                "healthy_ml": fig["healthy_ml"], "healthy_components": fig["healthy_components"],
                "first_row_lesion": float(np.mean(fig["first_row_lesion"])),
                "first_row_when_marked": fig["first_row_when_marked"],
                "jump_lesion": float(np.mean(fig["jump_lesion"])),
                "top_slice": float(np.mean(per_lever[m]["top_slice"])), "top_slice_per_case": per_lever[m]["top_slice"],
                "thresholds": fig["thresholds"],
                **({k: fig[k] for k in ("lesion_ml", "lesion_found", "false_components")} if key in LESIONWISE else {}),
            }
        print(f"{v} ({time.time() - t0:.0f} s)", flush=True)
    moved = {v: {name: {k: pm[k] for k in ("auprc", "best_dice", "n_cases")}
                     for name, cases in per_map.items() for pm in [pooled_metrics(cases)]}
             for v, per_map in terms.items()}
    hits = {s: {str(w): [[v, bool(h)] for v, h in fusion[s][w]] for w in FUSION_WEIGHTS} for s in subjects}
    result = {"moved_tissue": moved, "chain_vs_detector_max_abs_difference": checks, "subjects": subjects,
              "calibration_subjects": calibration, "variants": variants, "fpr": SHIPPED_FPR, "rows": rows,
              "slice_weight_hits": hits, "slice_weights": slice_weights(hits, subjects)}
    write_result(result, args.out, args.prefix)


def slice_weights(hits: Dict[str, Dict[str, list]], subjects: List[str]) -> dict:
    """Top slice on a lesion by slice-score fusion weight, and the weight chosen for each subject on the other
    subjects' cases (``hits``: subject -> weight -> [variant, top slice on a lesion] per case)."""
    def rate(subs: List[str], w: float) -> float:
        return float(np.mean([h for s in subs for _, h in hits[s][str(w)]]))
    chosen = {s: max(FUSION_WEIGHTS, key=lambda w: (rate([o for o in subjects if o != s], w), -abs(w - 0.7)))
              for s in subjects}
    return {"by_weight": {str(w): rate(subjects, w) for w in FUSION_WEIGHTS}, "chosen_on_other_subjects": chosen,
            "held_out_with_chosen": float(np.mean([h for s in subjects for _, h in hits[s][str(chosen[s])]]))}


def merge_results(results: List[dict]) -> dict:
    """One result from runs over disjoint variants of the same subjects, calibration and operating point."""
    first = results[0]
    for r in results[1:]:
        for k in ("subjects", "calibration_subjects", "fpr"):
            if r[k] != first[k]:
                raise ValueError(f"the runs differ in {k}: {first[k]} and {r[k]}")
    seen = [v for r in results for v in r["variants"]]
    twice = sorted({v for v in seen if seen.count(v) > 1})
    if twice:
        raise ValueError(f"variants evaluated by more than one run: {twice}")
    if any("slice_weight_hits" not in r for r in results):
        raise ValueError("a run was written before its slice-weight hits were kept: rerun it")
    variants = [v for v in VARIANTS if v in seen]
    rows: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for r in results:
        for key, per_v in r["rows"].items():
            rows[key].update(per_v)
    rows = {key: {v: per_v[v] for v in variants if v in per_v} for key, per_v in rows.items()}
    subjects = first["subjects"]
    hits = {s: {str(w): [h for r in results for h in r["slice_weight_hits"][s][str(w)]] for w in FUSION_WEIGHTS}
            for s in subjects}
    return {"moved_tissue": {v: m for r in results for v, m in r["moved_tissue"].items()},
            "chain_vs_detector_max_abs_difference": {k: d for r in results
                                                     for k, d in r["chain_vs_detector_max_abs_difference"].items()},
            "subjects": subjects, "calibration_subjects": first["calibration_subjects"], "variants": variants,
            "fpr": first["fpr"], "rows": rows, "slice_weight_hits": hits,
            "slice_weights": slice_weights(hits, subjects)}


def write_result(result: dict, out: Path, prefix: str) -> None:
    """``<prefix>.json`` and ``<prefix>_tables.md`` in ``out``; the tables printed."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{prefix}.json", json.dumps(result, indent=1))
    text = render(result)
    atomic_write_text(out / f"{prefix}_tables.md", text)
    print(text)


def _targets(r: dict) -> Tuple[bool, bool]:
    ok_h = all(ml <= 1.0 and n <= 2 for ml, n in zip(r["healthy_ml"], r["healthy_components"]))
    return ok_h, r["dice"] >= 0.35


def _variant_table(title: str, per_v: Dict[str, dict]) -> List[str]:
    lines = [title, "", "| variant | AUPRC | best Dice | Dice @ op | healthy ml (mean / max) | healthy components "
             "(mean / max) | top slice on a lesion | first table row a lesion (all cases; cases with a row) "
             "| jump on a lesion |", "|---|---|---|---|---|---|---|---|---|"]
    for v, r in per_v.items():
        lines.append(f"| {v} | {r['auprc']:.3f} | {r['best_dice']:.3f} | {r['dice']:.3f} | "
                     f"{np.mean(r['healthy_ml']):.2f} / {np.max(r['healthy_ml']):.2f} | "
                     f"{np.mean(r['healthy_components']):.1f} / {np.max(r['healthy_components'])} | "
                     f"{r['top_slice']:.2f} | {r['first_row_lesion']:.2f}; {_when_marked([r])} | "
                     f"{r['jump_lesion']:.2f} |")
    return lines


def _when_marked(rs: List[dict]) -> str:
    """Share of first rows that are a lesion among the lesion cases whose labelmap has a row, and their number
    (rows of results written before this figure have none: "–")."""
    hits = [h for r in rs for h in r.get("first_row_when_marked", [])]
    return f"{np.mean(hits):.2f} (n={len(hits)})" if hits else "–"


def _merit(per_v: Dict[str, dict]) -> Tuple[float, float]:
    """(share of held-out healthy scans within the targets, mean Dice at the operating point)."""
    ok = [m <= 1.0 and n <= 2 for r in per_v.values() for m, n in zip(r["healthy_ml"], r["healthy_components"])]
    return float(np.mean(ok)), float(np.mean([r["dice"] for r in per_v.values()]))


def _lesionwise_tables(result: dict) -> List[str]:
    """Per labelmap rule of :data:`LESIONWISE` in ``result``: the lesions found (pooled, and by size) and the false
    components per lesion case and per healthy scan, by variant and over all."""
    low, high = LESION_SIZES_ML
    sizes = ((f"< {low:g} ml", lambda ml: ml < low), (f"{low:g}-{high:g} ml", lambda ml: (low <= ml) & (ml <= high)),
             (f"> {high:g} ml", lambda ml: ml > high))
    lines: List[str] = []
    for key in LESIONWISE:
        per_v = {v: r for v, r in result["rows"].get(key, {}).items() if "lesion_found" in r}
        if not per_v:
            continue
        lines += ["", f"Lesion-wise, {key} (a lesion is found where one labelmap voxel overlaps it; a false component "
                  "overlaps no lesion):", "", "| variant | lesions | found | " + " | ".join(
                      f"found, {name}" for name, _ in sizes) + " | false components per lesion case (mean / max) "
                  "| components per healthy scan (mean / max) |", "|---|---|---|" + "---|" * len(sizes) + "---|---|"]
        for v, r in [*per_v.items(), ("all variants", {k: [x for r in per_v.values() for x in r[k]] for k in (
                "lesion_ml", "lesion_found", "false_components", "healthy_components")})]:
            found, ml = np.array(r["lesion_found"], bool), np.array(r["lesion_ml"])
            cells = [f"{found[pick(ml)].mean():.2f} (n={int(pick(ml).sum())})" if pick(ml).any() else "–"
                     for _, pick in sizes]
            lines.append(f"| {v} | {len(found)} | {found.mean():.2f} | " + " | ".join(cells) +
                         f" | {np.mean(r['false_components']):.2f} / {np.max(r['false_components'])} | "
                         f"{np.mean(r['healthy_components']):.2f} / {np.max(r['healthy_components'])} |")
    return lines


def render(result: dict) -> str:
    default = f"default | clean | {DEFAULT_LABELS}"
    rows = result["rows"]
    others = ("the other subjects'" if result.get("calibration_subjects", result["subjects"]) == result["subjects"]
              else f"{', '.join(result['calibration_subjects'])}'s (never the subject's own)")
    lines = _variant_table(f"Default detector (subjects {', '.join(result['subjects'])}; threshold: healthy "
                           f"false-positive rate {result['fpr']:.6f} on {others} clean held-out scans):",
                           rows.get(default, {}))
    floor = _merit(rows[default])[0] if default in rows else 0.0
    best = max((k for k in rows if k != default and _merit(rows[k])[0] >= floor), key=lambda k: _merit(rows[k])[1],
               default=None)
    if best:
        lines += [""] + _variant_table(f"Best lever by mean Dice among those with at least the default's share of healthy "
                                       f"scans within target: {best}", rows[best])
    lines += ["", "Levers, averaged over variants (healthy targets: every held-out healthy scan ≤ 1 ml and ≤ 2 components):",
              "", "| lever (map · threshold rule · labelmap rule) | mean AUPRC | mean best Dice | mean Dice @ op "
              "| healthy ml (mean / max) | healthy components (mean / max) | healthy scans within target "
              "| top slice | first row a lesion (all cases; cases with a row) | jump on a lesion |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, per_v in result["rows"].items():
        rs = list(per_v.values())
        ml = [x for r in rs for x in r["healthy_ml"]]
        nc = [x for r in rs for x in r["healthy_components"]]
        ok = np.mean([m <= 1.0 and n <= 2 for m, n in zip(ml, nc)])
        lines.append(f"| {key} | {np.nanmean([r['auprc'] for r in rs]):.3f} | {np.nanmean([r['best_dice'] for r in rs]):.3f} "
                     f"| {np.mean([r['dice'] for r in rs]):.3f} | {np.mean(ml):.2f} / {np.max(ml):.2f} | "
                     f"{np.mean(nc):.1f} / {np.max(nc)} | {ok:.2f} | {np.mean([r['top_slice'] for r in rs]):.2f} | "
                     f"{np.mean([r['first_row_lesion'] for r in rs]):.2f}; {_when_marked(rs)} | "
                     f"{np.mean([r['jump_lesion'] for r in rs]):.2f} |")
    for figure, name in (("dice_per_case", "Dice @ op"), ("top_slice_per_case", "top slice on a lesion")):
        for field, what in (("recipes", "lesion recipe"), ("case_subjects", "held-out subject")):
            groups: Dict[str, list] = defaultdict(list)
            for r in result["rows"].get(default, {}).values():
                for k, d in zip(r[field], r.get(figure, [])):
                    groups[k].append(d)
            if groups:
                lines += ["", f"Default, {name} by {what} (all variants): " +
                          ", ".join(f"{k} {np.mean(v):.3f} (n={len(v)})" for k, v in groups.items())]
    diffs = result["chain_vs_detector_max_abs_difference"].values()
    if diffs:
        lines += ["", f"The levers' post-processing chain with the default parameters vs the detector's map: largest "
                  f"difference {max(diffs):.2g} (normalised units; intensities cached as float16)"]
    moved = result.get("moved_tissue", {})
    if moved:
        names = list(next(iter(moved.values())))
        lines += ["", "Moved-tissue lesions (normal intensities, wrong structure; not in the figures above), pooled AUPRC "
                  "/ best Dice per variant:", "", "| map | " + " | ".join(moved) + " | mean AUPRC |",
                  "|---|" + "---|" * (len(moved) + 1)]
        for name in names:
            cells = [f"{moved[v][name]['auprc']:.3f} / {moved[v][name]['best_dice']:.3f}" for v in moved]
            lines.append(f"| {name} | " + " | ".join(cells) +
                         f" | {np.mean([moved[v][name]['auprc'] for v in moved]):.3f} |")
    lines += _lesionwise_tables(result)
    sw = result["slice_weights"]
    lines += ["", "Top slice on a lesion by slice-score fusion weight (all variants): " +
              ", ".join(f"w {w}: {v:.3f}" for w, v in sw["by_weight"].items()) +
              f"; chosen on the other subjects {sw['chosen_on_other_subjects']}: {sw['held_out_with_chosen']:.3f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
