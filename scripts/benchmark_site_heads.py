"""A site calibration on individual heads, each held out in turn (docs/benchmark.md, *A site calibration on
individual heads*), end to end as a site's user runs it.

For each head H of the benchmark's individual heads (``scripts/fetch_data.py DEST --names cortex_s1 brainbrowser1
brainbrowser2``): the site's healthy scans are the other two heads at 5 mm slabs and 3 % noise, and ``cevae-anomaly
calibrate`` on them gives H's site model. H's own healthy scan and three lesion cases (three lesions each:
hypo/hyper/ring/shift, radius 5-14 mm), degraded alike, are run through ``cevae-anomaly detect`` with the bundled
model and the given brain masks (a calibration changes thresholds, not scores), and their labelmaps are redrawn at
each operating point (``threshold_labelmap``, components of at least 50 mm³). H is never among its own site scans.

    python scripts/benchmark_site_heads.py --heads DEST --work runs/site-heads     # ~10 min on 2 cores

Steps already done (files present under ``--work``) are not redone. The table is printed and its figures written to
``--work``/site_heads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CeVAEAnomaly"))

from CeVAEAnomalyLib.engine.header import read_header  # noqa: E402
from CeVAEAnomalyLib.engine.postprocess import threshold_labelmap  # noqa: E402
from CeVAEAnomalyLib.io.atomic import atomic_write_text  # noqa: E402
from CeVAEAnomalyLib.options import DetectionRequest  # noqa: E402
from CeVAEAnomalyResearch.acquisition import Recipe, derive  # noqa: E402
from CeVAEAnomalyResearch.lesions import insert_lesions  # noqa: E402

HEADS = ("brainbrowser1", "brainbrowser2", "cortex_s1")
SITE = Recipe(slice_mm=5.0, noise=0.03)
CASES = 3
KINDS = ("hypo", "hyper", "ring", "shift")
MIN_VOLUME_MM3 = 50.0
Scan = Tuple[np.ndarray, Tuple[float, ...]]


def derive_scans(heads_dir: Path, work: Path) -> None:
    """Each head's healthy site scan and its lesion cases (image, brain mask, truth) under ``work``."""
    (work / "healthy").mkdir(parents=True, exist_ok=True)
    (work / "cases").mkdir(exist_ok=True)
    for i, head in enumerate(HEADS):
        if all((work / "cases" / f"{head}_s{s}_gt.nii.gz").is_file() for s in range(CASES)):
            continue
        image = sitk.ReadImage(str(heads_dir / f"{head}_t1.nii.gz"))
        brain = sitk.ReadImage(str(heads_dir / f"{head}_brainmask.nii.gz"))
        empty = sitk.Image(brain.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(brain)
        scan, mask, _ = derive(SITE, image, brain, empty, seed=100 + i)
        sitk.WriteImage(scan, str(work / "healthy" / f"{head}_t1.nii.gz"))
        sitk.WriteImage(mask, str(work / "healthy" / f"{head}_brainmask.nii.gz"))
        for s in range(CASES):
            lesioned, truth, _ = insert_lesions(image, brain, 1000 * i + s, n=3, kinds=KINDS, radius_mm=(5, 14),
                                                min_separation_mm=5.0)
            scan, mask, truth = derive(SITE, lesioned, brain, truth, seed=200 + 10 * i + s)
            base = work / "cases" / f"{head}_s{s}"
            sitk.WriteImage(scan, f"{base}_t1.nii.gz")
            sitk.WriteImage(mask, f"{base}_brainmask.nii.gz")
            sitk.WriteImage(truth, f"{base}_gt.nii.gz")


def cli(*args: str) -> None:
    """Run ``cevae-anomaly ARGS`` with this checkout's library; its output goes to ours."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "CeVAEAnomaly"),
                                                                       os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.cli", *args], check=True, env=env)


def run_user_commands(work: Path) -> None:
    """``detect`` (bundled model) on every scan and ``calibrate`` per held-out head, as a user types them."""
    (work / "out").mkdir(exist_ok=True)
    (work / "cal").mkdir(exist_ok=True)
    for folder in ("healthy", "cases"):
        for t1 in sorted((work / folder).glob("*_t1.nii.gz")):
            name = t1.name[: -len("_t1.nii.gz")]
            out = work / "out" / f"{folder}_{name}"
            if not Path(f"{out}.score.nii.gz").is_file():
                cli("detect", str(t1), "--mask", str(work / folder / f"{name}_brainmask.nii.gz"),
                    "--score", f"{out}.score.nii.gz", "--labelmap", f"{out}.label.nii.gz", "--record", f"{out}.json")
    for head in HEADS:
        model = work / "cal" / f"without_{head}.cevae"
        if not model.is_file():
            others = [h for h in HEADS if h != head]
            cli("calibrate", *[str(work / "healthy" / f"{h}_t1.nii.gz") for h in others],
                *[str(work / "healthy" / f"{h}_brainmask.nii.gz") for h in others], "--out", str(model))


def read_scan(path: Path) -> Scan:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def labelmap(scan: Scan, threshold: float, peak: float) -> np.ndarray:
    """The labelmap at ``threshold`` keeping components whose highest score reaches ``peak`` (absolute)."""
    score, spacing = scan
    return threshold_labelmap(score, spacing, threshold, MIN_VOLUME_MM3, 0.0, max(1.0, peak / threshold)).astype(bool)


def component_count(label: np.ndarray) -> int:
    return int(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(label.view(np.uint8)), True))
               .max())


def dice(label: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (label & truth).sum() / max(int(label.sum() + truth.sum()), 1))


def highest_component_peak(scan: Scan, threshold: float) -> float:
    """The highest score of the scan's labelmap at ``threshold`` without a peak rule (the threshold if empty)."""
    label = labelmap(scan, threshold, threshold)
    return float(scan[0][label].max()) if label.any() else threshold


def operating_points(bundled: float, site: float, site_1e3: float, calibration_peak: float
                     ) -> Dict[str, Tuple[float, float]]:
    """(threshold, absolute peak) of each row of the table."""
    return {
        "bundled threshold, peak 2 × (the default)": (bundled, 2 * bundled),
        "site threshold, peak 2 ×": (site, 2 * site),
        "site threshold, peak 1.5 ×": (site, 1.5 * site),
        "site threshold, peak 1.25 ×": (site, 1.25 * site),
        "site threshold, no peak filter": (site, site),
        "site threshold, peak at 2 × the bundled threshold": (site, 2 * bundled),
        "site threshold at --fpr 0.001, peak 2 ×": (site_1e3, 2 * site_1e3),
        "bundled threshold, peak at the calibration heads' highest healthy component peak": (bundled, calibration_peak),
    }


def evaluate(work: Path) -> Dict[str, Dict[str, List[float]]]:
    """Per operating point: each held-out head's healthy ml and components, and each lesion case's Dice."""
    bundled = float(json.loads((work / "out" / f"healthy_{HEADS[0]}.json").read_text())["threshold"])
    healthy = {h: read_scan(work / "out" / f"healthy_{h}.score.nii.gz") for h in HEADS}
    rows: Dict[str, Dict[str, List[float]]] = {}
    for head in HEADS:
        header = read_header(work / "cal" / f"without_{head}.cevae")
        site = header.threshold_of(DetectionRequest.of())[0]
        site_1e3 = header.threshold_of(DetectionRequest.of(fpr=1e-3))[0]
        calibration_peak = max(highest_component_peak(healthy[h], bundled) for h in HEADS if h != head)
        cases = [(read_scan(work / "out" / f"cases_{head}_s{s}.score.nii.gz"),
                  read_scan(work / "cases" / f"{head}_s{s}_gt.nii.gz")[0] > 0) for s in range(CASES)]
        voxel_ml = float(np.prod(healthy[head][1])) / 1000
        print(f"{head}: bundled threshold {bundled:.3f}, site {site:.2f}, site at --fpr 0.001 {site_1e3:.2f}")
        for name, (threshold, peak) in operating_points(bundled, site, site_1e3, calibration_peak).items():
            flagged = labelmap(healthy[head], threshold, peak)
            row = rows.setdefault(name, {"healthy_ml": [], "healthy_components": [], "dice": []})
            row["healthy_ml"].append(float(flagged.sum()) * voxel_ml)
            row["healthy_components"].append(component_count(flagged))
            row["dice"] += [dice(labelmap(scan, threshold, peak), truth) for scan, truth in cases]
    return rows


def table(rows: Dict[str, Dict[str, List[float]]]) -> str:
    lines = ["| operating point | largest healthy scan | Dice, mean of 9 cases |", "|---|---|---|"]
    for name, row in rows.items():
        worst = int(np.argmax(row["healthy_ml"]))
        lines.append(f"| {name} | {row['healthy_ml'][worst]:.2f} ml, {row['healthy_components'][worst]:.0f} "
                     f"components | {np.mean(row['dice']):.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, required=True, help="folder of the fetched individual heads")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "site-heads", help="scans, maps and models")
    args = parser.parse_args(list(argv) or None)
    derive_scans(args.heads, args.work)
    run_user_commands(args.work)
    rows = evaluate(args.work)
    atomic_write_text(args.work / "site_heads.json", json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
