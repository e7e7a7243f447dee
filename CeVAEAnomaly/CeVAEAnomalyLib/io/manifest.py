"""The one reader of CSV lists of files (train and calibrate manifests, batch lists, evaluation cases).

A list is UTF-8 (with or without the byte-order mark Excel writes; UTF-16 with its mark) and has a header row; file
columns hold paths relative to the CSV's folder (or absolute; backslashes, as Windows writes them, separate folders
on macOS and Linux too where only that names a file); cells are stripped; empty rows are
skipped; a row with cells but no key cell, or with more cells than the header, is refused; a column
named twice or a known column in other case is refused, other columns are reported as not read.
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import re
import unicodedata
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import COMMAND_LINE_SAME_PERSON, COMMAND_LINE_UNKNOWN_PERSONS, CeVAEError
from ..progress import Cancelled
from .images import refuse_image_as_mask
from .naming import APPLE_DOUBLE, RESOURCE_FORK, file_stem, subfolders_hint, table_delimiter

log = logging.getLogger(__name__)
_BIDS_FILE = re.compile(r"sub-([A-Za-z0-9]+)_")  # a BIDS file name starts with its subject: sub-01_ses-2_T1w.nii.gz
_BIDS_PREFIX = re.compile(r"^sub-(?=.)", re.IGNORECASE)  # a person label written as BIDS names the folder: sub-01


def distinct_names(images: Sequence[Path], name_of: Callable[[Path], str] = file_stem) -> Dict[Path, str]:
    """A name for each volume that tells it from the others: its file stem (``name_of``), led by as many of its
    folders as it takes where stems repeat (a BIDS layout's ``sub-01/anat/T1w.nii.gz`` and ``sub-02/anat/T1w.nii.gz``
    give ``sub-01/anat/T1w`` and ``sub-02/anat/T1w``)."""
    names: Dict[Path, str] = {}
    for image in dict.fromkeys(images):
        names[image] = name_of(image)
    for depth in range(1, 1 + max((len(Path(p).parts) for p in names), default=0)):
        repeated = {n for n, count in Counter(names.values()).items() if count > 1}
        if not repeated:
            break
        for image, name in names.items():
            if name in repeated:
                parts = Path(image).parent.parts[-depth:]
                names[image] = "/".join([*parts, name_of(image)])
    return names


def bids_person(image: Path) -> Optional[str]:
    """The person a BIDS file name says was scanned (``sub-01_ses-2_T1w.nii.gz``: ``01``); None for other names."""
    match = _BIDS_FILE.match(Path(image).name)
    return match.group(1) if match else None


def scan_group(person: Optional[str], scan: str) -> Tuple[str, str]:
    """The group of a scan of ``person`` (None or "": not known) that a split by person keeps on one side: the
    person's, else one of its own (``scan``: what tells it from the other scans, e.g. its path). A label is the
    same person with or without BIDS's ``sub-`` and in any case: a manifest's "sub-01" or "Sub-01" is a BIDS file
    name's "01"."""
    return ("person", _BIDS_PREFIX.sub("", person).casefold()) if person else ("image", scan)


def unknown_persons_note(subjects: Sequence[Subject], unknown: str = COMMAND_LINE_UNKNOWN_PERSONS,
                         same_person: str = COMMAND_LINE_SAME_PERSON) -> Optional[str]:
    """Where no one of several ``subjects`` has a known person, a sentence saying so: each volume is then taken for
    a person of its own, and a split by person cannot keep one person's sessions together. ``unknown``, ``same_person``:
    what would have named the person, and how to name one person's scans, in the caller's words (errors.Wording)."""
    if len(subjects) < 2 or any(s.group[0] == "person" for s in subjects):
        return None
    return (f"{unknown} says who was scanned, so each of the {len(subjects)} volumes is taken for a different person; "
            f"where some are scans of one person (sessions), {same_person} so that they are held out together.")


@dataclass(frozen=True)
class Subject:
    """One healthy volume, its optional brain mask and, if known, the person scanned (``person``: a manifest's
    ``subject`` column; else a BIDS file name's ``sub-<label>``); ``display_name``: what a model records it as and
    messages call it (e.g. the Slicer node's name of a copy), None: its file stem."""

    image: Path
    mask: Optional[Path] = None
    person: Optional[str] = None
    display_name: Optional[str] = None

    def __post_init__(self) -> None:
        for role in ("image", "mask"):  # text paths from a script become Paths
            value = getattr(self, role)
            if value is None and role == "mask":
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise CeVAEError(f"The scan's {role} must be a file path, got {type(value).__name__}.")
            object.__setattr__(self, role, Path(value))
        if self.display_name is not None and not (isinstance(self.display_name, str) and self.display_name):
            raise CeVAEError(f"The scan's display_name must be text or None, got {self.display_name!r}.")

    @property
    def name(self) -> str:
        return self.display_name or file_stem(self.image)

    @property
    def group(self) -> Tuple[str, str]:
        """What a split keeps on one side: the person scanned, where known; else this volume alone."""
        return scan_group(self.person or bids_person(self.image), str(self.image))

    @contextmanager
    def named_errors(self) -> Iterator[None]:
        """A CeVAEError in the block says which volume of a list it concerns: led by the image's path unless it
        names the image or mask already. A cancel passes unchanged."""
        try:
            yield
        except Cancelled:
            raise
        except CeVAEError as exc:
            if str(self.image) in str(exc) or (self.mask is not None and str(self.mask) in str(exc)):
                raise
            raise CeVAEError(f"{self.image}: {exc}") from None


