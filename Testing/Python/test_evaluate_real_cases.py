"""``evaluate`` on real heads (the shared healthy scans): files cut short, pooled memory, figures by hand."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest

from conftest import SHARED_DATA

HEADS = ("colin27", "mni152", "robex")


def real(name: str, kind: str) -> Path:
    path = SHARED_DATA / f"{name}_{kind}.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared data {path} missing")
    return path


def test_a_compressed_file_cut_short_is_refused_before_any_case_is_scored(
        tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A .nii.gz cut short (its header whole, its voxels missing) was found only when its case was scored, after
    every case listed before it (here six real heads, 2 s; minutes on a cohort): the pre-check read headers only. Its
    gzip size trailer now says so before the first case is read."""
    from CeVAEAnomalyLib.cli.main import main

    whole = real("robex", "t1").read_bytes()
    cut = tmp_path / "cut_t1.nii.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    rows = [f"{n},{real(n, 't1')},{real(n, 'brainmask')}" for n in HEADS]
    (tmp_path / "cases.csv").write_text("\n".join(["name,score,mask", *rows, f"cut,{cut},{real('robex', 'brainmask')}"])
                                        + "\n")
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", "--cases", str(tmp_path / "cases.csv")]) == 2
    err = capsys.readouterr().err
    assert f"line 5: case cut (score map {cut}, mask " in err and f"The score map file {cut} is truncated" in err
    assert "Evaluated" not in caplog.text


def test_a_whole_file_of_several_gzip_members_passes_the_pre_check(tmp_path: Path) -> None:
    """A whole file written as several gzip members (bgzip's blocks) has a last size trailer of its last member
    alone: it is decompressed to be told from one cut short, and taken."""
    from CeVAEAnomalyResearch.evaluate import evaluate_files

    raw = gzip.decompress(real("colin27", "brainmask").read_bytes())
    members = tmp_path / "members_mask.nii.gz"
    members.write_bytes(b"".join(gzip.compress(raw[i : i + (1 << 20)]) for i in range(0, len(raw), 1 << 20)))
    assert members.read_bytes()[-4:] != len(raw).to_bytes(4, "little")  # (the last member's size)
    cases, _ = evaluate_files([{"score": str(real("colin27", "t1")), "mask": str(members)}])
    assert cases[0].n_voxels > 0
