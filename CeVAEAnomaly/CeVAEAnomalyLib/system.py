"""What the machine and this installation offer this process (torch-free)."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from .errors import CeVAEError

RESEARCH_EXTRA = "pip install 'cevae-anomaly[research]'"


def require_research(command: str, modules: Sequence[str]) -> None:
    """Refuse ``command`` (as the user typed it: "cevae-anomaly demo") in one line, before any work, where the research
    code or what it needs is missing (the Slicer extension ships the runtime library only; a plain ``pip install``
    lacks the research extra)."""
    missing = missing_modules(modules)
    if missing:
        raise CeVAEError(f"`{command}` needs {', '.join(missing)}, which this installation lacks "
                         f"(research code, not part of the runtime): {RESEARCH_EXTRA} in a Python environment "
                         "of its own, or run it from a source checkout set up with scripts/setup.sh.")


def missing_modules(modules: Sequence[str]) -> List[str]:
    """Those of ``modules`` this installation cannot import (as far as the import system says, importing none)."""
    return [m for m in modules if not _findable(m)]


def _findable(module: str) -> bool:
    """Whether ``module`` can be imported as far as the import system says without importing it (a finder that
    refuses it, as a blocked or broken installation does, raises ImportError: not findable)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPU cores this process may run on: its affinity mask (Slurm's, taskset's), or fewer where a CPU quota of its
    cgroup or of one above it allows fewer whole cores (docker --cpus, Kubernetes' CPU limits; the mask does not show
    them). ``cgroup_root``: where the cgroup file system is mounted; ``self_cgroup``: the process's memberships."""
    if hasattr(os, "sched_getaffinity"):
        cores = max(1, len(os.sched_getaffinity(0)))
    else:
        cores = max(1, os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is not None:  # whole cores: an OpenMP thread throttled for its share stalls its siblings at each barrier
        cores = min(cores, max(1, int(quota)))
    return cores


def _cgroup_cpu_quota(root: Path, self_cgroup: Path) -> Optional[float]:
    """The smallest CPU quota, in CPUs, of the process's cgroup and those above it (None: none, or not Linux). cgroup
    v2 keeps it in ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), v1 in ``cpu.cfs_quota_us`` (-1: none) and
    ``cpu.cfs_period_us`` of the cpu controller's hierarchy. A path the mount lacks (a container's, which names its
    cgroup as the host does) is walked up to the mount's root, the container's own cgroup."""
    try:
        lines = self_cgroup.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = parts[1].split(",")
        if parts[0] == "0" and parts[1] == "":
            mount, files = root, ("cpu.max",)
        elif "cpu" in controllers:
            mount = next((root / name for name in (parts[1], "cpu,cpuacct", "cpu") if (root / name).is_dir()), None)
            if mount is None:
                continue
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        path = Path(parts[2].strip() or "/")
        for directory in [path, *path.parents]:
            quota = _quota_in(mount / str(directory).lstrip("/"), files)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _quota_in(directory: Path, files: Tuple[str, ...]) -> Optional[float]:
    """The CPU quota, in CPUs, that ``files`` in ``directory`` set (None: none, or unreadable)."""
    try:
        words = " ".join((directory / name).read_text(encoding="utf-8") for name in files).split()
        if len(words) != 2 or words[0] in ("max", "-1"):
            return None
        quota, period = int(words[0]), int(words[1])
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def torchrun_number(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    """torchrun's whole-number variable ``name`` (WORLD_SIZE, RANK, LOCAL_RANK); ``default`` where it is unset. One
    that is no whole number (exported empty or as a word by a job template) is refused in words."""
    value = environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CeVAEError(f"The environment variable {name} must be a whole number (torchrun sets it), got {value!r}; "
                         "unset it to run as one process.") from None


def threads_per_process(processes: int, environ: Mapping[str, str] = os.environ) -> int:
    """Threads each of ``processes`` processes that share this job's cores should run: the user's OMP_NUM_THREADS
    where it is a positive whole number (its outer level where it lists nested ones), else an equal share of
    :func:`usable_cores` (at least one)."""
    given = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, usable_cores() // processes)


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
