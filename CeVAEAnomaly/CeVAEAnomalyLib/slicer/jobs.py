"""The module's side of the worker: start it in its own process, read its messages, stop it.

A :class:`WorkerJob` never blocks: a reader thread collects the worker's stdout (as bytes, decoded
with replacement, so no byte can stop it) and :meth:`WorkerJob.poll` (called from a timer in
Slicer) takes what has arrived. Cancel ends the whole process tree at once: inside Slicer the
interpreter is ``PythonSlicer``, a launcher that runs the real Python as a child and forwards no
signal, so the worker is started in its own session (POSIX) and ended with its process group, or
with ``taskkill /T`` (Windows). Qt-free, so the same code runs in Slicer and in tests.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import CeVAEError
from ..io.atomic import machine_tag
from ..system import process_exists

log = logging.getLogger(__name__)
Launcher = Callable[[List[str]], subprocess.Popen]
Name = Union[str, Callable[[], str]]  # what the user calls a file the worker reads: as it is now, if a callable
STOP_WAIT_S = 0.5  # after terminate(), how long to wait before kill()
KILL_WAIT_S = 5.0  # after kill(), how long Cancel may wait for the process to go (the GUI waits meanwhile)
OUTPUT_GRACE_S = 2.0  # after the worker exits, how long its output may stay open (held by a process it started)
JOB_FOLDER_PREFIX = "CeVAEAnomaly-"  # a job's temporary folder (inputs, request, results)
WARNING_PREFIX = "WARNING: "  # a warning line of the worker's log (worker.LOG_FORMAT)
EXIT_ABANDONED = 3  # the worker's exit status once its job was withdrawn (its request file gone) or its owner ended
_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from CeVAEAnomalyLib.slicer.worker import main; sys.exit(main(sys.argv[2:]))")


class JobState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


def worker_command(python: str, request_path: Path) -> List[str]:
    """The command line that runs the worker on a request with this library, wherever it is installed."""
    library_parent = Path(__file__).resolve().parents[2]
    return [python, "-u", "-c", _BOOTSTRAP, str(library_parent), str(request_path)]


def launch_process(args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    """Start a console process with stdout and stderr merged into one byte pipe, so that
    :func:`stop_process_tree` can end it with everything it starts: on POSIX in a new session (its
    own process group); on Windows without a console window, as ``slicer.util.launchConsoleProcess``
    does. ``env``: its environment (Slicer: ``slicer.util.startupEnvironment()``); Python in it
    writes UTF-8."""
    environment = dict(os.environ if env is None else env, PYTHONIOENCODING="utf-8")
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags = subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
                                startupinfo=info)
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
                            start_new_session=True)


def leads_own_group(process: subprocess.Popen) -> bool:
    """Whether a running POSIX process leads its own process group (so the group is its tree)."""
    if os.name != "posix":
        return False
    try:
        return os.getpgid(process.pid) == process.pid
    except OSError:
        return False


def stop_process_tree(process: subprocess.Popen, own_group: bool) -> None:
    """End ``process`` and every process it started: the process group (``own_group``, POSIX:
    SIGTERM, then SIGKILL after STOP_WAIT_S), ``taskkill /T /F`` (Windows), else the process alone."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    elif own_group:
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline and _signal_group(process.pid, 0):
            process.poll()  # reap the leader, so that only live members keep the group
            time.sleep(0.01)
        _signal_group(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
    try:
        process.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # killed, but in uninterruptible I/O (a hung disk or GPU driver)
        log.warning("The worker (pid %d) has not ended yet after SIGKILL; it ends when its I/O returns.",
                    process.pid)


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # only zombies or foreign processes left
        return False
    return True


class WorkerJob:
    """One run of the worker: its request, its temporary folder, its progress and its end."""

    def __init__(self, request: Dict[str, Any], folder: Path, launch: Optional[Launcher] = None,
                 python: Optional[str] = None, remove_folder_at_end: bool = False,
                 names: Optional[Dict[str, Name]] = None, said: Sequence[str] = ()) -> None:
        """``remove_folder_at_end``: the folder holds nothing to read after the job (a calibration's or
        adaptation's copies of the scans; its model is written elsewhere), so it goes as soon as the job ends.
        ``names``: the request's files (the worker's copies of the scans) and what the user calls each (a node's
        name; a callable gives it as it is when a warning or the error is read, so a node renamed during the run is
        named by its new name): the worker's warnings and error say those instead of the temporary copies' paths.
        ``said``: warnings logged here as the request's inputs were read (a mask's transform), the job's first."""
        self.folder = Path(folder)
        # longest first: a file's path before its bare name, which it contains
        self._names = sorted(((str(k), v) for f, v in (names or {}).items() for k in (f, Path(f).name)),
                             key=lambda item: -len(item[0]))
        self._remove_folder_at_end = remove_folder_at_end
        self.request = request
        self.state = JobState.RUNNING
        self.fraction, self.message = 0.0, "Starting"
        self.done: Optional[Dict[str, Any]] = None
        self._error: Optional[str] = None  # as the worker said it (see error)
        self.output: List[str] = []  # lines that were not protocol messages (warnings, tracebacks)
        self._warnings: List[str] = list(said)  # then the worker's logged warnings (also in output), as it said them
        self._cancelled = False
        self._output_before = _file_stamp(request.get("out"))
        request_path = self.folder / "request.json"
        # the worker watches this process (Slicer) itself: behind a launcher its parent is the launcher; the machine
        # tells a later run whether that process id means anything where it runs (remove_abandoned_job_folders)
        request_path.write_text(json.dumps(dict(request, owner_pid=os.getpid(), owner_machine=machine_tag())),
                                encoding="utf-8")
        self.process = (launch or launch_process)(worker_command(python or sys.executable, request_path))
        self._own_group = leads_own_group(self.process)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=_read_lines, args=(self.process.stdout, self._lines), daemon=True)
        self._reader.start()
        self._eof = False
        self._exited_at: Optional[float] = None
        if not remove_folder_at_end:  # a detection dropped unloaded, or still held when Python exits: nobody can
            # load its results, so its worker is stopped and its copy of the scan removed (a calibration or an
            # adaptation writes its model elsewhere, and its worker removes its copies as it ends)
            weakref.finalize(self, _abandon, self.process, self._own_group, self.folder)

    @property
    def wrote_output(self) -> bool:
        """Whether the job's output file (a calibrated or adapted model) was written since the job started: a
        cancel can come after the worker's last write."""
        out = self.request.get("out")
        return out is not None and _file_stamp(out) not in (None, self._output_before)

    @property
    def warnings(self) -> List[str]:
        """The warnings of reading its inputs, then the worker's logged warnings so far, each once, in the order they
        came, naming what they name as it is called now (``names``)."""
        return list(dict.fromkeys(self._named(warning) for warning in self._warnings))

    @property
    def error(self) -> Optional[str]:
        """Why the job failed (None: it did not), naming what it names as it is called now (``names``)."""
        return None if self._error is None else self._named(self._error)

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING

    def poll(self) -> bool:
        """Take the messages that arrived; True once the job has ended (see :attr:`state`)."""
        while not self._eof:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
            else:
                self._take(line)
        if self.state is JobState.RUNNING and self.process.poll() is not None:
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            # a process the worker started may keep its output open: the job still ends once the worker has
            if self._eof or time.monotonic() - self._exited_at > OUTPUT_GRACE_S:
                self._end(self.process.returncode)
        return self.finished

    def wait(self, timeout: Optional[float] = None) -> JobState:
        """Block until the job ends (for scripts and tests; the module polls instead): the worker's exit, then its
        output's end, for at most :data:`OUTPUT_GRACE_S` more (a process it started may hold the output open)."""
        self.process.wait(timeout)
        self._reader.join(OUTPUT_GRACE_S)
        self.poll()
        if self.state is JobState.RUNNING:  # the output is still open: the worker itself has ended
            self._end(self.process.returncode)
        return self.state

    def cancel(self, reason: Optional[str] = None) -> None:
        """Stop the worker and every process it started now (see :func:`stop_process_tree`); ``reason``: what
        :attr:`message` says then (None: the last progress message stays)."""
        if self.finished:
            return
        self._cancelled = True
        stop_process_tree(self.process, self._own_group)
        self.state = JobState.CANCELLED
        if reason is not None:
            self.message = reason
        if self._remove_folder_at_end:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary folder (inputs and results); a worker still running then stops by itself."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _take(self, line: str) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # not the worker's own line
            message = None
        if not isinstance(message, dict):
            self.output.append(line)
            if line.startswith(WARNING_PREFIX):  # the worker logs "LEVEL: message"
                warning, said = self._named(line[len(WARNING_PREFIX):]), self.warnings
                self._warnings.append(line[len(WARNING_PREFIX):])
                if warning not in said:  # (one said for each of several scans is shown once)
                    log.warning("CeVAEAnomaly worker: %s", warning)
            else:
                log.info("CeVAEAnomaly worker: %s", line)
        elif "progress" in message:
            if self._cancelled:  # a line sent before the stop, taken after it: the progress stays where it stopped
                return
            fraction = message["progress"]
            if isinstance(fraction, int) and not isinstance(fraction, bool):
                fraction = min(max(fraction, 0), 1)  # (a whole number too large for a float: OverflowError)
            if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction):
                self.fraction, self.message = min(max(float(fraction), 0.0), 1.0), str(message.get("message", ""))
            else:  # not the worker's own line (it reports numbers in [0, 1]): the panel must not break on it
                log.info("CeVAEAnomaly worker: a progress line without a usable fraction: %s", line)
        elif "done" in message:
            self.done = message["done"]
        elif "error" in message:
            self._error = str(message["error"])

    def _named(self, text: str) -> str:
        """``text`` with the paths of the worker's copies replaced by what the user calls them."""
        for file, name in self._names:
            if file in text:
                text = text.replace(file, name() if callable(name) else name)
        return text

    def _end(self, returncode: int) -> None:
        withdrawn = returncode == EXIT_ABANDONED and not (self.folder / "request.json").exists()
        if self._remove_folder_at_end:
            self.cleanup()
        if self._cancelled:
            self.state = JobState.CANCELLED
        elif returncode == 0 and self.done is not None:
            self.state = JobState.DONE
        else:
            self.state = JobState.FAILED
            if self._error is None and withdrawn:  # not by this process (it cancels): e.g. a clean-up of /tmp
                self._error = (f"The run's temporary folder {self.folder} was removed while it ran (by a clean-up of "
                               "temporary files?), so its worker stopped; nothing was written. Run it again.")
            elif self._error is None:
                tail = "\n".join(self.output[-5:])
                self._error = (f"The worker process stopped unexpectedly (exit status {returncode}){_why(returncode)}."
                              f"\n{tail}").strip()

    def raise_for_failure(self) -> None:
        """Raise the worker's error as a CeVAEError if the job failed."""
        if self.state is JobState.FAILED:
            raise CeVAEError(self.error or "The worker failed.")


