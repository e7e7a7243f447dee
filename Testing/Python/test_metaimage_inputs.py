"""MetaImage inputs (.mha, or .mhd with its .raw/.zraw data file) cut short are refused in one line before any
scoring, as truncated NIfTI files are; intact ones read exactly as ITK reads them."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.images import read_image

SCAN = data_path("colin27_t1_2mm.nii.gz")  # a real head


def write_metaimage(folder: Path, name: str, compressed: bool) -> Path:
    """The real head written as ``name`` (.mha, or .mhd beside its .raw or .zraw data file)."""
    path = folder / name
    sitk.WriteImage(sitk.ReadImage(str(SCAN)), str(path), compressed)
    return path


def data_of(path: Path) -> Path:
    """The file holding the voxels of a MetaImage written by ITK (itself for .mha)."""
    return path if path.suffix == ".mha" else next(f for f in path.parent.iterdir() if f.suffix in (".raw", ".zraw"))


def cut_short(path: Path, keep_size_line: bool) -> Path:
    """Cut the voxel data of the MetaImage at ``path`` to half its length; without ``keep_size_line`` the header's
    CompressedDataSize line is removed (MetaIO then reads to the end of the file)."""
    header, data = path.read_bytes(), data_of(path).read_bytes()
    start = header.index(b"ElementDataFile")
    start = header.index(b"\n", start) + 1
    if not keep_size_line:
        header = re.sub(rb"CompressedDataSize = \d+\n", b"", header[:start]) + header[start:]
        start = header.index(b"\n", header.index(b"ElementDataFile")) + 1
    if data_of(path) == path:
        path.write_bytes(header[: start + (len(header) - start) // 2])
    else:
        path.write_bytes(header)
        data_of(path).write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("keep_size_line", [False, True])
@pytest.mark.parametrize("name", ["cut.mha", "cut.mhd"])
def test_compressed_metaimage_cut_short_is_refused_in_one_line(tmp_path, capfd, name, keep_size_line):
    """Without a CompressedDataSize line, ITK printed 'Uncompress failed' and returned the image anyway, its missing
    voxels zeros: a truncated scan was scored silently. With one, MetaIO printed two raw lines before the error."""
    path = cut_short(write_metaimage(tmp_path, name, True), keep_size_line)
    capfd.readouterr()
    with pytest.raises(CeVAEError, match=rf"The image file {re.escape(str(path))} is truncated or corrupt \(its "
                                         r"(data file \S+cut\.zraw|compressed data) ends after \d+ of the "
                                         r"874800 bytes its header announces\); copy or export it again\."):
        read_image(path)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name, compressed", [("s.mha", True), ("s.mhd", True), ("s.mha", False), ("s.mhd", False)])
def test_intact_metaimage_reads_as_itk_reads_it(tmp_path, capfd, name, compressed):
    path = write_metaimage(tmp_path, name, compressed)
    capfd.readouterr()
    image, itk = read_image(path), sitk.ReadImage(str(path))
    assert capfd.readouterr().err == ""
    assert image.GetPixelID() == itk.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(itk))
    for what in ("Size", "Spacing", "Origin", "Direction"):
        assert getattr(image, f"Get{what}")() == getattr(itk, f"Get{what}")(), what


@pytest.mark.parametrize("name", ["cut.mha", "cut.mhd"])
def test_uncompressed_metaimage_cut_short_is_refused_in_one_line(tmp_path, capfd, name):
    """MetaIO printed two raw lines ('M_ReadElementsData: data not read completely', 'ideal = ...') before the
    read's error, which named no cause."""
    path = cut_short(write_metaimage(tmp_path, name, False), keep_size_line=True)
    capfd.readouterr()
    with pytest.raises(CeVAEError, match=rf"The image file {re.escape(str(path))} is truncated or corrupt \(its "
                                         r"(data file \S+cut\.raw|voxel data) holds \d+ of the 874800 bytes its "
                                         r"header announces\); copy or export it again\."):
        read_image(path)
    assert capfd.readouterr().err == ""


def test_compressed_metaimage_with_corrupt_data_is_refused_in_one_line(tmp_path, capfd):
    """Bytes overwritten in the middle of the zlib stream (a bad copy), its length kept."""
    path = write_metaimage(tmp_path, "bad.mha", True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(CeVAEError, match=r"bad\.mha is truncated or corrupt \(its compressed data is corrupt after "
                                         r"\d+ of the 874800 bytes its header announces\)"):
        read_image(path)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name", ["kspace.mha", "kspace.mhd"])
def test_complex_metaimage_is_refused_as_possibly_complex(tmp_path, name):
    """A complex-valued MetaImage (which stores it as 2 float channels, its header the same as a 2-channel vector
    image's) was refused as a "colour or vector image", not a word of complex data, as an .nrrd or .nii.gz of the
    same voxels is refused."""
    head = sitk.ReadImage(str(SCAN), sitk.sitkFloat32)
    path = tmp_path / name
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(head, head), str(path))
    with pytest.raises(CeVAEError) as caught:
        read_image(path)
    assert str(caught.value) == (f"The image {path} holds 2 float values per voxel: complex-valued voxels (raw or "
                                 "phase data), which a MetaImage stores so and cannot tell from a 2-channel image, "
                                 "or another 2-channel image; a magnitude MRI volume of one channel is needed.")


def test_a_metaimage_of_three_channels_or_two_whole_channels_keeps_the_vector_refusal(tmp_path):
    """Complex voxels are 2 float values: 3 channels (colour) or 2 of whole numbers are no complex data."""
    head = sitk.ReadImage(str(SCAN), sitk.sitkUInt8)
    for image, count in ((sitk.Compose(head, head, head), 3), (sitk.Compose(head, head), 2)):
        sitk.WriteImage(image, str(tmp_path / "vector.mha"))
        with pytest.raises(CeVAEError, match=rf"has {count} components per voxel \(colour or vector image\)"):
            read_image(tmp_path / "vector.mha")
