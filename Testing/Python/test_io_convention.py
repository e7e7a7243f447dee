"""The one I/O convention: file stems, the CSV list reader, output names, the brain-mask helper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject, read_manifest, read_rows
from CeVAEAnomalyLib.io.naming import OUTPUT_NAMES, file_stem, output_paths


@pytest.mark.parametrize("name, stem", [
    ("sub-01_T1w.nii.gz", "sub-01_T1w"), ("scan.NII.GZ", "scan"), ("a.b.nrrd", "a.b"), ("head.mha", "head"),
    ("head.nhdr", "head"), ("notes.txt", "notes"), ("lesion.seg.nrrd", "lesion.seg"), ("DICOM", "DICOM"),
])
def test_file_stem(name, stem):
    assert file_stem(Path("/data") / name) == stem


def test_subject_names_use_the_file_stem(tmp_path):
    assert Subject(tmp_path / "sub-01_T1w.nii.gz").name == "sub-01_T1w"


def test_a_dicom_folder_named_by_its_series_uid_keeps_its_whole_name(tmp_path):
    """Series folders are often named by their UID: the name's last part is no extension, so two series of one
    study (…66012, …66013) named the same outputs and a batch of them was refused (one alone lost the part)."""
    from CeVAEAnomalyLib.cli.batch import collect_inputs

    uids = ("1.3.12.2.1107.5.2.43.66012", "1.3.12.2.1107.5.2.43.66013")
    for uid in uids:
        (tmp_path / uid).mkdir()
        (tmp_path / uid / "IM0001").write_bytes(b"\0" * 132)
    (tmp_path / "list.csv").write_text("image\n" + "\n".join(uids) + "\n")
    assert [item.name for item in collect_inputs(tmp_path / "list.csv")] == list(uids)
    assert Subject(tmp_path / uids[0]).name == uids[0]
    assert file_stem(tmp_path / "scan.v2.nii.gz") == "scan.v2"  # a file's extension still goes


def test_list_reader_resolves_paths_and_skips_empty_rows(tmp_path):
    (tmp_path / "list.csv").write_text(" image , mask ,name\n"
                                       "a.nii.gz,a_mask.nii.gz,first\n"
                                       ",,\n"
                                       f"{tmp_path}/abs/b.nrrd,,\n")
    rows = read_rows(tmp_path / "list.csv", "image", ("image", "mask"), "list", others=("name",))
    assert [r.line for r in rows] == [2, 4]
    assert rows[0].files == {"image": tmp_path / "a.nii.gz", "mask": tmp_path / "a_mask.nii.gz"}
    assert rows[0].cells == {"name": "first"}
    assert rows[1].files == {"image": tmp_path / "abs" / "b.nrrd", "mask": None} and rows[1].cells == {"name": ""}


def test_a_row_without_its_key_or_a_column_in_other_case_is_refused_and_unread_columns_are_said(tmp_path, caplog):
    """An evaluation case whose score cell is empty, or a 'GT' column, would silently lose lesions."""
    import logging

    cases = tmp_path / "cases.csv"
    cases.write_text("score,gt,name\na.nii.gz,a_gt.nii.gz,a\n,b_gt.nii.gz,b\n")
    with pytest.raises(CeVAEError, match=r"cases\.csv, line 3: the row has no 'score'; fill it in or remove the row"):
        read_rows(cases, "score", ("score", "gt"), "cases CSV", others=("name",))
    cases.write_text("score,GT\na.nii.gz,a_gt.nii.gz\n")
    with pytest.raises(CeVAEError, match=r"has a column 'GT'; column names are lower case: 'gt'"):
        read_rows(cases, "score", ("score", "gt"), "cases CSV")
    cases.write_text("Score,gt\na.nii.gz,a_gt.nii.gz\n")  # the key column too, not "needs a column 'score'"
    with pytest.raises(CeVAEError, match=r"has a column 'Score'; column names are lower case: 'score'"):
        read_rows(cases, "score", ("score", "gt"), "cases CSV")
    cases.write_text("score,ground_truth\na.nii.gz,a_gt.nii.gz\n")
    with caplog.at_level(logging.WARNING):
        assert len(read_rows(cases, "score", ("score", "gt"), "cases CSV")) == 1
    assert "has column(s) 'ground_truth' that are not read (it reads 'score', 'gt')" in caplog.text


@pytest.mark.parametrize("content, message", [
    ("score,gt\ns.nii.gz,gt.nii.gz,m.nii.gz\n", r"line 2: the row has more cells than the header has columns"),
    ("score,gt,score\na.nii.gz,,b.nii.gz\n", r"names the column\(s\) 'score' more than once"),
    ("score,gt\na.nii.gz\0,\n", r"line 2: a cell holds a NUL byte"),
])
def test_cells_beyond_the_header_a_repeated_column_or_a_nul_byte_are_refused(tmp_path, content, message):
    """A mask cell without a column, or two 'score' columns, would silently change what is evaluated."""
    (tmp_path / "cases.csv").write_text(content)
    with pytest.raises(CeVAEError, match=message):
        read_rows(tmp_path / "cases.csv", "score", ("score", "gt", "mask"), "cases CSV")


@pytest.mark.parametrize("content, message", [
    ("path,mask\na.nii.gz,\n", r"needs a header row with the column 'image' \(and optionally 'mask', 'subject'\)"),
    ("image,mask\n", r"lists no images"),
    ("image;mask\na.nii.gz;m.nii.gz\n", r"column 'image'.*separated by semicolons; separate them with commas"),
    ("image\tmask\na.nii.gz\tm.nii.gz\n", r"separated by tabs; separate them with commas"),
])
def test_manifest_problems_are_clear(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(CeVAEError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_manifest_that_is_not_text_is_refused(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\xff\xfe\x00\x81binary")  # UTF-16's byte-order mark, then no text
    with pytest.raises(CeVAEError, match="not a readable CSV file .it starts with UTF-16's byte-order mark but holds "
                                         "no line end"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_bytes(b"\xff\xfe" + "image\n\x07a.nii.gz\n".encode("utf-16-le"))
    with pytest.raises(CeVAEError, match="holds the control character U.0007"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(CeVAEError, match="does not exist"):
        read_manifest(tmp_path / "absent.csv")


def test_output_names_are_one_table(tmp_path):
    """batch's defaults (its four outputs, the component table detect --components writes among them) and the Slicer
    script's six outputs come from the same table."""
    assert output_paths(tmp_path, "s1") == {"score": tmp_path / "s1_score.nii.gz",
                                           "labelmap": tmp_path / "s1_labelmap.nii.gz",
                                           "slices": tmp_path / "s1_slices.csv",
                                           "components": tmp_path / "s1_components.csv"}
    every = output_paths(tmp_path, "s1", tuple(OUTPUT_NAMES), ".nrrd")
    assert [p.name for p in every.values()] == ["s1_score.nrrd", "s1_labelmap.nrrd", "s1_slices.csv",
                                                "s1_components.csv", "s1_segmentation.seg.nrrd", "s1_record.json"]


