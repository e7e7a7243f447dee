"""SIGTERM handled like Ctrl-C: raised where the program is, so every cleanup (temporary files) runs."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (kill, a job scheduler's time limit, a container stop)."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def pool_worker_signals() -> None:
    """In a pool's worker process: Ctrl-C, which reaches the whole process group, is left to the main process
    (it stops the pool), and SIGTERM (a scheduler stopping the group) raises :class:`Terminated`, so that the
    worker's temporary files are removed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, raise_terminated)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
