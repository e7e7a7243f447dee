"""The one way files are written: beside the target under a hidden name, checked, then renamed into place.

An interrupted or failed write (error, disk full, file-size limit, Ctrl-C, SIGTERM) never leaves a
partial file under the final name, nor a temporary file; the files of one write are renamed with Ctrl-C and
SIGTERM held, so a stop leaves them all new or all old. Every file is checked to be complete
(:mod:`.verify`) before the rename. A replaced file's permissions are kept; a new file gets the usual ones
(0666 minus the umask). A temporary names the machine and process that write it, so that what a write killed
with SIGKILL leaves can be told abandoned and removed by the next run (:func:`remove_abandoned_temporaries`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import CeVAEError, WriteFailed
from ..interrupts import stops_held
from ..system import process_exists
from .lock import hold_outputs
from .naming import full_suffix
from .targets import TEMPORARY_ROOM, Inputs, check_paths, name_leaving_room, refuse_special_output, write_remedy
from .verify import incomplete_reason

log = logging.getLogger(__name__)
Writer = Callable[[str], None]
_NEW_PRIVATE_FILE = os.O_WRONLY
_NEW_PRIVATE_FILE |= os.O_CREAT  # (augmented: vermin takes a chain of "|" for a 3.10 type union)
_NEW_PRIVATE_FILE |= os.O_EXCL


_BOOT_ID = "/proc/sys/kernel/random/boot_id"  # Linux: random for each start of the machine (containers share it)


@lru_cache(maxsize=None)
def machine_tag() -> str:
    """8 hex characters naming this machine, its start (boot) and its process-id namespace (a container has its
    own), so that a temporary's process id is only ever looked up where it means that process. The boot tells
    apart machines that share a folder and a host name: each one's first namespace has the same number."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    try:
        with open(_BOOT_ID, encoding="ascii") as fh:
            boot = fh.read().strip()
    except (OSError, ValueError):  # not Linux
        boot = ""
    owner = f"{socket.gethostname()}\0{namespace}\0{boot}"
    return hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _temp_parts(target: Path) -> Tuple[str, str]:
    """The ``.NAME.`` that starts the temporaries of ``target`` (NAME shortened to leave room) and their extension."""
    suffix = full_suffix(target)
    name = name_leaving_room(target, len(os.fsencode(suffix)) + TEMPORARY_ROOM)
    return f".{name}.", suffix


