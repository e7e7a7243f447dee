"""Reading volumes (files; DICOM series folders through :mod:`.dicom`) and checking them."""
from __future__ import annotations

import contextlib
import gzip
import itertools
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import CeVAEError
from .dicom import DICOMDIR_CLASS, read_dicom_folder, refuse_one_dicom_slice, sop_class
from .headers import GZIP_MAGIC, NIFTI_MAGIC, error_text, first_bytes, header_reader, itk_warnings_off, pair_files
from .metaimage import check_metaimage_complete, declared_bytes
from .targets import refuse_missing_volume

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]


MASK_IS_IMAGE = "is the image itself: give the brain mask file, or none for the automatic one."


def refuse_image_as_mask(image: PathLike, mask: Optional[PathLike], where: str = "") -> None:
    """Refuse, in one line and before any work, a brain mask file that is the image file (the same path, another path
    or a link to it); ``where`` leads the message (a list's line)."""
    try:
        same = mask is not None and os.path.samefile(image, mask)
    except (OSError, ValueError):  # a file missing or unreadable: the path checks say so
        return
    if same:
        raise CeVAEError(f"{where}The brain mask {mask} {MASK_IS_IMAGE}")


def read_image(path: PathLike, what: str = "image") -> sitk.Image:
    """Read a scalar 3D volume from a file SimpleITK reads or from a DICOM series folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise CeVAEError(f"The {what} must be a file path (or a DICOM folder), got {type(path).__name__}.")
    p = Path(path)
    refuse_missing_volume(p, what)
    layout = None
    if p.is_dir():
        image = read_dicom_folder(p, what)
    else:
        if p.stat().st_size == 0:
            raise CeVAEError(f"The {what} file {p} is empty.")
        pair = pair_files(p)
        data, layout = pair[1] if pair else p, _pair_layout(*pair) if pair else _nifti_layout(p)
        if layout is not None:
            _refuse_sizeless_voxels(p, layout, what)
            if pair and layout.gz and not data.name.lower().endswith(".gz"):  # the reader goes by the name
                raise CeVAEError(f"The {what} data file {data} is gzip-compressed but named without .gz, and the "
                                 f"reader would take its compressed bytes for voxels: rename it {data.name}.gz.")
        known = layout is not None and layout.datatype in _NIFTI_TYPES
        floats = known and layout.datatype in _NIFTI_FLOATS
        # ITK's NIfTI reader warns of an sform it does not follow, over several lines: checked below instead
        with itk_warnings_off() if layout is not None else contextlib.nullcontext():
            image = _read_plain_nifti(p, layout, what) if known and not pair else None  # checks its own length
            if image is None:
                if layout is not None:
                    _check_nifti_complete(data, layout, what)
                _refuse_missing_data_file(p, what)
                reader = header_reader(p) if layout is None else None  # (one read of the header for both checks)
                if reader is not None:
                    _check_declared_size(p, what, reader)
                    check_metaimage_complete(p, what, reader)
                try:
                    image = sitk.ReadImage(str(p))
                except RuntimeError as exc:
                    raise _unreadable(p, layout, what, exc) from None
                if floats:
                    image = _restore_non_finite(data, layout, image)
        refuse_one_dicom_slice(p, image, what)
        _refuse_layered_segmentation(p, image, what)
        _refuse_two_channel_metaimage(p, image, what)
    image = check_volume(image, f"{what} {p}")
    if layout is not None and layout.sform is not None:
        _refuse_two_placements(p, layout.sform, image, what)
    return image


def read_header(path: PathLike, what: str = "image") -> Optional[sitk.ImageFileReader]:
    """A reader holding the header of a volume file (its grid, without its voxels), for checking a list of files
    before any is read; None for a DICOM series folder. A file whose header cannot be read, or a NIfTI file far too
    short for the voxels its header announces, or a gzip-compressed one cut short (:func:`_check_gzip_end`), is refused
    as :func:`read_image` refuses it (a file whose header reads may still fail there: a corrupt one)."""
    p = Path(path)
    refuse_missing_volume(p, what)
    if p.is_dir():
        return None
    pair = pair_files(p)
    data, layout = pair[1] if pair else p, _pair_layout(*pair) if pair else _nifti_layout(p)
    if layout is not None:
        _check_plausible(data, layout, what)
        if layout.gz:
            _check_gzip_end(data, layout, what)
    _refuse_missing_data_file(p, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    with itk_warnings_off():
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise _unreadable(p, layout, what, exc) from None
    if layout is None:
        _check_declared_size(p, what, reader)
    return reader


def _unreadable(p: Path, layout: Optional[_NiftiLayout], what: str, exc: RuntimeError) -> CeVAEError:
    """The refusal of a file that ITK could not read (``exc``), saying why where it can be told: a macOS resource
    fork, a gzip file named .nii, a format named by another's extension, a DICOMDIR; else corrupt or not an
    image."""
    from .naming import RESOURCE_FORK, is_resource_fork

    if is_resource_fork(p):  # listed by a `find` or a glob beside the scan
        return CeVAEError(f"The {what} file {p} is {RESOURCE_FORK}.")
    if layout is not None and layout.gz and p.name.lower().endswith(".nii"):
        return CeVAEError(f"The {what} file {p} is gzip-compressed but named .nii, and the NIfTI "
                          "reader goes by the name: rename it to end in .nii.gz.")
    refuse_misnamed_format(p, what)
    if p.suffix.lower() in (".mgz", ".mgh"):  # SimpleITK has no reader of FreeSurfer's format
        return CeVAEError(f"The {what} file {p} is in FreeSurfer's MGH format, which is not read here: convert it to "
                          f"NIfTI first (FreeSurfer: mri_convert {p.name} {p.stem}.nii.gz) and give that file.")
    try:
        dicomdir = sop_class(p) == DICOMDIR_CLASS
    except OSError:
        dicomdir = False
    if dicomdir:
        return CeVAEError(f"The {what} file {p} is a DICOMDIR, the index of a DICOM disc or export, not an image: give "
                          f"the folder of one series it lists (below {p.parent}; a folder that holds that series' "
                          "files alone).")
    return CeVAEError(f"The {what} file {p} could not be read as an image "
                      f"(corrupt, truncated or not a medical image format): {error_text(exc)}")


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
# NIfTI datatype code -> (NumPy type, the pixel type ITK's reader gives): the scalar types read in one pass
_NIFTI_TYPES = {
    2: ("u1", sitk.sitkUInt8), 4: ("i2", sitk.sitkInt16), 8: ("i4", sitk.sitkInt32), 16: ("f4", sitk.sitkFloat32),
    64: ("f8", sitk.sitkFloat64), 256: ("i1", sitk.sitkInt8), 512: ("u2", sitk.sitkUInt16),
    768: ("u4", sitk.sitkUInt32), 1024: ("i8", sitk.sitkInt64), 1280: ("u8", sitk.sitkUInt64),
}


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a NIfTI file's voxels are, read from its header."""

    gz: bool
    endian: str
    datatype: int
    voxels: int
    offset: int  # first voxel byte (after header and extensions; of a pair: in its data file)
    size: int  # bytes the (decompressed) file holding the voxels must hold
    pixdim: Tuple[float, ...] = ()  # the voxel size of each axis the header gives (pixdim[1:dim+1])
    # the sform's rows (srow_x, srow_y, srow_z: index to RAS mm) where the header holds one (sform_code > 0), which
    # other software reads the grid from
    sform: Optional[Tuple[float, ...]] = None


