"""What the machine offers this process (torch-free)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity masks such as Slurm's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX; elsewhere assumed so: ``os.kill`` would end it). An id past what the
    system's process ids hold (read from a damaged file) names none."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True
