"""No worker outlives the Slicer that started it: at the application's exit (aboutToQuit) every job a
CeVAEAnomalyLogic started stops, the console's as the panel's (real workers on a tiny model, a real scene)."""
from __future__ import annotations

import gc
import time

import pytest

from conftest import add_volume, site_scene

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.slicer.jobs import JobState, WorkerJob  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402

ENDLESS_ADAPT = dict(steps=100_000, batch_size=8, checkpoint_every=50_000)  # runs until stopped


class QuittingApp:
    """Stands in for ``slicer.app`` where only its aboutToQuit signal is used: what is connected to it runs when it
    quits, in order, as Qt runs it."""

    def __init__(self) -> None:
        self.aboutToQuit = []

    def connect(self, signal: str, slot) -> None:
        assert signal == "aboutToQuit()", signal
        self.aboutToQuit.append(slot)

    def quit(self) -> None:
        for slot in self.aboutToQuit:
            slot()


def _working(jobs, timeout: float = 180.0) -> None:
    """Wait until each job's worker reports progress (torch imported, its scans read)."""
    deadline = time.monotonic() + timeout
    while not all(job.fraction > 0.0 for job in jobs):
        assert not any(job.poll() for job in jobs), [job.error for job in jobs]
        assert time.monotonic() < deadline, "a worker did not start"
        time.sleep(0.05)


def test_quitting_slicer_stops_the_jobs_the_console_started(tiny_bundle, tmp_path, monkeypatch):
    """Two adaptations started from the console by two logics, one of them no longer held: quitting stops both
    workers and removes their copies of the scans; neither writes a model."""
    app = QuittingApp()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the workers' slice caches: not in the shared temporary folder
    _, volumes, masks = site_scene()
    models = tmp_path / "models"
    models.mkdir()
    held = CeVAEAnomalyLogic().startAdaptation(volumes, masks, models / "a.cevae", modelPath=tiny_bundle,
                                               device="cpu", options=ENDLESS_ADAPT)
    dropped = CeVAEAnomalyLogic().startAdaptation(volumes, masks, models / "b.cevae", modelPath=tiny_bundle,
                                                  device="cpu", options=ENDLESS_ADAPT)
    _working([held, dropped])
    processes, folders = [held.process, dropped.process], [held.folder, dropped.folder]
    del dropped  # the console let go of it: its worker goes on
    gc.collect()
    assert processes[1].poll() is None
    assert len(app.aboutToQuit) == 1  # one hook, whichever logic started the jobs
    app.quit()
    assert [process.poll() is not None for process in processes] == [True, True]
    assert [folder.exists() for folder in folders] == [False, False]
    assert held.state is JobState.CANCELLED
    assert not list(models.glob("*.cevae"))
    assert CeVAEAnomalyLogic.stopAllJobs() == 0  # nothing left to stop


def test_stopping_all_jobs_leaves_an_ended_detection_to_be_loaded(tiny_bundle):
    """A detection that has ended is no running job: its results stay loadable after stopAllJobs."""
    from conftest import make_head

    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7)
    volume = add_volume(scene, image, "head")
    logic = CeVAEAnomalyLogic()
    job: WorkerJob = logic.startDetection(volume, add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode"),
                                          modelPath=tiny_bundle, device="cpu", threshold=0.3)
    assert job.wait(120) is JobState.DONE, job.error
    CeVAEAnomalyLogic.stopAllJobs()
    assert job.state is JobState.DONE and logic.finishDetection(job).nodes.score is not None


class _Held:
    """What RunningJobs keeps of a job: its worker process, process group and folder."""

    def __init__(self, process, folder) -> None:
        self.process, self._own_group, self.folder = process, False, folder


def test_a_job_that_cannot_be_stopped_leaves_the_others_stopped(tmp_path, monkeypatch, caplog):
    """Stopping one job fails (at exit nothing can be shown): the next is still stopped and the log names the first."""
    import subprocess
    import sys

    from CeVAEAnomalyLib.slicer import jobs

    workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
    try:
        running = jobs.RunningJobs()
        for n, process in enumerate(workers):
            running.add(_Held(process, tmp_path / f"job{n}"))  # dropped at once: held only weakly
        gc.collect()
        real = jobs._abandon

        def abandon(process, own_group, folder):
            if process is workers[0]:
                raise PermissionError("operation not permitted")
            real(process, own_group, folder)

        monkeypatch.setattr(jobs, "_abandon", abandon)
        assert running.stop_all() == 1
        assert workers[1].wait(timeout=30) is not None
        assert workers[0].poll() is None
        assert f"Could not stop the worker job in {tmp_path / 'job0'}" in caplog.text
    finally:
        for process in workers:
            process.kill()
            process.wait()
