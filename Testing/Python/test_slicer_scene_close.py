"""A detection started from the console (startDetection) stops when its scene closes, as the panel's does, or when its
input is removed, and its results never go into the next scene's nodes (real workers on a tiny model, a real scene)."""
from __future__ import annotations

import time

import pytest

from conftest import add_volume, make_head

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer import mrml  # noqa: E402
from CeVAEAnomalyLib.slicer.jobs import JobState, WorkerJob  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic, InputRemovedError  # noqa: E402
from CeVAEAnomalyLib.slicer.nodes import RUN_ATTRIBUTE, SCORE_ROLE, link_output  # noqa: E402

CLOSED = r"^The scene of 'head' was closed before its detection's results were loaded; the detection was stopped " \
         r"and nothing was loaded\.$"


def _head_scene():
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7)
    return scene, add_volume(scene, image, "head"), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")


def _working(job: WorkerJob, timeout: float = 180.0) -> None:
    """Wait until the worker reports progress (torch imported, the scan read)."""
    deadline = time.monotonic() + timeout
    while job.fraction == 0.0:
        assert not job.poll(), job.error
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)


def _reloaded(scene, old_id: str):
    """What a reload of a saved scene brings into the closed ``scene``: a scan under the closed input's node ID and
    a score volume of it."""
    image, _ = make_head(seed=8)
    volume = add_volume(scene, image, "head")
    assert volume.GetID() == old_id  # the IDs start again after a close
    score = add_volume(scene, image, "head anomaly score")
    link_output(score, SCORE_ROLE, volume)
    return volume, score


def test_closing_the_scene_stops_a_console_detection_and_says_so(tiny_bundle):
    """Scene close while a console detection runs: its worker stops at once (it ran to its end, minutes on a CPU)
    and its copy of the scan goes; finishing it after a reload says the scene was closed, not that it was
    cancelled, and writes nothing into the reloaded scene's nodes, even one under the input's node ID."""
    scene, volume, mask = _head_scene()
    old_id = volume.GetID()
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
    _working(job)
    scene.Clear(0)
    assert job.process.poll() is not None and not job.folder.exists()
    assert job.poll() and job.state is JobState.CANCELLED
    assert job.message == "Stopped: the scene was closed."
    reloaded, score = _reloaded(scene, old_id)
    before, voxels = mrml.node_ids(scene), score.GetImageData().GetMTime()
    with pytest.raises(InputRemovedError, match=CLOSED):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before and score.GetImageData().GetMTime() == voxels
    assert score.GetAttribute(RUN_ATTRIBUTE) is None and reloaded.GetImageData() is not None


def test_a_detection_ended_before_its_scene_closed_is_not_loaded_into_the_next_scene(tiny_bundle):
    """A console detection that ended unloaded, then its scene closed and its input put back into the scene: its
    results are discarded at the close, not loaded into the next scene."""
    scene, volume, mask = _head_scene()
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
    assert job.wait(120) is JobState.DONE, job.error
    scene.Clear(0)
    assert not job.folder.exists()
    scene.AddNode(volume)  # the same node object, in the scene that followed
    before = mrml.node_ids(scene)
    with pytest.raises(InputRemovedError, match=CLOSED):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before


def test_a_detection_finished_discarded_or_dropped_leaves_no_watch_on_its_scene(tmp_path):
    """The watch on the scene's close ends with the detection: loaded (here refused, as cancelled), discarded, or
    dropped unloaded; a console session running many detections adds no observer per run to its scene."""
    import gc
    import os

    if os.name != "posix":
        pytest.skip("the stand-in worker is a POSIX script")
    script = tmp_path / "worker"
    script.write_text("#!/bin/sh\nsleep 20\n")
    script.chmod(0o755)
    scene, volume, mask = _head_scene()
    logic = CeVAEAnomalyLogic()
    watched = (slicer.vtkMRMLScene.StartCloseEvent, slicer.vtkMRMLScene.NodeRemovedEvent)
    cancelled, discarded, dropped = (logic.startDetection(volume, mask, python=str(script)) for _ in range(3))
    assert all(scene.HasObserver(event) for event in watched)
    cancelled.cancel()
    with pytest.raises(CeVAEError, match="cancelled"):
        logic.finishDetection(cancelled)
    logic.discardJob(discarded)
    assert all(scene.HasObserver(event) for event in watched)  # the dropped one's
    del dropped
    gc.collect()
    assert not any(scene.HasObserver(event) for event in watched)


def test_closing_the_scene_during_a_detection_in_this_process_says_so_and_loads_nothing(tiny_bundle):
    """process() whose progress callback lets the GUI close the scene (and a reload bring a scan under the input's node
    ID): it said the input "was removed during the run"; now it stops at its next progress report, says the scene was
    closed, as finishDetection does, and writes nothing into the reloaded scene."""
    scene, volume, mask = _head_scene()
    old_id = volume.GetID()
    heard, reloaded = [], []

    def progress(fraction: float, message: str) -> None:
        heard.append(message)
        if message == "Loading the model":
            scene.Clear(0)
            reloaded.extend(_reloaded(scene, old_id))
            reloaded.append(mrml.node_ids(scene))

    with pytest.raises(InputRemovedError, match=CLOSED):
        CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", progress=progress)
    _, score, before = reloaded
    assert mrml.node_ids(scene) == before and score.GetAttribute(RUN_ATTRIBUTE) is None
    assert heard[-1] == "Loading the model"  # stopped at the close: the detection's own reports never came


def test_deleting_the_input_stops_its_detection_at_once_and_says_so(tiny_bundle):
    """The reader deletes the scan whose detection runs: its worker went on to its end (minutes on a CPU, the panel
    showing Cancel all along) for results that were then discarded. It now stops at once and its copy of the scan goes,
    as at a scene close; deleting another node (its brain mask) stops nothing; finishing it says the scan was removed
    and changes nothing in the scene, even with the scan put back."""
    scene, volume, mask = _head_scene()
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(volume, mask, modelPath=tiny_bundle, device="cpu")
    _working(job)
    scene.RemoveNode(mask)
    assert job.process.poll() is None and job.folder.exists()
    scene.RemoveNode(volume)
    assert job.process.poll() is not None and not job.folder.exists()
    assert job.poll() and job.state is JobState.CANCELLED
    assert job.message == "Stopped: the input volume 'head' was removed from the scene."
    scene.AddNode(volume)  # put back: its detection was stopped all the same
    before = mrml.node_ids(scene)
    with pytest.raises(InputRemovedError, match=r"^'head' was removed during the run; its results were discarded\.$"):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before


def test_deleting_the_input_during_a_detection_in_this_process_stops_it_at_the_next_report(tiny_bundle):
    """process() whose progress callback lets the GUI run, and the reader deletes the scan: the detection went on to
    its end for results that were then discarded; it now stops at its next progress report, says the scan was removed
    and changes nothing in the scene."""
    scene, volume, mask = _head_scene()
    heard = []

    def progress(fraction: float, message: str) -> None:
        heard.append(message)
        if message == "Loading the model":
            scene.RemoveNode(volume)

    before = [node_id for node_id in mrml.node_ids(scene) if node_id != volume.GetID()]
    with pytest.raises(InputRemovedError, match=r"^'head' was removed during the run; its results were discarded\.$"):
        CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", progress=progress)
    assert mrml.node_ids(scene) == before
    assert heard[-1] == "Loading the model"  # stopped at the removal: the detection's own reports never came
