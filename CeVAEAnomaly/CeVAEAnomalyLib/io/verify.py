"""Checking that a freshly written file is complete before it is renamed into place.

Some writers do not report a short write: ITK's NIfTI writer prints an error and returns when the
disk is full or a file-size limit is reached, leaving a truncated file. Each check below reads
back what a reader would need (NIfTI and raw NRRD: the header's byte count; gzip: the whole stream
with its CRC; other images: a full read; bundles: the safetensors header's data extent).
"""
from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Optional

from .naming import full_suffix

_IMAGE_READBACK = (".nhdr", ".mha", ".mhd")
_NRRD = (".nrrd", ".seg.nrrd")
_NRRD_BYTES = {"float": 4, "double": 8, "uchar": 1, "unsigned char": 1, "uint8": 1, "signed char": 1, "int8": 1,
               "short": 2, "int16": 2, "ushort": 2, "unsigned short": 2, "uint16": 2, "int": 4, "int32": 4,
               "uint": 4, "unsigned int": 4, "uint32": 4, "longlong": 8, "int64": 8, "ulonglong": 8, "uint64": 8}
_SAFETENSORS = (".cevae", ".safetensors")


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
    """Decompress the whole stream (gzip checks its CRC and length); NIfTI: compare with the header."""
    total = 0
    head = b""
    try:
        with gzip.open(path, "rb") as fh:
            while True:
                block = fh.read(1 << 22)
                if not block:
                    break
                if len(head) < 540:
                    head += block[: 540 - len(head)]
                total += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        return f"the compressed stream is cut short ({exc})"
    if suffix.endswith(".nii.gz"):
        need = _nifti_bytes(head)
        if need is None:
            return "no valid NIfTI header"
        if total < need:
            return f"{total} of the {need} bytes its header announces"
    return None


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
    """A raw NRRD (its voxels attached, uncompressed: the Slicer worker's hand-over files) is complete when
    it holds the bytes its header announces, checked without reading the voxels; other NRRDs are read back."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD") or end < 0:
        return "no valid NRRD header"
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lower()
    itemsize = _NRRD_BYTES.get(fields.get("type", ""))
    plain = fields.get("encoding") == "raw" and not {"data file", "datafile", "line skip", "byte skip"} & set(fields)
    if not plain or itemsize is None or "sizes" not in fields:
        return _readback_reason(path)
    need = end + 2 + itemsize * math.prod(int(n) for n in fields["sizes"].split())
    return f"{size} of the {need} bytes its header announces" if size < need else None


def _readback_reason(path: Path) -> Optional[str]:
    import SimpleITK as sitk

    from .images import error_text

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
