"""How fast Cancel ends the Slicer module's worker (issue 19); prints a Markdown table.

    .venv/bin/python Testing/benchmarks/bench_slicer_cancel.py [--repeats 5] [--model BUNDLE]

Needs slicer-core. Runs a detection of a synthetic head (automatic brain mask) in a worker process
started like the module does, behind a stand-in for ``PythonSlicer`` (a launcher that runs the real
interpreter as a child and forwards no signal), waits until it reports progress past a stage, then:

- ``discardJob`` (the module's Cancel): how long the call takes and when the real worker has ended
  (a zombie counts as ended: in a container without a reaping init, orphans stay zombies and keep
  the process group, so the call then waits its full STOP_WAIT_S before SIGKILL);
- SIGTERM to a worker started without the launcher: how long until it exits, and its exit status
  (3: it cleaned up and left without the interpreter's teardown).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Python"))

import slicer  # noqa: E402

from conftest import add_volume, make_head  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402

STAGES = (0.0, 0.1, 0.5)  # cancel once the reported progress is past these fractions
LAUNCHER = """#!{python}
import subprocess, sys
child = subprocess.Popen([{python!r}] + sys.argv[1:])
open({pidfile!r}, "w").write(str(child.pid))
sys.exit(child.wait())
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def watch_end(pid: int, ended: list) -> threading.Thread:
    """A thread that appends the time at which ``pid`` has ended."""
    def watch() -> None:
        while alive(pid):
            time.sleep(0.001)
        ended.append(time.monotonic())

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def started(logic, volume, model, python: str, past: float):
    job = logic.startDetection(volume, None, modelPath=model, device="cpu", python=python)
    while job.fraction <= past and not job.poll():
        time.sleep(0.005)
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="model bundle (default: the bundled model)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-cancel-"))
    pidfile, launcher = folder / "worker.pid", folder / "launcher"
    launcher.write_text(LAUNCHER.format(python=sys.executable, pidfile=str(pidfile)))
    launcher.chmod(0o755)
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=7)[0], "head")
    logic = CeVAEAnomalyLogic()
    print("| cancelled past | discardJob call (ms) | real worker ended (ms) | SIGTERM to exit (ms) | exit status |")
    print("|---|---|---|---|---|")
    for past in STAGES:
        calls, ended, term, statuses = [], [], [], set()
        for _ in range(args.repeats):
            job = started(logic, volume, args.model, str(launcher), past)
            gone: list = []
            watcher = watch_end(int(pidfile.read_text()), gone)
            start = time.monotonic()
            logic.discardJob(job)
            calls.append(1000 * (time.monotonic() - start))
            watcher.join()
            ended.append(1000 * (gone[0] - start))

            job = started(logic, volume, args.model, sys.executable, past)
            start = time.monotonic()
            os.killpg(job.process.pid, signal.SIGTERM)
            job.process.wait()
            term.append(1000 * (time.monotonic() - start))
            statuses.add(job.process.returncode)
            job.cleanup()
        print(f"| {past:.1f} | {statistics.median(calls):.0f} | {statistics.median(ended):.0f} | "
              f"{statistics.median(term):.0f} | {sorted(statuses)} |")


if __name__ == "__main__":
    main()
