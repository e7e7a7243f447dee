"""Atomic file creation: write beside the target under a hidden name, then rename into place.

An interrupted write never leaves a partial file under the final name. Files get the usual
permissions (0666 minus the umask), not the private mode of temporary files.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


_MULTI_SUFFIXES = (".seg.nrrd", ".seg.nii.gz", ".nii.gz")


def full_suffix(path: Path) -> str:
    """The file type suffix that writers go by (".seg.nrrd", ".nii.gz", ".nrrd", ...)."""
    return next((ext for ext in _MULTI_SUFFIXES if path.name.endswith(ext)), path.suffix)


def temp_beside(target: Path) -> str:
    """An empty hidden file in the target's folder, with the target's extension (for writers)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=full_suffix(target), dir=target.parent)
    os.close(fd)
    return tmp


def publish(tmp: str, target: Path) -> None:
    """Give ``tmp`` normal permissions and rename it onto ``target``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` as UTF-8 exactly as given: no newline translation (CSV rows keep their ``\\r\\n``).

    ``open(newline="")`` rather than ``Path.write_text(newline=...)``, which needs Python 3.10.
    """
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


@contextmanager
def atomic_path(target: Path) -> Iterator[str]:
    """Yield a temporary path; if the block succeeds it replaces ``target``, else it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        yield tmp
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
