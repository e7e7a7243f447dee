"""What the machine offers this process (torch-free)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity masks such as Slurm's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
