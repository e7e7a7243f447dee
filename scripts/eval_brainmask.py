#!/usr/bin/env python3
"""Evaluate the automatic brain mask against the reference masks of the healthy sample data.

colin27 is left out (it is the template). Besides robex (with skull) and mni152 (skull-stripped),
robex is also tested rotated by 15 degrees, on an oblique 1 mm 256^3 grid, with a smooth
bias field, with 5 mm slices, and skull-stripped with its own mask. Prints subject, Dice,
wall-clock and CPU seconds (CPU time is the fairer measure on a shared machine).

With ``--acquisitions``: every acquisition variant of CeVAEAnomalyResearch/acquisition.py (thick slices,
partial coverage, noise, bias, gamma, simulated post-contrast, their clinical combinations) of each
subject, against the reference mask degraded the same way by ``derive``. Prints Dice, the volume
difference (automatic - reference, ml), the automatic mask outside the reference ("leak", ml), the
reference outside the automatic mask ("miss", ml) and CPU seconds. Two deeper cuts than the benchmark's
(``EXTRA_CROPS``) probe the rule that takes a brain-sized foreground for a skull-stripped brain.

With ``--zero-air`` each scan's air is set to exactly 0 before the variants are made: a head cut off by the
field of view then looks brain-sized with a constant background, like a skull-stripped brain.

Usage: python scripts/eval_brainmask.py [--data-dir DIR] [--acquisitions [--subjects S,..] [--variants V,..]
       [--zero-air]] [-v]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CeVAEAnomaly"))

from CeVAEAnomalyLib.engine.brainmask import compute_brain_mask  # noqa: E402
from CeVAEAnomalyLib.io.images import voxel_volume_ml  # noqa: E402
from CeVAEAnomalyResearch.acquisition import VARIANTS, Recipe, derive  # noqa: E402
from CeVAEAnomalyResearch.sampledata import ensure_healthy_data, subject_files  # noqa: E402

Case = Callable[[], "tuple[sitk.Image, sitk.Image]"]
EXTRA_CROPS = {"bottom 40 % cut off": Recipe(crop=("bottom", 0.4)), "top 50 % cut off": Recipe(crop=("top", 0.5))}
RECIPES = {**VARIANTS, **EXTRA_CROPS}


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    return 2.0 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


def _rotation(degrees: float, centre: tuple[float, ...]) -> sitk.Euler3DTransform:
    angle = np.deg2rad(degrees)
    return sitk.Euler3DTransform(centre, angle, 0.5 * angle, -0.5 * angle, (6.0, -8.0, 5.0))


def _resample_pair(t1: sitk.Image, mask: sitk.Image, grid: sitk.Image, transform: sitk.Transform):
    return (sitk.Resample(t1, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
            sitk.Resample(mask, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def _oblique_grid(image: sitk.Image, degrees: float, spacing: float, size: int) -> sitk.Image:
    """A cubic grid with a rotated direction matrix centred on ``image``."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    rotation = np.array(_rotation(degrees, (0, 0, 0)).GetMatrix()).reshape(3, 3)
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(direction.flatten().tolist())
    grid.SetOrigin((np.array(centre) - direction @ np.full(3, (size - 1) / 2 * spacing)).tolist())
    return grid


