"""Stop signals: SIGTERM handled like Ctrl-C (raised where the program is, so every cleanup runs), and both held
where raising would do harm (between the renames of one set of outputs; inside a C++ loop with Python callbacks,
which would turn the stop into an error)."""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (kill, a job scheduler's time limit, a container stop)."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


ORPHAN_POLL_S = 0.5  # how often a pool worker looks whether its main process is still there
ORPHAN_GRACE_S = 5.0  # after stopping itself like SIGTERM, how long an orphaned worker may take to clean up


def pool_worker_signals() -> None:
    """In a pool's worker process: Ctrl-C, which reaches the whole process group, is left to the main process
    (it stops the pool), and SIGTERM (a scheduler stopping the group) raises :class:`Terminated`, so that the
    worker's temporary files are removed. A worker whose main process is gone (killed with SIGKILL) stops the
    same way instead of writing on and then waiting forever for work (POSIX, where the worker then gets another
    parent; on Windows its parent id stays, and nothing is watched)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, raise_terminated)
    if os.name != "posix":
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)  # raised where the worker is: its temporary files are removed
        time.sleep(ORPHAN_GRACE_S)
        os._exit(1)  # blocked where no signal is taken (e.g. waiting for work that will never come)

    threading.Thread(target=watch, name="CeVAEAnomaly orphan watch", daemon=True).start()


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


@contextmanager
def stops_held(on_stop: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM are recorded instead of raised (``on_stop`` is called when one comes,
    to end the work early) and delivered again when the block ends, so that they act after it. A signal the
    process ignores stays ignored. Only the main thread receives signals; elsewhere nothing changes."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    previous = {s: handler for s, handler in previous.items() if handler is not signal.SIG_IGN}
    caught: List[int] = []

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)
        if on_stop is not None:
            on_stop()

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught:
            signal.raise_signal(s)
