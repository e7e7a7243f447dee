"""File checksums (training provenance in bundles, sample-data verification, the slice cache's keys)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB blocks; of a folder (a DICOM series), of its files' names
    and contents in name order (the files directly in it, as the series reader sees them). OSError for
    anything else (never opened)."""
    digest = hashlib.sha256()
    path = Path(path)
    if not path.is_dir() and not path.is_file():  # missing, or a FIFO/device/socket: opening one may block forever
        raise OSError(f"{path} is not a regular file or a folder")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f is not path:
            digest.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
