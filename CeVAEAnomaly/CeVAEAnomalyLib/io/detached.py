"""The files that reading a volume file also opens: the data files a detached header names (MetaImage
``ElementDataFile``, NRRD ``data file``) and the other half of an Analyze/NIfTI ``.hdr``/``.img`` pair.

A header may name one file, a ``LIST`` of files (one a line, to the end of the header) or a ``printf``
pattern with first, last and step (``slice%03d.raw 1 120 1``); a pattern is kept as a rule, never
expanded, so a range of millions costs nothing.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

_HEAD_BYTES = 65536  # where the data file's field is looked for
_LIST_BYTES = 64 << 20  # a LIST header longer than this protects its whole folder instead
_KEYS = {".mhd": ("elementdatafile", "="), ".mha": ("elementdatafile", "="),
         ".nhdr": ("data file", ":"), ".nrrd": ("data file", ":")}
_PAIRS = ((".hdr", (".img", ".img.gz")), (".img", (".hdr",)), (".hdr.gz", (".img.gz",)),
          (".img.gz", (".hdr.gz", ".hdr")))  # an Analyze/NIfTI pair: name ending -> the other half's
PAIR_ENDINGS = tuple(ending for ending, _ in _PAIRS)  # the names of a pair's halves (lower case)
_INTEGER_FIELD = re.compile(r"%0?\d*d")


@dataclass(frozen=True)
class NumberedFiles:
    """The files ``fmt % k`` in ``folder`` for k in ``numbers``."""

    folder: Path
    fmt: str
    numbers: range

    def holds(self, path: Path) -> bool:
        """Whether ``path`` (resolved) is one of these files."""
        if path.parent != self.folder:
            return False
        head, tail = _INTEGER_FIELD.split(self.fmt)
        match = re.fullmatch(re.escape(head) + r"([+-]?\d+)" + re.escape(tail), path.name)
        if match is None:
            return False
        k = int(match.group(1))
        return k in self.numbers and self.fmt % k == path.name


@dataclass
class Alongside:
    """What reading a volume file also opens: ``files``, ``numbered`` ranges and, where the header names more
    than can be told, its whole ``folder``."""

    files: List[Path] = field(default_factory=list)
    numbered: List[NumberedFiles] = field(default_factory=list)
    folder: Optional[Path] = None


def read_alongside(path: Path) -> Alongside:
    """What reading the volume file ``path`` also opens (nothing for a name that is not a regular file: a FIFO
    is never opened here)."""
    out = Alongside()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return out
    except OSError:
        return out
    name = path.name.lower()
    for ending, others in _PAIRS:
        if name.endswith(ending):
            stem = path.name[: -len(ending)]
            out.files += [path.parent / (stem + o) for o in others] + [path.parent / (stem + o.upper()) for o in others]
    key = _KEYS.get(path.suffix.lower())
    if key is not None:
        _header_data(path, *key, out)
    return out


def _header_data(path: Path, want: str, sep: str, out: Alongside) -> None:
    try:
        with open(path, "rb") as fh:
            lines = fh.read(_HEAD_BYTES).decode("latin-1").splitlines()
    except OSError:
        return
    for i, line in enumerate(lines):
        key, found, value = line.partition(sep)
        if not found or key.strip().lower() not in (want, "datafile"):
            continue
        words = value.split()
        if not words or words[0].upper() == "LOCAL":
            return
        if words[0].upper() == "LIST":
            _listed(path, i, out)
        elif "%" in words[0]:
            _numbered(path, words, out)
        else:
            out.files.append(path.parent / value.strip())
        return


def _listed(path: Path, line: int, out: Alongside) -> None:
    """The names after the ``LIST`` line, to the end of the header (a detached header holds no voxels)."""
    try:
        if os.stat(path).st_size > _LIST_BYTES:
            out.folder = path.parent
            return
        lines = path.read_bytes().decode("latin-1").splitlines()
    except OSError:
        out.folder = path.parent
        return
    out.files += [path.parent / w.strip() for w in lines[line + 1:] if w.strip()]


def _numbered(path: Path, words: List[str], out: Alongside) -> None:
    """A ``printf`` pattern with first, last and step; a form not understood protects the whole folder."""
    fmt = words[0]
    try:
        first, last = int(words[1]), int(words[2])
        step = int(words[3]) if len(words) > 3 else 1
    except (IndexError, ValueError):
        out.folder = path.parent
        return
    if step == 0 or fmt.count("%") != 1 or len(_INTEGER_FIELD.findall(fmt)) != 1:
        out.folder = path.parent
        return
    folder = path.parent / Path(fmt).parent
    out.numbered.append(NumberedFiles(folder, Path(fmt).name, range(first, last + (1 if step > 0 else -1), step)))
