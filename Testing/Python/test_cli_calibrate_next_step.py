"""`calibrate` ended without saying how to use what it wrote (`adapt` ends with "Detect with it: ..."): a user
who calibrated on a site's healthy scans had to find out that detect takes the new bundle with --model."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibrate_ends_by_saying_how_to_detect_with_the_calibrated_model(tiny_bundle, tmp_path: Path,
                                                                           caplog) -> None:
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "c.nii.gz").write_bytes(data_path("colin27_t1_2mm.nii.gz").read_bytes())
    (healthy / "c_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    out = tmp_path / "site.cevae"
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", str(healthy), "--model", str(tiny_bundle), "--out", str(out),
                     "--device", "cpu"]) == 0
    last = caplog.records[-1].getMessage()
    assert last.startswith("Calibrated bundle written") and last.endswith(
        f"Detect with it: cevae-anomaly detect SCAN --model {out}"), last
