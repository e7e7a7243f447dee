"""Checking that a freshly written file is complete before it is renamed into place.

Some writers do not report a short write: ITK's NIfTI writer prints an error and returns when the
disk is full or a file-size limit is reached, leaving a truncated file; ITK's NRRD writer leaves a gzip stream
without its last bytes, which its reader does not miss. Each check below reads what tells a whole file: NIfTI and
raw NRRD, the header's byte count; gzip (.nii.gz, gzip NRRD), the whole stream to its end, with its CRC and length,
and the header's byte count; other images, a full read; bundles, the safetensors header's data extent.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

from .naming import full_suffix

_IMAGE_READBACK = (".nhdr", ".mha", ".mhd")
_NRRD = (".nrrd", ".seg.nrrd")
_NRRD_BYTES = {"float": 4, "double": 8, "uchar": 1, "unsigned char": 1, "uint8": 1, "signed char": 1, "int8": 1,
               "short": 2, "int16": 2, "ushort": 2, "unsigned short": 2, "uint16": 2, "int": 4, "int32": 4,
               "uint": 4, "unsigned int": 4, "uint32": 4, "longlong": 8, "int64": 8, "ulonglong": 8, "uint64": 8}
_NRRD_GZIP = ("gzip", "gz")
_SAFETENSORS = (".cevae", ".safetensors")
_CHUNK = 1 << 22  # bytes read, and decompressed, at a time
_HEADER_CHUNK = 1 << 16  # bytes of a NRRD header read at a time
_CUT_SHORT = (EOFError, OSError, zlib.error)  # what reading a gzip stream that is cut short or damaged raises


def incomplete_reason(path: Path, kind: Path, expected_bytes: Optional[int] = None) -> Optional[str]:
    """Why the file at ``path`` (written as a file named like ``kind``) is incomplete; None if it is whole."""
    suffix = full_suffix(kind).lower()
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        return f"{size} of {expected_bytes} bytes written"
    if suffix.endswith(".gz"):
        return _gzip_reason(path, suffix)
    if suffix == ".nii":
        return _nifti_reason(path, size)
    if suffix in _NRRD:
        return _nrrd_reason(path, size)
    if suffix in _IMAGE_READBACK:
        return _readback_reason(path)
    if suffix in _SAFETENSORS:
        return _safetensors_reason(path, size)
    return None


def _gzip_reason(path: Path, suffix: str) -> Optional[str]:
    """Decompress the whole stream (:func:`_inflated`); NIfTI: compare with the header."""
    try:
        total, head = _inflated(path, keep=540)
    except _CUT_SHORT as exc:
        return f"the compressed stream is cut short ({exc})"
    if suffix.endswith(".nii.gz"):
        need = _nifti_bytes(head)
        if need is None:
            return "no valid NIfTI header"
        if total < need:
            return f"{total} of the {need} bytes its header announces"
    return None


def _inflated(path: Path, start: int = 0, keep: int = 0) -> Tuple[int, bytes]:
    """How many bytes the gzip data that starts ``start`` bytes into ``path`` holds, and its first ``keep``,
    decompressed to the end of each member (gzip: one or more), whose CRC and length zlib checks there.

    Raises EOFError where the data stops before an end, zlib.error where it is damaged."""
    total, head = 0, b""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(_CHUNK)
        if not data:
            raise EOFError("no compressed data")
        while data:
            stream = zlib.decompressobj(wbits=31)  # 31: a gzip member
            while not stream.eof:
                block = stream.decompress(data, _CHUNK) if data else stream.flush()
                head += block[: max(keep - len(head), 0)]
                total += len(block)
                if not data and not stream.eof:
                    raise EOFError("the file ends before the compressed data does")
                data = stream.unconsumed_tail or (b"" if stream.eof else fh.read(_CHUNK))
            data = stream.unused_data or fh.read(_CHUNK)
    return total, head


def _nifti_reason(path: Path, size: int) -> Optional[str]:
    with open(path, "rb") as fh:
        need = _nifti_bytes(fh.read(540))
    if need is None:
        return "no valid NIfTI header"
    return f"{size} of the {need} bytes its header announces" if size < need else None


def _nifti_bytes(header: bytes) -> Optional[int]:
    """Bytes a NIfTI-1/-2 file with this header holds (header, extensions, voxels); None if no header."""
    from .images import nifti_layout_of_header

    layout = nifti_layout_of_header(header, gz=False)
    return None if layout is None else layout.size


def _nrrd_reason(path: Path, size: int) -> Optional[str]:
    """A NRRD with its voxels attached is complete when it holds the bytes its header announces: raw (the Slicer
    worker's hand-over files), checked from its size without reading the voxels; gzip (detect's and the Slicer
    script's outputs), decompressed to the end of the stream. Other NRRDs are read back."""
    head = _nrrd_header(path)
    if head is None:
        return "no valid NRRD header"
    end = len(head)
    fields = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lower()
    itemsize = _NRRD_BYTES.get(fields.get("type", ""))
    attached = not {"data file", "datafile", "line skip", "byte skip"} & set(fields)
    encoding = fields.get("encoding")
    if not attached or encoding not in ("raw", *_NRRD_GZIP) or itemsize is None or "sizes" not in fields:
        return _readback_reason(path)
    sizes = fields["sizes"].split()
    if not all(n.isascii() and n.isdigit() for n in sizes) or fields.get("dimension") != str(len(sizes)):
        return "no valid NRRD header"  # (a foreign or damaged file: a reader refuses sizes its dimension does not)
    voxel_bytes = itemsize * math.prod(int(n) for n in sizes)
    if encoding in _NRRD_GZIP:
        try:
            held = _inflated(path, start=end + 2)[0]
        except _CUT_SHORT as exc:
            return f"the compressed stream is cut short ({exc})"
        return f"{held} of the {voxel_bytes} voxel bytes its header announces" if held < voxel_bytes else None
    need = end + 2 + voxel_bytes
    return f"{size} of the {need} bytes its header announces" if size < need else None


def _nrrd_header(path: Path) -> Optional[bytes]:
    """The header of the NRRD file at ``path``, up to the blank line that ends it, however long it is (Slicer puts
    each segment's name, colour and tags of a segmentation there); None where the file is not NRRD or no header
    ends before its text does (a NUL byte) or the file does."""
    head = bytearray()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HEADER_CHUNK), b""):
            start = max(len(head) - 1, 0)  # a blank line may straddle two chunks
            head += chunk
            end = head.find(b"\n\n", start)
            if end >= 0:
                return bytes(head[:end]) if head.startswith(b"NRRD") else None
            if not head.startswith(b"NRRD") or b"\0" in chunk:
                return None
    return None


def _readback_reason(path: Path) -> Optional[str]:
    import SimpleITK as sitk

    from .headers import error_text

    try:
        sitk.ReadImage(str(path))
    except RuntimeError as exc:
        return f"it does not read back: {error_text(exc)}"
    return None


def _safetensors_reason(path: Path, size: int) -> Optional[str]:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensors' bytes."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return "no header"
        n = struct.unpack("<Q", raw)[0]
        if n > size:
            return "header cut short"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "header cut short"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    return f"{size} of {need} bytes written" if size < need else None