def test_given_mask_is_read_and_missing_mask_is_computed(head):
    from CeVAEAnomalyLib.engine.brainmask import compute_brain_mask, given_or_computed_mask

    image_path, mask_path = head
    image = sitk.ReadImage(str(image_path))
    given = given_or_computed_mask(image, mask_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(given), sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))))
    computed = given_or_computed_mask(image, None)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(computed), sitk.GetArrayFromImage(compute_brain_mask(image)))


def test_voxel_volume_ml():
    from CeVAEAnomalyLib.io.images import voxel_volume_ml

    image = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    image.SetSpacing((0.5, 2.0, 4.0))
    assert voxel_volume_ml(image) == pytest.approx(0.004)


def test_distinct_names_lead_repeated_stems_with_their_folders():
    """The names a bundle records for its volumes (training subjects, an adaptation's site scans and folds): a
    BIDS layout's T1w.nii.gz files were all 'T1w'."""
    from CeVAEAnomalyLib.io.manifest import distinct_names

    bids = [Path("/d/sub-01/anat/T1w.nii.gz"), Path("/d/sub-02/anat/T1w.nii.gz"), Path("/d/other/colin.nii.gz")]
    assert list(distinct_names(bids).values()) == ["sub-01/anat/T1w", "sub-02/anat/T1w", "colin"]
    sessions = [Path("/a/s1/ses-1/T1w.nii.gz"), Path("/a/s1/ses-2/T1w.nii.gz"), Path("/a/s2/ses-1/T1w.nii.gz")]
    names = distinct_names(sessions)
    assert len(set(names.values())) == 3 and all(n.endswith("T1w") for n in names.values())
    plain = [Path("/x/a.nii.gz"), Path("/y/b.nrrd")]
    assert distinct_names(plain) == {plain[0]: "a", plain[1]: "b"}


def test_a_macos_resource_fork_read_as_an_image_is_named_as_such(tmp_path):
    """A `._NAME.nii.gz` that macOS left beside a scan on another disk, listed in a batch CSV or given to detect, was
    refused as 'corrupt, truncated or not a medical image format'; it is said to be a resource fork to leave out."""
    from CeVAEAnomalyLib.io.images import read_image

    fork = tmp_path / "._t1.nii.gz"
    fork.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(4000))
    with pytest.raises(CeVAEError, match=r"\._t1\.nii\.gz is a macOS resource fork .*not an image; leave it out"):
        read_image(fork)
    other = tmp_path / "t1.nii.gz"
    other.write_bytes(b"not an image at all" + bytes(400))
    with pytest.raises(CeVAEError, match="corrupt, truncated or not a medical image format"):
        read_image(other)


def test_a_tsv_list_or_manifest_is_read_tab_separated(tmp_path):
    """Tables are written tab-separated under a .tsv name; a list or manifest so named was read as commas, and refused
    (batch: "neither a folder of images nor a CSV list")."""
    from CeVAEAnomalyLib.cli.batch import collect_inputs

    image = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8))
    for name in ("a.nii.gz", "a_mask.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    (tmp_path / "m.tsv").write_text("image\tmask\tsubject\na.nii.gz\ta_mask.nii.gz\tp1\n")
    (subject,) = read_manifest(tmp_path / "m.tsv")
    assert (subject.image, subject.mask) == (tmp_path / "a.nii.gz", tmp_path / "a_mask.nii.gz")
    (item,) = collect_inputs(tmp_path / "m.tsv")
    assert (item.image, item.mask) == (tmp_path / "a.nii.gz", tmp_path / "a_mask.nii.gz")
