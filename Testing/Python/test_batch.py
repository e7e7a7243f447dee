"""Batch detection over a folder / CSV: corrupt files, resuming, shards, parallel workers."""
import argparse
import csv
import logging
import os
import re
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import as_hounsfield, make_head
from CeVAEAnomalyLib.cli.batch import (
    BatchItem, DetectSettings, collect_folder, collect_inputs, output_paths, parse_shard, run_batch, select_shard,
)
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.options import DetectionRequest
from CeVAEAnomalyLib.errors import CeVAEError

NAMES = ["a1", "b2", "c3", "d4"]


def read_summary(path):
    return {r["name"]: r for r in csv.DictReader(path.read_text().splitlines())}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small heads with their masks beside them, plus a truncated NIfTI 'bad'."""
    d = tmp_path_factory.mktemp("cohort")
    for i, name in enumerate(NAMES):
        image, mask = make_head(size=(36, 40, 30), seed=20 + i)
        sitk.WriteImage(image, str(d / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"{name}_mask.nii.gz"))
    whole = (d / "a1.nii.gz").read_bytes()
    (d / "bad.nii.gz").write_bytes(whole[: len(whole) // 2])
    (d / "notes.txt").write_text("not an image")
    return d


def batch(cohort, out, bundle, *extra):
    return main(["batch", str(cohort), "--out-dir", str(out), "--model", str(bundle), "--device", "cpu", *extra])


def test_corrupt_file_is_recorded_and_rerun_skips_finished(cohort, tiny_bundle, tmp_path, caplog):
    out = tmp_path / "out"
    assert batch(cohort, out, tiny_bundle) == 2  # the cohort finishes, the exit status says a volume failed
    rows = read_summary(out / "summary.csv")
    assert sorted(rows) == sorted(NAMES + ["bad"])
    assert rows["bad"]["status"] == "error" and "corrupt" in rows["bad"]["error"]
    for name in NAMES:
        row = rows[name]
        assert row["status"] == "ok" and row["mask"].endswith(f"{name}_mask.nii.gz")
        paths = output_paths(out, name)
        score = sitk.ReadImage(str(paths["score"]))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["labelmap"])))
        assert score.GetSize() == (36, 40, 30)
        assert float(row["max_score"]) == pytest.approx(sitk.GetArrayViewFromImage(score).max(), rel=1e-5)
        voxel_ml = np.prod(score.GetSpacing()) / 1000
        assert float(row["flagged_ml"]) == pytest.approx(label.sum() * voxel_ml, abs=1e-4)
        slices = list(csv.DictReader(paths["slices"].read_text().splitlines()))
        top = max(slices, key=lambda r: (float(r["anomaly"]), float(r["neg_elbo"]), -int(r["index"])))
        assert row["top_slice"] == top["index"] and row["top_slice_axis"] == "IJK"[int(top["axis"])]
        assert float(row["seconds"]) > 0
    assert not list(out.glob("bad_*")) and not list(out.glob(".*"))  # no outputs or temp files for 'bad'

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"}
    assert batch(cohort, out, tiny_bundle) == 2  # 'bad' is tried again and fails again
    rerun = read_summary(out / "summary.csv")
    assert sorted(rerun) == sorted(NAMES + ["bad"]) and rerun["bad"]["status"] == "error"
    for name in NAMES:  # skipped, with the first run's values and checksums; the outputs are untouched
        assert rerun[name]["status"] == "skipped"
        for key in ("flagged_ml", "max_score", "top_slice", "top_slice_axis", "seconds", "image_sha256", "mask_sha256"):
            assert rerun[name][key] == rows[name][key]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"} == mtimes

    (out / "summary.csv").unlink()  # nothing says what the outputs were made from: scored again, to be safe
    with caplog.at_level(logging.WARNING):
        assert batch(cohort, out, tiny_bundle) == 2
    assert "scoring them again to be safe: a1, b2, c3, d4." in caplog.text
    read_again = read_summary(out / "summary.csv")
    for name in NAMES:
        assert read_again[name]["status"] == "ok"
        for key in ("flagged_ml", "max_score", "top_slice", "top_slice_axis", "image_sha256", "mask_sha256"):
            assert read_again[name][key] == rows[name][key]

    # a damaged or incomplete output set is scored again and replaced
    (out / "a1_score.nii.gz").write_bytes(b"garbage")
    (out / "b2_slices.csv").unlink()
    assert batch(cohort, out, tiny_bundle) == 2
    last = read_summary(out / "summary.csv")
    assert [last[n]["status"] for n in NAMES] == ["ok", "ok", "skipped", "skipped"]
    assert last["a1"]["max_score"] == rows["a1"]["max_score"] and (out / "b2_slices.csv").is_file()


def test_interrupted_run_keeps_its_summary(cohort, tiny_bundle, tmp_path):
    settings = DetectSettings(model=tiny_bundle, request=DetectionRequest.of(device="cpu"), out_dir=tmp_path / "out")
    items = [it for it in collect_inputs(cohort) if it.name != "bad"]
    summary_csv = tmp_path / "out" / "summary.csv"
    on_disk = []

    def stop_after_two(fraction, message):
        if message.endswith(" ok"):
            on_disk.append(sorted(read_summary(summary_csv)))  # written while the run goes on
            if len(on_disk) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(items, settings, summary_csv, progress=stop_after_two)
    assert on_disk[0] == ["a1"]
    assert [r["status"] for r in read_summary(summary_csv).values()] == ["ok", "ok"]
    summary = run_batch(items, settings, summary_csv)
    assert [summary.rows[n]["status"] for n in NAMES] == ["skipped", "skipped", "ok", "ok"]


def test_two_shards_cover_the_list_once(cohort, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    assert batch(cohort, out, tiny_bundle, "--shard", "1/2") == 2  # holds 'bad' (sorted: a1 b2 bad c3 d4)
    assert batch(cohort, out, tiny_bundle, "--shard", "2/2") == 0
    first = read_summary(out / "summary_shard-1-of-2.csv")
    second = read_summary(out / "summary_shard-2-of-2.csv")
    assert sorted(first) == ["a1", "bad", "d4"] and sorted(second) == ["b2", "c3"]
    assert not (out / "summary.csv").exists()
    assert sorted(p.name for p in out.glob("*_score.nii.gz")) == [f"{n}_score.nii.gz" for n in NAMES]

    items = [BatchItem(f"v{i:02d}", cohort / f"v{i}.nii.gz") for i in range(11)]
    for n in (1, 2, 3, 4, 11, 12):
        parts = [select_shard(items, i, n) for i in range(1, n + 1)]
        assert sorted(it.name for part in parts for it in part) == [it.name for it in items]
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow
def test_two_workers_match_one(cohort, tiny_bundle, tmp_path):
    source = tmp_path / "list.csv"  # a CSV list with a name column
    source.write_text("image,mask,name\n" + "".join(
        f"{cohort / n}.nii.gz,{cohort / n}_mask.nii.gz,case_{n}\n" for n in NAMES[:3]))
    assert batch(source, tmp_path / "one", tiny_bundle, "--mc-samples", "2", "--threshold", "0.6") == 0
    assert batch(source, tmp_path / "two", tiny_bundle, "--mc-samples", "2", "--threshold", "0.6",
                 "--workers", "2") == 0
    for n in NAMES[:3]:
        one, two = output_paths(tmp_path / "one", f"case_{n}"), output_paths(tmp_path / "two", f"case_{n}")
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p["score"]))) for p in (one, two))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p["labelmap"]))) for p in (one, two))
        assert a.sum() > 50 and (a != b).sum() <= 2  # only voxels within float noise of the threshold may differ
    rows = read_summary(tmp_path / "two" / "summary.csv")
    assert sorted(rows) == [f"case_{n}" for n in NAMES[:3]] and {r["status"] for r in rows.values()} == {"ok"}


def test_inputs_pairing_names_and_errors(tmp_path, caplog):
    image, mask = make_head(size=(20, 20, 20))
    for name in ("x.nii.gz", "x_brainmask.nii.gz", "y.nrrd", "z.mha", "z_mask.mha", "orphan_mask.nii.gz",
                 ".hidden.nii.gz"):
        sitk.WriteImage(mask if "mask" in name else image, str(tmp_path / name))
    (tmp_path / "readme.md").write_text("x")
    with caplog.at_level(logging.WARNING):
        items = collect_inputs(tmp_path)
    assert [(it.name, it.image.name, it.mask.name if it.mask else None) for it in items] == [
        ("x", "x.nii.gz", "x_brainmask.nii.gz"), ("y", "y.nrrd", None), ("z", "z.mha", "z_mask.mha")]
    assert "orphan_mask.nii.gz has no matching image" in caplog.text

    sitk.WriteImage(image, str(tmp_path / "y.nii.gz"))  # two files for one name
    with pytest.raises(CeVAEError, match="both the image of 'y'"):
        collect_inputs(tmp_path)

    lst = tmp_path / "sub" / "list.csv"
    lst.parent.mkdir()
    lst.write_text("image,mask\n../x.nii.gz,../x_brainmask.nii.gz\n../z.mha,\n")
    assert [(it.name, it.image.resolve(), it.mask) for it in collect_inputs(lst)] == [
        ("x", tmp_path / "x.nii.gz", lst.parent / "../x_brainmask.nii.gz"), ("z", tmp_path / "z.mha", None)]
    lst.write_text("image\n../a/x/T1.nii.gz\n../b/x/T1.nii.gz\n")  # their folders do not tell them apart either
    with pytest.raises(CeVAEError, match="distinct names"):
        collect_inputs(lst)
    lst.write_text("image,name\n../x.nii.gz,S1\n../z.mha,s1\n")  # one output file where names ignore case
    with pytest.raises(CeVAEError, match="named 'S1_\\*' and 's1_\\*', one file on a case-insensitive file system"):
        collect_inputs(lst)
    # one output file on macOS, which compares names in one Unicode form: é as one character or e + U+0301 (the
    # second volume was taken as finished with the first one's outputs)
    lst.write_text("image,name\n../x.nii.gz,caf\u00e9\n../z.mha,cafe\u0301\n", encoding="utf-8")
    with pytest.raises(CeVAEError, match="one name in two Unicode forms .* one file on macOS"):
        collect_inputs(lst)

    for name, odd in (("sub:01", ":"), ("a?", "?"), ("x\\y", "\\"), ("bell\a", "\a")):
        lst.write_text(f"image,name\n../x.nii.gz,{name}\n")  # on Windows sub:01 wrote into a hidden stream of "sub"
        with pytest.raises(CeVAEError, match=f"list.csv, line 2: the name .* holds {re.escape(repr(odd))}, which "
                                             "Windows does not allow in a file name"):
            collect_inputs(lst)

    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(CeVAEError):
            parse_shard(bad)
    assert parse_shard("2/2") == (2, 2)


def test_dicom_series_folders_of_one_name_are_named_after_their_folders(tiny_bundle, tmp_path, caplog):
    """A list of ``subj1/T1/`` and ``subj2/T1/`` (DICOM series folders, a common export) was refused: both default
    to the name T1. They are named subj1_T1 and subj2_T1, and a rerun finds their outputs; where the folders do not
    tell them apart, or a new name is another volume's, the list is still refused; names that worked are kept."""
    from test_dicom_series import write_series

    image, mask = make_head(size=(24, 28, 10), spacing=(2.0, 2.0, 3.0))
    for n in (1, 2):
        write_series(image, tmp_path / f"subj{n}" / "T1")
        sitk.WriteImage(mask, str(tmp_path / f"subj{n}" / "mask.nii.gz"))
    lst = tmp_path / "list.csv"
    lst.write_text("image,mask\nsubj1/T1/,subj1/mask.nii.gz\nsubj2/T1/,subj2/mask.nii.gz\n")
    with caplog.at_level(logging.INFO):
        assert [(it.name, it.image.name) for it in collect_inputs(lst)] == [("subj1_T1", "T1"), ("subj2_T1", "T1")]
    assert "share the name 'T1'; their outputs are named after their folders: subj1_T1_*, subj2_T1_*" in caplog.text
    out = tmp_path / "out"
    argv = ["batch", str(lst), "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu"]
    assert main(argv) == 0
    assert {name for name in os.listdir(out) if name.endswith("_score.nii.gz")} == {"subj1_T1_score.nii.gz",
                                                                                    "subj2_T1_score.nii.gz"}
    assert main(argv) == 0
    assert {r["status"] for r in read_summary(out / "summary.csv").values()} == {"skipped"}  # found, not redone

    before = {"subj1/T1/": "T1", "subj1/T1/,one": "one", "subj1/T1/,one\nsubj2/T1/,two": "one two"}
    for rows, names in before.items():  # lists that ran before keep their names
        lst.write_text(f"image{',name' * (',' in rows)}\n{rows}\n")
        assert " ".join(it.name for it in collect_inputs(lst)) == names
    sitk.WriteImage(image, str(tmp_path / "subj1_T1.nii.gz"))  # a volume named as one of them would be
    for rows in ("subj1/T1/\nsubj2/T1/\nsubj1_T1.nii.gz", "subj1/T1/\nsubj2/T1/\nsubj2/T1/"):
        lst.write_text(f"image\n{rows}\n")
        with pytest.raises(CeVAEError, match="distinct names"):
            collect_inputs(lst)


