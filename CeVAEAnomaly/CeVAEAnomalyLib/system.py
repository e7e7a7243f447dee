"""What the machine offers this process (torch-free)."""
from __future__ import annotations

import os
import shlex
import subprocess
from typing import Optional


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity masks such as Slurm's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


CMD_OPERATORS = frozenset("&|<>^()")  # what cmd.exe reads outside double quotes as a command separator, pipe,
# redirection, escape or block (list2cmdline quotes only around a space)


def command_word(text: str, windows: Optional[bool] = None) -> str:
    """``text`` (a path) as one word of a command line to paste into this platform's shell (``windows``: Windows'
    cmd.exe, which takes double quotes and not POSIX single quotes, around a path that holds a space or one of
    :data:`CMD_OPERATORS`; None: whether this machine runs Windows). A relative path that starts with "-" is led by
    the current folder, so that the command does not take it for an option."""
    if windows is None:
        windows = os.name == "nt"
    if text.startswith("-"):
        text = (".\\" if windows else "./") + text
    if not windows:
        return shlex.quote(text)
    word = subprocess.list2cmdline([text])  # (double-quoted where it holds a space)
    if word.startswith('"') or not CMD_OPERATORS.intersection(text):
        return word
    return f'"{word}' + "\\" * (len(word) - len(word.rstrip("\\"))) + '"'  # a closing backslash must not escape it


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists (it may be another user's). An id past what the system's process ids hold (read
    from a damaged file) names none. Where it cannot be told, it is taken to exist: callers remove what a process
    that no longer exists left behind, never what a live one may still use."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return _windows_process_exists(pid)
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


_WINDOWS_QUERY = 0x1000  # PROCESS_QUERY_LIMITED_INFORMATION
_WINDOWS_NO_SUCH_PROCESS = 87  # ERROR_INVALID_PARAMETER: what OpenProcess says of an id no process has
_WINDOWS_STILL_ACTIVE = 259  # the exit code GetExitCodeProcess gives a process that has not ended


def _windows_process_exists(pid: int) -> bool:
    """:func:`process_exists` on Windows, by the kernel's process object (``os.kill`` there would end the process).
    A process that has ended but whose object another program still holds open is no longer running: it counts as
    gone (its exit code is not STILL_ACTIVE)."""
    import ctypes
    from ctypes import wintypes

    if pid > 0xFFFFFFFF:
        return False
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    handle = kernel32.OpenProcess(_WINDOWS_QUERY, False, pid)
    if not handle:  # none, or one this user may not open (access denied: it exists)
        return ctypes.get_last_error() != _WINDOWS_NO_SUCH_PROCESS
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == _WINDOWS_STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
