"""A volume file's first bytes (gzip or not, the NIfTI magic), the halves of an .hdr/.img pair, ITK's warnings
silenced while a header is read, and the informative line of ITK's errors: the low-level helpers of reading and writing
volumes."""
from __future__ import annotations

import contextlib
import gzip
import re
import zlib
from pathlib import Path
from typing import Iterator, Optional, Tuple

import SimpleITK as sitk

from .detached import PAIR_ENDINGS, read_alongside

GZIP_MAGIC = b"\x1f\x8b"
NIFTI_MAGIC = {(348, 344): b"n+1\0", (540, 4): b"n+2\0"}  # (header size, magic offset) -> single-file magic


def first_bytes(p: Path, count: int = 540) -> Optional[Tuple[bool, bytes]]:
    """Whether the file at ``p`` is gzip-compressed (by its first bytes), and its first ``count`` bytes (decompressed);
    None where they cannot be read (a NIfTI-2 header is 540 bytes)."""
    try:
        with open(p, "rb") as fh:
            gz = fh.read(2) == GZIP_MAGIC
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as fh:
            return gz, fh.read(count)
    except (EOFError, OSError, zlib.error):
        return None


def pair_files(p: Path) -> Optional[Tuple[Path, Path]]:
    """The header and data file of the .hdr/.img pair (NIfTI-1 or Analyze 7.5) that ``p`` is a half of, in any
    case (SCAN.HDR, SCAN.IMG) and either gzipped; None if ``p`` is not named as one or its other half is missing
    (the image reader names it)."""
    lower = p.name.lower()
    if not lower.endswith(PAIR_ENDINGS):
        return None
    other = next((f for f in read_alongside(p).files if f.is_file()), None)
    if other is None:
        return None
    return (p, other) if lower.endswith((".hdr", ".hdr.gz")) else (other, p)


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """ITK's own warnings silenced (they are printed over several lines; what they warn of is checked by the caller)."""
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def header_reader(p: Path) -> Optional[sitk.ImageFileReader]:
    """A reader that has read the header of the volume file ``p`` (ITK's warnings silenced); None where ITK cannot
    read it (the read then says what is wrong)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def error_text(exc: BaseException) -> str:
    """The informative line of an ITK/SimpleITK error message, without location prefixes."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:"):
            return ln.split(":", 1)[1].strip()
    # "Reason: <errno text>" after an ITK error is a stale system error, not the cause
    useful = [ln for ln in lines if not ln.startswith(("Exception thrown in", "Reason:"))] or lines
    if not useful:
        return type(exc).__name__
    return re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: )", "", useful[-1])
