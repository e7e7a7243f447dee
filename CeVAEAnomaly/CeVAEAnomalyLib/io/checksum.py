"""File checksums (training provenance in bundles, sample-data verification, the slice cache's keys)."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..errors import CeVAEError
from .detached import read_alongside

if TYPE_CHECKING:
    import SimpleITK as sitk

# A file changed this recently (its modification or status-change time) may change again without changing its stamp
# (timestamps are as coarse as the file system's clock: FAT's 2 s), so what was read from it is not kept.
SETTLE_NS = 2_000_000_000
Stamp = Tuple[Tuple[str, int, int, int, int, int], ...]


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB blocks; of a folder (a DICOM series), of its files' names
    and contents in name order (the files directly in it, as the series reader sees them). A detached header
    (MetaImage ``.mhd``, NRRD ``.nhdr``, an Analyze/NIfTI ``.hdr``/``.img`` pair) is hashed with the data files
    reading it opens (io/detached.py), each after its name: the checksum identifies the volume, not the header
    alone. OSError for anything else (never opened)."""
    digest = hashlib.sha256()
    path = Path(path)
    for f in hashed_files(path):
        if f is not path:
            digest.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def hashed_files(path: Path) -> List[Path]:
    """The files :func:`sha256_of` reads for ``path``, in its order: the files directly in a folder, or the file and
    the data files its header names. OSError for anything else than a regular file or a folder (never opened)."""
    if not path.is_dir() and not path.is_file():  # missing, or a FIFO/device/socket: opening one may block forever
        raise OSError(f"{path} is not a regular file or a folder")
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path, *_data_files(path)]


