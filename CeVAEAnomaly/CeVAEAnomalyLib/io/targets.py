"""Where outputs may go: never onto an input, under a file, over a device, FIFO or socket, or over a file
without overwrite; and only under names the file system can hold.

"Onto an input" covers every way to name one file: the same path, a path that resolves to it
(``..``, symbolic links) and a hard link to it (the same inode); it also covers the files an input
reads besides itself (the data file of a detached header) and anything inside an input folder (a
DICOM series).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ..errors import CeVAEError, full_disk
from .detached import NumberedFiles, read_alongside
from .naming import UNICODE_TWINS, full_suffix, one_form


def special_file_kind(p: Path) -> Optional[str]:
    """What ``p`` is if it exists but is neither a regular file nor a folder ("a named pipe (FIFO)", ...)."""
    mode = os.stat(p).st_mode
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def resolved(path: Path) -> Path:
    """``path`` with links and ``..`` resolved as far as they can be (a symbolic-link loop stays as it is)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop (Python < 3.13)
        return Path(os.path.abspath(path))


def refuse_unsearchable(path: Path, what: str, where: str = "") -> None:
    """Refuse a path the system cannot look up at all: a name too long, a loop of symbolic links, a NUL byte.

    ``where`` (e.g. "list.csv, line 4: ") leads the message.
    """
    lead = f"{where}the {what}" if where else f"The {what}"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            raise CeVAEError(f"{lead} {_shortened(path)} cannot be opened: {exc.strerror.lower()}.") from None
    except ValueError:  # a NUL byte (a pasted or damaged text): no system call takes it
        shown = _shortened(Path(str(path).replace("\0", "\\0")))
        raise CeVAEError(f"{lead} path {shown} holds a NUL byte (\\0), which no file name can hold.") from None


