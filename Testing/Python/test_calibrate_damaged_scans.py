"""calibrate (the command and the Slicer panel's worker) names every healthy scan that cannot be read in one error,
before any scoring, in train's words: it stopped at the first one it read for its voxel checksums, so a site's
damaged scans were found one run at a time."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import DetectionRequest
from CeVAEAnomalyLib.slicer.worker import run_calibrate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def healthy(tmp_path) -> Dict[str, Path]:
    """A folder of three healthy scans with their brain masks: the bundled 2 mm Colin27, a truncated copy of it and a
    file that is no image."""
    folder = tmp_path / "healthy"
    folder.mkdir()
    scan = data_path("colin27_t1_2mm.nii.gz").read_bytes()
    files = {"good": scan, "cut": scan[: len(scan) // 3], "garbage": b"not an image\n"}
    for name, content in files.items():
        (folder / f"{name}.nii.gz").write_bytes(content)
        (folder / f"{name}_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    return {name: folder / f"{name}.nii.gz" for name in files}


def _names_both(said: str, healthy: Dict[str, Path]) -> None:
    assert said.startswith("2 of the 3 volumes could not be read (the others were read): "), said
    assert f"{healthy['cut']} is truncated or corrupt" in said, said
    assert f"{healthy['garbage']} could not be read as an image" in said, said


def test_calibrate_names_every_damaged_healthy_scan_in_one_error(healthy, tmp_path, capsys) -> None:
    out = tmp_path / "site.cevae"
    assert main(["calibrate", str(healthy["good"].parent), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1, err
    _names_both(said[0][len("error: "):], healthy)
    assert "Healthy volume" not in err and not out.exists()  # nothing scored, nothing written


def test_the_panels_calibration_names_every_damaged_scan_in_one_error(healthy, tmp_path) -> None:
    scored = []
    out = tmp_path / "site.cevae"
    task = {"subjects": [{"image": str(p), "mask": str(p.with_name(p.name.replace(".nii", "_mask.nii")))}
                         for p in healthy.values()],
            "model": str(default_model_path()), "request": DetectionRequest.of(device="cpu").to_dict(),
            "out": str(out)}
    with pytest.raises(CeVAEError) as refused:
        run_calibrate(task, lambda fraction, message: scored.append(message))
    _names_both(str(refused.value), healthy)
    assert not any("Healthy volume" in m for m in scored) and not out.exists()
