"""Lists of files (manifests, batch lists, evaluation cases): every row checked before any work, its line
named; DICOM series folders accepted; a CSV saved by Excel (with a byte-order mark) read like any other."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.batch import read_list
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject, read_manifest
from conftest import make_head
from test_bad_inputs import write_dicom_series
from test_reliability import one_error_line

SMALL = ["--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--device", "cpu", "--max-steps", "2",
         "--val-fraction", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cohort(tmp_path) -> Path:
    """A folder with two small heads (h1, h2), their masks, and an empty folder."""
    for seed in (1, 2):
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        sitk.WriteImage(image, str(tmp_path / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(tmp_path / f"h{seed}_mask.nii.gz"))
    return tmp_path


def manifest(folder: Path, *rows: str, bom: bool = False) -> Path:
    path = folder / "train.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(["image,mask", *rows, ""]).encode())
    return path


@pytest.mark.parametrize("bad,message", [
    ("missing.nii.gz,", r"line 4: the image .*missing\.nii\.gz does not exist"),
    ("h1.nii.gz,gone_mask.nii.gz", r"line 4: the brain mask .*gone_mask\.nii\.gz does not exist"),
    ("empty,", r"line 4: the image .*empty is a folder without files"),
    ("blank.nii.gz,", r"line 4: the image .*blank\.nii\.gz is empty"),
    ("pipe.nii.gz,", r"line 4: the image .*pipe\.nii\.gz is a named pipe \(FIFO\), not a file"),
    ("x" * 300 + ".nii.gz,", r"line 4: the image .*x\.\.\. cannot be opened: file name too long"),
    ("._h1.nii.gz,", r"line 4: the image .*\._h1\.nii\.gz is a macOS resource fork \(an AppleDouble '\._' file"),
])
@pytest.mark.parametrize("command", ["train", "prepare", "calibrate"])
def test_every_manifest_row_is_checked_before_any_work(cohort, tmp_path, capsys, bad, message, command, tiny_bundle):
    (cohort / "empty").mkdir()
    (cohort / "blank.nii.gz").write_bytes(b"")
    os.mkfifo(cohort / "pipe.nii.gz")
    (cohort / "._h1.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(4000))  # `find` lists it
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", "h2.nii.gz,", bad)
    out = tmp_path / "out"
    argv = {"train": ["train", "--manifest", str(csv), "--out", str(out / "m.cevae"), *SMALL],
            "prepare": ["prepare", "--manifest", str(csv), "--cache-dir", str(out)],
            "calibrate": ["calibrate", "--manifest", str(csv), "--model", str(tiny_bundle), "--out",
                          str(out / "c.cevae"), "--device", "cpu"]}[command]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, r"train\.csv, " + message)
    assert not out.exists()  # nothing was done


def test_a_bad_row_after_blank_lines_is_named_by_its_line_in_the_file(cohort, tmp_path, capsys):
    """Blank lines are skipped, but counted: the refusal named line 3 for the fifth line of this file."""
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", "", "", "missing.nii.gz,")
    assert main(["train", "--manifest", str(csv), "--out", str(tmp_path / "m.cevae"), *SMALL]) == 2
    one_error_line(capsys.readouterr().err, r"train\.csv, line 5: the image .*missing\.nii\.gz does not exist")
    rows = cohort / "cases.csv"
    rows.write_text("score,gt\n\n\n,h1_mask.nii.gz\n")
    assert main(["evaluate", "--cases", str(rows)]) == 2
    one_error_line(capsys.readouterr().err, r"cases\.csv, line 4: the row has no 'score'")


def test_an_image_argument_is_checked_like_a_manifest_row(cohort, tmp_path, capsys):
    assert main(["train", str(cohort / "h1.nii.gz"), str(cohort / "nope.nii.gz"), "--out",
                 str(tmp_path / "m.cevae"), *SMALL]) == 2
    one_error_line(capsys.readouterr().err, r"The image .*nope\.nii\.gz does not exist")


def test_train_reads_a_dicom_series_folder_in_a_manifest(cohort, tmp_path):
    image, _ = make_head(size=(32, 36, 28), seed=3)
    write_dicom_series(image, cohort / "series")
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", "series,")
    out = tmp_path / "m.cevae"
    assert main(["train", "--manifest", str(csv), "--out", str(out), *SMALL]) == 0
    assert out.is_file()


def test_a_byte_order_mark_is_read_like_any_csv(cohort, tiny_bundle, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; the one reader serves every list."""
    csv = manifest(cohort, "h1.nii.gz,h1_mask.nii.gz", bom=True)
    assert [s.image.name for s in read_manifest(csv)] == ["h1.nii.gz"]
    assert [i.name for i in read_list(csv)] == ["h1"]
    cases = tmp_path / "cases.csv"
    cases.write_bytes(b"\xef\xbb\xbfscore,gt,mask\n" + f"{cohort / 'h1.nii.gz'},,{cohort / 'h1_mask.nii.gz'}\n".encode())
    assert main(["evaluate", "--cases", str(cases)]) == 0