# what a file's first bytes say it is: (its format in words, the extensions its reader takes, the one to suggest
# first); NIfTI is told apart by its header's size and magic (NIFTI_MAGIC), the others by their first bytes
_TEXT_HEADERS = ((b"NRRD000", "an NRRD image", (".nrrd", ".nhdr")), (b"ObjectType", "a MetaImage", (".mha", ".mhd")))


def refuse_misnamed_format(p: Path, what: str) -> None:
    """Refuse, saying the rename to make, a file that its reader (chosen by the extension) could not read whose
    content is a NIfTI, NRRD or MetaImage of another extension; nothing when its content is none of these."""
    found = _format_by_content(p)
    if found is not None and not p.name.lower().endswith(found[1]):
        named = "".join(p.suffixes[-2:]) if p.name.lower().endswith(".gz") else p.suffix
        raise CeVAEError(f"The {what} file {p} holds {found[0]} but is named {named or 'without an extension'}, and "
                         f"the reader goes by the name: rename it to end in {found[1][0]}.")


def _format_by_content(p: Path) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(the format in words, the extensions its reader takes) of what the file at ``p`` holds, by its first bytes;
    None if unknown."""
    start = first_bytes(p)
    if start is None:
        return None
    gz, head = start
    for (size, at), magic in NIFTI_MAGIC.items():
        if head[at : at + 4] == magic and size in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]):
            return ("a NIfTI image (gzip-compressed)", (".nii.gz",)) if gz else ("a NIfTI image", (".nii", ".nii.gz"))
    return next(((words, ext) for start, words, ext in _TEXT_HEADERS if not gz and head.startswith(start)), None)


def _nifti_layout(p: Path) -> Optional[_NiftiLayout]:
    """The voxel layout of a .nii/.nii.gz file (NIfTI-1 or -2); None if it is not one.

    Whether it is compressed is read from its first bytes, not its name: ITK reads an uncompressed
    file named .nii.gz too, and would fill a truncated one with zeros unchecked.
    """
    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    start = first_bytes(p)
    if start is None:
        return None  # not even a readable header: the image reader says what is wrong
    return nifti_layout_of_header(start[1], start[0])


def _pair_layout(header_path: Path, data_path: Path) -> Optional[_NiftiLayout]:
    """The voxel layout of a pair's data file, read from its header; None if that is not a readable one."""
    try:
        with open(data_path, "rb") as fh:
            gz = fh.read(2) == GZIP_MAGIC
        with open(header_path, "rb") as fh:
            zipped = fh.read(2) == GZIP_MAGIC
        with (gzip.open(header_path, "rb") if zipped else open(header_path, "rb")) as fh:
            header = fh.read(348)
    except (EOFError, OSError, zlib.error):
        return None
    return nifti_layout_of_header(header, gz, pair=True)


