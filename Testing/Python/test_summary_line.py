"""The one-line summaries a reader sees first (the Slicer panel's status line, detect's and batch's log lines) name
the top-ranked component: its volume and the patient's side, in one wording (result.components_summary)."""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import add_volume
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.result import Component, components_summary, flagged_text

FIRST = re.compile(r"(\d+) component\(s\), ([0-9.]+) ml flagged; the first: ([0-9.]+) ml, the patient's left")


def lesioned_colin(folder: Path) -> Tuple[Path, Path]:
    """The bundled Colin27 (2 mm) with a bright ball of 9 mm radius 25 mm into the patient's left hemisphere, and its
    brain mask, written into ``folder``."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    brain = sitk.GetArrayViewFromImage(mask) > 0
    kji = np.indices(brain.shape).reshape(3, -1).T[:, ::-1].astype(float)
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in kji]).reshape(*brain.shape, 3)
    pixels = sitk.GetArrayFromImage(image)
    ball = np.linalg.norm(points - (points[brain].mean(0) + [25.0, 0.0, 10.0]), axis=-1) <= 9.0  # LPS: +x is left
    pixels[ball] = 1.6 * float(np.percentile(pixels[brain], 99.5))
    lesioned = sitk.GetImageFromArray(pixels)
    lesioned.CopyInformation(image)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(lesioned, str(folder / "lesion.nii.gz"))
    sitk.WriteImage(mask, str(folder / "lesion_mask.nii.gz"))
    return folder / "lesion.nii.gz", folder / "lesion_mask.nii.gz"


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Tuple[Path, Path]:
    return lesioned_colin(tmp_path_factory.mktemp("scan") / "in")


def first_row(table: Path) -> dict:
    return next(csv.DictReader(table.read_text().splitlines()))


def test_detect_says_the_first_components_volume_and_side(scan, tmp_path, caplog):
    image, mask = scan
    table = tmp_path / "components.csv"
    with caplog.at_level(logging.INFO):
        assert main(["detect", str(image), "--mask", str(mask), "--score", str(tmp_path / "score.nii.gz"),
                     "--components", str(table), "--device", "cpu"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Threshold "))
    found = FIRST.search(line)
    assert found, line
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert int(found[1]) == len(rows) and rows[0]["side"] == "left"
    assert float(found[3]) == pytest.approx(float(rows[0]["volume_ml"]), abs=0.005)
    assert line.endswith(f"the patient's left; most anomalous slice: {line.split('most anomalous slice: ')[1]}")


def test_batch_says_each_volumes_first_component(scan, tmp_path, caplog):
    image, _ = scan
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["batch", str(image.parent), "--out-dir", str(out), "--device", "cpu", "--workers", "1"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("[1/1] lesion: ok ("))
    found = FIRST.search(line)
    assert found, line
    first = first_row(out / "lesion_components.csv")
    assert first["side"] == "left" and float(found[3]) == pytest.approx(float(first["volume_ml"]), abs=0.005)
    assert "the patient's left; max score " in line


def test_the_panels_status_line_says_the_first_components_volume_and_side(scan):
    """A real detection through the module logic on a real vtkMRMLScene: the summary and the status line's message."""
    import slicer

    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    image, mask = scan
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, sitk.ReadImage(str(image)), "lesion")
    brain = add_volume(scene, sitk.ReadImage(str(mask)), "brain", "vtkMRMLLabelMapVolumeNode")
    result = CeVAEAnomalyLogic(scene).process(volume, brain, device="cpu")
    top = result.detection.components[0]
    assert top.side == "left"
    assert result.summary.startswith(f"{len(result.detection.components)} component(s), "
                                     f"{flagged_text(result.detection.flagged_ml)} ml flagged; the first: "
                                     f"{flagged_text(top.volume_ml)} ml, the patient's left; threshold ")
    assert result.message.startswith(result.summary)


def component(volume_ml: float, side: str) -> Component:
    return Component(1, 10, volume_ml, 3.0, 2.0, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), side)


@pytest.mark.parametrize("side, said", [
    ("left", "; the first: 4.07 ml, the patient's left"), ("right", "; the first: 4.07 ml, the patient's right"),
    ("both", "; the first: 4.07 ml, crossing the midline"), ("", "; the first: 4.07 ml")])
def test_the_first_components_side_in_words(side, said):
    assert components_summary([component(4.07, side), component(1.13, "right")]) == (
        f"2 component(s), 5.20 ml flagged{said}")


def test_without_components_no_first_is_said():
    assert components_summary([]) == "0 component(s), 0.00 ml flagged"
    assert components_summary([component(0.003, "left")]) == (
        "1 component(s), 0.003 ml flagged; the first: 0.003 ml, the patient's left")
