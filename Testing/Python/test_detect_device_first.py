"""`detect --device mps` (or cuda) where there is none said that it falls back to the CPU only after the image and
mask were read: a scan that could not be read was refused without a word about the device. `batch` said it only
after the model and the earlier outputs were hashed, once per worker."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from CeVAEAnomalyLib.cli.main import main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                                 reason="needs a machine without MPS")]

FALLBACK = "MPS was requested but is not available; using the CPU."


def test_detect_says_a_missing_accelerator_before_the_scan_is_read(tiny_bundle, tmp_path: Path, caplog, capsys):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not an image, so reading it stops the run")
    with caplog.at_level(logging.WARNING):
        assert main(["detect", str(scan), "--model", str(tiny_bundle), "--score", str(tmp_path / "score.nii.gz"),
                     "--device", "mps"]) == 2
    assert "scan.nii.gz" in capsys.readouterr().err  # the scan that could not be read, refused after
    assert [r.getMessage() for r in caplog.records] == [FALLBACK]


def test_batch_says_a_missing_accelerator_once_before_any_work(tiny_bundle, tmp_path: Path, caplog):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"not an image")
    (folder / "b.nii.gz").write_bytes(b"not an image either")
    with caplog.at_level(logging.INFO):
        assert main(["batch", str(folder), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_bundle),
                     "--device", "mps", "--threshold", "1", "--workers", "2"]) != 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(FALLBACK) == 1
    assert messages.index(FALLBACK) == 0  # before the threshold line, the summary and every volume's row
