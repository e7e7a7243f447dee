"""Work one run did twice, counted through wrappers around the real functions (which still run): the CT check's
shares of a detection, and of a calibration that checks contrast; calibrate's reads of the brain masks."""
from __future__ import annotations

import csv
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import SimpleITK as sitk

import CeVAEAnomalyLib.io.images as images
from conftest import as_hounsfield, make_head
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import recalibrate
from CeVAEAnomalyLib.engine.detector import detect
from CeVAEAnomalyLib.io.manifest import Subject

pytestmark = pytest.mark.usefixtures("one_thread")


def _count(monkeypatch: pytest.MonkeyPatch, module, name: str, counts: Counter, key: Callable = lambda *a: None):
    """Count each call of ``module.name`` by ``key(*args)``, wherever a module took it from (the real one runs)."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[key(*args)] += 1
        return real(*args, **kwargs)

    for other in list(sys.modules.values()):
        if getattr(other, name, None) is real:
            monkeypatch.setattr(other, name, counted)


@pytest.mark.parametrize("ct", [False, True])
def test_a_detection_measures_the_hounsfield_shares_once(tiny_bundle, monkeypatch, caplog, ct):
    """checked_image measured the shares for its CT warning, and the contrast check measured them again to leave a CT
    unsaid there (about 6 ms a volume). A CT is still warned of as one only, an MRI not at all."""
    image, mask = make_head(seed=7)
    counts: Counter = Counter()
    _count(monkeypatch, images, "_hounsfield_shares", counts)
    with caplog.at_level(logging.WARNING):
        detect(as_hounsfield(image) if ct else image, load_bundle(tiny_bundle, "cpu"), mask)
    assert counts[None] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("look like a CT" in w for w in warned) == ct


def test_a_calibration_measures_each_scans_hounsfield_shares_once(tiny_bundle, tmp_path: Path, monkeypatch, caplog):
    """A calibration checks each scan's contrast: it measured the shares there again, after checked_image had."""
    subjects = []
    for seed in (11, 12):
        image, mask = make_head(seed=seed)
        sitk.WriteImage(as_hounsfield(image) if seed == 12 else image, str(tmp_path / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(tmp_path / f"h{seed}_mask.nii.gz"))
        subjects.append(Subject(tmp_path / f"h{seed}.nii.gz", tmp_path / f"h{seed}_mask.nii.gz"))
    bundle = load_bundle(tiny_bundle, "cpu")
    counts: Counter = Counter()
    _count(monkeypatch, images, "_hounsfield_shares", counts)
    with caplog.at_level(logging.WARNING):
        recalibrate(bundle, subjects, tmp_path / "site.cevae", bundle.header.score_options, bundle.header.postprocess)
    assert counts[None] == 2  # one a scan
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warned if "look like a CT" in w] == [str(subjects[1].image)]


def test_calibrate_reads_each_brain_mask_once(tiny_bundle, tmp_path: Path, monkeypatch):
    """`cevae-anomaly calibrate` read each healthy scan's brain mask three times: to check that it reads (with the
    images' voxel checksums), again in recalibrate's own check, and to score the scan. The check and the score
    read it now (one read for both would hold every mask of the list in memory)."""
    folder = tmp_path / "healthy"
    folder.mkdir()
    for seed in (13, 14):
        image, mask = make_head(seed=seed)
        sitk.WriteImage(image, str(folder / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"h{seed}_mask.nii.gz"))
    counts: Counter = Counter()
    _count(monkeypatch, images, "read_image", counts, key=lambda path, *rest: Path(path).name)
    assert main(["calibrate", str(folder), "--model", str(tiny_bundle), "--out", str(tmp_path / "site.cevae"),
                 "--device", "cpu"]) == 0
    assert {name: n for name, n in counts.items() if "_mask" in name} == {"h13_mask.nii.gz": 2, "h14_mask.nii.gz": 2}


def test_a_batch_rerun_reads_its_summary_once(tiny_bundle, scan: Path, tmp_path: Path, monkeypatch):
    """A rerun of `cevae-anomaly batch` read its summary.csv three times before any work (its finished rows, the rows
    describing the outputs there, the rows of other lists to keep); it still skips the finished volume."""
    import CeVAEAnomalyLib.cli.batch as batch

    args = ["batch", str(scan), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_bundle), "--device", "cpu"]
    assert main(args) == 0
    counts: Counter = Counter()
    _count(monkeypatch, batch, "_summary_rows", counts, key=lambda path: Path(path).name)
    assert main(args) == 0
    assert counts == {"summary.csv": 1}
    rows = csv.DictReader((tmp_path / "out" / "summary.csv").read_text(encoding="utf-8").splitlines())
    assert [r["status"] for r in rows] == ["skipped"]
