"""Ensemble of fold models for the acquisition benchmark: average the cached network maps of several runs.

Each ``--maps`` folder is a ``benchmark_acquisition_maps.py`` cache made with another set of fold models
(e.g. another training seed); every case must be in all of them, made from the same volume. The ensemble
case holds the mean of the models' raw maps (``combi``, its mirror image, ``rec``/``grad`` where cached) and
of their slice ELBOs: what a detector averaging the networks' pixel scores before post-processing would
give. The rest (image, brain, ground truth, region) is the first folder's. ``final`` (the older MAD chain)
is averaged as well, so it is only approximately that chain on the ensemble map.

    python scripts/benchmark_acquisition_ensemble.py --maps runs/acq-seed0 --maps runs/acq-seed1 --out runs/acq-ens
    python scripts/benchmark_acquisition.py --maps runs/acq-ens --maps-levers none --prefix ...
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import numpy as np
from acquisition_cases import case_files
from CeVAEAnomalyLib.io.atomic import atomic_path

AVERAGED = ("final", "combi", "combi_m", "rec", "grad", "slice_neg_elbo")
SAME = ("image", "brain", "gt", "box_start", "slice_index")  # must agree: the same case on the same region


def ensemble_case(paths: List[Path], out: Path) -> None:
    """Write the ensemble of one case cached in each of ``paths`` to ``out`` (atomically)."""
    cases = []
    for p in paths:
        with np.load(p) as z:
            cases.append({k: z[k] for k in z.files})
    first = cases[0]
    for c, p in zip(cases[1:], paths[1:]):
        for k in SAME:
            if first[k].shape != c[k].shape or not np.array_equal(first[k], c[k]):
                raise SystemExit(f"{p} is not the case of {paths[0]} ({k} differs)")
    merged = dict(first)
    for k in AVERAGED:
        if k in first:
            merged[k] = np.mean([c[k].astype(np.float64) for c in cases], axis=0).astype(first[k].dtype)
    merged["seconds"] = np.sum([c["seconds"] for c in cases], axis=0)
    with atomic_path(out) as tmp:
        np.savez(tmp, **merged)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, action="append", required=True, help="a cache folder (give two or more)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if len(args.maps) < 2:
        p.error("give at least two --maps folders")
    args.out.mkdir(parents=True, exist_ok=True)
    names = [q.name for q in case_files(args.maps[0])]
    missing = [(m, n) for m in args.maps[1:] for n in names if not (m / n).exists()]
    if missing:
        raise SystemExit(f"{len(missing)} case(s) missing, e.g. {missing[0][0] / missing[0][1]}")
    for n, name in enumerate(names, 1):
        ensemble_case([m / name for m in args.maps], args.out / name)
        if n % 30 == 0 or n == len(names):
            print(f"{n}/{len(names)} cases", flush=True)


if __name__ == "__main__":
    main()