def nifti_layout_of_header(header: bytes, gz: bool, pair: bool = False) -> Optional[_NiftiLayout]:
    """The voxel layout a NIfTI-1/-2 header announces; None if ``header`` is not a valid one (``pair``: the header
    of an .hdr/.img pair, whose voxels start at their offset in the data file, 0 being the start)."""
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0] if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            # an Analyze 7.5 header (no NIfTI magic) holds its originator where NIfTI-1 holds sform_code
            sform = header[344:348] in (b"ni1\0", b"n+1\0") and struct.unpack(endian + "h", header[254:256])[0] > 0
            rows = struct.unpack(endian + "12f", header[280:328])
        elif size == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            sform = struct.unpack(endian + "i", header[348:352])[0] > 0
            rows = struct.unpack(endian + "12d", header[400:496])
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : dims[0] + 1]):
            return None  # malformed: the image reader reports it
        voxels = int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64))
        offset = max(offset, 0 if pair else size)
        return _NiftiLayout(gz, endian, datatype, voxels, offset, offset + voxels * bitpix // 8,
                            tuple(float(v) for v in pixdim[1 : min(dims[0], 3) + 1]),
                            tuple(float(v) for v in rows) if sform else None)
    return None


def _refuse_sizeless_voxels(p: Path, layout: _NiftiLayout, what: str) -> None:
    """Refuse a NIfTI header whose voxel size (pixdim) is 0 or not a number along an axis (ITK reads it as 1 mm),
    or negative beside an sform (ITK flips the axis, other software follows the sform and does not): either way
    the outputs would not lie where the scan does in other software. (A negative pixdim without an sform is a
    flipped axis to every reader.)"""
    for axis, size in enumerate(layout.pixdim):
        if size == 0 or not math.isfinite(size):
            raise CeVAEError(f"The {what} file {p} gives a voxel size (pixdim) of {size:g} along axis {'ijk'[axis]}, "
                             "which is no size; it would be read as 1 mm and the outputs would not lie where the scan "
                             "does. Fix the header's voxel size first.")
        if size < 0 and layout.sform:
            raise CeVAEError(f"The {what} file {p} gives a negative voxel size (pixdim {size:g}) along axis "
                             f"{'ijk'[axis]} beside an sform: it would be read with that axis flipped, and other "
                             "software, which follows the sform, would not flip it (the outputs would be mirrored "
                             "there). Fix the header's voxel size (positive) first.")


