"""Cohort benchmark: preprocessing and training memory and speed for simulated cohorts of N subjects.

Subjects are made from the three healthy scans (colin27, mni152, robex) by a random smooth
deformation (B-spline, a few mm) and intensity changes (gamma, scale, smooth bias field, noise),
resampled to 2.5 mm voxels and stored as int16 so that a thousand subjects stay small and quick
to make. The cohort of N is the
first N of one pool, so larger cohorts contain the smaller ones. For each N it runs, as separate
processes of the real command line:

  1. ``cevae-anomaly prepare`` into a fresh cache: wall time, peak RSS, cache size;
  2. ``cevae-anomaly train --cache-dir`` (64 px, the default model and batch size): start-up time,
     steps/s over the logged rows, and the peak RSS of the training process. Training is stopped
     after ``--rows`` log rows (10 steps each); packaging/calibration is not part of the measure.

    python scripts/bench_cohort.py --n 10 100 1000 [--workdir runs/cohort] [--threads 1]

It prints a Markdown table (and writes ``--json``). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import zoom

REPO = Path(__file__).resolve().parents[1]
HEALTHY = Path(os.environ.get("CEVAE_DATA_DIR", REPO.parent / "shared" / "data" / "healthy"))
BASES = ("colin27", "mni152", "robex")
SPACING = 2.5  # mm: the simulated volumes are downsampled to keep 1000 subjects small and quick


def downsampled(image: sitk.Image, interpolator: int, pixel: int) -> sitk.Image:
    """``image`` on a grid of SPACING mm voxels covering the same extent."""
    size = [int(round(n * s / SPACING)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), (SPACING,) * 3,
                         image.GetDirection(), 0, pixel)


def simulate(base: Tuple[sitk.Image, sitk.Image], rng: np.random.Generator) -> Tuple[sitk.Image, sitk.Image]:
    """One simulated subject from a (downsampled) base: a smooth random displacement field (a few mm),
    then gamma, scale, a smooth multiplicative bias field and noise; stored as int16 like most T1s."""
    image, mask = base
    shape = sitk.GetArrayViewFromImage(image).shape
    coarse = rng.normal(0.0, 3.0, (5, 5, 5, 3))  # mm, on a 5x5x5 lattice over the volume
    up = [zoom(np.eye(5), (n / 5, 1), order=3) for n in shape]  # [n, 5] cubic interpolation weights
    field = np.einsum("ai,bj,ck,ijkd->abcd", *up, coarse, optimize=True)
    disp = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    disp.CopyInformation(image)
    deform = sitk.DisplacementFieldTransform(disp)
    img = sitk.Resample(image, image, deform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    msk = sitk.Resample(mask, mask, deform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a = sitk.GetArrayFromImage(img)
    top = float(np.percentile(a[a > 0], 99)) if (a > 0).any() else 1.0
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in a.shape), indexing="ij")
    bias = np.exp(np.tensordot(rng.normal(0, 0.1, 3), np.stack([x, y, z]), 1))
    a = (np.clip(a / top, 0, None) ** rng.uniform(0.8, 1.25)) * rng.uniform(0.8, 1.2) * bias
    a = np.clip(800 * (a + rng.normal(0, 0.01, a.shape)), 0, 32767).astype(np.int16)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    return out, msk


def make_pool(d: Path, n: int, seed: int = 0) -> List[Tuple[Path, Path]]:
    """The first n simulated subjects (made once, reused)."""
    d.mkdir(parents=True, exist_ok=True)
    bases = [(downsampled(sitk.ReadImage(str(HEALTHY / f"{b}_t1.nii.gz"), sitk.sitkFloat32), sitk.sitkLinear,
                          sitk.sitkFloat32),
              downsampled(sitk.ReadImage(str(HEALTHY / f"{b}_brainmask.nii.gz"), sitk.sitkUInt8),
                          sitk.sitkNearestNeighbor, sitk.sitkUInt8)) for b in BASES]
    pairs = []
    for i in range(n):
        img_p, msk_p = d / f"sim{i:05d}_t1.nii.gz", d / f"sim{i:05d}_mask.nii.gz"
        if not (img_p.is_file() and msk_p.is_file()):
            img, msk = simulate(bases[i % 3], np.random.default_rng([seed, i]))
            sitk.WriteImage(msk, str(msk_p), True)
            sitk.WriteImage(img, str(img_p), True)
        pairs.append((img_p, msk_p))
    return pairs


def run_measured(cmd: List[str], env: Dict[str, str], errfile: Path, stop=None) -> Tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process; ``stop()`` true: kill it."""
    t0 = time.perf_counter()
    with open(errfile, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while stop is not None and proc.poll() is None and not stop():
            time.sleep(0.5)
        if stop is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) not in (0, -signal.SIGKILL):
        raise SystemExit(f"{' '.join(cmd[3:5])} failed:\n{errfile.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def log_rows(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("slices_per_s")]


def bench(n: int, pool: List[Tuple[Path, Path]], work: Path, rows: int, env: Dict[str, str]) -> dict:
    d = work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "train.csv").write_text("image,mask\n" + "".join(f"{i},{m}\n" for i, m in pool[:n]))
    cli = [sys.executable, "-m", "CeVAEAnomalyLib.cli"]
    cache = d / "cache"
    prep_s, prep_rss = run_measured([*cli, "prepare", "--manifest", str(d / "train.csv"),
                                     "--cache-dir", str(cache)], env, d / "prepare.err")
    cache_mb = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
    log = d / "m.cevae.log.csv"
    t0 = time.perf_counter()
    first: List[float] = []

    def enough() -> bool:
        got = log_rows(log)
        if got and not first:
            first.append(time.perf_counter() - t0 - float(got[0]["seconds"]))
        return len(got) >= rows

    _, train_rss = run_measured([*cli, "train", "--manifest", str(d / "train.csv"), "--out", str(d / "m.cevae"),
                                 "--cache-dir", str(cache), "--max-steps", "1000000", "--checkpoint-every",
                                 "1000000", "--val-fraction", "0.1", "--device", "cpu"], env, d / "train.err",
                                enough)
    rates = [float(r["slices_per_s"]) for r in log_rows(log)[1:]]  # the first row includes warm-up
    slices = sum(json.loads(p.read_text())["slices"] for p in cache.glob("*.json"))
    shutil.rmtree(cache)
    return {"n": n, "slices": slices, "prepare_s": round(prep_s, 1), "prepare_rss_mb": round(prep_rss),
            "cache_mb": round(cache_mb, 1), "train_startup_s": round(first[0], 1) if first else None,
            "train_rss_mb": round(train_rss), "slices_per_s": round(float(np.median(rates)), 1),
            "steps_per_s": round(float(np.median(rates)) / 64, 2)}


def table(results: List[dict]) -> str:
    head = ("N subjects", "slices cached", "prepare time", "prepare peak RSS", "cache size", "train start-up",
            "train steps/s (batch 64)", "train peak RSS")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append(f"| {r['n']} | {r['slices']} | {r['prepare_s']} s | {r['prepare_rss_mb']} MiB | "
                     f"{r['cache_mb']} MiB | {r['train_startup_s']} s | {r['steps_per_s']} "
                     f"({r['slices_per_s']} slices/s) | {r['train_rss_mb']} MiB |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "cohort")
    p.add_argument("--rows", type=int, default=8, help="training log rows (10 steps each) to measure")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of the measured processes")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO / "CeVAEAnomaly"), os.environ.get("PYTHONPATH", "")]))
    results = []
    for n in sorted(args.n):
        t = time.perf_counter()
        pool = make_pool(args.workdir / "pool", n)  # grows the pool; the smaller cohorts are its start
        print(f"{n} simulated subjects ready in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        results.append(bench(n, pool, args.workdir, args.rows, env))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
