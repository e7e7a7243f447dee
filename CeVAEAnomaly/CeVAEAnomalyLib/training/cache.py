"""The on-disk slice cache: each subject preprocessed once, read back one slice at a time.

An entry is one subject in one orientation: ``<key>.npy`` (float32 [N,S,S], plain NumPy) and
``<key>.json`` (what it was made from, and the sha256 of the slices), written in that order,
each atomically, so an entry whose JSON exists is complete. The key is ``s<SLICING_VERSION>-<hash>``, the hash of
the cache format, the slicing version, the preprocessing settings, the orientation and the sha256 of the image and
mask files: a changed file or setting gets a new key, and a stale entry is never read. Entries of slicing versions up
to 5 were named by the hash alone; those of the current version are still read under that name (one found damaged
is made again under the new name and removed). Entries of another
slicing version (known by name, no file read) are never used: a run says once how many there are, how much space
they take and how to remove them. It does not remove them itself: a run of an older version may share the folder
and read them at any time (a training reads its entries for hours). The first time a run
uses an entry, its JSON must describe that key and its slices must match their checksum, so an
entry damaged in place (same size, other bytes) or swapped with another subject's is made again.
Runs that share a memo (an adaptation's folds) check an entry once while its files stay unchanged
(io.checksum.FileMemo: same inode, size, modification and status-change time).
Entries of several cohorts and settings can share one folder. A write killed outright (SIGKILL, the
out-of-memory killer, a power cut) leaves a hidden temporary beside its entry; temporaries untouched for
an hour are removed when a run next prepares the folder (an entry is written in seconds).

Batches are read with a seek and a read per slice, not memory-mapped: mapped pages of a random
walk over the cohort stay in the process's resident memory, reads do not (docs/SCALING.md).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import stat
import tempfile
import time
import tokenize
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from ..engine.config import PreprocessConfig
from ..errors import COMMAND_LINE_TRAIN, CeVAEError, Wording, full_disk
from ..io.atomic import atomic_path, machine_tag
from ..io.checksum import FileMemo, refuse_changed
from ..io.targets import file_in_the_way, write_remedy
from ..progress import Cancelled, ProgressCallback, report
from ..system import process_exists
from .data import Subject, subject_slices, voxel_checksums

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: the JSON holds the slices' sha256
# The version of what slices a volume gives (engine/preprocess.py, engine/brainmask.py, training/data.py): part of
# every entry's key, so an upgrade that changes them never reuses slices made before. Raise it with any such
# change; the recorded digest of those files (Testing/Python/slicing_sources.json) makes the tests ask.
# 2: the automatic brain mask's rules for skull-stripped brains and partial head coverage.
# 3: the automatic brain mask made in one voxel order (LPS), whatever the order a scan is stored in.
# 4: the automatic brain mask's registration also starts shifted along the head.
# 5: the crop box's side in voxels is rounded through io.images.in_voxels (a voxel size one bit off, as Slicer's
#    IJK-to-RAS matrix gives, no longer crosses a rounding tie: at 3.2 or 0.64 mm it moved the box by a voxel).
SLICING_VERSION = 5
_UNNAMED_UP_TO = 5  # entries of slicing versions up to this one were named by their hash alone, without "s<V>-"
_NAMED = re.compile(r"s([0-9]{1,9})-[0-9a-f]{32}\.(?:npy|json)")  # an entry's file, of slicing version \1
_UNNAMED = re.compile(r"[0-9a-f]{32}\.(?:npy|json)")  # an entry's file of a slicing version up to _UNNAMED_UP_TO
_OTHER_VERSIONS_SAID: Set[str] = set()  # cache folders whose entries of other slicing versions this process named
_OPEN_FILES = 64  # open .npy files kept per process (least recently used are closed)
# an entry's temporary, as io.atomic.temp_beside names it: .KEY.npy.xxxxxxxx-MACHINE-PID.npy (or .json; older
# versions named no machine and process, nor the slicing version in KEY)
_ORPHAN = re.compile(r"\.(?:s[0-9]{1,9}-)?[0-9a-f]{32}\.(npy|json)\.[0-9a-f]{8}(?:-[0-9a-f]{8}-[0-9]{1,10})?\.\1")
_ORPHAN_AGE_S = 3600.0
_UNREAD_SAID = 10  # volumes that could not be read, named in one error (a missing template fails them all)


@dataclass(frozen=True)
class Entry:
    """One subject's slices in one orientation, complete on disk."""

    path: Path  # the .npy file
    slices: int
    offset: int  # byte offset of the first slice in the file
    slices_sha256: str = ""  # of the slices' bytes, as its JSON records it