def _shortened(path: Path, room: int = 80) -> str:
    """``path`` in at most ``room`` characters for a message: whole if it fits; else its end, which holds the file's
    name (a link loop deep in a folder tree), or for a name too long to show, the end of its folder and the start of
    the name (a long folder left no room for any of the name)."""
    text = str(path)
    if len(text) <= room:
        return text
    name = Path(path).name
    if len(name) <= room - 3:
        return "..." + text[3 - room:]
    start = name[:room // 2] + "..."
    folder = text[:len(text) - len(name)]  # (with its separator)
    return (folder if len(folder) + len(start) <= room else "..." + folder[len(start) + 3 - room:]) + start


def refuse_undecodable_name(path: Path, what: str, where: str = "") -> None:
    """Refuse a path that is not valid UTF-8 (a Latin-1 name from an old archive on a UTF-8 system): SimpleITK,
    which reads and writes the images, cannot take it, and aborted the whole process on it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
        lead = f"{where}the {what}" if where else f"The {what}"
        raise CeVAEError(f"{lead} path {shown} is not valid UTF-8 text, and the image library cannot open such a "
                         "name. Rename the file or folder (for example with convmv).") from None


def refuse_missing_volume(path: Path, what: str, where: str = "") -> None:
    """Refuse a volume path that is not UTF-8, that the system cannot look up, that does not exist, or that is a
    FIFO, device or socket (``where``, e.g. "list.csv, line 4: ", leads the message)."""
    refuse_undecodable_name(path, what, where)
    refuse_unsearchable(path, what, where)
    lead = f"{where}the {what}" if where else f"The {what}"
    if not path.exists():
        if path.is_symlink():
            raise CeVAEError(f"{lead} {path} is a symbolic link to {os.readlink(path)}, which does not exist (a file "
                             "not yet fetched, or on a disk not mounted?).")
        raise CeVAEError(f"{lead} {path} does not exist.")
    kind = special_file_kind(path)
    if kind is not None:
        raise CeVAEError(f"{lead} {path} is {kind}, not a file; give an image file or a DICOM folder.")


def refuse_special_output(target: Path) -> None:
    """Refuse an output path that is, or links to, a FIFO, device or socket: such a file is never replaced
    (renaming over ``/dev/null`` would replace the device node) nor written into."""
    try:
        kind = special_file_kind(target)  # follows a symbolic link to what it names
    except OSError:
        return  # absent, or a dangling link (which is replaced like a file)
    if kind is not None:
        raise CeVAEError(f"The output {target} is {kind}, not a regular file; outputs are only written as "
                         "regular files. Choose a file name.")


NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, XFS, APFS, NTFS)
PATH_MAX = 4096  # bytes in a whole path on Linux
# what the name of an output's hidden temporary (io.atomic.temp_beside) adds to the output's name, besides its
# extension once more: two dots, 8 random characters, "-", the machine's tag (8), "-", a process id (up to 10)
TEMPORARY_ROOM = 2 + 8 + 1 + 8 + 1 + 10


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of ``folder`` (or its nearest existing parent) allows."""
    for f in (folder, *folder.parents):
        if os.path.isdir(f):  # (Path.is_dir raises for a name too long)
            try:
                return min(NAME_MAX, int(os.pathconf(f, "PC_NAME_MAX")))
            except (OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
                return NAME_MAX
    return NAME_MAX


def name_leaving_room(target: Path, reserved: int) -> str:
    """``target``'s name, cut after a whole character where needed so that ``reserved`` more bytes still fit
    in one file name of its folder (for the hidden names made beside an output)."""
    room = max(name_max(target.parent) - reserved, 0)
    return os.fsencode(target.name)[:room].decode("utf-8", "ignore")


def lock_path(target: Path) -> Path:
    """The hidden lock file of ``target`` (:mod:`.lock` holds it): ``.NAME.lock`` beside it (NAME shortened to fit if
    needed)."""
    return target.with_name("." + name_leaving_room(target, len(".") + len(".lock")) + ".lock")


def refuse_overlong_name(target: Path) -> None:
    """Refuse an output whose file (or folder) name or whole path is longer than the file system allows."""
    limit = name_max(target.parent)
    for part in target.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise CeVAEError(f"The output name {part[:40]}... is {size} bytes long; file names may hold at most "
                             f"{limit} bytes. Choose a shorter name.")
    size = len(os.fsencode(os.path.abspath(target)))
    name = len(os.fsencode(target.name))
    more = min(name + len(os.fsencode(full_suffix(target))) + TEMPORARY_ROOM, limit) - name  # (a long name is cut)
    if size + more >= PATH_MAX:
        temporary = f"; the hidden temporary file it is first written as needs {more} more," if more > 0 else ""
        raise CeVAEError(f"The output path {str(target)[:60]}... is {size} bytes long{temporary} and paths may hold "
                         f"at most {PATH_MAX - 1} bytes. Choose a shorter path.")


class Inputs:
    """Everything a command reads, to compare outputs against (by resolved path and by inode): the files
    named, the data files their headers name, and everything inside an input folder."""

    def __init__(self, paths: Iterable[Optional[Path]] = ()) -> None:
        self.names: Dict[Union[Path, Tuple[int, int]], Path] = {}  # resolved path or (device, inode)
        self.folders: Dict[Path, Path] = {}  # resolved input folder -> as given
        self.numbered: List[Tuple[NumberedFiles, Path]] = []  # a header's numbered data files (resolved folder)
        for p in paths:
            if p is not None:
                self.add(Path(p))

    def add(self, path: Path, named: Optional[Path] = None) -> None:
        """Record ``path`` (read for the input ``named``, by default itself) and what reading it also opens."""
        named = path if named is None else named
        self.names[resolved(path)] = named
        if os.path.isdir(path):
            self.folders[resolved(path)] = named
        try:
            st = os.stat(path)
        except OSError:
            return
        self.names[(st.st_dev, st.st_ino)] = named
        if named is path:
            alongside = read_alongside(path)
            for other in alongside.files:
                self.add(other, path)
            self.numbered += [(replace(n, folder=resolved(n.folder)), path) for n in alongside.numbered]
            if alongside.folder is not None:
                self.folders[resolved(alongside.folder)] = path

    def which(self, target: Path) -> Optional[Path]:
        """The input that ``target`` would replace or write into, if any."""
        where = resolved(target)
        if where in self.names:
            return self.names[where]
        for folder in where.parents:
            if folder in self.folders:
                return self.folders[folder]
        for files, named in self.numbered:
            if files.holds(where):
                return named
        try:
            st = os.stat(target)
        except OSError:
            return None
        return self.names.get((st.st_dev, st.st_ino))


def file_in_the_way(folder: Path) -> Optional[Path]:
    """The existing file (not a folder) at ``folder`` or above it, which keeps ``folder`` from being made;
    None if the nearest existing one is a folder (or the path cannot be looked up: a name too long, said elsewhere)."""
    for p in (folder, *folder.parents):
        if os.path.exists(p):  # (Path.exists raises for a name too long)
            return None if os.path.isdir(p) else p
    return None


def refuse_under_a_file(target: Path) -> None:
    """Refuse an output whose folder would have to be made under an existing file."""
    blocker = file_in_the_way(target.parent)
    if blocker is not None:
        raise CeVAEError(f"The output {target} would be under {blocker}, which is a file, not a folder.")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return resolved(a) == resolved(b) or os.path.samefile(a, b)
    except OSError:
        return False


class OutputExists(CeVAEError):
    """An existing output refused without overwrite. The message names both ways to allow it, the command line's
    flag and the library's argument; :meth:`for_command_line` only the flag."""

    def __init__(self, target: Path) -> None:
        self.target = target
        super().__init__(f"The output {target} already exists; pass --overwrite (overwrite=True in Python) "
                         "to replace it.")

    def __reduce__(self) -> Tuple[type, Tuple[Path]]:  # (from a worker process, as it was raised)
        return type(self), (self.target,)

    def for_command_line(self) -> str:
        """The message as a command's user replaces an output: ``--overwrite``."""
        return f"The output {self.target} already exists; pass --overwrite to replace it."


def check_output_path(target: Path, overwrite: bool, inputs: Inputs) -> None:
    """Refuse an output onto an input, under a file, onto a folder, or over a file without ``overwrite``."""
    target = Path(target)
    refuse_undecodable_name(target, "output")
    refuse_overlong_name(target)
    refuse_under_a_file(target)
    if target.is_dir():
        raise CeVAEError(f"The output {target} is a folder; give a file name.")
    src = inputs.which(target)
    if src is not None:
        if os.path.isdir(src):
            raise CeVAEError(f"The output {target} is inside the input folder {src}; choose a path outside it.")
        if _same_file(target, src):
            raise CeVAEError(f"The output {target} is the same file as an input ({src}); choose another path.")
        raise CeVAEError(f"The output {target} is a file that reading the input {src} opens (its data); "
                         "choose another path.")
    refuse_special_output(target)
    if os.path.lexists(target) and not overwrite:
        raise OutputExists(target)


def refuse_unwritable_folder(folder: Path) -> None:
    """Refuse outputs in a folder that cannot be written (a read-only file system, no permission), before any work
    rather than after it; a folder not made yet is judged by the nearest one above it."""
    import tempfile

    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:
        return
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".cevae-write-test-"):
            pass
    except OSError as exc:
        raise cannot_write_into(folder, exc) from None


_REFUSED = (errno.EACCES, errno.EPERM)


def write_remedy(exc: BaseException, folder: Path, room: str = "Free some space") -> str:
    """What to do, as a sentence without its full stop, about a write in ``folder`` that failed with ``exc``, by its
    cause: ``room`` for a full disk or quota, or a failed write that says no cause (torch's, whose cause reads "disk
    full or a file-size limit?"); a read-only disk or permissions each named; the disk checked for an I/O error or a
    file that did not read back as written (an OSError without errno); the file named that stands where ``folder``
    or a folder above it should be (ENOTDIR, or EEXIST from making it); shorter names for a name too long; the limit
    on open files of the process (EMFILE) or of the system (ENFILE); any other error named by its errno."""
    if not isinstance(exc, OSError) or full_disk(exc):
        return room
    if exc.errno is None or exc.errno == errno.EIO:
        return f"Check the disk holding {folder} (move the run to another disk if it fails again)"
    if exc.errno == errno.EROFS:
        return f"The disk holding {folder} is mounted read-only: make it writable"
    if exc.errno in _REFUSED:
        return f"Make sure you may write in {folder} (its permissions)"
    if exc.errno == errno.ENAMETOOLONG:
        return f"Give {folder} and its files shorter names"
    if exc.errno == errno.EMFILE:
        return f"This process may hold {_open_file_limit()} files open at once: raise that limit (ulimit -n)"
    if exc.errno == errno.ENFILE:
        return "The system holds as many open files as it may: close other programs"
    blocker = file_in_the_way(folder) if exc.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        return f"{blocker} is a file, not a folder: rename or move it"
    return f"Make sure {folder} can be written ({errno.errorcode.get(exc.errno, exc.errno)})"


def _open_file_limit() -> str:
    """The number of files this process may hold open (its soft RLIMIT_NOFILE), or "few" where it is not known."""
    try:
        import resource  # (POSIX only)
    except ImportError:
        return "few"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "few" if soft == resource.RLIM_INFINITY else str(soft)


def cannot_write_into(folder: Path, exc: OSError) -> CeVAEError:
    """The one-line refusal of outputs in ``folder``, where a file could not be made (``exc``): the system's words,
    then what to do about its cause (:func:`write_remedy`) or to choose another folder."""
    remedy = write_remedy(exc, folder, f"Free some space on the disk holding {folder}")
    return CeVAEError(f"Cannot write into {folder} ({exc.strerror or exc}). {remedy}, or choose another folder.")


def check_paths(targets: Iterable[Path], overwrite: bool, inputs: Iterable[Optional[Path]] = ()) -> None:
    """Refuse outputs that equal an input, repeat each other (also in another letter case: one file on the
    case-insensitive file systems of macOS and Windows; or in another Unicode form: one file on macOS), are the lock
    file of another (:mod:`.lock`), exist (without overwrite) or cannot be written."""
    known = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
    targets = [Path(t) for t in targets]
    named = {resolved(t): t for t in targets}
    for t in targets:  # that file is truncated when the lock is taken and removed when it is let go
        held = named.get(resolved(lock_path(t)))
        if held is not None:
            raise CeVAEError(f"The output {held} is the lock file held while {t} is written; choose another name.")
    seen: Dict[str, Tuple[Path, Path]] = {}  # resolved path in one form, lower case -> (the output so named, its path)
    for t in targets:
        r = resolved(t)
        key = one_form(str(r)).lower()
        other, other_r = seen.get(key, (None, None))
        if other_r == r:
            raise CeVAEError(f"The output {t} is named twice.")
        if other_r is not None and one_form(str(other_r)) == one_form(str(r)):
            raise CeVAEError(f"The outputs {other} and {t} are {UNICODE_TWINS}, which makes them one file on macOS; "
                             "give them names that differ otherwise.")
        if other is not None:
            raise CeVAEError(f"The outputs {other} and {t} differ only in letter case, which makes them one file on "
                             "macOS and Windows; give them names that differ otherwise.")
        seen[key] = (t, r)
        check_output_path(t, overwrite, known)
    # where the temporary file is made: beside the output's own name (a symbolic link is replaced, not followed)
    for folder in sorted({Path(os.path.abspath(t)).parent for t in targets}):
        refuse_unwritable_folder(folder)
