"""DICOM series folders as clinical exports hold them: each slice written here as its own file, in tmp_path."""
from __future__ import annotations

import locale
import logging
import os
import struct
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import SimpleITK as sitk
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.io.dicom import pixel_data_shortfall
from conftest import make_head

SLOPE = b"\x28\x00\x53\x10"  # the tag (0028,1053) Rescale Slope as an implicit-VR little-endian file holds it


def write_series(image: sitk.Image, folder: Path, tags: Optional[Dict[str, str]] = None) -> Path:
    """One int16 DICOM file per slice, with the series UID, position, orientation, spacing, thickness and instance
    number a scanner writes (``tags``: more tags for every slice). GDCM's writer sets the C locale; it is restored."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        image = sitk.Cast(image, sitk.sitkInt16)
        d, spacing = image.GetDirection(), image.GetSpacing()
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            piece = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            for key, value in {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                               "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0013": str(k + 1),
                               "0008|0018": f"1.2.826.0.1.3680043.2.1125.2.{k + 1}",
                               "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                               "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                               "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}", "0018|0050": f"{spacing[2]:g}",
                               **(tags or {})}.items():
                piece.SetMetaData(key, value)
            writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
            writer.Execute(piece)
        return folder
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def set_slope(path: Path, slope: str) -> None:
    """Rewrite a slice's rescale slope in place, its stored integers unchanged (GDCM's writer takes integer slopes
    only, and scales the stored values by them)."""
    data = path.read_bytes()
    at = data.index(SLOPE)
    length = struct.unpack("<I", data[at + 4 : at + 8])[0]
    value = slope.encode() + b" " * (len(slope) % 2)
    path.write_bytes(data[: at + 4] + struct.pack("<I", len(value)) + value + data[at + 8 + length :])


@pytest.fixture(scope="module")
def head() -> sitk.Image:
    image, _ = make_head(size=(24, 28, 10), spacing=(2.0, 2.0, 3.0))
    return sitk.Cast(sitk.Round(image), sitk.sitkInt16)


@pytest.mark.parametrize("slope", ["0.25", "1000"])
def test_slices_rescaled_differently_keep_their_real_values(head, tmp_path, slope):
    """Where the first slice is stored unscaled and the others with their own slope, the reader gave the series
    the first slice's int16 and put the others' real values into it: 37 at slope 0.25 read 9, not 9.25, and 100
    at slope 1000 read -31072."""
    folder = write_series(head, tmp_path / "series", {"0028|1053": "1", "0028|1052": "0"})
    for k in range(1, head.GetDepth()):
        set_slope(folder / f"IM{k:04d}.dcm", slope)
    got = sitk.GetArrayFromImage(read_image(folder)).astype(np.float64)
    stored = sitk.GetArrayFromImage(head).astype(np.float64)
    np.testing.assert_array_equal(got[0], stored[0])
    np.testing.assert_allclose(got[1:], stored[1:] * float(slope), rtol=1e-6)


def test_one_rescaling_for_every_slice_keeps_the_stored_type(head, tmp_path):
    """A series scaled alike (or not at all) is read as before: its own pixel type, on the grid it was written on."""
    image = read_image(write_series(head, tmp_path / "series"))
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(head))
    for what in ("Size", "Spacing", "Origin", "Direction"):
        np.testing.assert_allclose(getattr(image, f"Get{what}")(), getattr(head, f"Get{what}")(), atol=1e-5)


CANNOT_READ = r"is a DICOM image of the series' kind that the series reader cannot read \(truncated or corrupt\)"


def cut(path: Path) -> None:
    """Truncate a file to half its length (an interrupted copy)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, damage, problem", [
    ("IM0009.dcm", cut, CANNOT_READ),
    ("IM0000.dcm", cut, CANNOT_READ),
    ("IM0004.dcm", cut, CANNOT_READ),
    ("IM0009.dcm", lambda p: p.write_bytes(b""), r"is empty"),
], ids=["last slice truncated", "first slice truncated", "a middle slice truncated", "empty"])
def test_a_slice_file_the_series_reader_leaves_out_is_named(head, tmp_path, name, damage, problem):
    """The series reader leaves out, unsaid, a file it cannot parse: the first or last slice was lost silently (9
    slices read of 10), a middle one was refused as a gap in the stack, naming no file."""
    folder = write_series(head, tmp_path / "series")
    damage(folder / name)
    with pytest.raises(CeVAEError, match=rf"^The DICOM series in {tmp_path}/series cannot be read whole: {name} "
                                         rf"({problem}, and the series would be read without it \(9 slices\)\."
                                         r"|ends \d+ bytes short of its pixel data \(truncated\), and the series "
                                         r"would be read with those pixels as 0\.)"):  # (SimpleITK 2.5; before 2.5)
        read_image(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_slice_file_cut_short_is_measured(head, tmp_path, keep):
    """SimpleITK before 2.5 (Slicer 5.6 bundles 2.2.1, 5.8 2.3.1) lists a truncated slice in its series and reads
    its missing pixels as 0, unsaid: the file is measured against its Pixel Data element's length, whatever reader
    lists it."""
    folder = write_series(head, tmp_path / "series")
    size = 24 * 28 * 2  # int16 pixels of one slice
    whole = folder / "IM0004.dcm"
    assert pixel_data_shortfall(whole, size) == 0
    assert pixel_data_shortfall(whole, size + 2) == 0  # (no element of that length: not judged)
    length = whole.stat().st_size
    whole.write_bytes(whole.read_bytes()[: int(length * keep)])
    assert pixel_data_shortfall(whole, size) == length - int(length * keep) > 0


def test_a_dangling_link_in_a_series_folder_is_named(head, tmp_path):
    """A slice not yet fetched (DataLad, git-annex): the reader lists no file after such a link in the folder's
    own order, so where the folder lists it first the folder was said to contain no DICOM series (and elsewhere
    part of the series was read, or refused as uneven)."""
    folder = write_series(head, tmp_path / "series")
    for i in range(200):  # a name the folder lists first (file systems list in creation or hash order)
        link = folder / f"IM{i:04d}.fetch.dcm"
        link.symlink_to(tmp_path / "annex" / f"{i}.dcm")
        if os.listdir(folder)[0] == link.name:
            break
        link.unlink()
    else:
        pytest.skip("no name found that this file system lists first")
    with pytest.raises(CeVAEError, match=rf"^The image folder {tmp_path}/series holds {link.name}, a symbolic link "
                                         rf"to {tmp_path}/annex/{i}\.dcm, which does not exist \(a file not yet "
                                         r"fetched, or on a disk not mounted\?\); the DICOM reader would skip the "
                                         r"files after it\. Fetch that file, or remove the link\.$"):
        read_image(folder)


def test_a_slice_file_without_read_permission_is_named(head, tmp_path):
    folder = write_series(head, tmp_path / "series")
    (folder / "IM0009.dcm").chmod(0)
    try:
        open(folder / "IM0009.dcm", "rb").close()
        pytest.skip("this user reads files without permission (root)")
    except PermissionError:
        pass
    with pytest.raises(CeVAEError, match=r"IM0009\.dcm cannot be opened \(Permission denied\), and the series"):
        read_image(folder)


def test_files_beside_a_series_that_are_no_slices_of_it_are_left_out(head, tmp_path):
    """Exports hold a DICOMDIR, notes, thumbnails and other DICOM objects (a report, without pixels) beside the
    slices: the series is read whole, as without them."""
    folder = write_series(head, tmp_path / "series")
    (folder / "README.txt").write_text("exported by PACS\n")
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(head[:, :, 4]), sitk.sitkUInt8), str(folder / "thumb.png"))
    write_series(head[:, :, :1], tmp_path / "other", {"0008|0016": "1.2.840.10008.5.1.4.1.1.7"})  # a screen capture
    data = (tmp_path / "other" / "IM0000.dcm").read_bytes()
    (folder / "DICOMDIR").write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # no pixel data
    image = read_image(folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(head))