def test_a_mask_named_without_the_images_contrast_tag_is_its_mask(tmp_path, caplog):
    """The project's own sample data (colin27_t1.nii.gz, colin27_brainmask.nii.gz) lost its masks to the automatic
    one, with a warning that did not say the rule."""
    image, mask = make_head(size=(20, 20, 20))
    for name in ("colin27_t1.nii.gz", "colin27_brainmask.nii.gz", "sub-02_T1w.nrrd", "sub-02_mask.nrrd",
                 "none_mask.nii.gz"):
        sitk.WriteImage(mask if "mask" in name else image, str(tmp_path / name))
    with caplog.at_level(logging.WARNING):
        items = collect_folder(tmp_path)
    assert {(it.image.name, it.mask.name if it.mask else None) for it in items} == {
        ("colin27_t1.nii.gz", "colin27_brainmask.nii.gz"), ("sub-02_T1w.nrrd", "sub-02_mask.nrrd")}
    assert "none_mask.nii.gz has no matching image" in caplog.text and "NAME_t1.nii.gz" in caplog.text
    sitk.WriteImage(mask, str(tmp_path / "colin27_t1_mask.nii.gz"))  # now colin27_t1 has two masks
    with pytest.raises(CeVAEError, match="both the brain mask of 'colin27_t1'"):
        collect_folder(tmp_path)


def test_out_dir_must_differ_from_input_folder(cohort, tiny_bundle, capsys):
    assert batch(cohort, cohort, tiny_bundle) == 2
    assert "--out-dir must differ" in capsys.readouterr().err


