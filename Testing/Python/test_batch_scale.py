"""batch on thousands of volumes: what it does for each volume does not grow with how many there are."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.cli import batch
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.cli.batch import SUMMARY_FIELDS, Summary

KEPT = 3000  # rows already in the summary (an archive's batch, part done)
ADDED = 100  # volumes finished one after another


def _row(name: str) -> Dict[str, object]:
    """A summary row as a scored volume has it: long warnings and a sha256 per file."""
    row: Dict[str, object] = {field: "0" * 64 for field in SUMMARY_FIELDS}
    row.update(name=name, image=f"/archive/{name}.nii.gz", mask="", status="ok", error="",
               warnings="The threshold's false-positive rate on this scan is not known. " * 5, seconds=1.5)
    return row


def test_a_large_summary_is_not_rewritten_for_every_volume(tmp_path: Path, monkeypatch) -> None:
    """Every write of the summary rewrites all its rows, and batch wrote it whenever 2 s had passed since the last:
    20000 rows took 2.3 s to write (800: 0.17 s), so a large batch, or the resume of one (a skipped row each), spent
    most of its time rewriting its summary. A write now waits 50 times as long as the last one took; the summary
    ends with every row."""
    written: List[int] = []
    write = batch.atomic_write_text

    def counted(path, text, *args, **kwargs):  # the real write, counted
        written.append(text.count("\n") - 1)
        return write(path, text, *args, **kwargs)

    monkeypatch.setattr(batch, "atomic_write_text", counted)
    summary = Summary(tmp_path / "summary.csv", interval=0.0,
                      kept={f"k{i:05d}": _row(f"k{i:05d}") for i in range(KEPT)})  # type: ignore[misc]
    for i in range(ADDED):
        summary.add(_row(f"v{i:05d}"))
    assert written == [KEPT + 1]  # the first row at once, then no rewrite of 3000 rows per volume
    summary.flush()
    with open(tmp_path / "summary.csv", newline="") as fh:
        names = [row["name"] for row in csv.DictReader(fh)]
    assert len(written) == 2 and len(names) == KEPT + ADDED and names[-1] == f"v{ADDED - 1:05d}"


def test_a_warning_every_volume_gets_is_said_once(tmp_path: Path, tiny_bundle, caplog) -> None:
    """800 scans of one protocol (6 mm slices) logged the same two 400-character warnings for each volume: 1067 of
    the run's 1911 lines. A warning an earlier volume got in the same words is said once, with one line at the end;
    every volume's row keeps its warnings."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    data = default_model_path().parent  # (the package's own 2 mm Colin27: a fresh clone has no shared data)
    image = sitk.ReadImage(str(data / "colin27_t1_2mm.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data / "colin27_brainmask_2mm.nii.gz"))
    size = [int(round(n * s / 6.0)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    image, mask = (sitk.Resample(v, size, sitk.Transform(), how, v.GetOrigin(), (6.0,) * 3, v.GetDirection(), 0,
                                 v.GetPixelID())
                   for v, how in ((image, sitk.sitkLinear), (mask, sitk.sitkNearestNeighbor)))
    rng = np.random.default_rng(0)
    for i in range(3):  # three scans of one protocol (other noise: not repeats of one scan)
        voxels = sitk.GetArrayFromImage(image)
        noisy = sitk.GetImageFromArray(voxels + rng.normal(0, 0.01 * voxels.max(), voxels.shape).astype(np.float32))
        noisy.CopyInformation(image)
        sitk.WriteImage(noisy, str(folder / f"s{i}_t1.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"s{i}_brainmask.nii.gz"))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["batch", str(folder), "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu"]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    thick = [m for m in said if "voxels are up to 6 mm" in m]
    assert [m.split(":")[0] for m in thick] == ["s0_t1"], said  # the first volume's, not all three
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [("voxels are up to 6 mm" in row["warnings"]) for row in rows] == [True] * 3
    assert any("2 of the volumes' warnings repeated" in r.getMessage() for r in caplog.records)