@pytest.mark.skipif(os.sep != "/", reason="backslashes separate folders on Windows already")
def test_a_list_written_on_windows_with_backslashes_is_read_on_macos_and_linux(cohort):
    """A manifest or batch list made on Windows (scans\\h1.nii.gz) was refused on macOS and Linux: "the image
    .../scans\\h1.nii.gz does not exist", beside the file it names."""
    (cohort / "scans").mkdir()
    for name in ("h1.nii.gz", "h1_mask.nii.gz"):
        os.replace(cohort / name, cohort / "scans" / name)
    csv = manifest(cohort, "scans\\h1.nii.gz,scans\\h1_mask.nii.gz")
    assert read_manifest(csv) == [Subject(cohort / "scans" / "h1.nii.gz", cohort / "scans" / "h1_mask.nii.gz")]
    assert [(i.image, i.mask) for i in read_list(csv)] == [(cohort / "scans" / "h1.nii.gz",
                                                             cohort / "scans" / "h1_mask.nii.gz")]
    weird = cohort / "a\\b.nii.gz"  # a file whose name holds a backslash (POSIX allows it) is still that file
    weird.write_bytes((cohort / "scans" / "h1.nii.gz").read_bytes())
    assert read_manifest(manifest(cohort, "a\\b.nii.gz,"))[0].image == weird
    with pytest.raises(CeVAEError, match=r"line 2: the image .*nowhere\\h9\.nii\.gz does not exist"):
        read_manifest(manifest(cohort, "nowhere\\h9.nii.gz,"))


def test_a_latin1_list_is_refused_naming_its_line_and_how_to_save_it(cohort):
    """Excel's plain "CSV" is saved in the system's code page (Latin-1 / Windows-1252 in Western Europe): a list naming
    résultats/ was refused with Python's words, "'utf-8' codec can't decode byte 0xe9 in position 45", naming
    neither the line nor what to do."""
    (cohort / "résultats").mkdir()
    path = cohort / "train.csv"
    path.write_bytes("image,mask\nh1.nii.gz,h1_mask.nii.gz\nrésultats/h2.nii.gz,\n".encode("latin-1"))
    with pytest.raises(CeVAEError) as refused:
        read_manifest(path)
    assert str(refused.value) == (f"The manifest {path}, line 3, is not UTF-8 text (byte 0xe9); save it as UTF-8 "
                                  "(\"CSV UTF-8\" in Excel).")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_list_with_its_byte_order_mark_is_read_as_utf8(cohort, encoding):
    """Excel's "Unicode Text" writes UTF-16 with a byte-order mark, which says the encoding for sure: such a list
    was refused as "not a readable CSV file". It is read like the UTF-8 one."""
    text = "image,mask\nh1.nii.gz,h1_mask.nii.gz\nh2.nii.gz,\n"
    path = cohort / "train.csv"
    path.write_bytes(("\ufeff" + text).encode(encoding))
    assert [(s.image.name, s.mask and s.mask.name) for s in read_manifest(path)] == [
        ("h1.nii.gz", "h1_mask.nii.gz"), ("h2.nii.gz", None)]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("text", ["image,mask\nh1.nii.gz,h1_mask.nii.gz\n", "image\nrésultats/h1.nii.gz\n"])