def test_an_out_dir_whose_name_is_too_long_is_refused_in_one_line(cohort, tiny_bundle, tmp_path, capsys):
    """It ended in "unexpected OSError: [Errno 36] File name too long": the check for a file in --out-dir's way asked
    Path.exists, which raises for such a name."""
    out = tmp_path / ("o" * 300)
    assert batch(cohort, out, tiny_bundle) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: The output name o{40}\.\.\. is 300 bytes long; file names may hold at most 255 "
                        r"bytes\. Choose a shorter name\.", err), err
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_that_is_a_file_is_said_to_be_one(cohort, tiny_bundle, tmp_path, capsys):
    """--out-dir naming a file said "--out-dir X is under X, which is a file": it is the file."""
    out = tmp_path / "results"
    out.write_text("notes")
    assert batch(cohort, out, tiny_bundle) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out-dir {out} is a file, not a folder; give a folder for the outputs.", err
    assert out.read_text() == "notes"
    assert batch(cohort, out / "sub", tiny_bundle) == 2  # a folder under it: said as before
    said = capsys.readouterr().err.strip()
    assert said == f"error: --out-dir {out / 'sub'} is under {out}, which is a file, not a folder.", said


@pytest.fixture
def two(cohort, tmp_path):
    """A CSV list of two volumes of the cohort (a1, b2)."""
    (tmp_path / "list.csv").write_text("image,mask\n" + "".join(
        f"{cohort / n}.nii.gz,{cohort / n}_mask.nii.gz\n" for n in NAMES[:2]))
    return tmp_path / "list.csv"


def settings_for(bundle_path, out):
    return DetectSettings(model=bundle_path, request=DetectionRequest.of(device="cpu"), out_dir=out)


def test_a_shard_left_empty_by_a_short_list_is_done_not_failed(two, tiny_bundle, tmp_path, capsys):
    """More shards than volumes (a Slurm array of 16 over a short list): a shard with no volume has nothing to do,
    so it ends with status 0 and an empty summary, not 'All 0 volumes failed' and status 2."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--shard", "3/3") == 0
    assert "failed" not in capsys.readouterr().err
    assert read_summary(out / "summary_shard-3-of-3.csv") == {}


def test_a_truncated_output_is_scored_again_not_skipped(two, tiny_bundle, tmp_path, caplog):
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    score = out / "a1_score.nii.gz"
    whole = score.read_bytes()
    score.write_bytes(whole[: len(whole) - 200])  # an earlier run's output cut short
    table = out / "b2_slices.csv"
    text = table.read_text()
    table.write_text(text[: len(text) - 30])  # a slice table cut mid-row
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle) == 0
    rows = read_summary(out / "summary.csv")
    assert rows["a1"]["status"] == rows["b2"]["status"] == "ok"
    assert "a1_score.nii.gz is incomplete" in caplog.text and "b2_slices.csv is incomplete" in caplog.text
    assert score.read_bytes() == whole and table.read_text() == text


def test_a_volume_with_some_outputs_missing_is_scored_again_with_a_warning(two, tiny_bundle, tmp_path, caplog):
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    fresh = (out / "a1_slices.csv").read_text()
    (out / "a1_score.nii.gz").unlink()
    (out / "a1_slices.csv").write_text("not this run's table")
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle) == 0
    assert "The outputs of a1 are incomplete (a1_score.nii.gz missing); scoring it again, replacing " in caplog.text
    assert "a1_slices.csv" in caplog.text.split("replacing ", 1)[1].splitlines()[0]
    assert read_summary(out / "summary.csv")["a1"]["status"] == "ok"
    assert (out / "a1_slices.csv").read_text() == fresh and (out / "a1_score.nii.gz").is_file()


@pytest.mark.parametrize("content", [b"subject,age\n1,30\n", bytes(range(256)) * 4], ids=["a CSV", "binary"])
def test_a_summary_path_holding_another_file_is_refused(two, tiny_bundle, tmp_path, capsys, content):
    """summary.csv that batch did not write (a user's table, junk) is never replaced without --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_bytes(content)
    assert batch(two, out, tiny_bundle) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out / 'summary.csv'} is not a batch summary; choose another --out-dir or pass --overwrite."
    assert [p.name for p in out.iterdir()] == ["summary.csv"] and (out / "summary.csv").read_bytes() == content
    assert batch(two, out, tiny_bundle, "--overwrite") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["ok", "ok"]


def test_a_folder_as_summary_is_refused_before_any_work(two, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)
    assert batch(two, out, tiny_bundle) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "summary.csv is a folder" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["summary.csv"]  # no volume was scored


def test_a_volume_finished_by_a_concurrent_run_counts_as_done(two, tiny_bundle, tmp_path):
    """Two batches on one --out-dir: what the other run completed, and recorded in its summary as made from this
    image, is neither an error nor replaced."""
    from CeVAEAnomalyLib.cli.batch import Summary, VolumeDetector, settings_record
    from CeVAEAnomalyLib.io import strict_json

    out = tmp_path / "out"
    item = collect_inputs(two)[0]
    ours, theirs = VolumeDetector(settings_for(tiny_bundle, out)), VolumeDetector(settings_for(tiny_bundle, out))
    score_volume = ours.detector

    def racing(image, mask, **kw):  # the other run publishes and records this volume while we are scoring it
        summary = Summary(out / "summary_shard-1-of-2.csv")
        out.mkdir(exist_ok=True)
        (out / "batch_settings_shard-1-of-2.json").write_text(strict_json.dumps(settings_record(theirs.s)))
        summary.add(theirs(item, False))
        summary.flush()
        assert summary.count("ok") == 1
        return score_volume(image, mask, **kw)

    ours.detector = racing
    row = ours(item, False)
    assert row["status"] == "skipped" and row["error"] == "", row["error"]
    published = {p: p.read_bytes() for p in output_paths(out, item.name).values()}
    ours.detector = lambda *a, **k: pytest.fail("a volume finished by another run was scored again")
    assert ours(item, False)["status"] == "skipped"  # found done before any work
    assert {p: p.read_bytes() for p in published} == published



@pytest.mark.parametrize("overwrite", [False, True])
def test_a_volume_another_run_is_writing_says_a_rerun_skips_it(two, tiny_bundle, tmp_path, overwrite):
    """Two runs of one list on one --out-dir (an unsharded run and a shard) scoring one volume at once: the one
    that found the other writing its outputs recorded "A batch (process N) is writing ...; wait for it to finish,
    or choose another output", not that a rerun once that run is done skips the volume."""
    from CeVAEAnomalyLib.cli.batch import VolumeDetector
    from CeVAEAnomalyLib.io.lock import hold_outputs

    out = tmp_path / "out"
    out.mkdir()
    item = collect_inputs(two)[0]
    with hold_outputs(output_paths(out, item.name).values(), "batch"):  # the other run, writing them
        row = VolumeDetector(settings_for(tiny_bundle, out))(item, overwrite)
    assert row["status"] == "error"
    rerun = "." if overwrite else (": it skips this volume if that run scored this image and mask, refuses to "
                                   "replace another scan's outputs, and scores it again otherwise.")
    assert row["error"] == (f"A batch (process {os.getpid()}) was writing its outputs in {out} meanwhile; they are "
                            f"not taken for this run's. Run the batch again once the other run is done{rerun}")
    assert not any(p.exists() for p in output_paths(out, item.name).values())