class FileMemo:
    """What this process learnt by reading files (a checksum, a check of their content), kept under a key with the
    files' stamp taken before the read, and recalled only while their stamp is the same: a file replaced, written
    or touched since (another inode, size, modification or status-change time) is read again. Files changed within
    :data:`SETTLE_NS` of the read are not kept (a change within the same clock tick keeps the stamp). In memory only:
    one command's runs share it (adapt's folds), nothing is trusted across processes."""

    def __init__(self) -> None:
        self._kept: Dict[Hashable, Tuple[Stamp, object]] = {}

    @staticmethod
    def stamp(files: Sequence[Path]) -> Optional[Stamp]:
        """The stamp of ``files`` now (take it before reading them); None where one cannot be found or has changed
        too recently to be told from a later change."""
        settled_before = time.time_ns() - SETTLE_NS
        stamps = []
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                return None
            if max(st.st_mtime_ns, st.st_ctime_ns) > settled_before:
                return None
            stamps.append((str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    def recall(self, key: Hashable, stamp: Optional[Stamp]) -> Optional[object]:
        """What was kept under ``key`` with this ``stamp``; None if nothing (or the files changed since)."""
        kept = self._kept.get(key)
        return kept[1] if stamp is not None and kept is not None and kept[0] == stamp else None

    def keep(self, key: Hashable, stamp: Optional[Stamp], value: object) -> None:
        """Keep ``value``, read from files of ``stamp`` (taken before the read; None: nothing is kept)."""
        if stamp is None:
            self._kept.pop(key, None)
        else:
            self._kept[key] = (stamp, value)

    def sha256(self, path: Path) -> str:
        """:func:`sha256_of` ``path``, read again only where its files changed since this memo last hashed them."""
        path = Path(path)
        files = hashed_files(path)
        stamp = self.stamp([path, *files] if path.is_dir() else files)  # (a folder: files added, removed, renamed)
        digest = self.recall(("sha256", path), stamp)
        if not isinstance(digest, str):
            digest = sha256_of(path)
            self.keep(("sha256", path), stamp, digest)
        return digest


def sha256_by(path: Path, memo: Optional[FileMemo] = None) -> str:
    """:func:`sha256_of` ``path``, through ``memo`` where given (a file unchanged since it hashed it is not read
    again)."""
    return memo.sha256(path) if memo is not None else sha256_of(path)


def refuse_changed(paths: Iterable[Optional[Path]], checksums: Mapping[Path, str],
                   then: str = "run again once it is complete.", memo: Optional[FileMemo] = None) -> None:
    """Refuse, in one line, a file of ``paths`` (None: none) whose content is no longer the one ``checksums`` holds,
    hashed before it was read: what was read from it may not be that content (the file was replaced, removed or
    still being written), so nothing made from it may be recorded under that checksum. ``then``: what to do.
    ``memo``: the one that hashed them (a file unchanged since is not read again)."""
    changed = first_changed(paths, checksums, memo)
    if changed is not None:
        raise changed_while_read(changed, then)


def changed_while_read(changed: Path, then: str) -> CeVAEError:
    """The one-line refusal of :func:`refuse_changed` for the file ``changed``; ``then``: what to do."""
    return CeVAEError(f"{changed} changed while it was being read (replaced or still being written); {then}")


def first_changed(paths: Iterable[Optional[Path]], checksums: Mapping[Path, str],
                  memo: Optional[FileMemo] = None) -> Optional[Path]:
    """The first file of ``paths`` (None: none) whose content is no longer the one ``checksums`` holds, or that can
    no longer be read (removed, no longer a file); None where there is none. ``memo``: see :func:`refuse_changed`."""
    for path in paths:
        if path is None:
            continue
        try:
            if sha256_by(path, memo) != checksums[path]:
                return path
        except OSError:
            return path
    return None


def voxel_sha256(path: Path) -> str:
    """Hex sha256 of the volume ``path`` holds: :func:`image_voxel_sha256` of the image it reads as, whatever the file
    format or compression (the same scan saved as .nii.gz and .nrrd gives one digest; its files' :func:`sha256_of`
    differ)."""
    from .images import read_image

    return image_voxel_sha256(read_image(path))


def image_voxel_sha256(image: sitk.Image) -> str:
    """Hex sha256 of an image's voxels (pixel type and values) and grid (size; spacing, origin and direction rounded
    to 0.0001, -0.0 as 0.0): one digest for one scan in memory or in any file (:func:`voxel_sha256`). The voxels are
    hashed where they lie (no copy)."""
    import numpy as np
    import SimpleITK as sitk

    digest = hashlib.sha256()
    digest.update(repr((image.GetSize(), image.GetPixelIDTypeAsString())).encode())
    grid = np.round(np.array([*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection()]), 4) + 0.0
    digest.update(grid.tobytes())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).data)  # (a view: already contiguous)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """Hex sha256 of the scan ``path`` holds in one canonical form: its voxel values as float32 in LPS orientation,
    with its grid's size and spacing (rounded to 0.001 mm). Format, compression, pixel type, origin and axis order do
    not count: the same scan saved again elsewhere (an NRRD copy of a NIfTI, Slicer's copy of a volume loaded from
    it) gives one digest, which a model records of each training volume (:meth:`~..engine.header.BundleHeader.
    trained_scans`)."""
    import numpy as np
    import SimpleITK as sitk

    from .images import read_image

    image = sitk.Cast(sitk.DICOMOrient(read_image(path), "LPS"), sitk.sitkFloat32)  # (kept: the view is its memory)
    digest = hashlib.sha256()
    digest.update(repr((image.GetSize(), tuple(round(s, 3) for s in image.GetSpacing()))).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


def content_checksums(images: Iterable[Path], checksums: Mapping[Path, str],
                      memo: Optional[FileMemo] = None) -> Dict[Path, Optional[str]]:
    """:func:`content_sha256` of each of ``images`` whose file still holds the content ``checksums`` gives (None for
    one changed, removed or unreadable since: its record keeps its file sha256 alone). ``memo``: see
    :func:`refuse_changed`."""
    out: Dict[Path, Optional[str]] = {}
    for image in images:
        try:
            content: Optional[str] = content_sha256(image)
        except (OSError, CeVAEError):
            content = None
        out[image] = None if first_changed([image], checksums, memo) is not None else content
    return out


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