def temp_beside(target: Path, claim: Optional[Callable[[str], None]] = None) -> str:
    """An empty hidden file in the target's folder, with the target's extension (for writers).

    Its name is ``.NAME.xxxxxxxx-MACHINE-PID.EXT`` (8 random characters, :func:`machine_tag`, the writing process),
    with ``NAME`` shortened where needed so that it fits whenever the target's own name does. ``claim`` is given
    each name before the file is made, so that a caller that removes its temporaries also removes one made just
    before a Ctrl-C.
    """
    start, suffix = _temp_parts(target)
    while True:
        tmp = str(target.parent / f"{start}{secrets.token_hex(4)}-{machine_tag()}-{os.getpid()}{suffix}")
        if claim is not None:
            claim(tmp)
        try:
            fd = os.open(tmp, _NEW_PRIVATE_FILE, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


STALE_AGE_S = 3600.0  # a temporary untouched this long belongs to a write that was killed
_RANDOM_AND_OWNER = "[0-9a-f]{8}(?:-[0-9a-f]{8}-[0-9]{1,10})?"  # (temporaries of older versions name no owner)
_OWNED = re.compile(r"[0-9a-f]{8}-([0-9a-f]{8})-([1-9][0-9]{0,9})\Z")  # what ends a temporary's name before .EXT


def remove_abandoned_temporaries(targets: Iterable[Path], started: float) -> int:
    """Remove the temporaries that killed writes (SIGKILL, a crash, a power cut) of ``targets`` left, where they are
    certainly abandoned: named as :func:`temp_beside` names those of one of them, made on this machine since it
    started (and in this process namespace) by a process that no longer exists, and last changed before ``started``
    (the time the calling run began). Anything else is kept: another machine's (one of the same name too), one from
    before the machine restarted, a live process's, an older version's (no owner in its name), a file that only
    looks alike. Each folder is listed once; how many were removed."""
    wanted: Dict[Path, Dict[str, str]] = {}  # folder -> {".NAME.": ".EXT"} of its targets
    for target in targets:
        start, suffix = _temp_parts(Path(target))
        wanted.setdefault(Path(target).parent, {})[start] = suffix
    removed = 0
    for folder, starts in wanted.items():
        lengths = {len(suffix) for suffix in starts.values()}
        try:
            with os.scandir(folder) as listing:
                names = [e.name for e in listing if e.name.startswith(".")]
        except OSError:  # no folder yet, or unreadable: nothing to tidy
            continue
        for name in names:
            for n in lengths:
                owned = _OWNED.search(name, 0, len(name) - n)
                if (owned and starts.get(name[: owned.start()]) == name[len(name) - n :]
                        and _abandoned(owned, folder / name, started)):
                    removed += 1
                    break
    if removed:
        log.info("Removed %d temporary file(s) that killed runs left beside the outputs.", removed)
    return removed


def _abandoned(owned: "re.Match[str]", path: Path, started: float) -> bool:
    """Remove ``path``, a temporary whose name matched ``owned`` (machine, process), if this machine's process that
    made it no longer exists and it was last changed before ``started``; whether it was removed."""
    if owned.group(1) != machine_tag() or process_exists(int(owned.group(2))):
        return False
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= started:
            return False
        os.unlink(path)
    except OSError:  # removed meanwhile, or not ours to remove
        return False
    return True


def remove_stale_temporaries(target: Path, older_than_s: float = STALE_AGE_S) -> int:
    """Remove the temporaries (:func:`temp_beside`) of writes of ``target`` that were killed (SIGKILL, a power cut)
    and left them: untouched for ``older_than_s`` (0: any, for a caller that knows no other write is under way, e.g.
    one holding the output's lock); how many."""
    start, suffix = _temp_parts(target)
    pattern = re.compile(re.escape(start) + _RANDOM_AND_OWNER + re.escape(suffix))
    cutoff, removed = time.time() - older_than_s, 0
    try:
        with os.scandir(target.parent) as listing:
            stale = [e.path for e in listing if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                     and e.stat(follow_symlinks=False).st_mtime < cutoff]
    except OSError:
        return 0
    for path in stale:
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def publish(tmp: str, target: Path, durable: bool = False) -> None:
    """Give ``tmp`` the permissions of the file it replaces (a private file stays private), or normal ones for a
    new file, and rename it onto ``target`` (never onto a device, FIFO or socket). ``durable``: the data, then the
    rename, are on the disk before this returns (what a resume after a power cut relies on)."""
    refuse_special_output(target)  # checked again here: the path may have changed since the first check
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:  # a new file (or one that cannot be read): 0666 minus the umask
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    if durable:  # before its mode is the target's, which may not allow writing
        _sync(tmp, os.O_RDWR)  # (Windows flushes only through a handle open for writing)
    os.chmod(tmp, mode)
    os.replace(tmp, target)
    if durable and os.name == "posix":
        _sync(str(target.parent), os.O_RDONLY)  # the rename itself (a folder opens read-only, on POSIX only)


def _sync(path: str, mode: int) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, mode)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_complete(tmp: str, target: Path, expected_bytes: Optional[int] = None) -> None:
    """Refuse to publish a short write (disk full, file-size limit) that the writer did not report."""
    reason = incomplete_reason(Path(tmp), target, expected_bytes)
    if reason is not None:
        raise CeVAEError(f"Could not write {target} completely ({reason}); is the disk full? "
                         "Nothing was replaced.")


