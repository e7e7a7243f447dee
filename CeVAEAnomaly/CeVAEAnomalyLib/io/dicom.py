"""DICOM series folders: reading one (after checking that it is one whole, regular series) and telling a DICOM file
by its meta header."""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import CeVAEError
from .headers import error_text, itk_warnings_off
from .naming import image_stem, subfolders_hint

log = logging.getLogger(__name__)

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR (Media Storage Directory Storage)


def read_dicom_folder(folder: Path, what: str) -> sitk.Image:
    """The volume of the one DICOM series in ``folder``; refused in one line where the folder does not hold one
    whole, regular series."""
    # ITK's own warnings are silenced: GDCM's for folders without a series, and the series
    # reader's for uneven slices, which _check_slice_positions turns into a clear refusal
    with itk_warnings_off():
        return _read_dicom_series(folder, what)


def holds_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` holds the files of a DICOM series (not searching its subfolders)."""
    with itk_warnings_off():
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    _refuse_dangling_links(folder, what)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        try:
            files = sorted(f.name for f in folder.iterdir() if image_stem(f.name) and not f.name.startswith("."))
        except OSError:  # a folder that cannot be listed: no hint
            files = []
        shown = ", ".join(files[:2]) + (", ..." if len(files) > 2 else "")
        hint = (f"; it holds image files ({shown}): give one of them (batch, train, calibrate and adapt read a folder "
                "of image files as a cohort)") if files else subfolders_hint(folder, "give the folder of one series")
        raise CeVAEError(f"The {what} folder {folder} contains no DICOM series{hint}.")
    if len(series) > 1:
        listed = "; ".join(_series_summary(reader, folder, uid) for uid in series)
        raise CeVAEError(f"The {what} folder {folder} holds {len(series)} DICOM series ({listed}); which one to "
                         "analyse would be a guess. Put that series in a folder of its own.")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    _refuse_left_out_slices(folder, files)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, to check the spacing
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CeVAEError(f"The DICOM series in {folder} could not be read: {_odd_slice(files) or error_text(exc)}") \
            from None
    _refuse_cut_slices(reader, files, folder)
    _check_slice_positions(reader, len(files), folder, min(image.GetSpacing()[:2]))
    _warn_of_fewer_slices_than_acquired(reader, len(files), folder)
    if len(set(_rescalings(reader, len(files)))) > 1:  # the pixel type is the first slice's: read them as floats
        reader.SetOutputPixelType(sitk.sitkFloat32)
        image = reader.Execute()
    return image


def _rescalings(reader: sitk.ImageSeriesReader, n: int) -> List[Tuple[str, str]]:
    """Each slice's rescale slope and intercept (0028|1053, 0028|1052) as numbers in text (1 and 0 where none).

    The reader gives the series the pixel type of its first slice and applies each slice's own rescaling, so where
    they differ (some scanners scale each slice) an integer first slice truncated the real values of the others
    (stored 37 at slope 0.25: 9, not 9.25) or wrapped them past its range."""
    def value(i: int, key: str, default: str) -> str:
        text = reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else default
        try:
            return repr(float(text))
        except ValueError:
            return text

    return [(value(i, "0028|1053", "1"), value(i, "0028|1052", "0")) for i in range(n)]


def _refuse_left_out_slices(folder: Path, files: Sequence[str]) -> None:
    """Refuse a series beside a file that may be one of its slices but that the series reader left out unsaid: one
    that cannot be opened (no permission), an empty one, or a DICOM image of the series' kind (its SOP class) that it
    could not parse (truncated, corrupt). The series was read without them: slices at either end were lost
    silently, in the middle refused as a gap. Other files (DICOMDIR, reports, notes, thumbnails) pass."""
    listed = {Path(f).name for f in files}
    others = [f for f in sorted(folder.iterdir()) if f.name not in listed and not f.name.startswith(".")
              and f.is_file()]
    try:
        kind = sop_class(Path(files[0]))
    except OSError:  # read by the series reader a moment ago: the reader says what became of it
        kind = None
    problems = []  # (file, problem), those that cannot be opened first
    for f in others:
        try:
            if f.stat().st_size == 0:
                problems.append((f, "is empty"))
            elif kind is not None and sop_class(f) == kind:
                problems.append((f, "is a DICOM image of the series' kind that the series reader cannot read "
                                    "(truncated or corrupt)"))
        except OSError as exc:
            problems.insert(0, (f, f"cannot be opened ({exc.strerror or exc})"))
    if problems:
        f, problem = problems[0]
        raise CeVAEError(f"The DICOM series in {folder} cannot be read whole: {f.name} {problem}, and the series would "
                         f"be read without it ({len(files)} slices). Copy or export the series again (or move that "
                         "file out of the folder if it is no slice of it).")


def _refuse_cut_slices(reader: sitk.ImageSeriesReader, files: Sequence[str], folder: Path) -> None:
    """Refuse a series one of whose slice files ends inside its pixel data (an interrupted copy): SimpleITK before
    2.5 (Slicer 5.6 and 5.8 bundle 2.2.1 and 2.3.1) reads such a file, its missing pixels 0, where 2.5 leaves it
    out (:func:`_refuse_left_out_slices`)."""
    def tag(i: int, key: str, default: str) -> int:
        text = reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else default
        return int(text) if text.isdigit() else 0

    for i, name in enumerate(files):
        size = tag(i, "0028|0010", "0") * tag(i, "0028|0011", "0") * tag(i, "0028|0002", "1") \
            * tag(i, "0028|0008", "1") * tag(i, "0028|0100", "0") // 8
        short = pixel_data_shortfall(Path(name), size) if size else 0
        if short:
            raise CeVAEError(f"The DICOM series in {folder} cannot be read whole: {Path(name).name} ends {short} bytes "
                             "short of its pixel data (truncated), and the series would be read with those pixels "
                             "as 0. Copy or export the series again.")


def pixel_data_shortfall(path: Path, size: int) -> int:
    """How many bytes a DICOM file lacks of its uncompressed Pixel Data (7FE0,0010) element of ``size`` bytes
    (little endian, explicit or implicit VR); 0 if it is whole or no such element is found (compressed data)."""
    data = path.read_bytes()
    lengths = [struct.pack("<I", n) for n in (size, size + 1)]  # (an odd length is padded to even)
    at = data.find(b"\xe0\x7f\x10\x00", 132)
    while at >= 0:
        if data[at + 4 : at + 6] in (b"OB", b"OW") and data[at + 6 : at + 8] == b"\0\0" \
                and data[at + 8 : at + 12] in lengths:
            start = at + 12
        elif data[at + 4 : at + 8] in lengths:
            start = at + 8
        else:
            at = data.find(b"\xe0\x7f\x10\x00", at + 1)
            continue
        return max(0, start + struct.unpack("<I", data[start - 4 : start])[0] - len(data))
    return 0


def refuse_one_dicom_slice(p: Path, image: sitk.Image, what: str) -> None:
    """Refuse one slice file of a DICOM series, naming the folder to give instead (the usual slip with an export)."""
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] == 1 and min(size[:2]) > 1 and sop_class(p) is not None:
        raise CeVAEError(f"The {what} {p} is one slice of a DICOM series ({size[0]}x{size[1]} pixels); give the "
                         f"folder that holds the series' files ({p.parent}) instead.")


def sop_class(path: Path) -> Optional[str]:
    """The SOP class UID (0002,0002) in a DICOM file's meta header; None if it has no preamble and meta header.
    OSError if it cannot be opened."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    at = head.find(b"\x02\x00\x02\x00UI", 132)
    if head[128:132] != b"DICM" or at < 0 or len(head) < at + 8:
        return None
    length = struct.unpack("<H", head[at + 6 : at + 8])[0]
    return head[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii", "replace") or None


def _refuse_dangling_links(folder: Path, what: str) -> None:
    """Refuse a folder holding a symbolic link to nothing (a file of a DataLad or git-annex dataset not yet
    fetched, a disk not mounted): the DICOM reader lists no file after it, in the folder's own order, so it saw
    part of a series (or none, or one of two) and said nothing."""
    try:
        dangling = next((f for f in sorted(folder.iterdir()) if f.is_symlink() and not f.exists()), None)
    except OSError:  # a folder that cannot be listed: the reader finds no series in it
        return
    if dangling is not None:
        raise CeVAEError(f"The {what} folder {folder} holds {dangling.name}, a symbolic link to "
                         f"{os.readlink(dangling)}, which does not exist (a file not yet fetched, or on a disk not "
                         "mounted?); the DICOM reader would skip the files after it. Fetch that file, or remove the "
                         "link.")


def _odd_slice(files: Sequence[str]) -> str:
    """Which file of a series has another size than most (the reader's own error only gives a size), and what to do;
    "" if none."""
    sizes = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return f"{name} cannot be read"
        sizes.append(tuple(reader.GetSize()[:2]))
    usual = max(set(sizes), key=sizes.count)
    odd = [(name, size) for name, size in zip(files, sizes) if size != usual]
    if not odd:
        return ""
    return (f"its slices differ in size: {Path(odd[0][0]).name} is {odd[0][1][0]}x{odd[0][1][1]} pixels, the usual "
            f"{usual[0]}x{usual[1]} ({len(odd)} of {len(files)} files differ). The folder mixes images of other "
            "acquisitions (a localizer or a reformat?): move those files out of it, or export the series into a "
            "folder of its own.")


def _series_summary(reader: sitk.ImageSeriesReader, folder: Path, uid: str) -> str:
    """A series as a reader can tell it: its description (if its first file has one), files and UID."""
    files = reader.GetGDCMSeriesFileNames(str(folder), uid)
    description = ""
    try:
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        first.ReadImageInformation()
        if first.HasMetaDataKey("0008|103e"):
            description = f"'{first.GetMetaData('0008|103e').strip()}', "
    except (RuntimeError, IndexError):
        pass
    return f"{description}{len(files)} file(s), UID {uid}"


def _check_slice_positions(reader: sitk.ImageSeriesReader, n: int, folder: Path, pixel_mm: float) -> None:
    """Refuse a series whose slices are not a regular stack: not evenly spaced (a missing or doubled slice, mixed
    acquisitions, gaps that drift), of different orientations, or shifted within their planes (a gantry tilt).

    The reader stacks the slices at their mean spacing along the first slice's normal, so such a series would put
    voxels in the wrong place. Scanners round the positions they write, so gaps within 10 % or
    :data:`_ROUNDING_MM`, slices as close to that stack, and shifts within the plane of less than half a pixel
    (``pixel_mm``: the smallest in-plane spacing) or :data:`_ROUNDING_MM`, pass. Slices without position tags are
    left to the reader.
    """
    key_pos, key_dir = "0020|0032", "0020|0037"
    if n < 3 or not all(reader.HasMetaDataKey(i, key_pos) for i in range(n)) or not reader.HasMetaDataKey(0, key_dir):
        return
    try:
        cosines = np.array([float(v) for v in reader.GetMetaData(0, key_dir).split("\\")])
        positions = np.array([[float(v) for v in reader.GetMetaData(i, key_pos).split("\\")] for i in range(n)])
        orientations = [np.array([float(v) for v in reader.GetMetaData(i, key_dir).split("\\")])
                        if reader.HasMetaDataKey(i, key_dir) else cosines for i in range(n)]
    except ValueError:
        return
    if cosines.shape != (6,) or positions.shape != (n, 3):
        return
    turned = [i for i, c in enumerate(orientations) if c.shape != (6,) or np.max(np.abs(c - cosines)) > 1e-3]
    if turned:
        raise CeVAEError(f"The DICOM series in {folder} has slices of different orientations (slice {turned[0] + 1} "
                         f"of {n} is turned against slice 1): the folder mixes acquisitions. Export the series "
                         "into a folder of its own.")
    normal = np.cross(cosines[:3], cosines[3:])
    in_plane = (positions - positions[0]) @ np.stack([cosines[:3], cosines[3:]]).T
    shift = np.hypot(in_plane[:, 0], in_plane[:, 1])
    if np.max(shift) > max(0.5 * pixel_mm, _ROUNDING_MM):
        worst = int(np.argmax(shift))
        raise CeVAEError(f"The DICOM series in {folder} is not a stack along its slices' normal: slice {worst + 1} of "
                         f"{n} lies {shift[worst]:.3g} mm off it within its plane (a gantry tilt or a sheared "
                         "acquisition), which a regular voxel grid cannot hold. Resample it onto a regular grid "
                         "first (3D Slicer's DICOM module does, with acquisition geometry regularization on in its "
                         "DICOM settings).")
    gaps = np.abs(np.diff(np.sort(positions @ normal)))
    usual = float(np.median(gaps))
    if usual <= 0 or np.max(np.abs(gaps - usual)) > max(0.1 * usual, _ROUNDING_MM):
        odd = int(np.argmax(np.abs(gaps - usual)))
        raise CeVAEError(
            f"The DICOM series in {folder} has unevenly spaced slices (a gap of {gaps[odd]:.3g} mm after slice "
            f"{odd + 1} of {n}, where the others are {usual:.3g} mm apart): a slice is missing or doubled, or "
            "the folder mixes acquisitions. Export the complete series into a folder of its own."
        )
    along = np.sort(positions @ normal)  # the reader stacks them at their mean spacing, from the first to the last
    mean = (along[-1] - along[0]) / (n - 1)
    off = np.abs(along - (along[0] + mean * np.arange(n)))
    if np.max(off) > max(0.1 * usual, _ROUNDING_MM):
        worst = int(np.argmax(off))
        raise CeVAEError(
            f"The DICOM series in {folder} has unevenly spaced slices: slice {worst + 1} of {n} lies {off[worst]:.3g} "
            f"mm from where a regular stack at their mean spacing ({mean:.3g} mm) puts it (its gaps range from "
            f"{np.min(gaps):.3g} to {np.max(gaps):.3g} mm). Resample it onto a regular grid first (3D Slicer's DICOM "
            "module does, with acquisition geometry regularization on in its DICOM settings), or export the complete "
            "series into a folder of its own if the folder mixes acquisitions."
        )


def _warn_of_fewer_slices_than_acquired(reader: sitk.ImageSeriesReader, n: int, folder: Path) -> None:
    """Warn of a series that may lack slices at its ends (a copy or export cut short, which its positions cannot
    tell): every slice says its acquisition made the same N images (0020,1002 Images in Acquisition), and n < N < 2n.
    Twice as many or more are echoes, dynamics or volumes of one acquisition; a reformat (ImageType SECONDARY) may
    keep its source's count; slices without the tag (it is optional) say nothing."""
    def tag(i: int, key: str) -> str:
        return reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else ""

    counts = {tag(i, "0020|1002") for i in range(n)}
    if len(counts) != 1 or not counts <= {str(k) for k in range(n + 1, 2 * n)}:
        return
    if any("SECONDARY" in tag(i, "0008|0008").upper().split("\\") for i in range(n)):
        return
    acquired = int(counts.pop())
    log.warning("The DICOM series in %s holds %d slices, but they say their acquisition made %d images (0020,1002 "
                "Images in Acquisition): %d slice(s) may be missing at its ends (a copy or export cut short?). Copy "
                "or export the series again if so.", folder, n, acquired, acquired - n)


_ROUNDING_MM = 0.2  # how far positions written to 0.1 mm may stray (a missing slice: a whole gap; a tilt: mm)
