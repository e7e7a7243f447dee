"""Adapting, calibrating and the Slicer panel's pre-check warn of scans of different acquisitions by one rule."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import SimpleITK as sitk
from conftest import add_volume, make_head

from CeVAEAnomalyLib.engine import calibrate as calibrate_mod
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibration import other_acquisitions
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.slicer.adapt_panel import mixed_acquisitions_warning
from CeVAEAnomalyLib.training import adapt as adapt_mod

# scans' voxel spacings (mm), and which of them are of another acquisition than the finest
EDGES: Dict[str, Tuple[Sequence[Tuple[float, float, float]], List[int]]] = {
    "exactly 1.5 times apart": ([(1.0, 1.0, 1.0), (1.0, 1.0, 1.5)], []),
    "one thick axis just over": ([(1.0, 1.0, 1.0), (1.0, 1.0, 1.503)], [1]),
    "finest just under 1 mm": ([(0.996, 0.996, 0.996), (1.0, 1.0, 1.5)], [1]),
    "in-plane and through-plane alike": ([(1.0, 1.0, 1.0), (1.5, 1.0, 1.0), (1.0, 1.0, 1.5)], []),
    "thick in-plane against thick slices": ([(1.0, 1.0, 1.0), (1.6, 1.6, 1.0), (1.0, 1.0, 1.5)], [1]),
}


def _scans(folder: Path, spacings: Sequence[Tuple[float, float, float]]) -> List[Subject]:
    """One synthetic head of each voxel spacing, with its brain mask, written as NIfTI."""
    folder.mkdir()
    subjects = []
    for n, spacing in enumerate(spacings):
        image, mask = make_head(size=(36, 40, 32), spacing=spacing, seed=n + 1)
        sitk.WriteImage(image, str(folder / f"s{n}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"s{n}_mask.nii.gz"))
        subjects.append(Subject(folder / f"s{n}.nii.gz", folder / f"s{n}_mask.nii.gz"))
    return subjects


def _said(caplog, run) -> List[str]:
    """The warnings of different acquisitions that ``run()`` logs."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run()
    return [r.getMessage() for r in caplog.records if "different acquisitions" in r.getMessage()]


@pytest.mark.parametrize("edge", list(EDGES))
def test_adapt_calibrate_and_the_panel_agree_on_mixed_acquisitions(edge, tiny_bundle, tmp_path, caplog, one_thread):
    """The adaptation warned by its scans' header spacings rounded to 0.01 mm, calibrating (and the Slicer panel) by
    the spacings read: a site of 1 mm and 1.503 mm scans, or of 0.996 mm and 1.5 mm ones, was one acquisition to the
    adaptation's warning before its first step and two to its own calibration's warning once it was done. All three
    now decide by engine.calibration.other_acquisitions of the spacings as read."""
    slicer = pytest.importorskip("slicer")
    spacings, coarse = EDGES[edge]
    subjects = _scans(tmp_path / "scans", spacings)
    bundle = load_bundle(tiny_bundle, "cpu")
    header = bundle.header
    calibrated = _said(caplog, lambda: calibrate_mod.calibrate_model(bundle, subjects, "test", header.score_options,
                                                                     header.postprocess))
    adapted = _said(caplog, lambda: adapt_mod._warn_of_mixed_acquisitions(subjects, "press Stop"))
    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, sitk.ReadImage(str(s.image)), s.image.name) for s in subjects]
    panel = mixed_acquisitions_warning([v.GetName() for v in volumes], [v.GetSpacing() for v in volumes], "calibrate")

    assert other_acquisitions([max(spacing) for spacing in spacings]) == coarse
    assert (len(calibrated), len(adapted), bool(panel)) == ((1, 1, True) if coarse else (0, 0, False)), \
        (calibrated, adapted, panel)
    if coarse:
        thick = subjects[max(coarse, key=lambda j: max(spacings[j]))]
        assert calibrated[0].startswith(f"The healthy volumes are of different acquisitions: {thick.image} ")
        assert f"and the {len(coarse)} with voxels over " in calibrated[0]
        assert adapted[0].startswith(f"The site scans are of different acquisitions: {thick.image} ")
        assert panel.startswith(f"The site scans are of different acquisitions: '{thick.image.name}' ")


def test_an_adaptation_of_mixed_acquisitions_warns_once_in_its_own_words(tiny_bundle, tmp_path, caplog, one_thread):
    """adapt warned before its first step, and its calibration warned again at the end, advising "Calibrate one model
    per acquisition" (calibrate's advice, not adapt's)."""
    from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

    subjects = _scans(tmp_path / "scans", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.6)])
    quick = AdaptOptions(steps=2, batch_size=8, checkpoint_every=2, device="cpu")
    said = _said(caplog, lambda: adapt_mod.adapt(tiny_bundle, subjects, tmp_path / "site.cevae", quick))
    assert len(said) == 1, said
    assert said[0].startswith(f"The site scans are of different acquisitions: {subjects[1].image} ")
    assert said[0].endswith("adapt one model per acquisition.")
