"""The one way files are written: beside the target under a hidden name, checked, then renamed into place.

An interrupted or failed write (error, disk full, file-size limit, Ctrl-C, SIGTERM) never leaves a
partial file under the final name, nor a temporary file; the files of one write are renamed with Ctrl-C and
SIGTERM held, so a stop leaves them all new or all old. Every file is checked to be complete
(:mod:`.verify`) before the rename. A replaced file's permissions are kept; a new file gets the usual ones
(0666 minus the umask).
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from ..errors import CeVAEError
from ..interrupts import stops_held
from .naming import full_suffix
from .targets import check_paths, name_leaving_room, refuse_special_output
from .verify import incomplete_reason

Writer = Callable[[str], None]
_NEW_PRIVATE_FILE = os.O_WRONLY
_NEW_PRIVATE_FILE |= os.O_CREAT  # (augmented: vermin takes a chain of "|" for a 3.10 type union)
_NEW_PRIVATE_FILE |= os.O_EXCL


def temp_beside(target: Path, claim: Optional[Callable[[str], None]] = None) -> str:
    """An empty hidden file in the target's folder, with the target's extension (for writers).

    Its name is ``.NAME.xxxxxxxx.EXT``, with ``NAME`` shortened where needed so that it fits
    whenever the target's own name does. ``claim`` is given each name before the file is made, so that a
    caller that removes its temporaries also removes one made just before a Ctrl-C.
    """
    suffix = full_suffix(target)
    name = name_leaving_room(target, len(os.fsencode(suffix)) + 10)  # the dots and 8 random characters
    while True:
        tmp = str(target.parent / f".{name}.{secrets.token_hex(4)}{suffix}")
        if claim is not None:
            claim(tmp)
        try:
            fd = os.open(tmp, _NEW_PRIVATE_FILE, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


STALE_AGE_S = 3600.0  # a temporary untouched this long belongs to a write that was killed


def remove_stale_temporaries(target: Path, older_than_s: float = STALE_AGE_S) -> int:
    """Remove the temporaries (:func:`temp_beside`) of writes of ``target`` that were killed (SIGKILL, a power cut)
    and left them: untouched for ``older_than_s`` (0: any, for a caller that knows no other write is under way, e.g.
    one holding the output's lock); how many."""
    suffix = full_suffix(target)
    name = name_leaving_room(target, len(os.fsencode(suffix)) + 10)
    pattern = re.compile(re.escape(f".{name}.") + "[0-9a-f]{8}" + re.escape(suffix))
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
    ``target`` that were killed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if durable:
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
              published: Optional[List[Path]] = None) -> List[Path]:
    """Write images (sitk.Image), texts (str), bytes or anything a callable(temp_path) writes; all or none.
    ``published`` gets each target as it is renamed into place, so that a caller stopped meanwhile (a stop
    raised after the last rename, or during the renames where it cannot be held) can say which were written."""
    from .images import error_text

    targets = [Path(t) for t in files]
    check_paths(targets, overwrite, inputs)
    temps: Dict[Path, str] = {}
    try:
        for target, value in zip(targets, files.values()):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                temp_beside(target, lambda name, target=target: temps.__setitem__(target, name))
                _writer_for(value)(temps[target])
            except (RuntimeError, OSError) as exc:
                raise CeVAEError(f"Could not write {target}: {error_text(exc)}") from None
            check_complete(temps[target], target, _size_of(value))
        with stops_held():  # a stop comes after the last rename: all new or all old
            for target, tmp in temps.items():
                try:
                    publish(tmp, target)
                    if published is not None:
                        published.append(target)
                except OSError as exc:
                    raise CeVAEError(f"Could not move the finished {target} into place: {exc}") from None
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return targets


def atomic_write_text(path: Union[str, "os.PathLike[str]"], text: str, overwrite: bool = True,
                      inputs: Sequence[Optional[Path]] = ()) -> Path:
    """Write one text file atomically and completely (see :func:`write_all`)."""
    return write_all({Path(path): text}, overwrite, inputs)[0]
