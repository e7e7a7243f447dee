"""A long Slicer session: many detections in one scene, with models switched and model files replaced (a real MRML
scene from slicer-core, real model files)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.data import default_model_path  # noqa: E402
from CeVAEAnomalyLib.engine.header import read_header  # noqa: E402
from CeVAEAnomalyLib.io.checksum import sha256_of  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402
from CeVAEAnomalyLib.slicer.settings import ModelSettingsCache  # noqa: E402


@pytest.mark.parametrize("how", ["copied over it (cp -p)", "moved into its place (rsync -t)"])
def test_a_model_file_replaced_by_another_with_the_same_modification_time_is_loaded_anew(tiny_bundle, tmp_path, how):
    """The logic kept the model it loaded while the file's modification time stayed the same: a site model replaced by
    a newer one copied with its times kept (cp -p, rsync -t, a tar or zip extracted) was not read again, so the
    session's detections used the earlier model, and their records named its checksum. The file is read again once
    it is another file or was written since."""
    site = tmp_path / "site.cevae"
    shutil.copyfile(default_model_path(), site)
    newer = tmp_path / "newer.cevae"
    shutil.copyfile(tiny_bundle, newer)
    kept = os.stat(site)
    os.utime(newer, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    logic = CeVAEAnomalyLogic()
    first = logic.loadModel(site, "cpu")
    assert logic.loadModel(site, "cpu") is first  # unchanged: not read again
    if how.startswith("copied"):
        shutil.copy2(newer, site)
    else:
        os.replace(newer, site)
    assert os.stat(site).st_mtime_ns == kept.st_mtime_ns
    again = logic.loadModel(site, "cpu")
    assert again is not first
    assert again.sha256 == sha256_of(site) != first.sha256
    assert again.model_config == CeVAEAnomalyLogic().loadModel(tiny_bundle, "cpu").model_config


def test_the_panels_model_settings_follow_a_model_file_replaced_with_its_modification_time_kept(tiny_bundle,
                                                                                              tmp_path):
    """The panel kept what it read of its model (score types, calibrated sensitivities, the model's values) by the
    file's path and modification time: after the file was replaced by another model copied with its times kept, the
    panel offered and checked the earlier model's choices while the worker ran the new one."""
    site = tmp_path / "site.cevae"
    shutil.copyfile(default_model_path(), site)
    panel = SimpleNamespace(useBundledModel=False, modelPath=str(site))
    cache = ModelSettingsCache()
    first = cache.of(panel)
    assert first is not None and cache.of(panel) is first
    kept = os.stat(site)
    shutil.copy2(tiny_bundle, site)  # cp -p: the same file written, its modification time set as the copy's source's
    os.utime(site, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    now = cache.of(panel)
    assert now is not first and now.header == read_header(site) != first.header


def own_job_folders() -> list:
    """The job folders in the temporary folder whose request names this process as their owner."""
    import glob
    import json
    import tempfile

    from CeVAEAnomalyLib.slicer.jobs import JOB_FOLDER_PREFIX

    mine = []
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), JOB_FOLDER_PREFIX + "*")):
        try:
            request = json.loads(Path(folder, "request.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if request.get("owner_pid") == os.getpid():
            mine.append(folder)
    return mine


def child_processes() -> list:
    """The processes this one started that still exist (zombies too)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == os.getpid():
            found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files and processes through /proc")
def test_a_session_of_many_detections_leaves_nothing_behind(tiny_bundle, tmp_path):
    """Twelve detections in one scene, in this process and in workers, with two models switched between, every third
    run cancelled, results deleted and the scene closed in between: each run's copies of the scan, worker, open files
    and scene nodes go with it, and one model is kept in memory (measured over 24 runs on Colin27 at 2 mm: memory,
    files, threads, observers and nodes level off after the first runs)."""
    import gc
    import weakref

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.progress import Cancelled
    from conftest import add_volume, make_head

    other = tmp_path / "other.cevae"
    shutil.copyfile(tiny_bundle, other)
    scene = slicer.vtkMRMLScene()
    logic = CeVAEAnomalyLogic()
    image, mask = make_head(seed=7)
    open_files = len(os.listdir("/proc/self/fd"))
    earlier = set(child_processes())  # (of earlier tests in this process, in a whole suite's run)
    earlier_folders = set(own_job_folders())
    models = []
    nodes_after_first_cycle = None
    for run in range(12):
        volume = add_volume(scene, image, f"case {run}")
        brain = add_volume(scene, mask, f"mask {run}", "vtkMRMLLabelMapVolumeNode")
        model, cancel = (tiny_bundle, other)[run % 2], run % 3 == 2
        if run % 4 < 2:
            def progress(fraction: float, message: str) -> None:
                if cancel and fraction > 0.3:
                    raise Cancelled()
            try:
                result = logic.process(volume, brain, modelPath=model, device="cpu", progress=progress)
            except Cancelled:
                result = None
            models.append(weakref.ref(logic._bundle))
        else:
            job = logic.startDetection(volume, brain, modelPath=model, device="cpu")
            if cancel:
                job.cancel()
            job.wait(300)
            try:
                result = logic.finishDetection(job)
            except CeVAEError:
                result = None
            del job
        assert (result is None) == cancel, run
        if run % 3 == 0 and result is not None:  # the reader deletes the results
            for node in vars(result.nodes).values():
                if node is not None:
                    scene.RemoveNode(node)
        result = None
        if run % 6 == 5:
            if nodes_after_first_cycle is None:
                nodes_after_first_cycle = scene.GetNumberOfNodes()
            assert scene.GetNumberOfNodes() == nodes_after_first_cycle  # each cycle leaves as many nodes
            scene.Clear(0)
            assert scene.GetNumberOfNodes() == 0
        gc.collect()
        assert set(own_job_folders()) <= earlier_folders and set(child_processes()) <= earlier, run
        assert sum(model() is not None for model in models) <= 1, run
    assert len(os.listdir("/proc/self/fd")) == open_files
