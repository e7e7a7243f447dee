"""An exclusive lock on an output for as long as a command writes it (two `train` runs with one --out).

The lock is ``flock`` on a hidden file beside the output, so it is released when its holder ends,
however it ends (even SIGKILL); the file is removed by the holder when it finishes. One that a killed run left is
locked by the next (made 0666 minus the umask; another user's that this one may not write, in a folder they share,
is removed once no process holds it). A write that may run
inside a command's longer hold of the same output (a command holding its outputs, then writing them) asks
for the lock as ``reentrant``. Folders made for a lock file go again if nothing was written in them. Where
``flock`` does not exist (Windows), one byte of the lock file, past its holder's line, is locked with
``msvcrt.locking`` instead (also let go when its holder ends); the file is removed once closed (Windows removes no
open file), unless another run has opened it meanwhile.
"""
from __future__ import annotations

import errno
import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Iterator, List, Optional, Set

from ..errors import CeVAEError
from ..interrupts import stops_held
from .targets import cannot_write_into, lock_path

log = logging.getLogger(__name__)

try:
    import fcntl

    _EXCLUSIVE_NOW = fcntl.LOCK_EX
    _EXCLUSIVE_NOW |= fcntl.LOCK_NB  # not written "A | B", which the Python-version check takes for a type union
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]
_HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK)  # another process holds the lock
_WINDOWS_LOCK_BYTE = 0x7FFFFFFE  # the byte msvcrt locks: past the holder's line, which the refused run reads


