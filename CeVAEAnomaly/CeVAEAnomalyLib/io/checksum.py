"""File checksums (training provenance in bundles, sample-data verification, the slice cache's keys)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator, List, Mapping, Optional, Tuple

from ..errors import CeVAEError
from .detached import read_alongside


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB blocks; of a folder (a DICOM series), of its files' names
    and contents in name order (the files directly in it, as the series reader sees them). A detached header
    (MetaImage ``.mhd``, NRRD ``.nhdr``, an Analyze/NIfTI ``.hdr``/``.img`` pair) is hashed with the data files
    reading it opens (io/detached.py), each after its name: the checksum identifies the volume, not the header
    alone. OSError for anything else (never opened)."""
    digest = hashlib.sha256()
    path = Path(path)
    if not path.is_dir() and not path.is_file():  # missing, or a FIFO/device/socket: opening one may block forever
        raise OSError(f"{path} is not a regular file or a folder")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path, *_data_files(path)]
    for f in files:
        if f is not path:
            digest.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def refuse_changed(paths: Iterable[Optional[Path]], checksums: Mapping[Path, str],
                   then: str = "run again once it is complete.") -> None:
    """Refuse, in one line, a file of ``paths`` (None: none) whose content is no longer the one ``checksums`` holds,
    hashed before it was read: what was read from it may not be that content (the file was replaced, removed or
    still being written), so nothing made from it may be recorded under that checksum. ``then``: what to do."""
    for path in paths:
        if path is None:
            continue
        try:
            same = sha256_of(path) == checksums[path]
        except OSError:
            same = False
        if not same:
            raise CeVAEError(f"{path} changed while it was being read (replaced or still being written); {then}")


def voxel_sha256(path: Path) -> str:
    """Hex sha256 of the volume ``path`` holds: its voxels (type and values) and grid, whatever the file format or
    compression (the same scan saved as .nii.gz and .nrrd gives one digest; its files' :func:`sha256_of` differ)."""
    import numpy as np
    import SimpleITK as sitk

    from .images import read_image

    image = read_image(path)
    digest = hashlib.sha256()
    digest.update(repr((image.GetSize(), image.GetPixelIDTypeAsString())).encode())
    digest.update(np.round(np.array([*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection()]), 4).tobytes())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


def _data_files(path: Path) -> List[Path]:
    """The existing regular files that reading the volume file ``path`` also opens, once each (by file identity:
    on a case-insensitive file system ``x.img`` and ``x.IMG`` are one file), in a fixed order."""
    seen, out = {_identity(path)}, []
    for f in _alongside(path):
        if f.is_file() and _identity(f) not in seen:
            seen.add(_identity(f))
            out.append(f)
    return out


def _identity(path: Path) -> Tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _alongside(path: Path) -> Iterator[Path]:
    found = read_alongside(path)
    yield from found.files
    for numbered in found.numbered:  # the files of the pattern that exist (one listing, whatever its range)
        try:
            yield from sorted(p for p in numbered.folder.iterdir() if numbered.holds(p))
        except OSError:
            continue
    if found.folder is not None:  # a header naming more than can be told: every file beside it
        yield from sorted(p for p in found.folder.iterdir() if p.is_file())
