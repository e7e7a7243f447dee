"""What a model bundle is: how many healthy scans its threshold was calibrated on, said by detection, with the bundled
model and a copy calibrated on two real healthy scans at 3 mm."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA, add_volume
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.options import ThresholdPolicy

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(),
                                 reason="needs the healthy sample volumes")]
SITE = ("colin27", "mni152")  # calibrated on; robex: the scan detected


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Dict[str, Path]:
    """The healthy sample scans at 3 mm (slab-averaged, as a thick acquisition) with their brain masks:
    ``NAME.nii.gz`` and ``NAME_mask.nii.gz``, the two site scans in the folder ``site``."""
    research = pytest.importorskip("CeVAEAnomalyResearch.acquisition")
    root = tmp_path_factory.mktemp("scans")
    (root / "site").mkdir()
    out = {"site": root / "site"}
    for name in (*SITE, "robex"):
        folder = root / "site" if name in SITE else root
        image = research.downsample_isotropic(sitk.ReadImage(str(SHARED_DATA / f"{name}_t1.nii.gz"),
                                                             sitk.sitkFloat32), 3.0)
        mask = sitk.ReadImage(str(SHARED_DATA / f"{name}_brainmask.nii.gz"))
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"{name}_mask.nii.gz"))
        out[name] = folder / f"{name}.nii.gz"
    return out


@pytest.fixture(scope="module")
def calibrated(scans, tmp_path_factory) -> Path:
    """The bundled model calibrated (`cevae-anomaly calibrate`) on the two 3 mm site scans."""
    out = tmp_path_factory.mktemp("calibrated") / "site.cevae"
    assert main(["calibrate", str(scans["site"]), "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_detection_says_how_many_healthy_scans_its_threshold_was_calibrated_on(scans, calibrated, tmp_path, caplog):
    """detect said "calibrated on healthy volumes given to calibrate" (an adapted model: "on site scans"), not on how
    many: 2 scans or 200 read alike in its log, its record and the Slicer summary."""
    robex = scans["robex"]
    record = tmp_path / "record.json"
    with caplog.at_level(logging.INFO):
        assert main(["detect", str(robex), "--mask", str(robex.with_name("robex_mask.nii.gz")), "--model",
                     str(calibrated), "--score", str(tmp_path / "score.nii.gz"), "--record", str(record),
                     "--device", "cpu"]) == 0
    said = "calibrated on healthy volumes given to calibrate (2 scans), healthy false-positive rate 0.00021774"
    assert said in caplog.text
    assert json.loads(record.read_text())["threshold_source"].startswith(said)

    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, sitk.ReadImage(str(robex)), "robex")
    mask = add_volume(scene, sitk.ReadImage(str(robex.with_name("robex_mask.nii.gz"))), "mask",
                      "vtkMRMLLabelMapVolumeNode")
    assert said in CeVAEAnomalyLogic().process(volume, mask, modelPath=calibrated, device="cpu").summary

    bundled = read_header(default_model_path())  # calibrated before tables counted their scans: its list of them
    source = bundled.threshold(bundled.score_options, bundled.postprocess, ThresholdPolicy())[1]
    assert source.startswith("calibrated on held-out scores (3 scans), healthy false-positive rate")