def _refuse_two_placements(p: Path, sform: Tuple[float, ...], image: sitk.Image, what: str) -> None:
    """Refuse a NIfTI file whose sform places its voxels elsewhere than ``image``, the grid ITK read: ITK reads the
    qform unless the sform is a scanner one (sform_code 1) that it can decompose, FSL, SPM and nibabel read the sform,
    so the outputs, written with ITK's grid as both, would lie off the scan in one of them. Corners of the volume
    apart by at most :data:`_PLACEMENT_VOXELS` of a voxel pass (float rounding; as a DICOM series' in-plane shifts)."""
    rows = np.array(sform).reshape(3, 4)
    if not np.isfinite(rows).all():
        raise CeVAEError(f"The {what} file {p} has an sform (srow_x/y/z) that is not a valid matrix: it holds "
                         f"{rows[~np.isfinite(rows)][0]:g}. Fix the header's sform first (e.g. fslorient "
                         "-copyqform2sform where the qform is right).")
    corners = [[float(c) for c in corner] for corner in itertools.product(*[(0, n - 1) for n in image.GetSize()])]
    read = np.array([image.TransformContinuousIndexToPhysicalPoint(c) for c in corners])
    sformed = (np.array(corners) @ rows[:, :3].T + rows[:, 3]) * (-1.0, -1.0, 1.0)  # RAS to ITK's LPS
    apart = float(np.max(np.linalg.norm(read - sformed, axis=1)))
    if not apart <= _PLACEMENT_VOXELS * min(image.GetSpacing()):
        raise CeVAEError(f"The {what} file {p} places its voxels up to {apart:.2g} mm from where ITK and 3D Slicer "
                         "read them: its sform, which FSL, SPM and nibabel follow, differs from its qform, so the "
                         "outputs would lie off the scan in one or the other. Make them agree first (e.g. fslorient "
                         "-copysform2qform where the sform is right, -copyqform2sform where the qform is).")


_PLACEMENT_VOXELS = 0.5  # how far (in voxels) the sform may place the volume's corners from ITK's grid


_MAX_DEFLATE_RATIO = 1032  # deflate cannot compress better than about 1032:1


def _check_nifti_complete(p: Path, layout: _NiftiLayout, what: str) -> None:
    """Refuse a truncated NIfTI file: ITK would silently fill the missing voxels with zeros.

    A gzip file is decompressed up to the announced length: its size trailer is not trusted
    (it can be stale, or forged, and it only holds the length modulo 4 GiB).
    """
    _check_plausible(p, layout, what)
    have = _gunzipped_size(p, layout.size) if layout.gz else p.stat().st_size
    if have < layout.size:
        _refuse_truncated(p, layout, have, what)


def _check_gzip_end(p: Path, layout: _NiftiLayout, what: str) -> None:
    """Refuse a gzip NIfTI file cut short, cheaply: a whole one of one member ends in the size of its content (modulo
    4 GiB), which one cut short holds only by chance (1 in 2**32). Where that size differs (several members, bytes
    beyond the voxels) the file is decompressed to count them (:func:`_check_nifti_complete`). A matching size is
    trusted here only: :func:`read_image` counts the voxels it reads."""
    with open(p, "rb") as fh:
        fh.seek(-min(4, p.stat().st_size), os.SEEK_END)
        if int.from_bytes(fh.read(4), "little") != layout.size % (1 << 32):
            _check_nifti_complete(p, layout, what)


def _refuse_missing_data_file(p: Path, what: str) -> None:
    """Refuse a detached header (MetaImage .mhd, NRRD .nhdr) whose data file is not beside it, naming that file
    (ITK's reader names only the header)."""
    from .detached import read_alongside

    if p.suffix.lower() not in (".mhd", ".nhdr"):
        return
    files = read_alongside(p).files
    if files and not any(f.exists() for f in files):
        raise CeVAEError(f"The {what} header {p} names the data file {files[0]}, which does not exist; copy it "
                         "beside the header.")


def _check_plausible(p: Path, layout: _NiftiLayout, what: str) -> None:
    """Refuse, without reading, a file too small to hold what its header announces (no huge allocation)."""
    size = p.stat().st_size
    most = size * _MAX_DEFLATE_RATIO + 1024 if layout.gz else size
    if layout.size > most:
        _refuse_truncated(p, layout, None if layout.gz else size, what)


def _check_declared_size(p: Path, what: str, reader: sitk.ImageFileReader) -> None:
    """Refuse, before ITK allocates it, a volume (NRRD, MetaImage, any non-NIfTI file) whose header (``reader`` has
    read it) announces far more voxel bytes than its file, or its detached data files, could hold even compressed (a
    1 KB NRRD claiming 1200^3 floats had 6.9 GB allocated before its read failed)."""
    from .detached import read_alongside

    declared = declared_bytes(reader)
    if declared is None:
        return
    alongside = read_alongside(p)
    if alongside.numbered or alongside.folder is not None:
        return  # data in many files: not counted here
    files = [f for f in alongside.files if f.is_file()]
    held = p.stat().st_size + sum(f.stat().st_size for f in files)
    if declared > held * _MAX_DEFLATE_RATIO + 1024:
        holder = f"its data file {files[0]} is" if len(files) == 1 else "its data files are" if files else "it is"
        raise CeVAEError(f"The {what} file {p} is truncated or corrupt ({holder} far too small for the {declared} "
                         "bytes its header announces); copy or export it again.")


