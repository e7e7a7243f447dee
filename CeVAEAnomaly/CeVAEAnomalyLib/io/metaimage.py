"""MetaImage (.mha, .mhd) completeness: voxel data or a compressed stream shorter than its header announces is refused
before ITK reads it; and the voxel bytes any header ITK has read announces."""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import CeVAEError
from .detached import read_alongside


def declared_bytes(reader: sitk.ImageFileReader) -> Optional[int]:
    """The bytes of the voxels whose header ``reader`` has read; None where ITK cannot tell (an unknown pixel type)."""
    try:
        voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
        return int(np.prod(reader.GetSize(), dtype=object)) * sitk.GetArrayViewFromImage(voxel).nbytes
    except (RuntimeError, ValueError, TypeError):
        return None


def check_metaimage_complete(p: Path, what: str, reader: sitk.ImageFileReader) -> None:
    """Refuse a MetaImage whose voxel data hold fewer bytes than its header announces, or whose zlib or gzip stream
    (CompressedData = True) is cut short or corrupt: without a CompressedDataSize line ITK printed 'Uncompress failed'
    and returned the image, its missing voxels zeros or garbage; otherwise MetaIO printed two raw lines before the
    read failed. A compressed stream is decompressed in steps, its output counted and dropped (0.09 s for a 256^3
    int16 volume, 0.2 s float32); of uncompressed data only the size is looked at. Other files, data in several
    files and headers with a HeaderSize are left to the reader. ``reader`` has read ``p``'s header."""
    found = _metaimage_fields(p)
    if found is None:
        return
    fields, start = found
    if fields["HeaderSize"] != "0":
        return
    compressed = fields["CompressedData"].startswith(("T", "t", "1"))
    data, holder = p, "its compressed data" if compressed else "its voxel data"
    if fields["ElementDataFile"].upper() != "LOCAL":
        alongside = read_alongside(p)
        if alongside.numbered or alongside.folder is not None or len(alongside.files) != 1:
            return
        data, start, holder = alongside.files[0], 0, f"its data file {alongside.files[0]}"
    declared = declared_bytes(reader)
    if declared is None or not data.is_file():
        return
    if not compressed:
        have = data.stat().st_size - start
        if have < declared:
            raise CeVAEError(f"The {what} file {p} is truncated or corrupt ({holder} holds {have} of the {declared} "
                             "bytes its header announces); copy or export it again.")
        return
    budget = int(fields["CompressedDataSize"]) if fields["CompressedDataSize"].isdigit() else 0
    have, whole = _inflated_size(data, start, budget or None)
    if not whole or have < declared:
        ends = "ends" if whole is not None else "is corrupt"
        raise CeVAEError(f"The {what} file {p} is truncated or corrupt ({holder} {ends} after {have} of the "
                         f"{declared} bytes its header announces); copy or export it again.")


_METAIMAGE_KEYS = ("CompressedData", "CompressedDataSize", "HeaderSize", "BinaryData", "ElementDataFile")


def _metaimage_fields(p: Path) -> Optional[Tuple[Dict[str, str], int]]:
    """The fields of a MetaImage header that say where its voxels are and how they are stored (their text, "" where
    absent, HeaderSize "0"), and where the data of a LOCAL one begin; None for another file, or one whose header
    has no ElementDataFile line in its first :data:`_METAIMAGE_HEADER_BYTES` or stores its voxels as text."""
    if p.suffix.lower() not in (".mha", ".mhd"):
        return None
    try:
        with open(p, "rb") as fh:
            head = fh.read(_METAIMAGE_HEADER_BYTES)
    except OSError:
        return None
    fields = dict.fromkeys(_METAIMAGE_KEYS, "")
    fields["HeaderSize"] = "0"
    at = 0
    while True:
        end = head.find(b"\n", at)
        if end < 0:
            return None
        key, sep, value = head[at:end].decode("latin-1").partition("=")
        at = end + 1
        if sep and key.strip() in fields:
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return None if fields["BinaryData"].startswith(("F", "f", "0")) else (fields, at)


_METAIMAGE_HEADER_BYTES = 1 << 20  # where a MetaImage header's ElementDataFile line is looked for


def _inflated_size(p: Path, start: int, budget: Optional[int]) -> Tuple[int, Optional[bool]]:
    """The bytes the zlib or gzip stream in ``p`` from ``start`` (at most ``budget`` bytes of it, as MetaIO reads)
    decompresses to, and whether it reached its end (None: it is corrupt)."""
    have, pending, left = 0, b"", budget
    inflate = zlib.decompressobj(47)  # a zlib or a gzip header, as MetaIO takes
    with open(p, "rb") as fh:
        fh.seek(start)
        while not inflate.eof:
            if not pending:
                pending = fh.read(1 << 20 if left is None else min(1 << 20, left))
                if not pending:
                    break
                left = None if left is None else left - len(pending)
            try:
                have += len(inflate.decompress(pending, 1 << 20))
            except zlib.error:
                return have, None
            pending = inflate.unconsumed_tail
    return have, inflate.eof