def test_a_utf16_list_without_its_byte_order_mark_is_said_to_be_utf16(cohort, encoding, text):
    """A UTF-16 list without a byte-order mark (NUL bytes between its letters) was refused as "a cell holds a NUL
    byte; is this a CSV text file?" (or, with an accented letter, as not UTF-8), not saying what it is or what to do."""
    path = cohort / "train.csv"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(CeVAEError) as refused:
        read_manifest(path)
    assert str(refused.value) == (f"The manifest {path} looks like UTF-16 text without a byte-order mark (a NUL byte "
                                  "between its letters); save it as UTF-8 (\"CSV UTF-8\" in Excel).")


def test_a_nul_byte_in_a_utf8_list_is_still_said_so(cohort):
    path = cohort / "train.csv"
    path.write_bytes(b"image,mask\nh1.nii.gz,h1_mask\0.nii.gz\n")
    with pytest.raises(CeVAEError, match=r"line 2: a cell holds a NUL byte"):
        read_manifest(path)


def test_train_holds_out_persons_not_volumes(tmp_path):
    """Two scans of one person never land on both sides of the split: by a manifest's ``subject`` column, or by a
    BIDS file name's ``sub-<label>`` where the column is absent."""
    from CeVAEAnomalyLib.engine.bundle import read_header

    for seed in range(1, 7):  # with their masks: no brain mask to compute
        image, mask = make_head(size=(32, 36, 28), seed=seed)
        for name in (f"sub-p{(seed + 1) // 2}_ses-{seed % 2}_T1w", f"scan{seed}"):
            sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
            sitk.WriteImage(mask, str(tmp_path / f"{name}_mask.nii.gz"))
    person = {f"scan{seed}": f"p{(seed + 1) // 2}" for seed in range(1, 7)}
    csv = tmp_path / "train.csv"
    csv.write_text("image,mask,subject\n" + "".join(f"{n}.nii.gz,{n}_mask.nii.gz,{p}\n" for n, p in person.items()))
    bids = sorted(str(p) for p in tmp_path.glob("sub-*_T1w*.nii.gz"))  # each scan and its NAME_mask beside it
    for out, args in ((tmp_path / "by_column.cevae", ["--manifest", str(csv)]), (tmp_path / "by_bids.cevae", bids)):
        # (seed 1: a split by volume would hold out scan1 and scan5, two persons; seed 0's happen to be one's)
        assert main(["train", *args, "--out", str(out), *SMALL[:-1], "0.34", "--seed", "1"]) == 0
        training = read_header(out).training
        sides = [{person.get(s["name"], s["name"].split("_")[0]) for s in training[role]}
                 for role in ("subjects", "validation_subjects")]
        assert len(sides[1]) == 1 and not sides[0] & sides[1], sides  # one person of three held out, whole
        assert sum(len(training[role]) for role in ("subjects", "validation_subjects")) == 6


def test_a_manifest_names_the_person_and_a_bids_file_name_tells_it(cohort):
    subjects = read_manifest(manifest(cohort, "h1.nii.gz,,", "h2.nii.gz,,").parent / "train.csv")
    assert [s.person for s in subjects] == [None, None] and subjects[0].group != subjects[1].group
    csv = cohort / "persons.csv"
    csv.write_text("image,subject\nh1.nii.gz,anna\nh2.nii.gz,anna\n")
    one, two = read_manifest(csv)
    assert one.person == "anna" and one.group == two.group
    assert Subject(Path("d/sub-07_ses-2_T1w.nii.gz")).group == Subject(Path("e/sub-07_T1w.nii.gz")).group
    assert Subject(Path("sub-07_T1w.nii.gz")).group != Subject(Path("sub-70_T1w.nii.gz")).group
    assert Subject(Path("sub-cortical.nii.gz")).person is None  # not a BIDS name: a person of its own
    assert Subject(Path("sub-cortical.nii.gz")).group == ("image", "sub-cortical.nii.gz")