class OutputHeld(CeVAEError):
    """Another process holds an output's lock (is writing it); ``holder`` says who ("A batch (process 123)")."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


_held: Dict[str, int] = {}  # the lock files this process holds (a forked child holds none of them)
_unlockable: Set[Path] = set()  # folders whose lock files could not be locked (said once)


@contextmanager
def hold_output(target: Path, command: str, reentrant: bool = False) -> Iterator[None]:
    """Hold ``target``'s lock for the block; refuse at once if another process holds it. ``reentrant``: a lock
    this process holds already is held on (otherwise it is refused too)."""
    path = lock_path(target)
    key = _lock_key(target)
    if (fcntl is None and msvcrt is None) or (reentrant and _held.get(key) == os.getpid()):  # (a 2nd lock: refused)
        yield
        return
    made = _missing_folders(target.parent)  # made for the lock file: removed again unless something was written
    fh: Optional[BinaryIO] = None
    try:
        with stops_held():  # a stop (Ctrl-C, SIGTERM) as the lock is taken comes once it is held, and lets it go
            fh = _locked(target, path, command)
            _held[key] = os.getpid()
        yield
    finally:
        if fh is not None:
            del _held[key]
            _let_go(fh, path)
        for folder in made:  # deepest first, while empty (a failed run's outputs were never written there)
            try:
                os.rmdir(folder)
            except OSError:
                break


def _locked(target: Path, path: Path, command: str) -> BinaryIO:
    """The lock file ``path`` of ``target``, made with its folder where missing and locked by this process (unlocked
    where the file system offers no locks); refused at once if another process holds it."""
    while True:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fh = _open_lock(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CeVAEError(f"The lock file {path} of {target} is a symbolic link, which a lock file never is; "
                                 "remove the link (not what it points to) and run again.") from None
            if exc.errno == errno.EACCES and _removed_if_abandoned(target, path, command):
                continue  # another user's, left by a run that was killed: made anew, this process's
            raise cannot_write_into(target.parent, exc) from None
        try:
            _lock_now(fh.fileno())
        except OSError as exc:
            if exc.errno not in _HELD_ERRNOS:  # e.g. ENOLCK: no locks there
                if path.parent not in _unlockable:  # said once per folder, not for every file a batch writes
                    log.warning("%s cannot be locked (%s): the file system offers no locks. Make sure no other "
                                "command writes %s meanwhile.", path, exc.strerror or exc, target)
                    _unlockable.add(path.parent)
                return fh
            fh.close()
            raise _held_by(target, path, command) from None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                os.ftruncate(fh.fileno(), 0)
                os.write(fh.fileno(), f"{command} {os.getpid()}\n".encode())  # who holds it, for the refused
                return fh
        except FileNotFoundError:
            pass
        except OSError as exc:  # its holder's line could not be written: a full disk, a used-up quota
            _let_go(fh, path)
            raise cannot_write_into(target.parent, exc) from None
        fh.close()  # its previous holder removed the file meanwhile: lock the new one


def _held_by(target: Path, path: Path, command: str) -> OutputHeld:
    """The refusal of ``target``, whose lock file ``path`` another process holds."""
    holder = _holder(path, command)
    return OutputHeld(f"{holder} is writing {target} (it holds {path}); wait for it to finish, or choose another "
                      "output.", holder)


def _removed_if_abandoned(target: Path, path: Path, command: str) -> bool:
    """Remove the lock file ``path`` that this user may not open for writing (another user's, in a folder they share:
    its mode is of that user's umask) if no process holds it (its run was killed); refuse ``target`` as held
    (:class:`OutputHeld`) while one does. False where it cannot be told (the file is gone or unreadable, or the file
    system locks no file open read-only; Windows) or not removed."""
    if fcntl is None:
        return False
    try:
        flags = os.O_RDONLY
        flags |= os.O_NOFOLLOW  # (not "A | B", which the Python-version check takes for a type union)
        fh = os.fdopen(os.open(path, flags), "rb")  # (flock needs no writing, but on NFS)
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), _EXCLUSIVE_NOW)
        except OSError as exc:
            if exc.errno in _HELD_ERRNOS:
                raise _held_by(target, path, command) from None
            return False
        try:  # locked: nobody holds it, and nobody removes or replaces it while this process holds it
            if os.fstat(fh.fileno()).st_ino != os.stat(path).st_ino:
                return True  # removed and made anew meanwhile: try that one
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError:  # a folder with the sticky bit: only its owner may remove it
            return False
    log.info("Removed %s, the lock file of a run of another user that ended without removing it.", path)
    return True


def _lock_now(fd: int) -> None:
    """Lock the open lock file ``fd`` for this process, or raise OSError (errno in _HELD_ERRNOS: another process
    holds it): ``flock``, else (Windows) ``msvcrt.locking`` of one byte past the holder's line."""
    if fcntl is not None:
        fcntl.flock(fd, _EXCLUSIVE_NOW)
        return
    os.lseek(fd, _WINDOWS_LOCK_BYTE, os.SEEK_SET)  # (the holder's line is appended: O_APPEND)
    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _let_go(fh: BinaryIO, path: Path) -> None:
    """Remove the lock file ``path`` that ``fh`` holds locked, and close it (Windows: close it, then remove it, which
    fails, leaving it to be locked again, where another run has opened it meanwhile)."""
    if fcntl is None:
        fh.close()
    try:
        os.unlink(path)
    except OSError:
        pass
    if fcntl is not None:  # (POSIX: removed while still locked, so that no run locks it just before it goes)
        fh.close()


def _missing_folders(folder: Path) -> List[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first."""
    missing = []
    for f in (folder, *folder.parents):
        if os.path.lexists(f):
            break
        missing.append(f)
    return missing


def refuse_if_held(target: Path, command: str) -> None:
    """Refuse at once, as :func:`hold_output` does, if another process holds ``target``'s lock (a run is writing
    it); otherwise do nothing (a lock file its holder left is removed). For checks that would otherwise take that
    run's files for an earlier run's."""
    if os.path.lexists(lock_path(target)):
        with hold_output(target, command):
            pass


@contextmanager
def hold_outputs(targets: Iterable[Path], command: str, reentrant: bool = False) -> Iterator[None]:
    """Hold the lock of every one of ``targets`` (see :func:`hold_output`) for the block, in one order whoever asks;
    each lock once (long names, cut to fit, may share one: a second flock of it would be refused)."""
    locks = {_lock_key(Path(t)): Path(os.path.abspath(t)) for t in targets}
    with ExitStack() as stack:
        for key in sorted(locks):
            stack.enter_context(hold_output(locks[key], command, reentrant))
        yield


def _lock_key(target: Path) -> str:
    """``target``'s lock file with its folder's links resolved: one key for one lock file."""
    path = lock_path(target)
    return os.path.join(os.path.realpath(path.parent), path.name)


def _open_lock(path: Path) -> BinaryIO:
    """The lock file, created if missing (0666 minus the umask, as outputs: in a folder a group shares, with umask 002
    its users all may lock it), never truncated, and never opened through a symbolic link (that would write into the
    link's target)."""
    flags = os.O_WRONLY
    for flag in (os.O_CREAT, os.O_APPEND, getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_BINARY", 0)):  # (not "A | B",
        flags |= flag  # which the Python-version check takes for a type union; Windows has no O_NOFOLLOW)
    return os.fdopen(os.open(path, flags, 0o666), "ab")


def _holder(path: Path, command: str) -> str:
    """Who holds the lock at ``path``, as its holder wrote it ("A train (process 123)"), else "Another <command>"."""
    try:
        words = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        words = []
    if len(words) == 2 and words[1].isascii() and words[1].isdigit():
        return f"{'An' if words[0][:1] in 'aeiou' else 'A'} {words[0]} (process {words[1]})"
    return f"Another {command}"
