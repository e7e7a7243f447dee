"""batch never replaces, without --overwrite, files in --out-dir that no batch record there accounts for."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Tuple

import pytest
import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.cli.main import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A cohort folder of one head, a, with its brain mask a_mask."""
    d = tmp_path_factory.mktemp("cohort")
    image, mask = make_head(size=(36, 40, 30), seed=20)
    sitk.WriteImage(image, str(d / "a.nii.gz"))
    sitk.WriteImage(mask, str(d / "a_mask.nii.gz"))
    return d


def batch(folder: Path, out: Path, bundle: Path, *extra: str) -> int:
    return main(["batch", str(folder), "--out-dir", str(out), "--model", str(bundle), "--device", "cpu", *extra])


def statuses(out: Path) -> list:
    with open(out / "summary.csv", newline="") as fh:
        return [row["status"] for row in csv.DictReader(fh)]


def contents(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("which", ["some", "all"])
def test_outputs_that_no_batch_wrote_are_refused_and_kept(folder, tiny_bundle, tmp_path, capsys, which):
    """A fresh --out-dir (no summary, no batch_settings.json) holding a user's a_labelmap.nii.gz and a_slices.csv,
    or detect's outputs of a (its component table too): batch replaced them ("scoring it again, replacing ...") and
    exited 0."""
    out = tmp_path / "res"
    out.mkdir()
    if which == "some":
        sitk.WriteImage(sitk.ReadImage(str(folder / "a_mask.nii.gz")), str(out / "a_labelmap.nii.gz"))
        (out / "a_slices.csv").write_text("my notes\n")
        names = "a_labelmap.nii.gz, a_slices.csv"
    else:
        assert main(["detect", str(folder / "a.nii.gz"), "--mask", str(folder / "a_mask.nii.gz"), "--model",
                     str(tiny_bundle), "--device", "cpu", "--threshold", "0.5", "--score", str(out / "a_score.nii.gz"),
                     "--labelmap", str(out / "a_labelmap.nii.gz"), "--slice-scores", str(out / "a_slices.csv"),
                     "--components", str(out / "a_components.csv")]) == 0
        names = "a_score.nii.gz, a_labelmap.nii.gz, a_slices.csv, a_components.csv"
    before = contents(out)
    capsys.readouterr()
    assert batch(folder, out, tiny_bundle) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {out} already holds {names}, which no batch wrote there (no batch summary lists their "
                   "volume, and there is no batch_settings.json); they are kept. Pass --overwrite to replace them, or "
                   "choose another --out-dir.")
    assert contents(out) == before  # nothing scored or written: no summary, no settings record
    assert batch(folder, out, tiny_bundle, "--overwrite") == 0
    assert statuses(out) == ["ok"] and (out / "a_slices.csv").read_text().startswith("axis,")
    assert (out / "a_components.csv").read_text().startswith("component,")


def test_a_rerun_over_a_batchs_own_outputs_still_resumes(folder, tiny_bundle, tmp_path, caplog):
    """What a batch record accounts for is scored again or skipped as before: its summary deleted (the settings
    record is there), or its settings record deleted (the summary lists the volume)."""
    out = tmp_path / "res"
    assert batch(folder, out, tiny_bundle) == 0
    (out / "summary.csv").unlink()
    with caplog.at_level(logging.WARNING):
        assert batch(folder, out, tiny_bundle) == 0
    assert "scoring them again to be safe: a." in caplog.text and statuses(out) == ["ok"]
    (out / "batch_settings.json").unlink()
    (out / "a_slices.csv").unlink()
    assert batch(folder, out, tiny_bundle) == 0
    assert statuses(out) == ["ok"] and (out / "a_slices.csv").is_file()
    assert batch(folder, out, tiny_bundle) == 0
    assert statuses(out) == ["skipped"]


def test_a_batch_killed_while_writing_its_first_outputs_is_still_resumed(folder, tiny_bundle, tmp_path, monkeypatch):
    """The settings record is written before the first outputs: a batch killed between writing a volume's outputs
    and its summary row (Ctrl-C, the out-of-memory killer) left outputs nothing accounted for, and the rerun its
    own message advised was refused."""
    from CeVAEAnomalyLib.io import atomic

    out = tmp_path / "out"
    real_write_all = atomic.write_all

    def killed_after_writing(*args, **kwargs):
        written = real_write_all(*args, **kwargs)
        if any(Path(path).name == "a_score.nii.gz" for path in args[0]):
            raise KeyboardInterrupt  # the outputs are there, the summary row is not
        return written

    monkeypatch.setattr(atomic, "write_all", killed_after_writing)  # (batch imports it when it scores)
    assert batch(folder, out, tiny_bundle) != 0  # (main turns Ctrl-C into its exit status)
    monkeypatch.undo()
    assert (out / "a_score.nii.gz").exists() and (out / "batch_settings.json").exists()
    assert batch(folder, out, tiny_bundle) == 0
    assert statuses(out) == ["ok"]


def two_lists(folder: Path, stem: str, names=None) -> None:
    """Lists A.csv and B.csv in ``folder``, each naming one head of its own, A/STEM.nii.gz and B/STEM.nii.gz (two
    scans; with a mask each), under ``names`` (a 'name' column; None: none, the volumes named by their files)."""
    for n, sub in enumerate(("A", "B")):
        (folder / sub).mkdir()
        image, mask = make_head(size=(36, 40, 30), seed=21 + n)
        sitk.WriteImage(image, str(folder / sub / f"{stem}.nii.gz"))
        sitk.WriteImage(mask, str(folder / sub / f"{stem}_mask.nii.gz"))
        row = f"{sub}/{stem}.nii.gz,{sub}/{stem}_mask.nii.gz" + ("" if names is None else f",{names[n]}")
        (folder / f"{sub}.csv").write_text(f"image,mask{'' if names is None else ',name'}\n{row}\n", encoding="utf-8")


def second_list_refused(folder: Path, model: Path, capsys) -> Tuple[Path, str]:
    """Batch A.csv, then B.csv (:func:`two_lists`) into one --out-dir, ``folder``/res: the second run is refused
    (exit 2) and leaves the first's outputs as they were. The folder and the refusal's line."""
    out = folder / "res"
    assert batch(folder / "A.csv", out, model) == 0
    before = contents(out)
    capsys.readouterr()
    assert batch(folder / "B.csv", out, model) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert contents(out) == before
    return out, err


def test_another_lists_volume_of_the_same_name_is_refused_and_kept(tiny_bundle, tmp_path, capsys):
    """Two lists sharing one --out-dir, each with a head.nii.gz of its own folder (both named 'head'): the second
    list's run took the first's outputs for its own scan's, "changed", and replaced them without --overwrite (and
    a rerun of the first replaced them back)."""
    two_lists(tmp_path, "head")
    out, err = second_list_refused(tmp_path, tiny_bundle, capsys)
    assert err == (f"error: {out} holds outputs of 'head' that a batch summary there records as made from "
                   f"{tmp_path / 'A' / 'head.nii.gz'}, another scan than {tmp_path / 'B' / 'head.nii.gz'} (another "
                   "list sharing this --out-dir?); they are kept. Give each list its own --out-dir, or its volumes "
                   "other names (a 'name' column in the CSV); to replace them, remove them (head_*) or pass "
                   "--overwrite.")
    assert batch(tmp_path / "A.csv", out, tiny_bundle) == 0 and statuses(out) == ["skipped"]


@pytest.mark.parametrize("first, second, alike", [
    ("Head", "head", "one file on a case-insensitive file system (macOS, Windows)"),
    ("caf\u00e9", "cafe\u0301", "one name in two Unicode forms (an accent as one character, or as a letter and a "
                               "combining mark), one file on macOS")])
def test_another_lists_volume_of_a_twin_name_is_refused_and_kept(tiny_bundle, tmp_path, capsys, first, second, alike):
    """Two lists sharing one --out-dir name their scans 'Head' and 'head' (or 'café' in two Unicode forms): on Linux
    the second run wrote head_* beside Head_*; on macOS and Windows those are the first list's files, which it
    replaced with another scan's outputs (unknown to its summary: scored again 'to be safe'), and a rerun of the
    first list replaced them back."""
    two_lists(tmp_path, "t1", (first, second))
    out, err = second_list_refused(tmp_path, tiny_bundle, capsys)
    assert err == (f"error: {out} holds outputs of '{first}' that a batch summary there records as made from "
                   f"{tmp_path / 'A' / 't1.nii.gz'}, another scan than {tmp_path / 'B' / 't1.nii.gz'} (another "
                   f"list sharing this --out-dir?), and '{first}_*' and '{second}_*' are {alike}; they are kept. Give "
                   "each list its own --out-dir, or its volumes other names (a 'name' column in the CSV); to replace "
                   f"them, remove them ({first}_*) or pass --overwrite.")