def test_a_folder_or_a_glob_of_scans_and_their_masks_is_read_as_batch_reads_a_folder(cohort, tmp_path):
    """`adapt site/` said "contains no DICOM series"; `adapt site/*.nii.gz` took each NAME_mask file for a scan."""
    import argparse

    from CeVAEAnomalyLib.cli.commands import _healthy_subjects

    def read(*images):
        return sorted((s.image.name, s.mask.name if s.mask else None)
                      for s in _healthy_subjects(argparse.Namespace(manifest=None, images=list(images))))

    expected = [("h1.nii.gz", "h1_mask.nii.gz"), ("h2.nii.gz", "h2_mask.nii.gz")]
    assert read(cohort) == expected
    assert read(*sorted(cohort.glob("*.nii.gz"))) == expected
    assert read(cohort / "h1.nii.gz") == [("h1.nii.gz", None)]
    image, _ = make_head(size=(32, 36, 28), seed=3)
    write_dicom_series(image, tmp_path / "series")
    assert read(tmp_path / "series") == [("series", None)]  # a folder without image files: one DICOM series
    lone = cohort / "h3_mask.nii.gz"  # a mask whose image is not given (e.g. a BIDS *_desc-brain_mask)
    lone.write_bytes((cohort / "h1_mask.nii.gz").read_bytes())
    assert read(cohort / "h1.nii.gz", lone) == [("h1.nii.gz", None)]
    second = cohort / "h1_brainmask.nii.gz"  # two masks of one image, among the files given
    second.write_bytes((cohort / "h1_mask.nii.gz").read_bytes())
    with pytest.raises(CeVAEError, match="are both the brain mask of 'h1'; give one of them"):
        read(cohort / "h1.nii.gz", cohort / "h1_mask.nii.gz", second)
    second.unlink()
    assert read(cohort / "h1.nii.gz", cohort / "h1.nii.gz") == [("h1.nii.gz", None)]  # the same file twice: once
    spelt = cohort / ".." / cohort.name / "h1_mask.nii.gz"  # the mask's folder spelt another way
    assert read(cohort / "h1.nii.gz", spelt, cohort / "h1_mask.nii.gz") == [("h1.nii.gz", "h1_mask.nii.gz")]
    tagged = tmp_path / "tagged"  # as the sample data name them: the image's contrast tag, not the mask's
    tagged.mkdir()
    (tagged / "h4_t1.nii.gz").write_bytes((cohort / "h1.nii.gz").read_bytes())
    (tagged / "h4_brainmask.nii.gz").write_bytes((cohort / "h1_mask.nii.gz").read_bytes())
    assert read(tagged / "h4_t1.nii.gz", tagged / "h4_brainmask.nii.gz") == [("h4_t1.nii.gz", "h4_brainmask.nii.gz")]
    sitk.WriteImage(sitk.ReadImage(str(cohort / "h1.nii.gz")), str(cohort / "h1.nrrd"))
    with pytest.raises(CeVAEError, match="both the image of 'h1'"):
        read(cohort / "h1.nii.gz", cohort / "h1.nrrd", cohort / "h1_mask.nii.gz")


@pytest.mark.parametrize("role", ["h2.nii.gz", "h2_mask.nii.gz"])
@pytest.mark.parametrize("command", ["train", "prepare", "calibrate"])
def test_a_link_to_a_file_not_fetched_in_a_cohort_folder_is_said_so(cohort, tmp_path, capsys, role, command,
                                                                   tiny_bundle):
    """A folder's dangling link (a DataLad file not fetched) was hashed unchecked: "unexpected OSError"."""
    (cohort / role).unlink()
    (cohort / role).symlink_to(tmp_path / "annex" / "not-fetched")
    out = {"train": ["--out", str(tmp_path / "m.cevae"), *SMALL], "prepare": ["--cache-dir", str(tmp_path / "c")],
           "calibrate": ["--model", str(tiny_bundle), "--out", str(tmp_path / "m.cevae")]}[command]
    assert main([command, str(cohort), *out]) == 2
    one_error_line(capsys.readouterr().err, rf"{role.replace('.', '[.]')} is a symbolic link to .*not-fetched, "
                                            "which does not exist")