def _refuse_truncated(p: Path, layout: _NiftiLayout, have: Optional[int], what: str) -> None:
    holds = f"it holds {have} of the {layout.size} bytes" if have is not None else \
        f"it is far too small for the {layout.size} bytes"
    raise CeVAEError(f"The {what} file {p} is truncated or corrupt ({holds} its header announces); "
                     "copy or export it again.")


def _gunzipped_size(p: Path, limit: int) -> int:
    """Decompressed length of a gzip file (one or more members), counted up to ``limit`` or to where it breaks."""
    have, pending = 0, b""
    inflate = zlib.decompressobj(31)
    with open(p, "rb") as fh:
        while have < limit:
            if not pending:
                pending = fh.read(1 << 16)  # small steps: a broken stream loses only the last one's output
                if not pending:
                    break
            try:
                have += len(inflate.decompress(pending, 1 << 24))
            except zlib.error:
                break
            pending = inflate.unconsumed_tail
            if inflate.eof:  # end of one gzip member; another may follow
                pending, inflate = inflate.unused_data, zlib.decompressobj(31)
    return min(have, limit)


def _read_plain_nifti(p: Path, layout: _NiftiLayout, what: str) -> Optional[sitk.Image]:
    """A plain 3D scalar NIfTI read in one pass (float NaN/Inf kept); None where ITK must read it.

    Checking a gzip file's length and then letting ITK read it would decompress it twice, and
    ITK's reader zeroes float NaN/Inf. Here ITK reads only the header (geometry exactly as it
    would give it) and the voxels are read once, straight into the array. Files with intensity
    scaling or more than three dimensions go the general way.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        slope = float(reader.GetMetaData("scl_slope")) if reader.HasMetaDataKey("scl_slope") else 1.0
        inter = float(reader.GetMetaData("scl_inter")) if reader.HasMetaDataKey("scl_inter") else 0.0
    except (RuntimeError, ValueError):
        return None
    code, pixel = _NIFTI_TYPES[layout.datatype]
    dtype = np.dtype(layout.endian + code)
    if (reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1 or reader.GetPixelID() != pixel
            or int(np.prod(reader.GetSize(), dtype=np.int64)) != layout.voxels
            or slope not in (0.0, 1.0) or inter != 0.0 or min(reader.GetSpacing()) <= 0):
        return None  # ITK's full read knows these (e.g. a negative pixdim becomes a flipped axis)
    _check_plausible(p, layout, what)
    try:
        arr = np.empty(reader.GetSize()[::-1], dtype)
    except MemoryError:
        _check_nifti_complete(p, layout, what)  # a short file that claims a huge volume is corrupt
        raise
    try:
        got = _read_voxels_into(p, layout, memoryview(arr).cast("B"))
    except (EOFError, OSError, zlib.error) as exc:
        raise CeVAEError(f"The {what} file {p} could not be read (corrupt or truncated): {exc}") from None
    if got < arr.nbytes:
        _refuse_truncated(p, layout, layout.offset + got, what)
    if not dtype.isnative:
        arr = arr.byteswap().view(dtype.newbyteorder("="))
    image = sitk.GetImageFromArray(arr, isVector=False)
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def _read_voxels_into(p: Path, layout: _NiftiLayout, out: memoryview) -> int:
    """Fill ``out`` with the file's bytes from ``layout.offset`` on (gzip: one or more members); bytes read."""
    with open(p, "rb") as fh:
        if not layout.gz:
            fh.seek(layout.offset)
            return fh.readinto(out) or 0
        pos, need = -layout.offset, len(out)  # pos: where the next decompressed byte goes in ``out``
        inflate = zlib.decompressobj(31)
        pending = b""
        while pos < need:
            if not pending:
                pending = fh.read(1 << 22)
                if not pending:
                    break
            block = inflate.decompress(pending, 1 << 24)
            pending = inflate.unconsumed_tail
            if inflate.eof:  # end of one gzip member; another may follow
                pending, inflate = inflate.unused_data, zlib.decompressobj(31)
            start = max(pos, 0)
            n = min(pos + len(block), need) - start
            if n > 0:
                out[start : start + n] = memoryview(block)[start - pos : start - pos + n]
            pos += len(block)
        return max(0, min(pos, need))


