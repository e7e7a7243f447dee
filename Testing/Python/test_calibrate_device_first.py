"""`calibrate --device mps` (or cuda) where there is none said that it falls back to the CPU only after every healthy
volume was read and hashed: a volume that could not be read was refused without a word about the device."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                    reason="needs a machine without MPS")
def test_a_missing_accelerator_is_said_before_any_volume_is_read(tiny_bundle, tmp_path: Path, caplog, capsys):
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "c.nii.gz").write_bytes(b"not an image, so reading it stops the run")
    (healthy / "c_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(healthy), "--model", str(tiny_bundle), "--out", str(tmp_path / "site.cevae"),
                     "--device", "mps"]) == 2
    assert "c.nii.gz" in capsys.readouterr().err  # the volume that could not be read, refused after
    assert [r.getMessage() for r in caplog.records] == ["MPS was requested but is not available; using the CPU."]
