"""A scan whose file name ends in another format's extension is named as what it is, with the rename to make."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.images import read_image

SAMPLE = data_path("colin27_t1_2mm.nii.gz")


def written(tmp_path: Path, ext: str) -> Path:
    """The sample head written as ``ext`` by ITK's writer for it."""
    path = tmp_path / f"head{ext}"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE)), str(path))
    return path


@pytest.mark.parametrize("ext, named, advice", [
    (".nii.gz", "scan.nrrd", "a NIfTI image (gzip-compressed)"),
    (".nii.gz", "scan.mha", "a NIfTI image (gzip-compressed)"),
    (".nrrd", "scan.nii.gz", "an NRRD image"),
    (".mha", "scan.nrrd", "a MetaImage"),
])
def test_a_misnamed_file_is_named_as_what_it_holds(tmp_path, ext, named, advice):
    """The message said the file was "corrupt, truncated or not a medical image format": a user with a sound scan
    saved under the wrong extension (a download renamed, a converter's default name) was told it was damaged."""
    path = tmp_path / named
    shutil.copy(written(tmp_path, ext), path)
    with pytest.raises(CeVAEError) as caught:
        read_image(path)
    named = "".join(path.suffixes)
    assert str(caught.value) == (f"The image file {path} holds {advice} but is named {named}, and the reader goes by "
                                 f"the name: rename it to end in {ext}.")


def test_a_plain_nifti_named_mha_says_nii_and_detect_says_it_in_one_line(tmp_path, capsys):
    path = tmp_path / "scan.mha"
    path.write_bytes(gzip.decompress(SAMPLE.read_bytes()))
    assert main(["detect", str(path), "--score", str(tmp_path / "s.nii.gz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: The image file {path} holds a NIfTI image but is named .mha, and the reader goes by the "
                   "name: rename it to end in .nii.\n")
    assert not (tmp_path / "s.nii.gz").exists()


def test_a_file_that_is_no_image_is_still_said_to_be_unreadable(tmp_path):
    path = tmp_path / "scan.nrrd"
    path.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(CeVAEError, match="could not be read as an image"):
        read_image(path)


def test_a_damaged_detached_nrrd_header_is_not_told_to_be_renamed(tmp_path):
    """An .nhdr is an NRRD header under its own extension: damaged, it is said to be unreadable, not misnamed."""
    header = tmp_path / "scan.nhdr"
    header.write_text("NRRD0004\ntype: what\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: scan.raw\n")
    (tmp_path / "scan.raw").write_bytes(bytes(8))
    with pytest.raises(CeVAEError, match="could not be read as an image"):
        read_image(header)
