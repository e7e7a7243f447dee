"""system.process_exists: what removing a killed run's leftovers (job folders, slice caches, temporaries) and a
Slicer worker's watch of its owner rely on, on every platform."""
import os
import subprocess
import sys

from CeVAEAnomalyLib.system import process_exists


def test_this_process_exists():
    assert process_exists(os.getpid())


def test_a_process_that_ended_does_not():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # ended and reaped: its id names no process (until the system gives it to another)
    assert not process_exists(child.pid)


def test_ids_that_name_no_process():
    """Ids read from a damaged file or folder name: 0 and negative ones name a process group on POSIX (os.kill
    signals the group), not a process; one past the system's range names none."""
    for pid in (0, -1, -os.getpid(), 2 ** 40):
        assert not process_exists(pid), pid