@pytest.fixture
def own_two(cohort, tmp_path):
    """A folder with copies of a1 and b2 (and their masks) that a test may replace."""
    d = tmp_path / "in"
    d.mkdir()
    for n in NAMES[:2]:
        for suffix in ("", "_mask"):
            (d / f"{n}{suffix}.nii.gz").write_bytes((cohort / f"{n}{suffix}.nii.gz").read_bytes())
    return d


def test_a_replaced_input_is_scored_again_and_the_others_skipped(own_two, tiny_bundle, tmp_path, caplog):
    out = tmp_path / "out"
    assert batch(own_two, out, tiny_bundle) == 0
    image, mask = make_head(size=(30, 34, 28), seed=99)  # another scan, on another grid
    sitk.WriteImage(image, str(own_two / "a1.nii.gz"))
    sitk.WriteImage(mask, str(own_two / "a1_mask.nii.gz"))
    with caplog.at_level(logging.WARNING):
        assert batch(own_two, out, tiny_bundle) == 0
    assert (f"The input of a1 changed since its outputs were made (image {own_two / 'a1.nii.gz'}, brain mask "
            f"{own_two / 'a1_mask.nii.gz'}); scoring it again.") in caplog.text and "b2" not in caplog.text
    rows = read_summary(out / "summary.csv")
    assert [rows[n]["status"] for n in NAMES[:2]] == ["ok", "skipped"]
    assert sitk.ReadImage(str(output_paths(out, "a1")["score"])).GetSize() == (30, 34, 28)
    from CeVAEAnomalyLib.io.checksum import sha256_of
    assert rows["a1"]["image_sha256"] == sha256_of(own_two / "a1.nii.gz")

    eroded = sitk.BinaryErode(sitk.ReadImage(str(own_two / "b2_mask.nii.gz")) > 0, [2, 2, 2])
    sitk.WriteImage(sitk.Cast(eroded, sitk.sitkUInt8), str(own_two / "b2_mask.nii.gz"))  # only the mask changes
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert batch(own_two, out, tiny_bundle) == 0
    assert f"The input of b2 changed since its outputs were made (brain mask {own_two / 'b2_mask.nii.gz'})" \
        in caplog.text
    rows = read_summary(out / "summary.csv")
    assert [rows[n]["status"] for n in NAMES[:2]] == ["skipped", "ok"]


def test_a_scan_whose_data_file_alone_was_replaced_is_scored_again(cohort, tiny_bundle, tmp_path, caplog):
    """A MetaImage header with its .raw data: replacing the data (the header's text unchanged) is a new scan. The
    checksum held the header alone, so the rerun kept the old scan's outputs."""
    d = tmp_path / "in"
    d.mkdir()
    image, mask = sitk.ReadImage(str(cohort / "a1.nii.gz")), sitk.ReadImage(str(cohort / "a1_mask.nii.gz"))
    for key in image.GetMetaDataKeys():  # the NIfTI fields, which MetaImage writes in part: the same each time
        image.EraseMetaData(key)
    sitk.WriteImage(image, str(d / "a1.mhd"))
    sitk.WriteImage(mask, str(d / "a1_mask.mhd"))
    out = tmp_path / "out"
    assert batch(d, out, tiny_bundle) == 0
    header = (d / "a1.mhd").read_bytes()
    brighter = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 1.5)
    brighter.CopyInformation(image)
    sitk.WriteImage(brighter, str(d / "a1.mhd"))
    assert (d / "a1.mhd").read_bytes() == header  # only a1.raw changed
    with caplog.at_level(logging.WARNING):
        assert batch(d, out, tiny_bundle) == 0
    assert f"The input of a1 changed since its outputs were made (image {d / 'a1.mhd'})" in caplog.text
    assert read_summary(out / "summary.csv")["a1"]["status"] == "ok"


def test_a_summary_without_checksums_means_scoring_again(two, tiny_bundle, tmp_path, caplog):
    """An older version's summary says nothing of what the outputs were made from: they are scored again."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    rows = read_summary(out / "summary.csv")
    old_fields = ["name", "image", "mask", "status", "error", "flagged_ml", "max_score", "top_slice_axis",
                  "top_slice", "seconds"]
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows.values())
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle) == 0
    assert "outputs of 2 volume(s)" in caplog.text and "scoring them again to be safe: a1, b2." in caplog.text
    again = read_summary(out / "summary.csv")
    assert [again[n]["status"] for n in NAMES[:2]] == ["ok", "ok"]
    assert [again[n]["max_score"] for n in NAMES[:2]] == [rows[n]["max_score"] for n in NAMES[:2]]
    assert batch(two, out, tiny_bundle) == 0  # now recorded: skipped
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(two, tiny_bundle, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    recorded = json.loads((out / "batch_settings.json").read_text())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for extra, named in ((["--threshold", "0.5"], f"threshold {recorded['threshold']:.6g} -> 0.5"),
                         (["--score-type", "rec"], "score_type 'combi' -> 'rec'"),
                         (["--batch-size", "8"], "batch_size 64 -> 8")):
        assert batch(two, out, tiny_bundle, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (INFO lines before it)
        assert err.startswith(f"error: The outputs in {out} were made with other settings ({named}")
        assert err.endswith(f"; see {out / 'batch_settings.json'}); pass --overwrite to score every volume again "
                            "with these, or choose another --out-dir.")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    assert batch(two, out, tiny_bundle, "--threshold", "0.5", "--overwrite") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["ok", "ok"]
    assert json.loads((out / "batch_settings.json").read_text())["threshold"] == 0.5
    assert batch(two, out, tiny_bundle, "--threshold", "0.5") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]

    for foreign in ("my notes", "[" * 100_000 + "]" * 100_000):  # a file batch did not write is not replaced either
        (out / "batch_settings.json").write_text(foreign)
        assert batch(two, out, tiny_bundle, "--threshold", "0.5") == 2
        assert (f"{out / 'batch_settings.json'} is not a batch settings record; choose another --out-dir or pass "
                "--overwrite.") in capsys.readouterr().err


def _batch_and_detect_a1(cohort: Path, two: Path, bundle: Path, tmp_path: Path) -> Tuple[Path, Path]:
    """A batch of ``two`` at threshold 0.3 into tmp_path/out, and detect's component table of its volume a1 at the
    same threshold: (the batch's folder, that table)."""
    out, table = tmp_path / "out", tmp_path / "a1_components.csv"
    assert batch(two, out, bundle, "--threshold", "0.3") == 0
    assert main(["detect", str(cohort / "a1.nii.gz"), "--mask", str(cohort / "a1_mask.nii.gz"), "--model",
                 str(bundle), "--device", "cpu", "--threshold", "0.3", "--score", str(tmp_path / "s.nii.gz"),
                 "--components", str(table)]) == 0
    return out, table


def test_the_summary_counts_each_volumes_components_as_detect_lists_them(cohort, two, tiny_bundle, tmp_path):
    """A cohort's healthy scans are judged by flagged ml and components: the summary has both, the count equal to
    the component table's rows, also for a volume whose outputs were found and read back."""
    out, table = _batch_and_detect_a1(cohort, two, tiny_bundle, tmp_path)
    listed = len(table.read_text().splitlines()) - 1
    assert listed >= 1 and read_summary(out / "summary.csv")["a1"]["components"] == str(listed)
    from CeVAEAnomalyLib.cli.batch import read_back

    row = read_back(BatchItem("a1", cohort / "a1.nii.gz", cohort / "a1_mask.nii.gz"), out, {})  # (another run's)
    assert row["status"] == "skipped" and row["components"] == listed


def test_each_volume_gets_the_component_table_detect_writes(cohort, two, tiny_bundle, tmp_path, caplog):
    """batch wrote each volume's score map, labelmap and slice table but not the lesion table of detect --components,
    so a cohort's lesion locations were only in its labelmaps. NAME_components.csv is now written with the other
    outputs (the same table as detect's), its sha256 in the summary: a rerun skips it, and scores a volume again whose
    table was cut short or is not the file recorded."""
    from CeVAEAnomalyLib.io.checksum import sha256_of

    out, table = _batch_and_detect_a1(cohort, two, tiny_bundle, tmp_path)
    assert (out / "a1_components.csv").read_bytes() == table.read_bytes()  # volumes, scores, RAS centroids
    rows = read_summary(out / "summary.csv")
    tables = {n: (out / f"{n}_components.csv").read_bytes() for n in NAMES[:2]}
    for name in NAMES[:2]:
        assert rows[name]["components_sha256"] == sha256_of(out / f"{name}_components.csv")
        assert int(rows[name]["components"]) == len(tables[name].splitlines()) - 1
    assert int(rows["a1"]["components"]) >= 1

    text = tables["a1"].decode()
    (out / "a1_components.csv").write_text(text[: len(text) - 5], newline="")  # cut mid-row
    (out / "b2_components.csv").write_bytes(tables["b2"].splitlines(keepends=True)[0])  # cut where a row ends
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle, "--threshold", "0.3") == 0
    assert "a1_components.csv is incomplete (a row is cut short)" in caplog.text
    assert "b2_components.csv is incomplete (it lists 0 of the" in caplog.text  # (its header alone)
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["ok", "ok"]
    assert {n: (out / f"{n}_components.csv").read_bytes() for n in NAMES[:2]} == tables
    (out / "b2_components.csv").unlink()  # the summary records it: missing, not an earlier version's outputs
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle, "--threshold", "0.3") == 0
    assert "The outputs of b2 are incomplete (b2_components.csv missing); scoring it again" in caplog.text
    assert "earlier versions" not in caplog.text and (out / "b2_components.csv").read_bytes() == tables["b2"]
    assert batch(two, out, tiny_bundle, "--threshold", "0.3") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]