def _restore_non_finite(p: Path, layout: _NiftiLayout, image: sitk.Image) -> sitk.Image:
    """Put back the NaN/Inf voxels that ITK's NIfTI reader turns into 0 (so they can be left out)."""
    dtype = np.dtype(layout.endian + _NIFTI_FLOATS[layout.datatype])
    if image.GetNumberOfPixels() != layout.voxels or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    with (gzip.open(p, "rb") if layout.gz else open(p, "rb")) as fh:
        fh.seek(layout.offset)
        raw = np.frombuffer(fh.read(layout.voxels * dtype.itemsize), dtype)
    bad = ~np.isfinite(raw)
    if not bad.any():
        return image
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype.kind != "f":
        return image
    arr.reshape(-1)[bad] = raw[bad]
    restored = sitk.GetImageFromArray(arr, isVector=False)
    restored.CopyInformation(image)
    return restored


def _refuse_layered_segmentation(p: Path, image: sitk.Image, what: str) -> None:
    """Refuse a Slicer segmentation saved in layers (one voxel component each: its segments overlap), naming what to
    give instead; as a colour or vector image it said neither what the file is nor what to do."""
    layers = image.GetNumberOfComponentsPerPixel()
    if layers > 1 and p.name.lower().endswith(".seg.nrrd"):
        raise CeVAEError(f"The {what} {p} is a segmentation saved in {layers} layers (segments that overlap); "
                         "export its segments to one labelmap first (Slicer's Segmentations module, Export/import "
                         "models and labelmaps), in which every voxel holds one label.")


def _refuse_two_channel_metaimage(p: Path, image: sitk.Image, what: str) -> None:
    """Refuse a MetaImage of 2 float channels saying it may be complex-valued: MetaImage has no complex type and
    ITK writes complex voxels as 2 float channels, with a header the same as a 2-channel vector image's (NRRD and
    NIfTI say complex, and ITK reads those as complex)."""
    if (p.suffix.lower() in (".mha", ".mhd") and image.GetNumberOfComponentsPerPixel() == 2
            and image.GetPixelID() in (sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)):
        raise CeVAEError(f"The {what} {p} holds 2 float values per voxel: complex-valued voxels (raw or phase data), "
                         "which a MetaImage stores so and cannot tell from a 2-channel image, or another 2-channel "
                         "image; a magnitude MRI volume of one channel is needed.")


_COMPLEX = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
_VECTORS = frozenset(getattr(sitk, f"sitkVector{t}") for t in ("UInt8", "Int8", "UInt16", "Int16", "UInt32", "Int32",
                                                             "UInt64", "Int64", "Float32", "Float64"))


def warn_if_ct_range(image: sitk.Image, modality: str, where: str = "") -> bool:
    """Warn when the intensities look like CT (Hounsfield units) rather than MRI, saying what a model of ``modality``
    (its header's) takes instead; ``where`` leads the warning. Whether it warned (its other warnings of a wrong
    modality are then left unsaid).

    A CT of a head has much air at -1000 and most of the rest at soft tissue's values (fat, brain, CSF, scalp; bone
    above them). A low minimum alone is no CT: an MRI stored with an offset, or with a few negative outlier voxels
    (as some reconstructions write), has one and scores as the MRI it is."""
    air, tissue = _hounsfield_shares(sitk.GetArrayViewFromImage(image))
    if _ct_like(air, tissue):
        instead = ("this model is for T1 MRI and its scores will not be meaningful: give a T1-weighted MRI of the "
                   "head" if modality.upper() == "T1" else
                   f"this model's modality is {modality!r}: its scores are meaningful only on scans like its "
                   "training volumes (on a CT only if it was trained on CTs): give a scan of its modality")
        log.warning("%sThe intensities look like a CT in Hounsfield units (%.0f %% of the voxels at air's -1000, "
                    "%.0f %% of the others at soft tissue's -200 to 200); %s.", where, 100 * air, 100 * tissue, instead)
        return True
    return False


def _ct_like(air: float, tissue: float) -> bool:
    return air >= _CT_AIR_SHARE and tissue >= _CT_TISSUE_SHARE