def entry_key(pre: PreprocessConfig, orientation: str, image_sha256: str, mask_sha256: Optional[str]) -> str:
    """``s<SLICING_VERSION>-`` and the hash of everything the cached slices depend on."""
    ident = {"format": CACHE_FORMAT, "slicing": SLICING_VERSION, "preprocess": pre.to_dict(),
             "orientation": orientation, "image_sha256": image_sha256, "mask_sha256": mask_sha256}
    return f"s{SLICING_VERSION}-{_key_of(ident)}"


def _key_of(ident: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _data_sha256(fh: BinaryIO, offset: int) -> str:
    """sha256 of the bytes of an open file from ``offset`` to its end (the slices of a .npy file)."""
    digest = hashlib.sha256()
    fh.seek(offset)
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def temporary_folder(wording: Wording = COMMAND_LINE_TRAIN) -> Path:
    """The system's temporary folder, where a run without a cache folder keeps its slices; a CeVAEError saying what
    to do (``wording``) where none can be written (a full disk or quota: Python finds no usable one)."""
    try:
        return Path(tempfile.gettempdir())
    except OSError as exc:
        raise CeVAEError(f"The slice cache needs a temporary folder, and none can be written: {exc.strerror or exc} "
                         f"(a full disk or a used-up quota?). {wording.cache_room}.") from None


def temporary_cache(prefix: str, wording: Wording = COMMAND_LINE_TRAIN) -> Path:
    """A new private cache folder in the system's temporary folder, named after this process, machine and process-id
    namespace (``<prefix><pid>@<host>@<machine_tag>@xxxx``); folders of that prefix of this machine and namespace
    whose process is gone (killed before it could remove its own) are removed first, so that killed runs do not fill
    the disk with copies of their slices. Another machine's (a temporary folder shared by the nodes of a cluster) and
    another container's (its process ids mean nothing here) are never touched, nor those of earlier versions (named
    without a namespace), another user's, or a symbolic link."""
    host = socket.gethostname().replace("@", "_").replace(os.sep, "_") or "host"
    tag = machine_tag()
    root = temporary_folder(wording)
    for folder in root.glob(f"{glob.escape(prefix)}*@{glob.escape(host)}@{tag}@*"):
        pid, owner, owner_tag, _ = (folder.name[len(prefix):].split("@", 3) + ["", "", ""])[:4]
        ours = owner == host and owner_tag == tag and pid.isascii() and pid.isdigit()
        if ours and int(pid) != os.getpid() and _own_folder(folder) and not process_exists(int(pid)):
            log.info("Removing %s, the slice cache of a run that ended without removing it.", folder)
            shutil.rmtree(folder, ignore_errors=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}@{host}@{tag}@", dir=root))
    except OSError as exc:
        raise CeVAEError(f"Could not make the slice cache folder in {root}: "
                         f"{exc.strerror or exc}. {wording.cache_room}.") from None


def _own_folder(folder: Path) -> bool:
    """Whether ``folder`` is a folder of this user (not a symbolic link to one)."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _this_users(st)


def _this_users(st: os.stat_result) -> bool:
    """Whether the file of ``st`` belongs to this user (on systems without user ids: yes)."""
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


class UnreadVolumes(CeVAEError):
    """The volumes of a list that could not be read for their slices (``problems``: each one's error, naming it), said
    together once every other volume of the list is prepared (``others``: what was done with the others): a cohort's
    damaged scans all at once, not one a run."""

    def __init__(self, problems: Sequence[str], volumes: int, others: str = "the others were prepared") -> None:
        self.problems, self.volumes, self.others = list(problems), volumes, others
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
            return
        said = self.problems[:_UNREAD_SAID]
        more = len(self.problems) - len(said)
        none = "Neither" if volumes == 2 else "None"  # (all of them: no others to speak of)
        head = (f"{len(self.problems)} of the {volumes} volumes could not be read ({others})"
                if len(self.problems) < volumes else f"{none} of the {volumes} volumes could be read")
        super().__init__(f"{head}: "
                         + " ".join(said) + (f" ... and {more} more." if more else ""))

    def __reduce__(self) -> tuple:  # (a copy sent to another process keeps its list)
        return UnreadVolumes, (self.problems, self.volumes, self.others)

    def joined(self, other: "UnreadVolumes") -> "UnreadVolumes":
        """These and ``other``'s, of both lists of volumes."""
        return UnreadVolumes([*self.problems, *other.problems], self.volumes + other.volumes, self.others)


def voxel_checksums_or_errors(images: Sequence[Path],
                              checksums: Dict[Path, str]) -> Tuple[Dict[Path, str], Dict[Path, str]]:
    """:func:`~.data.voxel_checksums` of each image (once), and the error of each that could not be read, by image
    (it keeps its file sha256 from ``checksums`` among the first), led by the image's path unless it names it (as
    :meth:`~..io.manifest.Subject.named_errors` does): every damaged scan of a list is found, not the first one
    alone."""
    voxels: Dict[Path, str] = {}
    unread: Dict[Path, str] = {}
    for image in dict.fromkeys(images):
        try:
            voxels.update(voxel_checksums([image], checksums))
        except CeVAEError as exc:
            voxels[image] = checksums[image]
            unread[image] = str(exc) if str(image) in str(exc) else f"{image}: {exc}"
    return voxels, unread


def refuse_cache_among_inputs(root: Path, subjects: Sequence[Subject], wording: Wording = COMMAND_LINE_TRAIN) -> None:
    """Refuse a cache folder in an input DICOM series folder (its entries would change the series' checksum, so they
    would never be found again, and a resumed training would see another volume), and one that is the folder of an
    input scan or mask (its entries would be written among the user's files), as batch refuses an --out-dir that is
    its input folder. A subfolder there is a folder of its own (a folder of scans is not searched below itself)."""
    folder = root.resolve()
    for s in subjects:
        for path, what in ((s.image, "scan"), (s.mask, "mask")):
            if path is None:
                continue
            if path.is_dir() and (folder == path.resolve() or path.resolve() in folder.parents):
                raise CeVAEError(f"The cache folder {root} lies in the input series folder {path}; "
                                 f"give {wording.cache_dir} a folder outside it.")
            if folder == Path(os.path.abspath(path)).parent.resolve():
                raise CeVAEError(f"The cache folder {root} is the folder of the input {what} {path}: its entries "
                                 f"would be written among the input files; give {wording.cache_dir} a folder of its "
                                 "own.")


class SliceCache:
    """A cache folder; ``prepare`` fills in what is missing and returns the entries in subject order. ``wording``: the
    caller's words for what to do where the cache's disk is full, and for its cache folder option. ``memo``: the one
    that hashed the volumes (adapt's, shared by its runs), which checks that a volume read for its slices is still
    the one hashed, and keeps which entries were checked (an entry unchanged since is not read again)."""

    def __init__(self, root: Path, pre: PreprocessConfig, wording: Wording = COMMAND_LINE_TRAIN,
                 memo: Optional[FileMemo] = None) -> None:
        file = file_in_the_way(root)
        if file == root:
            raise CeVAEError(f"The cache folder {root} is a file; give a folder for {wording.cache_dir}.")
        if file is not None:
            raise CeVAEError(f"The cache folder {root} would be under {file}, which is a file, not a folder.")
        self.root = root
        self.pre = pre
        self.wording = wording
        self.memo = memo if memo is not None else FileMemo()
        self._damaged: Set[str] = set()  # entries named by their hash alone found damaged: removed once made again

    def refuse_inside_inputs(self, subjects: Sequence[Subject]) -> None:
        """:func:`refuse_cache_among_inputs` for this folder."""
        refuse_cache_among_inputs(self.root, subjects, self.wording)

    def remove_orphans(self) -> int:
        """Remove the temporaries of entry writes that were killed (untouched for an hour); return how many."""
        removed, freed, cutoff = 0, 0, time.time() - _ORPHAN_AGE_S
        try:
            with os.scandir(self.root) as listing:
                candidates = [e for e in listing if _ORPHAN.fullmatch(e.name)]
        except OSError:  # no folder yet, or unreadable: nothing to tidy
            return 0
        for entry in candidates:
            try:
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and st.st_mtime < cutoff:
                    os.remove(entry.path)
                    removed, freed = removed + 1, freed + st.st_size
            except OSError:  # removed by another run meanwhile, or not ours to remove
                continue
        if removed:
            log.info("Slice cache %s: removed %d temporary file(s) of interrupted writes (%.1f MiB).", self.root,
                     removed, freed / 2**20)
        return removed

    def say_other_versions(self) -> None:
        """Say once per process and folder how many entries of other slicing versions it holds (known by name: the
        folder is listed, no entry read), the space they take and how to remove them. Only this user's plain files
        are counted (not symbolic links); nothing is removed (an older version's run may read them)."""
        said = str(self.root.absolute())
        if said in _OTHER_VERSIONS_SAID:
            return
        files: Dict[str, int] = {}
        versions: Set[str] = set()
        try:
            with os.scandir(self.root) as listing:
                for item in listing:
                    named = _NAMED.fullmatch(item.name)
                    if named is not None and int(named.group(1)) != SLICING_VERSION:
                        version = named.group(1)
                    elif named is None and SLICING_VERSION > _UNNAMED_UP_TO and _UNNAMED.fullmatch(item.name):
                        version = ""
                    else:
                        continue
                    st = item.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and _this_users(st):
                        files[item.name] = st.st_size
                        versions.add(version)
        except OSError:  # no folder yet, or unreadable, or a file removed meanwhile: nothing to say
            return
        entries = len({name.rsplit(".", 1)[0] for name in files})
        if entries:
            _OTHER_VERSIONS_SAID.add(said)
            folder = shlex.quote(str(self.root))
            ordered = sorted(versions, key=lambda v: (int(v), 1) if v else (_UNNAMED_UP_TO, 0))  # 9 before 10
            stems = [f"s{v}-*" if v else "?" * 32 for v in ordered]
            log.warning("Slice cache %s: %d entries (%.1f MB) were prepared by another version of CeVAEAnomaly "
                        "(slicing version %s) and are not used by this one. Once no run of that version uses the "
                        "folder, remove them with: rm %s", self.root, entries, sum(files.values()) / 1e6,
                        ", ".join(v or f"{_UNNAMED_UP_TO} or earlier" for v in ordered),
                        " ".join(f"{folder}/{stem}.{ext}" for stem in stems for ext in ("npy", "json")))

    def lookup(self, key: str) -> Optional[Entry]:
        """The complete entry stored under ``key``, or None (missing or damaged: it is made again).

        The entry's content is checked against the checksum in its JSON unless the memo checked it with its files
        unchanged since. An entry named by its hash alone (as versions up to slicing version 5 named them) is read
        where the named one is missing.
        """
        for stem in (key, _hash_of(key)):
            meta_path, npy = self.root / f"{stem}.json", self.root / f"{stem}.npy"
            if meta_path.is_file() and npy.is_file():  # else missing, or not a plain file (a FIFO is never opened)
                break
        else:
            return None
        entry = self._checked(key, meta_path, npy)
        if entry is None and stem != key:
            self._damaged.add(stem)
        return entry

    def _checked(self, key: str, meta_path: Path, npy: Path) -> Optional[Entry]:
        """The entry of ``key`` in ``meta_path`` and ``npy`` (:meth:`lookup`), or None where incomplete or damaged."""
        stamp = self.memo.stamp((meta_path, npy))  # before either is read
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with open(npy, "rb") as fh:
                shape, offset = _npy_layout(fh)
                expected = (meta["slices"], self.pre.input_size, self.pre.input_size)
                complete = os.path.getsize(npy) == offset + 4 * int(np.prod(shape))
                if shape != expected or not complete:
                    log.warning("The cache entry %s is incomplete; it is made again.", npy)
                    return None
                if self.memo.recall(("slices", npy), stamp) is None:
                    problem = self._mismatch(key, meta, fh, offset)
                    if problem:
                        log.warning("The cache entry %s %s (damaged or replaced); it is made again.", npy, problem)
                        return None
                digest = str(meta["slices_sha256"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("The cache entry %s is damaged (%s); it is made again.", npy, type(exc).__name__
                        if isinstance(exc, RecursionError) else exc)
            return None
        self.memo.keep(("slices", npy), stamp, True)
        return Entry(npy, shape[0], offset, digest)

    @staticmethod
    def _mismatch(key: str, meta: Dict[str, object], fh: BinaryIO, offset: int) -> str:
        """What is wrong with an entry's content ("" if nothing): its JSON must describe ``key`` and its
        slices must match the checksum the JSON holds."""
        ident = {k: meta[k] for k in ("format", "slicing", "preprocess", "orientation", "image_sha256",
                                      "mask_sha256")}
        if _key_of(ident) != _hash_of(key):
            return "describes another subject or setting"
        if _data_sha256(fh, offset) != meta["slices_sha256"]:
            return "does not match its checksum"
        return ""

    def prepare(self, subjects: Sequence[Subject], checksums: Dict[Path, str], orientations: Sequence[str],
                progress: Optional[ProgressCallback] = None) -> List[List[Entry]]:
        """Per subject, its entries in ``orientations`` order; missing ones are preprocessed now. Volumes that cannot
        be read are refused together (:class:`UnreadVolumes`) once the others are prepared."""
        self.refuse_inside_inputs(subjects)
        self.remove_orphans()
        self.say_other_versions()
        out: List[List[Entry]] = []
        made = 0
        unread: List[str] = []
        for n, s in enumerate(subjects):
            try:
                entries, new = self.entries_for(s, checksums, orientations)
                out.append(entries)
                made += new
            except Unreadable as exc:
                unread.append(str(exc))
            report(progress, (n + 1) / max(1, len(subjects)), f"prepared {n + 1} of {len(subjects)} volumes")
        if unread:
            raise UnreadVolumes(unread, len(subjects))
        if subjects:
            log.info("Slice cache %s: %d volume(s) preprocessed now, %d found ready.", self.root, made,
                     len(subjects) - made)
        return out

    def entries_for(self, subject: Subject, checksums: Dict[Path, str],
                    orientations: Sequence[str]) -> Tuple[List[Entry], bool]:
        """The subject's entries in ``orientations`` order, and whether any had to be made now."""
        keys = [self.key(subject, checksums, o) for o in orientations]
        found = [self.lookup(k) for k in keys]
        missing = [o for o, e in zip(orientations, found) if e is None]
        if not missing:
            return [e for e in found if e is not None], False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CeVAEError(f"Cannot make the slice cache folder {self.root} ({exc.strerror or exc}); give "
                             f"{self.wording.cache_dir} a folder you can write to.") from None
        try:
            # (reading the image too: a cohort's files may share a name, BIDS's T1w.nii.gz)
            with subject.named_errors():
                arrays = dict(zip(missing, subject_slices(subject, self.pre, missing)))
        except Cancelled:
            raise
        except CeVAEError as exc:
            raise Unreadable(str(exc)) from None
        # hashed before it was read: the slices are of it
        refuse_changed((subject.image, subject.mask), checksums, memo=self.memo)
        return [e if e is not None else self._store(k, subject, o, arrays[o], checksums)
                for k, o, e in zip(keys, orientations, found)], True

    def key(self, subject: Subject, checksums: Dict[Path, str], orientation: str) -> str:
        mask_sha = checksums[subject.mask] if subject.mask is not None else None
        return entry_key(self.pre, orientation, checksums[subject.image], mask_sha)

    def _store(self, key: str, subject: Subject, orientation: str, slices: np.ndarray,
               checksums: Dict[Path, str]) -> Entry:
        npy = self.root / f"{key}.npy"
        meta = {"format": CACHE_FORMAT, "slicing": SLICING_VERSION, "subject": subject.name,
                "image": str(subject.image),
                "mask": str(subject.mask) if subject.mask else None, "orientation": orientation,
                "image_sha256": checksums[subject.image],
                "mask_sha256": checksums[subject.mask] if subject.mask else None,
                "preprocess": self.pre.to_dict(), "slices": int(len(slices)),
                "slices_sha256": hashlib.sha256(np.ascontiguousarray(slices, "<f4").tobytes()).hexdigest()}
        text = json.dumps(meta, indent=1)
        target, size = npy, slices.nbytes
        try:
            with atomic_path(npy) as tmp:
                with open(tmp, "wb") as fh:  # the data through Python's write: a failure keeps the system's errno
                    data = np.ascontiguousarray(slices)  # (a quota, a size limit), which NumPy's own write drops
                    np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(data))
                    fh.write(data)
            target, size = self.root / f"{key}.json", len(text.encode())
            with atomic_path(target) as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CeVAEError(write_failure(target, exc, size, self.wording)) from None
        entry = self.lookup(key)
        if entry is None:
            raise CeVAEError(f"The slice cache entry {npy} could not be read back after writing it.")
        self._remove_damaged(_hash_of(key), npy)
        return entry

    def _remove_damaged(self, stem: str, made: Path) -> None:
        """Remove the entry named by its hash alone ``stem`` where :meth:`lookup` found it damaged: it is ``made``
        again under its named key, which is read first, so it would stay on disk for ever (its JSON goes first: an
        .npy alone is no entry)."""
        if stem not in self._damaged:
            return
        self._damaged.discard(stem)
        for ext in ("json", "npy"):
            try:
                (self.root / f"{stem}.{ext}").unlink()
            except FileNotFoundError:  # removed meanwhile
                continue
            except OSError as exc:
                log.warning("The damaged cache entry %s could not be removed (%s); remove it (it is made again as "
                            "%s).", self.root / f"{stem}.npy", exc.strerror or exc, made)
                return
        log.info("The damaged cache entry %s is removed (made again as %s).", self.root / f"{stem}.npy", made.name)


def _hash_of(key: str) -> str:
    """The hash of an entry's key (without its ``s<SLICING_VERSION>-``), the name of the entry up to version 5."""
    return key.rsplit("-", 1)[-1]


class Unreadable(CeVAEError):
    """A volume whose slices could not be made (:meth:`SliceCache.entries_for`), its error naming it."""


def write_failure(target: Path, exc: OSError, size: int, wording: Wording = COMMAND_LINE_TRAIN) -> str:
    """The error for a cache entry ``target`` of about ``size`` bytes whose write failed with ``exc``, with what to do
    (:func:`~..io.targets.write_remedy`, or another cache folder). A full disk or quota is said in those words, with
    what to do in ``wording``: errno ENOSPC or EDQUOT, or a write that failed without an errno (NumPy's short write
    says only 'N requested and M written') where the folder has less free space than the entry needs (the part written
    is removed by then)."""
    folder = target.parent
    try:
        free: Optional[int] = shutil.disk_usage(folder).free
    except OSError:
        free = None
    short = free is not None and free < size
    if not (full_disk(exc) or (exc.errno is None and short)):
        return (f"Could not write the slice cache entry {target}: {exc.strerror or exc}. "
                f"{write_remedy(exc, folder)}, or give {wording.cache_dir} another folder.")
    if exc.errno == getattr(errno, "EDQUOT", None):
        cause = f"your disk quota on {folder} is used up"
    else:
        room = f" ({free / 1e6:.3g} MB free, the entry needs {size / 1e6:.3g} MB)" if short else ""
        cause = f"the disk holding {folder} is full{room}"  # (out of inodes: full without the sizes)
    return f"Could not write the slice cache entry {target}: {cause}. {wording.cache_room}."


def _npy_layout(fh: BinaryIO) -> tuple:
    """(shape, data offset) of a float32 C-order .npy file open at its start."""
    version = np.lib.format.read_magic(fh)
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (tokenize.TokenError, SyntaxError) as exc:  # numpy reads the header with Python's tokenizer
        raise ValueError(f"unreadable .npy header ({type(exc).__name__})") from None
    if fortran or dtype != np.dtype("<f4"):
        raise ValueError("not a little-endian float32 C-order array")
    return tuple(shape), fh.tell()


class SliceSet(torch.utils.data.Dataset):
    """The slices of a list of entries as one indexable set; ``set[indices]`` is a batch [B,1,S,S].

    Holds only the entry list and offsets in memory; files are opened lazily in each process
    (DataLoader workers included), a bounded number at a time. ``wording``: the caller's words for how to resume where
    the files are removed or cut short under the run.
    """

    def __init__(self, entries: Sequence[Entry], size: int, wording: Wording = COMMAND_LINE_TRAIN) -> None:
        self.entries = list(entries)
        self.size = size
        self.wording = wording
        self.ends = np.cumsum([e.slices for e in self.entries], dtype=np.int64)
        self._files: "OrderedDict[int, BinaryIO]" = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor:
        return self.read(indices)

    def read(self, indices: Sequence[int], half_widths: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Slices ``indices`` as a batch [B,1,S,S]; with ``half_widths``, slice i is the mean of its entry's
        slices within ``half_widths[i]`` of it (a thick slab; cut at the ends of the subject's stack)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"slice index out of range 0..{len(self) - 1}")
        half = np.zeros(len(idx), np.int64) if half_widths is None else np.asarray(half_widths, np.int64).reshape(-1)
        which = np.searchsorted(self.ends, idx, side="right")
        counts = np.asarray([self.entries[w].slices for w in which], dtype=np.int64)
        local = idx - (self.ends[which] - counts)
        first, last = np.maximum(local - half, 0), np.minimum(local + half, counts - 1)
        out = np.empty((len(idx), self.size, self.size), np.float32)
        nbytes = self.size * self.size * 4
        for k, (w, a, b) in enumerate(zip(which.tolist(), first.tolist(), last.tolist())):
            slab = out[k] if a == b else np.empty((b - a + 1, self.size, self.size), np.float32)
            fh = self._file(w)
            fh.seek(self.entries[w].offset + a * nbytes)
            if fh.readinto(memoryview(slab).cast("B")) != slab.nbytes:
                raise CeVAEError(f"The slice cache file {self.entries[w].path} is truncated (changed while this run "
                                 "read it). A new run prepares it anew; to go on from the last checkpoint, "
                                 f"{self.wording.resume}.")
            if a != b:
                slab.mean(axis=0, out=out[k])
        return torch.from_numpy(out)[:, None]

    def _file(self, w: int) -> BinaryIO:
        if self._pid != os.getpid():  # in a forked worker: never share the parent's file offsets
            self._files = OrderedDict()
            self._pid = os.getpid()
        fh = self._files.pop(w, None)
        if fh is None:
            try:
                fh = open(self.entries[w].path, "rb")
            except FileNotFoundError:
                raise CeVAEError(f"The prepared slices {self.entries[w].path} were removed while this run read them "
                                 "(was the slice cache deleted?). Delete a cache only while no run uses it. A new run "
                                 "prepares them anew; to go on from the last checkpoint, "
                                 f"{self.wording.resume}.") from None
            if len(self._files) >= _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files[w] = fh
        return fh

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __getstate__(self) -> dict:  # workers started by spawn open their own files
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state
