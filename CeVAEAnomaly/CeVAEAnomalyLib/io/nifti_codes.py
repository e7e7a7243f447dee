"""The qform and sform codes of NIfTI outputs: read from a NIfTI input's header and written in place of the (1, 1)
ITK always writes."""
from __future__ import annotations

import contextlib
import gzip
import os
import struct
from pathlib import Path
from typing import BinaryIO, Optional, Tuple

import SimpleITK as sitk

from .atomic import temp_beside
from .headers import NIFTI_MAGIC, first_bytes, pair_files
from .images import PathLike


def nifti_codes(path: PathLike) -> Optional[Tuple[int, int]]:
    """(qform_code, sform_code) of a NIfTI-1/-2 volume's header (a .nii/.nii.gz file, or either half of an .hdr/.img
    pair): the space its grid is in (1 scanner, 2 aligned, 3 Talairach, 4 MNI; both 0: none, a grid from the voxel
    size alone, which ITK reads as LPS from the origin and nibabel and FSL as LAS about the centre, so the outputs say
    none either); None for another format (an Analyze 7.5 pair too), or where they are ITK's own (1, 1)."""
    p = Path(path)
    pair = pair_files(p) if p.is_file() else None
    single = pair is None and p.name.lower().endswith((".nii", ".nii.gz"))
    start = first_bytes(pair[0] if pair else p) if pair or single else None
    found = _code_fields(start[1], pair is not None) if start is not None else None
    if found is None:
        return None
    at, fmt = found
    codes = tuple(int(v) for v in struct.unpack(fmt, start[1][at : at + struct.calcsize(fmt)]))
    return (codes[0], codes[1]) if codes != (1, 1) else None


def _code_fields(header: bytes, pair: bool = False) -> Optional[Tuple[int, str]]:
    """Where a NIfTI-1/-2 header (of a single file; ``pair``: of an .hdr/.img pair) holds its qform and sform codes,
    and their struct format."""
    for (size, at), magic in NIFTI_MAGIC.items():
        magic = magic.replace(b"+", b"i") if pair else magic  # (a pair's header says "ni1", "ni2")
        for endian in "<>":
            if header[at : at + 4] == magic and len(header) >= size and \
                    struct.unpack(endian + "i", header[:4])[0] == size:
                return (252, endian + "2h") if size == 348 else (344, endian + "2i")
    return None


def write_image(image: sitk.Image, path: str, codes: Optional[Tuple[int, int]], target: Path) -> None:
    """Write ``image`` to ``path`` (a temporary of ``target``), compressed where the format can be; a NIfTI file with
    the qform and sform codes ``codes`` (:func:`nifti_codes` of the scan) in place of the (1, 1), scanner space, that
    ITK always writes: an input registered to MNI space stays in MNI space for FSL and AFNI (the grid is ITK's either
    way)."""
    sitk.WriteImage(image, path, True)
    if codes is None or not path.lower().endswith((".nii", ".nii.gz")):
        return
    p = Path(path)
    gz = first_bytes(p, 2)
    if gz is None or not gz[0]:
        with open(p, "r+b") as fh:
            _put_codes(fh, codes)
        return
    rewritten = temp_beside(target)  # the header is in the compressed stream: the file is copied with the new codes
    # (into another temporary of the target, which a later run removes if this one is killed meanwhile)
    try:
        with gzip.open(p, "rb") as src, open(rewritten, "wb") as raw:
            with gzip.GzipFile("", "wb", 6, raw, mtime=0) as dst:  # (no file name in its header, as ITK writes)
                header = bytearray(src.read(540))
                found = _code_fields(bytes(header))
                if found is not None:
                    at, fmt = found
                    header[at : at + struct.calcsize(fmt)] = struct.pack(fmt, *codes)
                dst.write(bytes(header))
                while True:
                    block = src.read(1 << 22)
                    if not block:
                        break
                    dst.write(block)
        os.replace(rewritten, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(rewritten)


def _put_codes(fh: BinaryIO, codes: Tuple[int, int]) -> None:
    """Set the codes in the header of an uncompressed NIfTI file open for update."""
    found = _code_fields(fh.read(540))
    if found is not None:
        at, fmt = found
        fh.seek(at)
        fh.write(struct.pack(fmt, *codes))