def test_train_says_how_many_persons_it_splits_and_when_it_cannot_tell_them(cohort, tmp_path, caplog):
    """The split is by person, but the log counted volumes only: two sessions taken for two persons went unsaid."""
    image, mask = make_head(size=(32, 36, 28), seed=3)
    sitk.WriteImage(image, str(cohort / "h3.nii.gz"))
    sitk.WriteImage(mask, str(cohort / "h3_mask.nii.gz"))  # each scan with its mask: no brain mask to compute
    persons = cohort / "persons.csv"
    persons.write_text("image,mask,subject\nh1.nii.gz,h1_mask.nii.gz,anna\nh3.nii.gz,h3_mask.nii.gz,anna\n"
                       "h2.nii.gz,h2_mask.nii.gz,ben\n")
    args = ["--out", str(tmp_path / "m.cevae"), "--overwrite", *SMALL[:-1], "0.5"]
    with caplog.at_level("INFO"):
        assert main(["train", "--manifest", str(persons), *args]) == 0
    assert re.search(r"training slices \(\d volume\(s\) of 1 person\(s\)\), \d+ validation slices \(\d volume\(s\) of "
                     r"1 person\(s\)\)", caplog.text), caplog.text
    assert "taken for a different person" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        scans = [str(cohort / f"h{n}{part}.nii.gz") for n in (1, 3) for part in ("", "_mask")]
        assert main(["train", *scans, *args]) == 0
    assert "each of the 2 volumes is taken for a different person" in caplog.text


@pytest.mark.parametrize("with_description", [True, False])
def test_a_bids_dataset_given_as_a_folder_is_told_to_be_listed_in_a_manifest(cohort, tmp_path, capsys,
                                                                             with_description):
    """Its subfolders are not searched; it was taken for a DICOM series folder: "give the folder of one series"."""
    import argparse

    from CeVAEAnomalyLib.cli.commands import _healthy_subjects

    bids = tmp_path / "bids"
    for person in ("01", "02"):
        anat = bids / f"sub-{person}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{person}_T1w.nii.gz").write_bytes((cohort / "h1.nii.gz").read_bytes())
    if with_description:
        (bids / "dataset_description.json").write_text('{"Name": "site", "BIDSVersion": "1.8.0"}')
    assert main(["prepare", str(bids), "--cache-dir", str(tmp_path / "c")]) == 2
    one_error_line(capsys.readouterr().err, r"bids holds no image files of its own, and its subfolders \(such as "
                                            r"sub-01/anat/sub-01_T1w\.nii\.gz\) are not searched: list the scans, "
                                            r"with their brain masks, in a --manifest CSV")
    image, _ = make_head(size=(32, 36, 28), seed=3)  # a DICOM series folder is still one, whatever lies below it
    write_dicom_series(image, tmp_path / "series")
    (tmp_path / "series" / "converted").mkdir()
    (tmp_path / "series" / "converted" / "s.nii.gz").write_bytes((cohort / "h1.nii.gz").read_bytes())
    subjects = _healthy_subjects(argparse.Namespace(manifest=None, images=[tmp_path / "series"]))
    assert [s.image.name for s in subjects] == ["series"]


def test_adapt_says_when_no_scan_s_person_is_known(cohort, tmp_path, tiny_bundle, caplog):
    """Two sessions named anna_1, anna_2 pass adapt's two-person minimum as two persons: it is said, not silent."""
    persons = cohort / "persons.csv"
    persons.write_text("image,mask,subject\nh1.nii.gz,h1_mask.nii.gz,anna\nh2.nii.gz,h2_mask.nii.gz,ben\n")
    for args in (["--manifest", str(persons)], [str(cohort)]):
        caplog.clear()
        with caplog.at_level("INFO"):  # --resume without a checkpoint: refused after the persons are counted
            assert main(["adapt", *args, "--model", str(tiny_bundle), "--out", str(tmp_path / "s.cevae"),
                         "--resume"]) == 2
        assert ("each of the 2 volumes is taken for a different person" in caplog.text) == (args[0] == str(cohort))