def _bias(image: sitk.Image) -> sitk.Image:
    """Multiply by a smooth field varying 0.7..1.3 across the field of view."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in reversed(image.GetSize())], indexing="ij")
    field = 1.0 + 0.3 * np.clip(0.6 * x + 0.5 * y - 0.6 * z, -1, 1)
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * field.astype(np.float32))
    out.CopyInformation(image)
    return out


def cases(folder: Path) -> Iterator[tuple[str, Case]]:
    def load(name: str):
        t1, mask = subject_files(folder, name)
        return sitk.ReadImage(str(t1)), sitk.ReadImage(str(mask))

    def rotated():
        t1, mask = load("robex")
        centre = t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()])
        return _resample_pair(t1, mask, t1, _rotation(15.0, centre))

    def oblique_256():
        t1, mask = load("robex")
        return _resample_pair(t1, mask, _oblique_grid(t1, 20.0, 1.0, 256), sitk.Transform())

    def thick_slices():
        t1, mask = load("robex")
        grid = sitk.Image([int(t1.GetSize()[0] * 1.5), int(t1.GetSize()[1] * 1.5), t1.GetSize()[2] * 3 // 10],
                          sitk.sitkUInt8)
        grid.SetSpacing((1.0, 1.0, 5.0))
        grid.SetDirection(t1.GetDirection())
        grid.SetOrigin(t1.GetOrigin())
        return _resample_pair(sitk.SmoothingRecursiveGaussian(sitk.Cast(t1, sitk.sitkFloat32), (0.1, 0.1, 2.0)),
                              mask, grid, sitk.Transform())

    def stripped():
        t1, mask = load("robex")
        return sitk.Mask(t1, mask), mask

    def biased():
        t1, mask = load("robex")
        return _bias(sitk.Cast(t1, sitk.sitkFloat32)), mask

    yield "robex", lambda: load("robex")
    yield "mni152", lambda: load("mni152")
    yield "robex_rot15", rotated
    yield "robex_oblique_256", oblique_256
    yield "robex_bias", biased
    yield "robex_5mm_slices", thick_slices
    yield "robex_stripped", stripped


def overlap_ml(auto: sitk.Image, reference: sitk.Image) -> tuple[float, float, float]:
    """(automatic - reference volume, automatic outside the reference, reference outside the automatic), in ml."""
    x = sitk.GetArrayViewFromImage(auto) > 0
    y = sitk.GetArrayViewFromImage(reference) > 0
    voxel = voxel_volume_ml(reference)
    return ((np.count_nonzero(x) - np.count_nonzero(y)) * voxel, np.count_nonzero(x & ~y) * voxel,
            np.count_nonzero(y & ~x) * voxel)


def zero_air(head: sitk.Image) -> sitk.Image:
    """``head`` with its air set to exactly 0, as a masked or defaced export has it: everything outside the
    head's outline (above a tenth of its 99.5th percentile, largest component, grown by 3 voxels, holes filled)."""
    values = sitk.GetArrayFromImage(head).astype(np.float32)
    outline = sitk.BinaryDilate(sitk.Cast(head > 0.1 * float(np.percentile(values, 99.5)), sitk.sitkUInt8), [3] * 3)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(outline), sortByObjectSize=True) == 1
    inside = sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)) > 0
    result = sitk.GetImageFromArray(np.where(inside, values, 0.0).astype(np.float32))
    result.CopyInformation(head)
    return result


def acquisitions(folder: Path, subjects: list[str], variants: list[str], air_zeroed: bool = False) -> None:
    """One markdown row per subject and acquisition variant (the reference mask degraded with the image);
    with ``air_zeroed`` the clean scan's air is set to 0 first (``zero_air``)."""
    print("| subject | variant | size | spacing (mm) | Dice | volume diff (ml) | leak (ml) | miss (ml) | cpu s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for subject in subjects:
        t1_path, mask_path = subject_files(folder, subject)
        t1, reference = sitk.ReadImage(str(t1_path)), sitk.ReadImage(str(mask_path))
        if air_zeroed:
            t1 = zero_air(t1)
        truth = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
        truth.CopyInformation(reference)
        for variant in variants:
            seed = list(RECIPES).index(variant)  # the same degradation whichever variants are selected
            image, brain, _ = derive(RECIPES[variant], t1, reference, truth, seed)
            cpu_start = time.process_time()
            mask = compute_brain_mask(image)
            cpu = time.process_time() - cpu_start
            diff, leak, miss = overlap_ml(mask, brain)
            size = "x".join(str(n) for n in image.GetSize())
            spacing = "x".join(f"{s:g}" for s in image.GetSpacing())
            print(f"| {subject} | {variant} | {size} | {spacing} | {dice(mask, brain):.3f} | {diff:+.0f} | "
                  f"{leak:.0f} | {miss:.0f} | {cpu:.1f} |", flush=True)


def _selected(text: str, names: list[str]) -> list[str]:
    """The ``names`` containing one of the comma-separated parts of ``text``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return [n for n in names if any(p in n for p in parts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="healthy data folder (default: find or fetch)")
    parser.add_argument("--acquisitions", action="store_true", help="evaluate on the acquisition variants")
    parser.add_argument("--subjects", default="mni152,robex",
                        help="with --acquisitions: subjects (default mni152,robex; colin27 is the template)")
    parser.add_argument("--variants", default="", help="with --acquisitions: names containing one of these "
                        "comma-separated parts (default: all)")
    parser.add_argument("--zero-air", action="store_true",
                        help="with --acquisitions: set each scan's air to exactly 0 first (masked or defaced exports)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    folder = args.data_dir or ensure_healthy_data()
    if args.acquisitions:
        variants = _selected(args.variants, list(RECIPES)) if args.variants else list(RECIPES)
        acquisitions(folder, [s.strip() for s in args.subjects.split(",")], variants, args.zero_air)
        return 0
    print(f"{'subject':20s} {'size':>16s} {'Dice':>6s} {'seconds':>8s} {'cpu_s':>6s}")
    for name, make in cases(folder):
        t1, reference = make()
        start, cpu_start = time.perf_counter(), time.process_time()
        mask = compute_brain_mask(t1)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        size = "x".join(str(n) for n in t1.GetSize())
        print(f"{name:20s} {size:>16s} {dice(mask, reference):6.3f} {seconds:8.1f} {cpu:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
