"""Batch: two lists of differently named volumes run one after the other into one --out-dir share its summary."""
from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Dict, List

import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.io.naming import output_paths

DATA = Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomalyLib" / "data"


def two_lists(folder: Path) -> None:
    """The 2 mm sample scan (with its brain mask) as A/ann.nii.gz, listed in A.csv, and as B/bob.nii.gz, in B.csv."""
    for sub, name in (("A", "ann"), ("B", "bob")):
        (folder / sub).mkdir()
        shutil.copyfile(DATA / "colin27_t1_2mm.nii.gz", folder / sub / f"{name}.nii.gz")
        shutil.copyfile(DATA / "colin27_brainmask_2mm.nii.gz", folder / sub / f"{name}_mask.nii.gz")
        (folder / f"{sub}.csv").write_text(f"image,mask\n{sub}/{name}.nii.gz,{sub}/{name}_mask.nii.gz\n")


def batch(source: Path, out: Path, bundle: Path, *extra: str) -> int:
    return main(["batch", str(source), "--out-dir", str(out), "--model", str(bundle), "--device", "cpu", *extra])


def rows(summary: Path) -> Dict[str, Dict[str, str]]:
    with summary.open(newline="") as fh:
        return {row["name"]: row for row in csv.DictReader(fh)}


def outputs(out: Path, names: List[str]) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for name in names for p in output_paths(out, name).values()}


def test_a_second_list_keeps_the_first_lists_rows_and_reruns_skip(tiny_bundle, tmp_path: Path, caplog) -> None:
    """The second list's run rewrote summary.csv with its own rows only: a rerun of the first list found its outputs
    described by no summary and scored them all again ("Nothing records the input and settings ..."), dropping the
    second list's rows in turn. The summary keeps the rows of volumes a run does not list; reruns skip."""
    two_lists(tmp_path)
    out = tmp_path / "res"
    assert batch(tmp_path / "A.csv", out, tiny_bundle) == 0
    first = rows(out / "summary.csv")["ann"]
    assert first["status"] == "ok"
    assert batch(tmp_path / "B.csv", out, tiny_bundle) == 0
    summary = rows(out / "summary.csv")
    assert sorted(summary) == ["ann", "bob"] and summary["ann"] == first and summary["bob"]["status"] == "ok"
    before = outputs(out, ["ann", "bob"])
    for source, name in (("A.csv", "ann"), ("B.csv", "bob")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert batch(tmp_path / source, out, tiny_bundle) == 0
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        summary = rows(out / "summary.csv")
        assert sorted(summary) == ["ann", "bob"] and summary[name]["status"] == "skipped"
        assert outputs(out, ["ann", "bob"]) == before
    assert not list(out.glob(".*"))  # (written atomically: no temporary file left)


def test_shards_keep_their_own_summaries(tiny_bundle, tmp_path: Path) -> None:
    """Shards of one list each write their own summary of their own volumes; an unsharded rerun skips them all."""
    two_lists(tmp_path)
    scan = sitk.ReadImage(str(tmp_path / "B" / "bob.nii.gz"))
    sitk.WriteImage(scan + 1, str(tmp_path / "B" / "bob.nii.gz"))  # another scan (the same one is scored once)
    (tmp_path / "both.csv").write_text("image,mask\nA/ann.nii.gz,A/ann_mask.nii.gz\nB/bob.nii.gz,B/bob_mask.nii.gz\n")
    out = tmp_path / "res"
    for i, name in ((1, "ann"), (2, "bob")):
        assert batch(tmp_path / "both.csv", out, tiny_bundle, "--shard", f"{i}/2") == 0
        assert list(rows(out / f"summary_shard-{i}-of-2.csv")) == [name]
    assert batch(tmp_path / "both.csv", out, tiny_bundle, "--shard", "1/2") == 0
    assert {n: r["status"] for n, r in rows(out / "summary_shard-1-of-2.csv").items()} == {"ann": "skipped"}
    assert list(rows(out / "summary_shard-2-of-2.csv")) == ["bob"]
    assert batch(tmp_path / "both.csv", out, tiny_bundle) == 0
    assert {n: r["status"] for n, r in rows(out / "summary.csv").items()} == {"ann": "skipped", "bob": "skipped"}