def check_subjects(subjects: Sequence[Subject]) -> None:
    """Refuse a list of healthy scans holding something other than :class:`Subject` (e.g. a bare path)."""
    for s in subjects:
        if not isinstance(s, Subject):
            raise CeVAEError(f"The healthy scans must be Subject(image, mask) objects, got {type(s).__name__} "
                             "(Subject: from CeVAEAnomalyLib.io.manifest).")


@dataclass(frozen=True)
class Row:
    """One row of a list: its line in the CSV, its file columns as paths and its other cells."""

    line: int
    files: Dict[str, Optional[Path]]
    cells: Dict[str, str]


def read_rows(path: Path, key: str, files: Sequence[str], what: str, others: Sequence[str] = ()) -> List[Row]:
    """The rows of the CSV at ``path`` (tab-separated under a ``.tsv`` name, as the tables are written) that have a
    ``key`` cell; ``files`` are its path columns."""
    from .targets import refuse_unsearchable

    path = Path(path)
    refuse_unsearchable(path, what)
    if not path.is_file():
        raise CeVAEError(f"The {what} {path} does not exist." if not path.exists()
                         else f"The {what} {path} is not a file.")
    optional = [c for c in (*files, *others) if c != key]
    try:
        text = _list_text(path, what)
        if "\0" in text:  # (Python < 3.11's csv stops at it with its own words)
            raise CeVAEError(f"{path}, line {text.count(chr(10), 0, text.index(chr(0))) + 1}: a cell holds a NUL "
                             "byte; is this a CSV text file?")
        delimiter = table_delimiter(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = [f.strip() for f in reader.fieldnames or []]
        if key not in header:
            spelt = [c for c in header if c.lower() == key]
            if spelt:
                raise CeVAEError(f"The {what} {path} has a column {spelt[0]!r}; column names are lower case: {key!r}.")
            extra = f" (and optionally {', '.join(repr(c) for c in optional)})" if optional else ""
            raise CeVAEError(f"The {what} {path} needs a header row with the column {key!r}{extra}."
                             + _separator_hint(header, delimiter))
        _check_columns(header, (*files, *others), path, what)
        rows = []
        for raw in reader:
            line = reader.line_num  # the file's line (the reader skips blank lines; a row's count would not)
            if any(v.strip() for v in raw.get(None) or ()):  # DictReader puts cells beyond the header there
                raise CeVAEError(f"{path}, line {line}: the row has more cells than the header has columns; "
                                 "quote paths that hold commas, or add the missing column name.")
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
            if not row.get(key):
                if any(row.values()):  # not an empty line: a row that lost its key cell
                    raise CeVAEError(f"{path}, line {line}: the row has no {key!r}; fill it in or remove the row.")
                continue
            rows.append(Row(line, {c: _cell_path(path.parent, row[c]) if row.get(c) else None for c in files},
                            {c: row.get(c, "") for c in others}))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CeVAEError(f"The {what} {path} is not a readable CSV file ({exc}).") from None
    return rows


def _list_text(path: Path, what: str) -> str:
    """The text of a list: UTF-8 (a byte-order mark, as Excel's "CSV UTF-8" writes, dropped), or UTF-16 where its
    byte-order mark says so (Excel's "Unicode Text"). Other text (Excel's plain "CSV", in the system's code page) is
    refused naming the line of its first byte that is not UTF-8."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16")  # (the mark says the byte order and is dropped)
        control = next((c for c in text if c not in "\t\r\n" and unicodedata.category(c) == "Cc"), None)
        if control is not None or "\n" not in text:  # (a binary file that happens to start as a UTF-16 mark)
            held = "no line end" if control is None else f"the control character U+{ord(control):04X}"
            raise CeVAEError(f"The {what} {path} is not a readable CSV file (it starts with UTF-16's byte-order mark "
                             f"but holds {held}).")
        return text
    if _looks_like_utf16(raw):
        raise CeVAEError(f"The {what} {path} looks like UTF-16 text without a byte-order mark (a NUL byte between its "
                         "letters); save it as UTF-8 (\"CSV UTF-8\" in Excel).")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise CeVAEError(f"The {what} {path}, line {line}, is not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as "
                         "UTF-8 (\"CSV UTF-8\" in Excel).") from None


def _looks_like_utf16(raw: bytes) -> bool:
    """Whether ``raw`` has NUL bytes at every other byte, as UTF-16 text (LE or BE) of Latin letters without a
    byte-order mark has: at least three in four bytes of one parity are NUL, and none of the other."""
    halves = (raw[0::2], raw[1::2])
    return len(raw) >= 4 and any(4 * nul.count(0) >= 3 * len(nul) and 0 not in other
                                 for nul, other in (halves, halves[::-1]))


def _separator_hint(header: Sequence[str], delimiter: str) -> str:
    """A hint when a one-column header holds another separator than ``delimiter`` (a spreadsheet saved with ';' or
    tabs; a list named .tsv written with commas)."""
    names = {",": "commas", ";": "semicolons", "\t": "tabs"}
    if len(header) == 1:
        for sep in names:
            if sep != delimiter and sep in header[0]:
                rename = f", or name the file {'.csv' if sep == ',' else '.tsv'}" if sep in ",\t" else ""
                return f" Its columns are separated by {names[sep]}; separate them with {names[delimiter]}{rename}."
    return ""


def _check_columns(header: Sequence[str], known: Sequence[str], path: Path, what: str) -> None:
    """Refuse a column named twice, or a known column spelt in other case (``GT`` for ``gt``: its cells would be
    lost); warn about columns that are not read."""
    by_lower = {c.lower(): c for c in known}
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise CeVAEError(f"The {what} {path} names the column(s) {', '.join(repr(c) for c in repeated)} more than "
                         "once; which one counts would be a guess.")
    unread = [c for c in header if c and c not in known]
    for c in unread:
        if c.lower() in by_lower:
            raise CeVAEError(f"The {what} {path} has a column {c!r}; column names are lower case: "
                             f"{by_lower[c.lower()]!r}.")
    if unread:
        log.warning("The %s %s has column(s) %s that are not read (it reads %s).", what, path,
                    ", ".join(repr(c) for c in unread), ", ".join(repr(c) for c in known))


def _cell_path(folder: Path, cell: str) -> Path:
    """A path cell of a list in ``folder``. On macOS and Linux, one written on Windows (``scans\\h1.nii.gz``) names
    the file with its backslashes taken for folder separators where only that names one."""
    path = folder / cell
    if os.sep == "/" and "\\" in cell and not os.path.lexists(path):
        slashed = folder / cell.replace("\\", "/")
        if os.path.lexists(slashed):
            return slashed
    return path


def read_manifest(path: Path) -> List[Subject]:
    """Subjects from a CSV with columns ``image,mask`` and optionally ``subject`` (mask may be empty; paths relative
    to the CSV; ``subject`` names the person scanned, so that a split keeps a person's scans on one side).

    Every row's files are checked (:func:`check_volume_path`) before any is used; a problem names its line.
    """
    rows = read_rows(path, "image", ("image", "mask"), "manifest", others=("subject",))
    if not rows:
        raise CeVAEError(f"The manifest {path} lists no images.")
    for r in rows:
        for column, what in (("image", "image"), ("mask", "brain mask")):
            check_volume_path(r.files[column], what, f"{path}, line {r.line}: ")
        refuse_image_as_mask(r.files["image"], r.files["mask"], f"{path}, line {r.line}: ")
    return [Subject(r.files["image"], r.files["mask"], r.cells["subject"] or None)  # type: ignore[arg-type]
            for r in rows]


def check_volume_path(path: Optional[Path], what: str, where: str = "") -> None:
    """Refuse (naming ``where``, e.g. a manifest line) a volume path that is missing, a special file, an
    empty or unreadable file, a macOS resource fork, or a folder without files (a DICOM series folder is accepted)."""
    from .targets import refuse_missing_volume

    if path is None:
        return
    refuse_missing_volume(path, what, where)
    lead = f"{where}the {what}" if where else f"The {what}"
    try:
        if path.is_dir():
            if not any(p.is_file() for p in path.iterdir()):
                hint = subfolders_hint(path, "give the folder of each series") or \
                    "; give an image file or a folder holding one DICOM series"
                raise CeVAEError(f"{lead} {path} is a folder without files{hint}.")
        elif path.stat().st_size == 0:
            raise CeVAEError(f"{lead} {path} is empty.")
        else:
            with open(path, "rb") as fh:
                if fh.read(len(APPLE_DOUBLE)) == APPLE_DOUBLE:
                    raise CeVAEError(f"{lead} {path} is {RESOURCE_FORK}.")
    except OSError as exc:
        raise CeVAEError(f"{lead} {path} cannot be read ({exc.strerror or exc}).") from None
