"""io/checksum.sha256_of: what identifies a volume file."""
from __future__ import annotations

import hashlib

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.io.checksum import sha256_of


def _write(path, value: float) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), value, np.float32)), str(path))


def test_a_single_file_is_its_plain_sha256(tmp_path):
    _write(tmp_path / "scan.nii.gz", 1.0)
    assert sha256_of(tmp_path / "scan.nii.gz") == hashlib.sha256((tmp_path / "scan.nii.gz").read_bytes()).hexdigest()


def test_a_detached_header_is_identified_with_its_data(tmp_path):
    """Two subjects' .mhd headers of the same text, and one header whose .raw was replaced: all differ."""
    for site, value in (("site1", 1.0), ("site2", 2.0)):
        (tmp_path / site).mkdir()
        _write(tmp_path / site / "scan.mhd", value)
    one, two = tmp_path / "site1" / "scan.mhd", tmp_path / "site2" / "scan.mhd"
    assert one.read_bytes() == two.read_bytes()
    assert sha256_of(one) != sha256_of(two)
    before = sha256_of(one)
    _write(one, 3.0)
    assert one.read_bytes() == two.read_bytes() and sha256_of(one) != before
    _write(one, 1.0)
    assert sha256_of(one) == before  # the same content again: the same checksum


def test_an_analyze_pair_is_identified_by_both_halves(tmp_path):
    _write(tmp_path / "scan.hdr", 1.0)
    assert (tmp_path / "scan.img").is_file()
    before = sha256_of(tmp_path / "scan.hdr")
    _write(tmp_path / "other.hdr", 2.0)
    (tmp_path / "scan.img").write_bytes((tmp_path / "other.img").read_bytes())
    assert sha256_of(tmp_path / "scan.hdr") != before


def test_a_numbered_data_file_pattern_is_hashed_by_the_files_that_exist_in_one_listing(tmp_path):
    """``slice%03d.raw 1 1000000 1``: the slices present are hashed (a changed one changes the checksum) without
    asking for each of a million names."""
    header = tmp_path / "scan.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 3\nElementType = MET_UCHAR\n"
                      "ElementDataFile = slice%03d.raw 1 1000000 1\n")
    for k in (1, 2, 3):
        (tmp_path / f"slice{k:03d}.raw").write_bytes(bytes([k] * 4))
    (tmp_path / "notes.txt").write_text("not a slice")
    before = sha256_of(header)
    (tmp_path / "notes.txt").write_text("still not a slice")
    assert sha256_of(header) == before
    (tmp_path / "slice002.raw").write_bytes(bytes([9] * 4))
    assert sha256_of(header) != before


def test_the_same_voxels_in_two_formats_have_one_voxel_digest_and_two_file_digests(tmp_path):
    from CeVAEAnomalyLib.io.checksum import voxel_sha256

    image = sitk.GetImageFromArray(np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10))
    image.SetSpacing((1.0, 1.5, 2.0))
    for name in ("scan.nii.gz", "scan.nrrd"):
        sitk.WriteImage(image, str(tmp_path / name))
    a, b = tmp_path / "scan.nii.gz", tmp_path / "scan.nrrd"
    assert sha256_of(a) != sha256_of(b) and voxel_sha256(a) == voxel_sha256(b)
    image.SetSpacing((1.0, 1.5, 2.5))  # the same values on another grid: another scan
    sitk.WriteImage(image, str(b))
    assert voxel_sha256(a) != voxel_sha256(b)