def _hounsfield_shares(values: np.ndarray) -> Tuple[float, float]:
    """The share of (a strided sample of) the finite ``values`` within :data:`_CT_AIR` and, of those above it, the
    share within :data:`_CT_TISSUE`; (0, 0) where none reaches air (an MRI's values start at or near 0).

    One value holding most of the air band is padding, not air, and is left out: a CT's air is noisy (tens of HU
    about -1000), while converters and resampling tools fill an MRI's background with one constant (-1024, -1000).
    A CT's noisy air is still air where its scanner pads outside the field of view with -1024."""
    flat = values.ravel()
    sample = flat[:: max(1, flat.size // _CT_SAMPLES)]
    sample = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if sample.size == 0 or float(sample.min()) > _CT_AIR[1]:
        return 0.0, 0.0
    sample = sample.astype(np.float64)
    in_air = (sample >= _CT_AIR[0]) & (sample <= _CT_AIR[1])
    if in_air.any():
        median = np.median(sample[in_air])  # a value held by more than half of the air band is its median
        padding = sample == median
        if 2 * np.count_nonzero(padding) > np.count_nonzero(in_air):
            sample, in_air = sample[~padding], in_air[~padding]
    if sample.size == 0:
        return 0.0, 0.0
    body = sample[sample > _CT_AIR[1]]
    air = float(np.mean(in_air))
    tissue = float(np.mean((body >= _CT_TISSUE[0]) & (body <= _CT_TISSUE[1]))) if body.size else 0.0
    return air, tissue


_CT_AIR = (-1100.0, -900.0)  # HU: air (-1000) with a CT's noise
_CT_TISSUE = (-200.0, 200.0)  # HU: fat, CSF, brain, blood and scalp; bone lies above (700 to 2000 and more)
_CT_AIR_SHARE = 0.05  # a CT of a head holds at least this share of air around it
_CT_TISSUE_SHARE = 0.5  # and at least this share of the rest is soft tissue
_CT_SAMPLES = 1_000_000  # voxels sampled (strided): the shares of a big volume without copies of it


# the largest cosine between two voxel axes of a volume that is scored: ITK's NIfTI writer makes the directions
# orthogonal, by more than rounding beyond this (and says so), so outputs of a more sheared grid would not lie on it
_MAX_AXIS_COSINE = 1e-4
_MAX_AXIS_STRETCH = 1e-3  # how far from 1 a direction column's length may be (headers store them rounded)


def check_volume(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Refuse what the model cannot score: complex, not 3D, several components, a voxel size or an extent no head
    has, a single slice, too small, fewer than 4 slices. A vector image of one component (a (z, y, x, 1) array's) is
    taken as its scalar image."""
    if image.GetPixelID() in _COMPLEX:
        raise CeVAEError(f"The {what} has complex-valued voxels (raw or phase data); a magnitude MRI "
                         "volume is needed.")
    if image.GetNumberOfComponentsPerPixel() == 1 and image.GetPixelID() in _VECTORS:
        image = sitk.VectorIndexSelectionCast(image, 0)  # a (z, y, x, 1) array's image: its one channel
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CeVAEError(
            f"The {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(colour or vector image); a single-channel MRI volume is needed."
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        extra = " (a time series or multi-volume file: extract one volume first)" if dim == 4 else ""
        raise CeVAEError(f"The {what} is {dim}D{extra}; a 3D volume is needed.")
    axes = np.array(image.GetDirection()).reshape(3, 3)  # columns: the unit vectors of the voxel axes
    lengths = np.linalg.norm(axes, axis=0)
    if np.abs(lengths - 1.0).max() > _MAX_AXIS_STRETCH:  # (ITK multiplies them into the voxel size)
        i = int(np.argmax(np.abs(lengths - 1.0)))
        raise CeVAEError(f"The {what}'s direction matrix scales voxel axis {'ijk'[i]} by {lengths[i]:g} (a direction "
                         "holds unit vectors), so its voxels are not of the size its spacing says and volumes in mL "
                         "would be wrong. Write it with a unit direction and the voxel size in its spacing first.")
    cosines = np.abs(axes.T @ axes)
    np.fill_diagonal(cosines, 0.0)
    if cosines.max() > _MAX_AXIS_COSINE:
        i, j = np.unravel_index(int(np.argmax(cosines)), cosines.shape)
        angle = float(np.degrees(np.arccos(min(cosines[i, j], 1.0))))
        raise CeVAEError(f"The {what} has voxel axes that are not perpendicular (axes {'ijk'[i]} and {'ijk'[j]} meet "
                         f"at {angle:.{1 if angle < 89.9 else 3}f} degrees: a sheared grid), which the outputs could "
                         "not keep. Resample it onto a regular grid first.")
    spacing = image.GetSpacing()
    low, high = (np.float32(v) for v in _VOXEL_MM)  # as headers store them (NIfTI: 0.01 is 0.0099999998)
    if not all(low <= np.float32(s) <= high for s in spacing):
        raise CeVAEError(f"The {what} has voxels of {' x '.join(f'{s:g}' for s in spacing)} mm; an MRI of a head has "
                         f"voxels of {_VOXEL_MM[0]:g} to {_VOXEL_MM[1]:g} mm, so its header's voxel size is wrong "
                         "(or in other units). Fix the header first.")
    size = image.GetSize()
    extent = [n * s for n, s in zip(size, spacing)]
    if max(extent) > _FIELD_OF_VIEW_MM:
        i = int(np.argmax(extent))
        raise CeVAEError(f"The {what} spans {extent[i] / 1000:g} m along its {'ijk'[i]} axis ({size[i]} voxels of "
                         f"{spacing[i]:g} mm); an MRI of a head spans well under {_FIELD_OF_VIEW_MM / 1000:g} m, so "
                         "its header's voxel size is wrong (or in other units). Fix the header first.")
    shape = "x".join(map(str, size))
    if sorted(size)[1] >= 8 and min(size) == 1:
        raise CeVAEError(f"The {what} is a single slice ({shape} voxels); a 3D volume of the head is needed.")
    if min(sorted(size)[1:]) < 8:
        raise CeVAEError(f"The {what} is too small to analyse ({shape} voxels).")
    if min(size) < _MIN_SLICES:
        raise CeVAEError(f"The {what} has only {min(size)} voxels along one axis ({shape} voxels); at least "
                         f"{_MIN_SLICES} are needed to analyse it (the filters need them).")
    return image


_MIN_SLICES = 4  # fewer slices break ITK's shrink and recursive Gaussian filters
_VOXEL_MM = (0.01, 50.0)  # voxel sizes a head MRI can have, generously (beyond them the margins in mm take gigabytes)
_FIELD_OF_VIEW_MM = 1000.0  # along any axis; a larger extent made the automatic brain mask's 4 mm grid take gigabytes


def looks_like_an_image(values: np.ndarray) -> bool:
    """Whether the nonzero values of what should be a label image (a brain mask, a lesion mask) are an intensity
    image's or a score map's (a copy of the scan, swapped arguments), where "> 0" would take far more than the
    labels: more than :data:`MAX_LABELS` different values (counted on a strided sample) and no plateau. A mask
    resampled with linear interpolation has thousands of values too, at its edge, but most of its voxels hold
    (about) its top value."""
    values = np.asarray(values).ravel()
    values = values[(values != 0) & ~np.isnan(values)] if values.dtype.kind == "f" else values[values != 0]
    values = values[:: max(1, values.size // _DISTINCT_SAMPLES)]
    if values.size == 0 or len(np.unique(values)) <= MAX_LABELS:
        return False
    return np.count_nonzero(values >= 0.95 * values.max()) < values.size / 2  # no plateau near the top


MAX_LABELS = 1000  # label images hold one to hundreds of labels; an MRI or a score map thousands of values
_DISTINCT_SAMPLES = 2_000_000  # values sampled to count them (a strided sample keeps the count fast on big volumes)


def in_voxels(size: float, voxel: float) -> float:
    """``size / voxel`` to 9 decimals: a voxel size read one bit off (1.1999999999999997 mm for 1.2 mm, from Slicer's
    IJK-to-RAS matrix) must not move a length (the rim, the crop box, the plane search's bins) across a rounding tie
    (a 3 mm rim on 1.2 mm voxels: 2.5 voxels)."""
    return round(size / voxel, 9)


def voxel_volume_ml(image: sitk.Image) -> float:
    """The volume of one voxel of ``image`` in millilitres."""
    return float(np.prod(image.GetSpacing())) / 1000.0


def grid_difference(a: sitk.Image, b: sitk.Image, atol: float = 1e-4, rtol: float = 0.0) -> Optional[str]:
    """The first of "Size", "Spacing", "Origin", "Direction" that differs between the grids, or None."""
    for what in ("Size", "Spacing", "Origin", "Direction"):
        va, vb = getattr(a, f"Get{what}")(), getattr(b, f"Get{what}")()
        if len(va) != len(vb) or not np.allclose(va, vb, rtol=rtol, atol=atol):
            return what
    return None


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Same size, spacing, origin and direction (within ``tol``, plus numpy's default relative 1e-5): whether
    detection takes a mask on ``b``'s grid as on ``a``'s, or resamples it."""
    return grid_difference(a, b, atol=tol, rtol=1e-5) is None