@pytest.mark.parametrize("dropped", [1, 4], ids=["without side", "without peaks and side"])
def test_a_component_table_of_an_earlier_version_reads_back_whole(cohort, two, tiny_bundle, tmp_path, dropped):
    """The component table gained the peak columns (peak_r, peak_a, peak_s), then the side column: a table of an
    earlier version, without them, is still a whole table (not "incomplete (no component header)") where batch reads
    outputs back."""
    from CeVAEAnomalyLib.cli.batch import incomplete_outputs, read_back

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--threshold", "0.3") == 0
    table = out / "a1_components.csv"
    lines = table.read_bytes().decode().splitlines(keepends=True)
    assert lines[0].rstrip().endswith(",r,a,s,peak_r,peak_a,peak_s,side") and len(lines) > 1
    assert all(line.rstrip().rsplit(",", 1)[1] in ("left", "right", "both") for line in lines[1:])
    older = "".join(line.rstrip("\r\n").rsplit(",", dropped)[0] + line[len(line.rstrip("\r\n")):] for line in lines)
    table.write_bytes(older.encode())
    assert incomplete_outputs(output_paths(out, "a1")) == ""
    row = read_back(BatchItem("a1", cohort / "a1.nii.gz", cohort / "a1_mask.nii.gz"), out, {})
    assert row["status"] == "skipped" and row["components"] == len(lines) - 1


def test_a_component_table_cut_where_a_row_ends_is_incomplete(cohort, two, tiny_bundle, tmp_path):
    """A component table cut where a row ends (its last components lost, or all but the header) passed batch's check
    of outputs another run wrote as whole: its header, row lengths and final line end are those of a whole table. Its
    rows are now counted against the labelmap's components."""
    from CeVAEAnomalyLib.cli.batch import incomplete_outputs, read_back

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--threshold", "0.3") == 0
    table = out / "a1_components.csv"
    lines = table.read_bytes().splitlines(keepends=True)
    assert len(lines) > 1
    table.write_bytes(b"".join(lines[:-1]))
    problem = incomplete_outputs(output_paths(out, "a1"))
    assert problem == (f"a1_components.csv is incomplete (it lists {len(lines) - 2} of the {len(lines) - 1} "
                       "components of a1_labelmap.nii.gz)"), problem
    with pytest.raises(ValueError, match="a1_components.csv is incomplete"):
        read_back(BatchItem("a1", cohort / "a1.nii.gz", cohort / "a1_mask.nii.gz"), out, {})


def test_a_slice_table_cut_where_a_row_ends_is_incomplete(cohort, two, tiny_bundle, tmp_path):
    """A slice table cut where a row ends (its least anomalous slices lost) passed batch's check of outputs another run
    wrote: its header, row lengths and final line end are those of a whole table, so a volume "finished by another run
    meanwhile" was kept with the cut table, and its checksums recorded for every later resume. Every slice the score
    map scores (all in the brain, which has a row for each of its slices) must now be listed."""
    from CeVAEAnomalyLib.cli.batch import incomplete_outputs, read_back

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--threshold", "0.3") == 0
    assert incomplete_outputs(output_paths(out, "a1")) == ""
    table = out / "a1_slices.csv"
    lines = table.read_bytes().splitlines(keepends=True)
    scored = np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a1_score.nii.gz"))).any(axis=(1, 2)))
    assert lines[0].startswith(b"axis,index,") and {line[:2] for line in lines[1:]} == {b"2,"} and scored > 4
    table.write_bytes(b"".join(lines[:4]))  # the header and the three most anomalous slices
    problem = incomplete_outputs(output_paths(out, "a1"))
    assert problem == (f"a1_slices.csv is incomplete (it does not list {scored - 3} of the {scored} slices that "
                       "a1_score.nii.gz scores)"), problem
    with pytest.raises(ValueError, match="a1_slices.csv is incomplete"):
        read_back(BatchItem("a1", cohort / "a1.nii.gz", cohort / "a1_mask.nii.gz"), out, {})
    table.write_bytes(lines[0])  # the header alone
    assert incomplete_outputs(output_paths(out, "a1")) == "a1_slices.csv is incomplete (it lists no slice)"


@pytest.mark.parametrize("column", ["absent", "empty"])
def test_outputs_of_a_version_without_component_tables_are_scored_again_once(two, tiny_bundle, tmp_path, caplog,
                                                                              column):
    """An --out-dir an earlier version filled: no NAME_components.csv, a summary without components_sha256 ("empty":
    the column there, blank in the rows a rerun stopped early carried on). Every volume is scored again once, said
    in one line, not one warning per volume, so that each gets its table; the next rerun skips them."""
    from CeVAEAnomalyLib.cli.batch import SUMMARY_FIELDS
    from CeVAEAnomalyLib.io.checksum import sha256_of

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 0
    rows = read_summary(out / "summary.csv")
    fields = [f for f in SUMMARY_FIELDS if column == "empty" or f != "components_sha256"]
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(dict(row, components_sha256="") for row in rows.values())
    for name in NAMES[:2]:
        (out / f"{name}_components.csv").unlink()
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "component" in r.getMessage()]
    assert said == ["The outputs of 2 volume(s) have no component table (NAME_components.csv), as earlier versions of "
                    "batch wrote them; scoring them again once, so that every volume has its table: a1, b2."]
    assert "incomplete" not in caplog.text
    again = read_summary(out / "summary.csv")
    for name in NAMES[:2]:
        assert again[name]["status"] == "ok" and again[name]["max_score"] == rows[name]["max_score"]
        assert again[name]["components_sha256"] == sha256_of(out / f"{name}_components.csv")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert batch(two, out, tiny_bundle) == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]
    assert "component table" not in caplog.text


