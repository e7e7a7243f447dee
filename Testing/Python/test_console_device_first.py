"""The Slicer console's ``logic.process(..., device="cuda")`` without CUDA said its fallback to the CPU only when it
loaded the model, after the volume was read: a volume that could not be read was refused without a word about the
device (``detect`` and Scripts/DetectVolume.py say it first)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import add_volume, make_head

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FALLBACK = "CUDA was requested but is not available; using the CPU."


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU


def _steps():
    """A progress callback that logs each step, so that the log holds the steps and the warnings in their order."""
    return lambda fraction, message: logging.getLogger("steps").info(message)


def test_the_fallback_is_said_once_before_the_volume_is_read(no_cuda, tiny_bundle, caplog):
    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7)
    volume, brain = add_volume(scene, image, "patient A"), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode")
    with caplog.at_level(logging.INFO):
        result = CeVAEAnomalyLogic().process(volume, brain, modelPath=tiny_bundle, device="cuda", threshold=0.3,
                                             progress=_steps())
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(FALLBACK) == 1, messages
    assert messages.index(FALLBACK) < messages.index("Reading the volume"), messages
    assert [w for w in result.warnings if "CUDA" in w] == [FALLBACK] and result.detection.record.device == "cpu"


def test_a_volume_that_cannot_be_read_is_refused_after_the_fallback_is_said(no_cuda, tiny_bundle, caplog):
    scene = slicer.vtkMRMLScene()
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    with caplog.at_level(logging.INFO), pytest.raises(CeVAEError):
        CeVAEAnomalyLogic().process(empty, modelPath=tiny_bundle, device="cuda", progress=_steps())
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(FALLBACK) == 1 and messages.index(FALLBACK) < messages.index("Reading the volume"), messages