def test_a_folder_of_series_folders_says_they_are_not_searched(head, tmp_path, capsys):
    """A DICOM export holds a folder per series; given that export, detect said only "contains no DICOM series",
    calibrate "is a folder without files" and batch "holds no images", in a folder full of DICOM files."""
    from CeVAEAnomalyLib.cli.main import main

    export = tmp_path / "export"
    for name in ("SE0001", "SE0002", "SE0003"):
        write_series(head, export / name)
    out = tmp_path / "out"
    expected = {
        "detect": "The image folder {} contains no DICOM series; its subfolders (SE0001, SE0002, ...) are not "
                  "searched: give the folder of one series.",
        "calibrate": "The image {} is a folder without files; its subfolders (SE0001, SE0002, ...) are not "
                     "searched: give the folder of each series.",
        "batch": "{} holds no images (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .hdr); its subfolders (SE0001, "
                 "SE0002, ...) are not searched: list the images or DICOM series folders in a CSV (column 'image').",
    }
    for command, argv in (("detect", [str(export), "--score", str(out / "s.nii.gz")]),
                          ("calibrate", [str(export), "--out", str(out / "site.cevae")]),
                          ("batch", [str(export), "--out-dir", str(out)])):
        assert main([command, *argv]) == 2
        assert capsys.readouterr().err.strip() == f"error: {expected[command].format(export)}"
    assert not out.exists()