@contextmanager
def atomic_path(target: Path, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path; if the block succeeds and the file is complete it replaces ``target`` (``durable``:
    see :func:`publish`; such a write, of a model or checkpoint, first removes the temporaries of earlier writes of
    ``target`` that were killed: this machine's whose process is gone, and any untouched for an hour)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        remove_abandoned_temporaries([target], time.time())
        remove_stale_temporaries(target)
    claimed: List[str] = []
    try:
        tmp = temp_beside(target, claimed.append)
        yield tmp
        check_complete(tmp, target)
        publish(tmp, target, durable)
    finally:
        for name in claimed:
            if os.path.exists(name):
                os.unlink(name)


def _text_bytes(text: str) -> bytes:
    """``text`` as UTF-8; the bytes of a file name that is not UTF-8 (held as surrogates) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode("utf-8")


def _writer_for(value: object) -> Writer:
    import SimpleITK as sitk

    if callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, sitk.Image):
        return lambda tmp: sitk.WriteImage(value, tmp, True)
    if isinstance(value, (str, bytes)):
        data = _text_bytes(value) if isinstance(value, str) else value
        return lambda tmp: Path(tmp).write_bytes(data)
    raise TypeError(f"cannot write a {type(value).__name__}")


def _size_of(value: object) -> Optional[int]:
    """The bytes a text or bytes value writes (None: the writer's own format, checked otherwise)."""
    if isinstance(value, str):
        return len(_text_bytes(value))
    return len(value) if isinstance(value, bytes) else None


def write_all(files: Dict[Path, object], overwrite: bool = False, inputs: Sequence[Optional[Path]] = (),
              published: Optional[List[Path]] = None, command: str = "run") -> List[Path]:
    """Write images (sitk.Image), texts (str), bytes or anything a callable(temp_path) writes; all or none.
    ``published`` gets each target as it is renamed into place, so that a caller stopped meanwhile (a stop
    raised after the last rename, or during the renames where it cannot be held) can say which were written.
    The targets' locks (:mod:`.lock`) are held from the check of the targets to the last rename, so that another
    process's write of the same files is refused there (named as ``command``, e.g. "detect"), never mixed with
    this one, and no file it wrote meanwhile is replaced without ``overwrite``."""
    from .headers import error_text

    targets = [Path(t) for t in files]
    known = Inputs(inputs)
    check_paths(targets, overwrite, known)  # first without the locks: a path that cannot be an output is said so
    temps: Dict[Path, str] = {}
    with hold_outputs(targets, command, reentrant=True):  # (a caller may hold them already, for longer)
        check_paths(targets, overwrite, known)  # again: another run may have written one since
        try:
            for target, value in zip(targets, files.values()):
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    temp_beside(target, lambda name, target=target: temps.__setitem__(target, name))
                    _writer_for(value)(temps[target])
                except (RuntimeError, OSError) as exc:
                    words = exc.strerror if isinstance(exc, OSError) and exc.strerror else error_text(exc)
                    raise WriteFailed(f"Could not write {target}: {words}. Nothing was replaced. "
                                      f"{_output_remedy(exc, target)}.", exc) from None
                try:
                    check_complete(temps[target], target, _size_of(value))
                except CeVAEError as exc:  # a short write the writer did not report: a full disk, most often
                    raise CeVAEError(f"{exc} {_output_remedy(exc, target)}.") from None
            moved: List[Path] = []
            with stops_held():  # a stop comes after the last rename: all new or all old
                for target, tmp in temps.items():
                    try:
                        publish(tmp, target)
                    except (OSError, CeVAEError) as exc:
                        raise CeVAEError(_move_failed(target, exc, moved, targets)) from None
                    moved.append(target)
                    if published is not None:
                        published.append(target)
        finally:
            for tmp in temps.values():
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return targets


def _move_failed(target: Path, exc: BaseException, moved: Sequence[Path], targets: Sequence[Path]) -> str:
    """The one line for a rename of the finished ``target`` into place that failed with ``exc`` (an OSError, or the
    refusal of what appeared at ``target`` meanwhile) after ``moved`` were renamed: which outputs now hold this run's
    files, which still hold what was there before and which were not written, then what to do."""
    if isinstance(exc, OSError):
        said = f"Could not move the finished {target} into place: {exc.strerror or exc}."
        remedy = f" {_output_remedy(exc, target)}."
    else:  # its own message says what to do
        said, remedy = str(exc), ""
    if not moved:
        return f"{said} Nothing was replaced.{remedy}"
    rest = [t for t in targets if t not in moved]
    kept = [t for t in rest if os.path.lexists(t)]
    parts = [f"{_listed(moved)} {'is' if len(moved) == 1 else 'are'} this run's"]
    if kept:
        parts.append(f"{_listed(kept)} still {'holds' if len(kept) == 1 else 'hold'} what was there before")
    absent = [t for t in rest if t not in kept]
    if absent:
        parts.append(f"{_listed(absent)} {'was' if len(absent) == 1 else 'were'} not written")
    return f"{said} Only some outputs were replaced: {'; '.join(parts)}.{remedy}"


def _listed(paths: Sequence[Path]) -> str:
    """``paths`` as "a", "a and b" or "a, b and c"."""
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _output_remedy(exc: BaseException, target: Path) -> str:
    """What to do about an output ``target`` whose write failed with ``exc``, by its cause (a full disk, a read-only
    one, permissions, another error: :func:`~.targets.write_remedy`), then to run again."""
    room = f"Free some space on the disk holding {target.parent}"
    return f"{write_remedy(exc, target.parent, room)}, then run again"


def atomic_write_text(path: Union[str, "os.PathLike[str]"], text: str, overwrite: bool = True,
                      inputs: Sequence[Optional[Path]] = ()) -> Path:
    """Write one text file atomically and completely (see :func:`write_all`)."""
    return write_all({Path(path): text}, overwrite, inputs)[0]
