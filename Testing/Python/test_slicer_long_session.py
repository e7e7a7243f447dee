"""A long Slicer session: many detections in one scene, with models switched and model files replaced (a real MRML
scene from slicer-core, real model files)."""
from __future__ import annotations

import os
import shutil
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
