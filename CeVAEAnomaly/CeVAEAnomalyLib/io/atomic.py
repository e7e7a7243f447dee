"""The one way files are written: beside the target under a hidden name, checked, then renamed into place.

An interrupted or failed write (error, disk full, file-size limit, Ctrl-C, SIGTERM) never leaves a
partial file under the final name, nor a temporary file. Every file is checked to be complete
(:mod:`.verify`) before the rename. A replaced file's permissions are kept; a new file gets the usual ones
(0666 minus the umask).
"""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from ..errors import CeVAEError
from .naming import full_suffix
from .targets import check_paths, name_leaving_room, refuse_special_output
from .verify import incomplete_reason

Writer = Callable[[str], None]


def temp_beside(target: Path) -> str:
    """An empty hidden file in the target's folder, with the target's extension (for writers).

    Its name is ``.NAME.xxxxxxxx.EXT``, with ``NAME`` shortened where needed so that it fits
    whenever the target's own name does.
    """
    suffix = full_suffix(target)
    name = name_leaving_room(target, len(os.fsencode(suffix)) + 10)  # the dots and mkstemp's 8 random characters
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    return tmp


def publish(tmp: str, target: Path) -> None:
    """Give ``tmp`` the permissions of the file it replaces (a private file stays private), or normal ones for a
    new file, and rename it onto ``target`` (never onto a device, FIFO or socket)."""
    refuse_special_output(target)  # checked again here: the path may have changed since the first check
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:  # a new file (or one that cannot be read): 0666 minus the umask
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def check_complete(tmp: str, target: Path, expected_bytes: Optional[int] = None) -> None:
    """Refuse to publish a short write (disk full, file-size limit) that the writer did not report."""
    reason = incomplete_reason(Path(tmp), target, expected_bytes)
    if reason is not None:
        raise CeVAEError(f"Could not write {target} completely ({reason}); is the disk full? "
                         "Nothing was replaced.")


@contextmanager
def atomic_path(target: Path) -> Iterator[str]:
    """Yield a temporary path; if the block succeeds and the file is complete it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        yield tmp
        check_complete(tmp, target)
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _text_writer(text: str) -> Writer:
    data = text.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return write


def _writer_for(value: object) -> Writer:
    import SimpleITK as sitk

    if callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, sitk.Image):
        return lambda tmp: sitk.WriteImage(value, tmp, True)
    if isinstance(value, str):
        return _text_writer(value)
    raise TypeError(f"cannot write a {type(value).__name__}")


def write_all(files: Dict[Path, object], overwrite: bool = False, inputs: Sequence[Optional[Path]] = ()) -> List[Path]:
    """Write images (sitk.Image), texts (str) or anything a callable(temp_path) writes; all or none."""
    from .images import error_text

    targets = [Path(t) for t in files]
    check_paths(targets, overwrite, inputs)
    temps: Dict[Path, str] = {}
    try:
        for target, value in zip(targets, files.values()):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                temps[target] = temp_beside(target)
                _writer_for(value)(temps[target])
            except (RuntimeError, OSError) as exc:
                raise CeVAEError(f"Could not write {target}: {error_text(exc)}") from None
            check_complete(temps[target], target, len(value.encode("utf-8")) if isinstance(value, str) else None)
        for target, tmp in temps.items():
            try:
                publish(tmp, target)
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
