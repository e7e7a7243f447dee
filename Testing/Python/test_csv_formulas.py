"""The text cells of the CSV tables (batch summary, evaluate's metrics) stay text in a spreadsheet: a scan named
"=HYPERLINK(...)" or "@SUM(...)" was written as it is, a formula once the table is opened in Excel or LibreOffice."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List

import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyResearch.evaluate import CaseMetrics, write_metrics_csv

NAMES = ("=HYPERLINK(1)", "@SUM(1+1)", "'quoted", "plain")  # a name starting with a quote: read back as it was


def cells(path: Path, column: str) -> Dict[str, str]:
    """The raw text of ``column``, by the summary's raw ``name`` cell."""
    with open(path, newline="") as fh:
        return {row["name"]: row[column] for row in csv.DictReader(fh)}


def test_a_batch_summary_keeps_names_text_and_a_rerun_finds_them_done(tiny_bundle, tmp_path):
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    cohort.mkdir()
    for seed, name in enumerate(NAMES):
        image, mask = make_head(size=(36, 40, 30), seed=30 + seed)
        sitk.WriteImage(image, str(cohort / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(cohort / f"{name}_mask.nii.gz"))
    run = ["batch", str(cohort), "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu",
           "--threshold", "0.3"]
    assert main(run) == 0
    status = cells(out / "summary.csv", "status")
    assert set(status) == {"'=HYPERLINK(1)", "'@SUM(1+1)", "''quoted", "plain"}
    assert set(status.values()) == {"ok"}
    assert all(not p.startswith("'") for p in cells(out / "summary.csv", "image").values())  # /tmp/...: as it is
    assert main(run) == 0  # a resume reads the names back: every volume is done, its name not quoted twice over
    assert cells(out / "summary.csv", "status") == dict.fromkeys(status, "skipped")


def test_the_metrics_table_keeps_case_names_text_and_numbers_numbers(tmp_path):
    def case(name: str, threshold: float) -> CaseMetrics:
        return CaseMetrics(name, 0.9, 0.5, 0.4, threshold, None, math.nan, 1.25, 100, 10)

    path = tmp_path / "metrics.csv"
    write_metrics_csv(path, [case("+cmd|' /C calc'!A0", -1.5), case("-2", -math.inf), case("a", 0.25)],
                      {"auroc": -0.5, "best_threshold": -2.0})
    rows: List[Dict[str, str]] = list(csv.DictReader(path.open(newline="")))
    assert [r["name"] for r in rows] == ["'+cmd|' /C calc'!A0", "-2", "a", "pooled"]  # "-2": a number either way
    assert [r["best_threshold"] for r in rows] == ["-1.5", "-inf", "0.25", "-2.0"]
    assert rows[-1]["auroc"] == "-0.5"