def test_batch_given_the_folder_of_one_series_says_how_to_score_it(head, tmp_path, capsys):
    """batch given a folder of DICOM files (one series, which detect reads) said only that it "holds no images",
    listing file name extensions, with nothing to do; it now says it is one series and how to score it."""
    from CeVAEAnomalyLib.cli.main import main

    series = write_series(head, tmp_path / "series")
    out = tmp_path / "out"
    assert main(["batch", str(series), "--out-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {series} holds no images (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .hdr); it is the folder of one "
        f"DICOM series: score it with cevae-anomaly detect {series} --score SCORE.nii.gz, or list series folders in a "
        "CSV (column 'image') for batch.")
    assert not out.exists()


def test_the_command_batch_suggests_for_one_series_pastes_as_it_is(head, tmp_path, capsys):
    """A series folder named 'Series 3 (T1)' was printed bare in 'score it with cevae-anomaly detect FOLDER', and
    without the --score detect requires: pasted, the shell split it at its spaces (and at its parentheses), and
    detect refused it."""
    import shlex

    from CeVAEAnomalyLib.cli.main import build_parser, main

    series = write_series(head, tmp_path / "Series 3 (T1)")
    assert main(["batch", str(series), "--out-dir", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err.strip()
    command = said[said.index("cevae-anomaly detect"): said.index(", or list series")]
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.command, args.image, args.score) == ("detect", series, Path("SCORE.nii.gz"))


def test_one_slice_file_of_a_series_points_to_its_folder(head, tmp_path):
    """A user who gives one file of a series (the usual slip with a DICOM export) is told to give its folder, which
    is scored; a single-slice file of another format keeps the plain message."""
    folder = write_series(head, tmp_path / "series")
    with pytest.raises(CeVAEError) as one:
        read_image(folder / "IM0003.dcm")
    assert str(one.value) == (f"The image {folder / 'IM0003.dcm'} is one slice of a DICOM series (24x28 pixels); "
                              f"give the folder that holds the series' files ({folder}) instead.")
    assert read_image(folder).GetSize() == head.GetSize()
    sitk.WriteImage(head[:, :, 3:4], str(tmp_path / "slice.nii.gz"))
    with pytest.raises(CeVAEError, match="is a single slice"):
        read_image(tmp_path / "slice.nii.gz")


def write_slices_at(image: sitk.Image, folder: Path, offsets_mm) -> Path:
    """The slices of ``image`` as one series, slice k written ``offsets_mm[k]`` mm along the normal from the first
    (as an acquisition of uneven slice spacing writes them)."""
    first = image.TransformIndexToPhysicalPoint((0, 0, 0))
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    for k, offset in enumerate(offsets_mm):
        position = np.array(first) + offset * normal
        write_series(image[:, :, k : k + 1], folder.parent / f"{folder.name}_{k}", {
            "0020|0013": str(k + 1), "0008|0018": f"1.2.826.0.1.3680043.2.1125.2.{k + 1}",
            "0020|0032": "\\".join(f"{v:.6f}" for v in position)})
        folder.mkdir(parents=True, exist_ok=True)
        (folder.parent / f"{folder.name}_{k}" / "IM0000.dcm").rename(folder / f"IM{k:04d}.dcm")
    return folder


def test_slices_drifting_off_the_grid_the_reader_puts_them_on_are_refused(head, tmp_path):
    """Gaps of 3 mm, then of 3.25 mm (each within 10 % of the usual gap) were read as one stack at their mean spacing
    (3.11 mm), which puts the middle slices 0.56 mm (a fifth of a slice) from where they were taken; such a series
    was scored on that wrong grid without a word."""
    offsets = list(np.cumsum([0.0] + [3.0] * 5 + [3.25] * 4))
    folder = write_slices_at(head, tmp_path / "series", offsets)
    with pytest.raises(CeVAEError, match=rf"^The DICOM series in {tmp_path}/series has unevenly spaced slices: slice 6 "
                                         r"of 10 lies 0\.556 mm from where a regular stack at their mean spacing "
                                         r"\(3\.11 mm\) puts it \(its gaps range from 3 to 3\.25 mm\)\. Resample it "
                                         r"onto a regular grid first \(3D Slicer's DICOM module does"):
        read_image(folder)


def test_slice_positions_rounded_by_the_scanner_are_read_on_their_grid(head, tmp_path):
    """Positions written to 0.1 mm (gaps of 1.2 mm read 1.2 or 1.3) stray from the regular stack by a rounding: the
    series is read, at its spacing."""
    offsets = [round(1.24 * k, 1) for k in range(head.GetDepth())]
    image = read_image(write_slices_at(head, tmp_path / "series", offsets))
    assert image.GetSpacing()[2] == pytest.approx(offsets[-1] / (len(offsets) - 1))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(head))


def test_a_localizer_of_another_size_in_the_series_says_what_to_do(head, tmp_path):
    """A localizer (another orientation and size) carrying the series' UID made the reader fail: the refusal named
    the odd file but not what the user should do with it."""
    folder = write_series(head, tmp_path / "series")
    scout = sitk.Image([10, 28, 1], sitk.sitkInt16)
    scout.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))
    write_series(scout, tmp_path / "scout", {"0008|0018": "1.2.826.0.1.3680043.2.1125.2.99", "0020|0013": "99",
                                             "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    (tmp_path / "scout" / "IM0000.dcm").rename(folder / "LOC.dcm")
    with pytest.raises(CeVAEError) as refused:
        read_image(folder)
    assert str(refused.value) == (
        f"The DICOM series in {folder} could not be read: its slices differ in size: LOC.dcm is 10x28 pixels, the "
        "usual 24x28 (1 of 11 files differ). The folder mixes images of other acquisitions (a localizer or a "
        "reformat?): move those files out of it, or export the series into a folder of its own.")


def dicomdir_bytes() -> bytes:
    """A DICOMDIR (Media Storage Directory Storage, explicit VR little endian) indexing no record, as a disc's index
    file begins."""
    def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
        value += (b"\0" if vr in (b"UI", b"OB") else b" ") * (len(value) % 2)
        if vr in (b"OB", b"SQ"):
            return struct.pack("<HH", group, number) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", group, number) + vr + struct.pack("<H", len(value)) + value

    meta = (element(2, 1, b"OB", b"\0\1") + element(2, 2, b"UI", b"1.2.840.10008.1.3.10")
            + element(2, 3, b"UI", b"1.2.826.0.1.3680043.2.1125.9") + element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1"))
    body = (element(4, 0x1130, b"CS", b"DISC") + element(4, 0x1200, b"UL", struct.pack("<I", 0))
            + element(4, 0x1202, b"UL", struct.pack("<I", 0)) + element(4, 0x1212, b"US", struct.pack("<H", 0))
            + element(4, 0x1220, b"SQ", b""))
    return b"\0" * 128 + b"DICM" + element(2, 0, b"UL", struct.pack("<I", len(meta))) + meta + body


def test_a_dicomdir_given_as_the_image_says_what_to_give(head, tmp_path):
    """A disc or export: DICOMDIR beside DICOM/<series folders>. Given the DICOMDIR file, it was "could not be read
    as an image (corrupt, truncated or not a medical image format): Unable to determine ImageIO reader"."""
    write_series(head, tmp_path / "DICOM" / "S1")
    (tmp_path / "DICOMDIR").write_bytes(dicomdir_bytes())
    with pytest.raises(CeVAEError) as refused:
        read_image(tmp_path / "DICOMDIR")
    assert str(refused.value) == (
        f"The image file {tmp_path / 'DICOMDIR'} is a DICOMDIR, the index of a DICOM disc or export, not an image: "
        f"give the folder of one series it lists (below {tmp_path}; a folder that holds that series' files alone).")
    with pytest.raises(CeVAEError, match=r"contains no DICOM series; its subfolders \(DICOM\) are not searched: "):
        read_image(tmp_path)  # the disc's folder
    assert read_image(tmp_path / "DICOM" / "S1").GetSize() == head.GetSize()


@pytest.mark.parametrize("images, image_type, warned", [("12", "ORIGINAL\\PRIMARY\\M\\ND", True),
                                                        ("10", "ORIGINAL\\PRIMARY\\M\\ND", False),
                                                        ("20", "ORIGINAL\\PRIMARY\\M\\ND", False),
                                                        ("12", "DERIVED\\SECONDARY\\MPR", False)])
def test_a_series_with_fewer_slices_than_its_acquisition_made_is_warned_of(head, tmp_path, caplog, images, image_type,
                                                                           warned):
    """A series cut at an end (its first or last slices not copied) was read without a word: nothing in the folder
    is amiss, but its slices say how many images their acquisition made (0020,1002 Images in Acquisition). Fewer
    slices than that, and more than half of it, is told (twice as many or more: echoes, dynamics or volumes of one
    acquisition; a reformat, SECONDARY, keeps its source's count)."""
    folder = write_series(head, tmp_path / "series", {"0020|1002": images, "0008|0008": image_type})
    with caplog.at_level(logging.WARNING):
        assert read_image(folder).GetSize() == head.GetSize()
    message = (f"The DICOM series in {folder} holds 10 slices, but they say their acquisition made 12 images "
               "(0020,1002 Images in Acquisition): 2 slice(s) may be missing at its ends (a copy or export cut "
               "short?). Copy or export the series again if so.")
    assert (message in caplog.text) == warned and ("Images in Acquisition" in caplog.text) == warned
