"""batch writes each volume's record (NAME_record.json: how its outputs were made), the one detect --record writes
for that scan; folders written before records keep resuming."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict

import pytest
import SimpleITK as sitk

from conftest import make_head
from test_reading_warnings_recorded import CUT_SHORT, _cut_series
from CeVAEAnomalyLib.cli.main import main


def batch(source: Path, out: Path, bundle: Path, *extra: str) -> int:
    return main(["batch", str(source), "--out-dir", str(out), "--model", str(bundle), "--device", "cpu",
                 "--threshold", "0.3", *extra])


def summary(out: Path, name: str = "summary.csv") -> Dict[str, Dict[str, str]]:
    with open(out / name, newline="") as fh:
        return {row["name"]: row for row in csv.DictReader(fh)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """A cohort folder of two heads, a and b, with their brain masks."""
    d = tmp_path_factory.mktemp("two")
    for seed, name in ((20, "a"), (21, "b")):
        image, mask = make_head(size=(36, 40, 30), seed=seed)
        sitk.WriteImage(image, str(d / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"{name}_mask.nii.gz"))
    return d


def test_each_volume_s_record_is_the_one_detect_writes_for_its_scan(tiny_bundle, tmp_path):
    """A cohort's maps could not say how they were made: batch wrote no record. Now NAME_record.json beside them is
    detect --record's for the scan (inputs with path and sha256, the reading warnings first), but for created_utc;
    the summary gives its sha256."""
    series, mask = _cut_series(tmp_path)
    listing = tmp_path / "list.csv"
    listing.write_text(f"image,mask\n{series},{mask}\n")
    out = tmp_path / "out"
    assert batch(listing, out, tiny_bundle) == 0
    assert main(["detect", str(series), "--mask", str(mask), "--score", str(tmp_path / "score.nrrd"),
                 "--record", str(tmp_path / "record.json"), "--model", str(tiny_bundle), "--device", "cpu",
                 "--threshold", "0.3"]) == 0
    theirs = json.loads((out / "T1_record.json").read_text())
    detects = json.loads((tmp_path / "record.json").read_text())
    assert theirs.pop("created_utc") and detects.pop("created_utc")
    assert theirs == detects
    assert theirs["inputs"] == {"image": {"path": str(series), "sha256": summary(out)["T1"]["image_sha256"]},
                                "mask": {"path": str(mask), "sha256": sha256(mask)}}
    assert CUT_SHORT in theirs["warnings"][0]
    assert summary(out)["T1"]["record_sha256"] == sha256(out / "T1_record.json")


@pytest.mark.parametrize("earlier", ["a version without records", "records deleted"])
def test_a_done_volume_without_its_record_stays_done_and_the_summary_says_so(two, tiny_bundle, tmp_path, caplog,
                                                                             earlier):
    """An --out-dir of a version that wrote no records (its summary without record_sha256), or whose records were
    deleted: a rerun skips the volumes as before (their outputs untouched, batch_settings.json as it was), writes no
    record it cannot vouch for, leaves record_sha256 empty and says which volumes have none."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    for path in out.glob("*_record.json"):
        path.unlink()
    if earlier == "a version without records":
        rows = summary(out)
        fields = [f for f in next(iter(rows.values())) if f != "record_sha256"]
        with open(out / "summary.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows.values())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"}
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle) == 0
    rows = summary(out)
    assert [(r["status"], r["record_sha256"]) for r in rows.values()] == [("skipped", "")] * 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"} == before
    assert ("2 volume(s) done have no record of how their outputs were made (NAME_record.json missing, or not the "
            "file written with them; an earlier version of batch wrote none): their record_sha256 in the summary is "
            "empty (--overwrite scores every volume again, with its record): a, b.") in caplog.text


def test_a_changed_record_is_not_vouched_for(two, tiny_bundle, tmp_path):
    """A record edited after the run (not the file written with its outputs) is kept, but the summary no longer gives
    it as theirs; the untouched record keeps its checksum."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    first = summary(out)
    record = out / "a_record.json"
    record.write_text(record.read_text().replace('"tool"', '"tool" ', 1))
    assert batch(two, out, tiny_bundle) == 0
    rows = summary(out)
    assert rows["a"]["record_sha256"] == "" and rows["b"]["record_sha256"] == first["b"]["record_sha256"]


def test_shards_and_overwrite_write_each_volume_s_record(two, tiny_bundle, tmp_path):
    """Shards sharing an --out-dir each write their volumes' records; --overwrite writes them again."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--shard", "1/2") == 0
    assert batch(two, out, tiny_bundle, "--shard", "2/2") == 0
    shards = {**summary(out, "summary_shard-1-of-2.csv"), **summary(out, "summary_shard-2-of-2.csv")}
    assert {n: r["record_sha256"] for n, r in shards.items()} == {n: sha256(out / f"{n}_record.json") for n in "ab"}
    assert batch(two, out, tiny_bundle) == 0  # skips what the shards scored, their records vouched for
    assert {n: r["record_sha256"] for n, r in summary(out).items()} == {n: shards[n]["record_sha256"] for n in "ab"}
    os.utime(out / "a_record.json", (0, 0))
    assert batch(two, out, tiny_bundle, "--overwrite") == 0
    rows = summary(out)
    assert [r["status"] for r in rows.values()] == ["ok", "ok"] and (out / "a_record.json").stat().st_mtime > 0
    assert {n: r["record_sha256"] for n, r in rows.items()} == {n: sha256(out / f"{n}_record.json") for n in "ab"}


def test_a_record_that_no_batch_wrote_is_refused_and_kept(two, tiny_bundle, tmp_path, capsys):
    """detect --record's NAME_record.json in a fresh --out-dir is not replaced without --overwrite, as its other
    outputs are not."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_record.json").write_text("{}\n")
    assert batch(two, out, tiny_bundle) == 2
    assert "already holds a_record.json, which no batch wrote there" in capsys.readouterr().err
    assert (out / "a_record.json").read_text() == "{}\n" and not (out / "summary.csv").exists()


def test_a_volume_without_its_record_is_warned_of_once(two, tiny_bundle, tmp_path, caplog):
    """A done volume without its record was warned of again on every rerun, though the summary said so already
    (record_sha256 empty): later reruns say it in an info line; a record lost since is still warned of."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    (out / "a_record.json").unlink()
    assert batch(two, out, tiny_bundle) == 0  # warns of a
    (out / "b_record.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert batch(two, out, tiny_bundle) == 0
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "have no record" in r.getMessage()]
    assert said == [
        ("WARNING", "1 volume(s) done have no record of how their outputs were made (NAME_record.json missing, or not "
                    "the file written with them; an earlier version of batch wrote none): their record_sha256 in the "
                    "summary is empty (--overwrite scores every volume again, with its record): b."),
        ("INFO", "1 volume(s) done have no record of how their outputs were made, as the summary says already "
                 "(record_sha256 empty; --overwrite scores every volume again, with its record): a.")]
    assert [r["record_sha256"] for r in summary(out).values()] == ["", ""]