_KILLED = (-9, 128 + 9)  # SIGKILL, as Python reports it and as a launcher's shell-style status (PythonSlicer)


def _why(returncode: int) -> str:
    """What an exit status without an error message most likely means, for the user (or "")."""
    if returncode in _KILLED:
        return (": it was killed, most often by the system when memory runs out; close other programs, or choose a "
                "smaller batch size or the CPU, and run again")
    return ""


def _abandon(process: subprocess.Popen, own_group: bool, folder: Path) -> None:
    """What is left of a detection job no one holds any more: stop its worker if it still runs, remove its
    folder (one the module made: its name says so)."""
    if process.poll() is None:
        stop_process_tree(process, own_group)
    if folder.name.startswith(JOB_FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


class RunningJobs:
    """The worker jobs a program started, to stop together when it ends (Slicer's exit). A job is held by a weak
    reference beside its process and folder, so that one dropped unloaded is still stopped when it is collected
    (:class:`WorkerJob`), and one dropped while it runs (a calibration's or an adaptation's goes on) is still found."""

    def __init__(self) -> None:
        self._held: List[Tuple["weakref.ReferenceType[WorkerJob]", subprocess.Popen, bool, Path]] = []

    def add(self, job: WorkerJob) -> WorkerJob:
        """Hold ``job`` (and forget those whose worker has ended); returns it."""
        self._held = [held for held in self._held if held[1].poll() is None]
        self._held.append((weakref.ref(job), job.process, job._own_group, job.folder))
        return job

    def stop_all(self) -> int:
        """Stop each held job whose worker still runs, as Cancel does, with every process it started, and remove its
        folder; jobs that have ended are left as they are (a detection's results may still be loaded). How many were
        stopped."""
        held, self._held = self._held, []
        stopped = 0
        for reference, process, own_group, folder in held:
            try:  # one job that cannot be stopped must not keep the others running
                stopped += _stop(reference(), process, own_group, folder)
            except Exception as exc:  # (at exit: nothing can be shown but the log)
                log.warning("Could not stop the worker job in %s (process %s): %s", folder, process.pid, exc)
        return stopped


def _stop(job: Optional[WorkerJob], process: subprocess.Popen, own_group: bool, folder: Path) -> int:
    """Stop one held job (``job``: None where it was dropped) if its worker still runs; 1 if it was stopped."""
    if job is None and process.poll() is None:  # dropped while it runs
        _abandon(process, own_group, folder)
        return 1
    if job is not None and not job.poll():
        job.cancel()
        job.cleanup()  # a detection's folder too: nothing cancelled is loaded
        return 1
    return 0


def remove_abandoned_job_folders(root: Path) -> int:
    """Remove the job folders in ``root`` that nobody will read or remove: made on this machine by a process (a
    Slicer) that no longer exists, as its request says; a Slicer killed after its worker ended leaves one, with the
    copy of the scan in it. Others are kept (a running Slicer's, another machine's, one without a readable
    request); how many were removed."""
    removed = 0
    try:
        with os.scandir(root) as listing:
            folders = [e.path for e in listing
                       if e.name.startswith(JOB_FOLDER_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for folder in folders:
        try:
            request = json.loads(Path(folder, "request.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        owner = request.get("owner_pid") if isinstance(request, dict) else None
        if (isinstance(owner, int) and not isinstance(owner, bool) and 0 < owner != os.getpid()
                and request.get("owner_machine") == machine_tag() and not process_exists(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        log.info("CeVAEAnomaly: removed %d job folder(s) that an earlier Slicer, which ended unexpectedly, left in %s.",
                 removed, root)
    return removed


def _file_stamp(path: Optional[str]) -> Optional[Tuple[int, int, int]]:
    """(inode, size, modification time in ns) of a file, or None if there is none."""
    try:
        status = os.stat(path) if path else None
    except OSError:
        return None
    return None if status is None else (status.st_ino, status.st_size, status.st_mtime_ns)


def _read_lines(stream: IO, lines: "queue.Queue[Optional[str]]") -> None:
    """Reader thread: every line of ``stream`` into ``lines``, then None at its end, whatever happens.

    A text stream (``slicer.util.launchConsoleProcess`` opens one in the locale's encoding) is read
    through its byte buffer: bytes that are not UTF-8 become U+FFFD instead of stopping the reader.
    """
    source = getattr(stream, "buffer", stream)
    try:
        for line in source:
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            lines.put(text.rstrip("\r\n"))
    except Exception:  # noqa: BLE001 - the end marker below must still be sent
        log.exception("CeVAEAnomaly: reading the worker's output failed")
    finally:
        lines.put(None)
        stream.close()