def test_a_threshold_of_inf_is_recorded_as_standard_json_and_a_rerun_skips(two, tiny_bundle, tmp_path):
    """--threshold inf (nothing labelled): batch_settings.json holds "inf", not the Infinity token other parsers
    refuse, and a rerun with the same settings finds its outputs made with them."""
    import json

    def refuse(token):
        raise ValueError(f"non-standard token {token}")

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--threshold", "inf") == 0
    assert json.loads((out / "batch_settings.json").read_text(), parse_constant=refuse)["threshold"] == "inf"
    assert batch(two, out, tiny_bundle, "--threshold", "inf") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]
    record = (out / "batch_settings.json").read_text()  # as an earlier version wrote it: the Infinity token
    assert '"threshold": "inf"' in record
    (out / "batch_settings.json").write_text(record.replace('"threshold": "inf"', '"threshold": Infinity'))
    assert batch(two, out, tiny_bundle, "--threshold", "inf") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]


def test_shards_sharing_an_out_dir_each_check_their_own_settings(two, tiny_bundle, tmp_path, capsys):
    """Shard 1 redone with another threshold must not make shard 2's outputs pass for made with it."""
    out = tmp_path / "out"
    for shard in ("1/2", "2/2"):
        assert batch(two, out, tiny_bundle, "--shard", shard) == 0
    assert batch(two, out, tiny_bundle, "--shard", "1/2", "--threshold", "0.5", "--overwrite") == 0
    capsys.readouterr()
    assert batch(two, out, tiny_bundle, "--shard", "2/2", "--threshold", "0.5") == 2
    assert "were made with other settings (threshold" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("batch_settings*")) == ["batch_settings_shard-1-of-2.json",
                                                                    "batch_settings_shard-2-of-2.json"]


