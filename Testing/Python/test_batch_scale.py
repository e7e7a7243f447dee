"""batch on thousands of volumes: what it does for each volume does not grow with how many there are."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

from CeVAEAnomalyLib.cli import batch
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
