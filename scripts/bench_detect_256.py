"""End-to-end `cevae-anomaly detect` time on a 256³ 1 mm T1 (colin27 resampled), default model and options.

    python scripts/bench_detect_256.py [--repeats 3] [--threads 2] [-- --model other.cevae --threshold 5 ...]

Runs the command line as a user would (read, brain mask given, score, post-process, write) and prints
the median wall time and the machine's load average, which on a shared machine inflates the figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk


def volume_256(data: Path, out: Path) -> tuple:
    image = sitk.ReadImage(str(data / "colin27_t1.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data / "colin27_brainmask.nii.gz"))
    ref = sitk.Image([256] * 3, sitk.sitkFloat32)
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin((128.0, 128.0, -128.0))
    paths = (out / "t1_256.nii.gz", out / "mask_256.nii.gz")
    sitk.WriteImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0), str(paths[0]))
    sitk.WriteImage(sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0), str(paths[1]))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, help="folder with colin27_t1/_brainmask.nii.gz (default: find or fetch)")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="after --: more flags for detect (another --model, ...)")
    args = p.parse_args()
    flags = [f for f in args.flags if f != "--"]
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        image, mask = volume_256(args.data, Path(tmp))
        walls = []
        for i in range(args.repeats):
            cmd = [sys.executable, "-m", "CeVAEAnomalyLib.cli", "detect", str(image), "--mask", str(mask),
                   "--score", str(Path(tmp) / f"score{i}.nii.gz"), "--labelmap", str(Path(tmp) / f"label{i}.nii.gz"),
                   "--device", "cpu"]
            cmd += flags
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            walls.append(time.perf_counter() - t0)
    what = f"with {' '.join(flags)}" if flags else "default model and options"
    print(f"detect 256³, {what}: median {statistics.median(walls):.2f} s over {args.repeats} runs "
          f"({', '.join(f'{w:.2f}' for w in walls)}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