@pytest.mark.slow
def test_an_interrupted_pool_lists_every_volume_it_wrote(cohort, tiny_bundle, tmp_path):
    """Ctrl-C with --workers: no volume is written after the run ends, and each one written is in the summary."""
    out = tmp_path / "out"
    settings = settings_for(tiny_bundle, out)
    items = [it for it in collect_inputs(cohort) if it.name != "bad"]

    def stop_at_the_first(fraction, message):
        if message.endswith(" ok"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(items, settings, out / "summary.csv", workers=2, progress=stop_at_the_first)
    written = sorted(n for n in NAMES if all(p.exists() for p in output_paths(out, n).values()))
    listed = read_summary(out / "summary.csv")
    assert sorted(listed) == written and {r["status"] for r in listed.values()} == {"ok"}
    assert not [p for p in out.iterdir() if p.name.startswith(".") or
                (p.name.split("_")[0] in NAMES and p.name.split("_")[0] not in written)]  # no temp file or part set
    summary = run_batch(items, settings, out / "summary.csv")
    assert [summary.rows[n]["status"] for n in NAMES] == ["skipped" if n in written else "ok" for n in NAMES]


@pytest.mark.skipif(os.name != "posix", reason="named pipes are POSIX")
def test_a_named_pipe_in_the_folder_is_said_and_left_out(cohort, tmp_path, caplog):
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a1.nii.gz", "a1_mask.nii.gz"):
        shutil.copy(cohort / name, folder / name)
    os.mkfifo(folder / "p9.nii.gz")
    with caplog.at_level(logging.WARNING):
        items = collect_folder(folder)
    assert [i.name for i in items] == ["a1"]
    assert "p9.nii.gz in" in caplog.text and "is not a regular file (a named pipe, device or socket); ignored" \
        in caplog.text


def test_a_second_run_on_the_same_summary_is_refused_while_the_first_runs(two, tiny_bundle, tmp_path, capsys):
    """Two runs writing one summary (the same --out-dir, no shards) would race on it and on the settings record;
    another shard's summary is its own."""
    from CeVAEAnomalyLib.io.lock import hold_output

    out = tmp_path / "out"
    with hold_output(out / "summary.csv", "batch"):  # as a first run holds it
        assert batch(two, out, tiny_bundle) == 2
        assert f"A batch (process {os.getpid()}) is writing" in capsys.readouterr().err
        assert not list(out.glob("*.nii.gz"))
        assert batch(two, out, tiny_bundle, "--shard", "1/2") == 0
    assert batch(two, out, tiny_bundle, "--shard", "2/2") == 0


def test_a_rerun_stopped_while_it_checks_what_is_done_keeps_the_earlier_rows(cohort, tiny_bundle, tmp_path,
                                                                             monkeypatch):
    """Ctrl-C while a resumed run walks the finished volumes must not shrink the summary to the ones it reached:
    the next run would score all the others again."""
    import CeVAEAnomalyLib.cli.batch as batch_mod

    settings = DetectSettings(model=tiny_bundle, request=DetectionRequest.of(device="cpu"), out_dir=tmp_path / "out")
    items = [it for it in collect_inputs(cohort) if it.name != "bad"]
    summary_csv = tmp_path / "out" / "summary.csv"
    run_batch(items, settings, summary_csv)
    before = read_summary(summary_csv)
    checked = []
    real = batch_mod._skipped_row

    def interrupted_at_the_second(*args, **kwargs):
        checked.append(args[0].name)
        if len(checked) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_mod, "_skipped_row", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_batch(items, settings, summary_csv)
    assert sorted(read_summary(summary_csv)) == sorted(before)  # every earlier row is still there
    monkeypatch.undo()
    summary = run_batch(items, settings, summary_csv)
    assert {summary.rows[n]["status"] for n in NAMES} == {"skipped"}  # nothing scored again

    overwrite = DetectSettings(model=tiny_bundle, request=DetectionRequest.of(device="cpu"), out_dir=tmp_path / "out",
                               overwrite=True)
    kept = summary_csv.read_bytes()

    def stop_at_once(fraction, message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # --overwrite, stopped before any volume was scored again
        run_batch(items, overwrite, summary_csv, progress=stop_at_once)
    assert summary_csv.read_bytes() == kept


def test_outputs_of_a_run_with_other_settings_are_never_taken_for_this_runs(cohort, two, tiny_bundle, tmp_path,
                                                                           capsys):
    """A shard run with --threshold 1.0 and a plain run on one --out-dir: the plain run marked the shard's outputs
    "skipped", as if made with its own settings, and kept them for good."""
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--shard", "1/1", "--threshold", "1.0") == 0
    made = {p: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert made and batch(two, out, tiny_bundle, "--threshold", "0.9") == 2
    err = capsys.readouterr().err
    assert "with other settings (batch_settings_shard-1-of-1.json: threshold 1 -> 0.9)" in err
    assert {p: p.read_bytes() for p in out.glob("*.nii.gz")} == made
    assert batch(two, out, tiny_bundle, "--shard", "1/1", "--threshold", "1.0") == 0  # the same settings: fine

    def stop_after_the_first(fraction, message):
        if message.endswith(" ok"):
            raise KeyboardInterrupt

    stopped = DetectSettings(model=tiny_bundle, request=DetectionRequest.of(device="cpu", threshold=0.9),
                             out_dir=out, overwrite=True)
    with pytest.raises(KeyboardInterrupt):  # an unsharded --overwrite that does not finish supersedes nothing
        run_batch(collect_inputs(two), stopped, out / "summary.csv", progress=stop_after_the_first)
    assert (out / "batch_settings_shard-1-of-1.json").is_file()
    assert batch(two, out, tiny_bundle, "--threshold", "0.9", "--overwrite") == 0  # all scored: supersedes it
    assert batch(two, out, tiny_bundle, "--threshold", "0.9") == 0  # ... so the remedy the message gives works
    assert batch(two, out, tiny_bundle, "--shard", "1/1", "--threshold", "1.0", "--overwrite") == 0

    from CeVAEAnomalyLib.cli.batch import VolumeDetector, made_from, settings_record

    detector = VolumeDetector(settings_for(tiny_bundle, out))  # adopting outputs that appeared meanwhile
    item = collect_inputs(two)[0]
    assert settings_record(detector.s)["threshold"] != 1.0
    with pytest.raises(CeVAEError, match="written meanwhile by a run with other settings"):
        detector.done_by_another_run(item, made_from(item))


def test_an_overwrite_with_other_settings_stopped_in_its_first_volume_leaves_no_outputs_to_skip(
        two, tiny_bundle, tmp_path, monkeypatch):
    """The new settings record was written while the earlier summary stayed: a rerun with the new settings skipped
    every volume, keeping labelmaps made at the old threshold as its own."""
    import CeVAEAnomalyLib.cli.batch as batch_mod

    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle, "--threshold", "0.5") == 0

    def stopped(self, item, overwrite):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_mod.VolumeDetector, "__call__", stopped)
    assert batch(two, out, tiny_bundle, "--threshold", "inf", "--overwrite") == 130
    monkeypatch.undo()
    assert batch(two, out, tiny_bundle, "--threshold", "inf") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["ok", "ok"]
    for labelmap in out.glob("*_labelmap.nii.gz"):
        assert not sitk.GetArrayFromImage(sitk.ReadImage(str(labelmap))).any()


def test_analyze_pairs_in_a_folder_are_volumes_of_the_batch(tiny_bundle, tmp_path):
    """An .hdr/.img pair, which detect reads, was left out of a folder's batch without a word (the summary did not
    list it), and a folder of such pairs given to train or adapt was taken for a DICOM series."""
    d = tmp_path / "in"
    d.mkdir()
    image, mask = make_head(size=(36, 40, 30), seed=3)
    sitk.WriteImage(image, str(d / "a.nii.gz"))
    sitk.WriteImage(mask, str(d / "a_mask.nii.gz"))
    sitk.WriteImage(image, str(d / "b.hdr"))
    sitk.WriteImage(mask, str(d / "b_mask.hdr"))
    assert [(it.name, it.image.name, it.mask.name) for it in collect_inputs(d)] == [
        ("a", "a.nii.gz", "a_mask.nii.gz"), ("b", "b.hdr", "b_mask.hdr")]
    assert batch(d, tmp_path / "out", tiny_bundle) == 0
    assert [r["status"] for r in read_summary(tmp_path / "out" / "summary.csv").values()] == ["ok", "ok"]


def test_a_plain_rerun_after_an_array_of_shards_skips_what_the_shards_scored(cohort, two, tiny_bundle, tmp_path,
                                                                             caplog):
    """The shards' summaries and settings records describe every output, yet an unsharded rerun (or one with
    another shard count) scored the whole cohort again, "to be safe"."""
    out = tmp_path / "out"
    for shard in ("1/2", "2/2"):
        assert batch(two, out, tiny_bundle, "--shard", shard) == 0
    made = {p: p.stat().st_mtime_ns for p in out.glob("*_score.nii.gz")}
    assert batch(two, out, tiny_bundle, "--shard", "1/1") == 0
    assert batch(two, out, tiny_bundle) == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_score.nii.gz")} == made

    first = NAMES[0]  # another scan file under a shard's volume name: its outputs are kept until removed
    (tmp_path / "list.csv").write_text(f"image,mask,name\n{cohort / NAMES[2]}.nii.gz,{cohort / NAMES[2]}_mask.nii.gz,"
                                       f"{first}\n{cohort / NAMES[1]}.nii.gz,{cohort / NAMES[1]}_mask.nii.gz,\n")
    assert batch(two, out, tiny_bundle, "--shard", "1/3") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_score.nii.gz")} == made
    for path in out.glob(f"{first}_*"):
        path.unlink()
    assert batch(two, out, tiny_bundle, "--shard", "1/3") == 0
    assert read_summary(out / "summary_shard-1-of-3.csv")[first]["status"] == "ok"


def test_a_mask_tag_in_capitals_names_a_brain_mask(tmp_path, caplog):
    """Extensions are read in any case (S1.NII.GZ), the mask and contrast tags were not: S1_MASK.NII.GZ became a
    volume of its own (an error row) and S1 got the automatic brain mask instead of its own; S3_MASK was left out."""
    from CeVAEAnomalyLib.cli.commands import _healthy_subjects

    image, mask = make_head(size=(20, 20, 20))
    for name in ("S1.NII.GZ", "S1_MASK.NII.GZ", "s2.nii.gz", "s2_BrainMask.nii.gz", "S3_T1W.NII.GZ", "S3_MASK.NII.GZ"):
        sitk.WriteImage(mask if "mask" in name.lower() else image, str(tmp_path / name.lower()))
        (tmp_path / name.lower()).rename(tmp_path / name)
    expected = [("S1", "S1.NII.GZ", "S1_MASK.NII.GZ"), ("S3_T1W", "S3_T1W.NII.GZ", "S3_MASK.NII.GZ"),
                ("s2", "s2.nii.gz", "s2_BrainMask.nii.gz")]
    assert [(it.name, it.image.name, it.mask.name) for it in collect_inputs(tmp_path)] == expected
    given = argparse.Namespace(manifest=None, images=sorted(tmp_path.iterdir()))
    assert sorted((s.image.name, s.mask.name) for s in _healthy_subjects(given)) == sorted(e[1:] for e in expected)


def test_a_rerun_redoes_outputs_that_are_not_the_files_its_summary_recorded(cohort, tiny_bundle, tmp_path, caplog):
    """A rerun trusted any complete output older than the summary: one restored with `cp -p` from another run, or
    cut short to whole rows with its time kept, was skipped. The summary now records each output's sha256."""
    import shutil

    from CeVAEAnomalyLib.io.checksum import sha256_of

    out = tmp_path / "out"
    assert batch(cohort, out, tiny_bundle) == 2
    first = {name: {role: sha256_of(path) for role, path in output_paths(out, name).items()} for name in NAMES}
    shutil.copy2(out / "b2_score.nii.gz", out / "a1_score.nii.gz")  # another volume's, with its older time
    slices = out / "c3_slices.csv"
    before = slices.stat()
    slices.write_text("".join(slices.read_text().splitlines(keepends=True)[:-1]))  # whole rows, its last (least
    # anomalous, an unscored edge slice: only its checksum tells the table cut) lost
    os.utime(slices, ns=(before.st_atime_ns, before.st_mtime_ns))
    with caplog.at_level(logging.WARNING):
        assert batch(cohort, out, tiny_bundle) == 2
    rerun = read_summary(out / "summary.csv")
    assert [rerun[n]["status"] for n in NAMES] == ["ok", "skipped", "ok", "skipped"]
    assert ("The outputs of a1 are not the files its summary records (a1_score.nii.gz differs: changed, damaged, or "
            "restored from another run); scoring it again.") in caplog.text
    assert "The outputs of c3 are not the files its summary records (c3_slices.csv differs" in caplog.text
    for name in NAMES:  # the same outputs again, recorded as such
        for role, path in output_paths(out, name).items():
            assert rerun[name][f"{role}_sha256"] == sha256_of(path) == first[name][role]


def test_the_help_says_that_a_rerun_skips_only_the_outputs_its_summary_recorded(capsys):
    """A rerun scores a volume again when an output is not the file the summary recorded (its sha256), not only when
    its input changed; the help said only the latter."""
    assert main(["batch", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "skips volumes whose outputs are the files its summary recorded (sha256), made from the same input" in text


def test_a_volume_whose_detection_runs_out_of_memory_gets_a_row_that_says_so(two, tiny_bundle, tmp_path,
                                                                           monkeypatch):
    """PyTorch's CPU allocator fails with a RuntimeError: the row read "unexpected RuntimeError: ... can't allocate
    memory", as for a bug to report (the command line says "out of memory" for the same failure)."""
    import CeVAEAnomalyLib.engine.detector as detector_mod

    def allocator_fails(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 8589934592 bytes.")

    monkeypatch.setattr(detector_mod.Detector, "__call__", allocator_fails)
    out = tmp_path / "out"
    assert batch(two, out, tiny_bundle) == 1  # (volumes out of memory: as detect, not refused)
    rows = read_summary(out / "summary.csv").values()
    assert [r["error"] for r in rows] == ["out of memory; give a smaller --batch-size or fewer --workers"] * 2


def test_out_of_memory_is_told_from_other_failures():
    import torch

    from CeVAEAnomalyLib.errors import out_of_memory

    assert out_of_memory(MemoryError()) and out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.2 GB, other allocations: 1 GB)"))
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(ValueError("can't allocate memory"))


def test_the_summary_keeps_each_volume_s_warnings_and_a_rerun_carries_them(tiny_bundle, tmp_path):
    """A cohort's warnings (here a CT-like intensity range) are in the volume's summary row, not only on the console
    that scrolled past; a rerun that skips the volume keeps them, and a summary written before the column existed
    is still trusted (its volumes are skipped, not scored again)."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    image, mask = make_head(size=(36, 40, 30), seed=20)
    for name, volume in (("plain", image), ("ct", as_hounsfield(image))):
        sitk.WriteImage(volume, str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"{name}_mask.nii.gz"))
    assert batch(folder, out, tiny_bundle, "--threshold", "0.3") == 0
    rows = read_summary(out / "summary.csv")
    assert rows["plain"]["warnings"] == ""
    assert rows["ct"]["warnings"].startswith("The intensities look like a CT in Hounsfield units")
    assert batch(folder, out, tiny_bundle, "--threshold", "0.3") == 0
    again = read_summary(out / "summary.csv")
    assert [r["status"] for r in again.values()] == ["skipped", "skipped"]
    assert again["ct"]["warnings"] == rows["ct"]["warnings"]
    with open(out / "summary.csv", "w", newline="") as fh:  # as a version without the column wrote it
        writer = csv.DictWriter(fh, [f for f in rows["plain"] if f != "warnings"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows.values())
    assert batch(folder, out, tiny_bundle, "--threshold", "0.3") == 0
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["skipped", "skipped"]


def test_batch_help_says_the_exit_status_a_failed_volume_gives(cohort, tiny_bundle, tmp_path, capsys):
    """A script running batch learns from its exit status whether every volume was done; --help did not say which
    status means what (a failed volume: 2, as a refusal)."""
    assert main(["batch", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert ("exit status: 0 every volume done (scored or skipped); 1 a volume ran out of memory or failed "
            "unexpectedly, or a worker process died (the summary's error column says why; a rerun retries the failed "
            "volumes); 2 the failed volumes were all refused, or the run was refused before any work") in shown
    (tmp_path / "in").mkdir()
    for name in ("a1.nii.gz", "a1_mask.nii.gz", "bad.nii.gz"):
        (tmp_path / "in" / name).write_bytes((cohort / name).read_bytes())
    assert batch(tmp_path / "in", tmp_path / "out", tiny_bundle) == 2
    assert batch(tmp_path / "in", tmp_path / "out", tiny_bundle) == 2  # a rerun: a1 skipped, bad failing again
    (tmp_path / "in" / "bad.nii.gz").unlink()
    assert batch(tmp_path / "in", tmp_path / "out", tiny_bundle) == 0


def test_a_batch_whose_every_volume_failed_says_none_is_done(cohort, tiny_bundle, tmp_path, capsys):
    """Two truncated volumes (and, alone, one): the last line said "2 of 2 volume(s) failed ... The others are done,
    and a rerun retries only the failed ones", of others there were none."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.nii.gz").write_bytes((cohort / "bad.nii.gz").read_bytes())
    whole = (cohort / "b2.nii.gz").read_bytes()
    (tmp_path / "in" / "bad2.nii.gz").write_bytes(whole[: len(whole) // 2])  # (another volume: not a repeat)
    out = tmp_path / "out"
    assert batch(tmp_path / "in", out, tiny_bundle) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: All 2 volumes failed; the reasons are in the 'error' column of {out / 'summary.csv'}. None is "
        "done, and a rerun retries them all.")
    assert [r["status"] for r in read_summary(out / "summary.csv").values()] == ["error", "error"]
    (tmp_path / "in" / "bad2.nii.gz").unlink()
    assert batch(tmp_path / "in", out, tiny_bundle) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: The volume failed; the reason is in the 'error' column of {out / 'summary.csv'}. Nothing is done, "
        "and a rerun retries it.")


def test_a_list_whose_paths_are_relative_to_the_current_folder_is_refused_saying_so(cohort, tiny_bundle, tmp_path,
                                                                                    monkeypatch, capsys):
    """Paths in a list are read relative to the list's folder: a list in a subfolder written with paths relative to
    the current folder (as a shell's tab completion gives them) ran with every volume an error row, "The image
    lists/in/a1.nii.gz does not exist", though in/a1.nii.gz was there."""
    (tmp_path / "in").mkdir()
    (tmp_path / "lists").mkdir()
    for name in ("a1.nii.gz", "a1_mask.nii.gz"):
        (tmp_path / "in" / name).write_bytes((cohort / name).read_bytes())
    (tmp_path / "lists" / "cohort.csv").write_text("image,mask\nin/a1.nii.gz,in/a1_mask.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    assert batch(Path("lists/cohort.csv"), Path("out"), tiny_bundle) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: lists/cohort.csv, line 2: the image in/a1.nii.gz is read relative to the list's folder, "
                   "as lists/in/a1.nii.gz, which does not exist; it exists relative to the current folder. Write "
                   "the list's paths relative to lists, or absolute."), err
    assert not Path("out").exists()
    (tmp_path / "lists" / "cohort.csv").write_text("image,mask\n../in/a1.nii.gz,../in/a1_mask.nii.gz\n")
    assert batch(Path("lists/cohort.csv"), Path("out"), tiny_bundle) == 0
