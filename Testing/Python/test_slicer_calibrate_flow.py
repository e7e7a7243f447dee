"""The Slicer module's "Calibrate on healthy scans" as a radiologist uses it: the real worker on a real MRML scene
(slicer-core), the panel's Qt-free checks (adapt_panel), and what the module file does with them."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import add_volume, make_head

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.engine.header import read_header  # noqa: E402
from CeVAEAnomalyLib.engine.calibration import calibrated_test_time_steps  # noqa: E402
from CeVAEAnomalyLib.options import THOROUGH_STEPS  # noqa: E402
from CeVAEAnomalyLib.slicer.jobs import JobState  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402


def calibrated(volume, mask, out: Path, model: Path, thorough: bool = False):
    """The finished job of the panel's Calibrate on one healthy volume."""
    job = CeVAEAnomalyLogic().startCalibration([volume], [mask], out, modelPath=model, device="cpu",
                                               thorough=thorough)
    assert job.wait(300) is JobState.DONE, job.error
    return job


def test_a_calibration_that_drops_the_models_thorough_calibration_says_so(tiny_bundle, tmp_path):
    """The bundled model is calibrated for the thorough mode too. Calibrated in the panel with Thorough unticked, the
    new model (at once the one in use) was not, and nothing said so: the command line warns, the panel's status line
    said only that the model was saved and used, and Thorough then fell back to an absolute threshold. The worker
    now warns in the panel's words, and the status line shows the run's warnings."""
    scene = slicer.vtkMRMLScene()
    image, brain = make_head(seed=11)
    volume = add_volume(scene, image, "healthy")
    mask = add_volume(scene, brain, "mask", "vtkMRMLLabelMapVolumeNode")
    both = tmp_path / "both.cevae"  # like the bundled model: calibrated for the plain and the thorough mode
    calibrated(volume, mask, both, tiny_bundle, thorough=True)
    assert THOROUGH_STEPS in calibrated_test_time_steps(read_header(both).calibration)

    plain = calibrated(volume, mask, tmp_path / "site.cevae", both)
    assert THOROUGH_STEPS not in calibrated_test_time_steps(read_header(tmp_path / "site.cevae").calibration)
    lost = [w for w in plain.warnings if "thorough mode" in w]
    assert lost == ["both.cevae is calibrated for the thorough mode too (Advanced: 'Adapt the model to this scan "
                    "first'); site.cevae is not, so with that mode ticked detection with it needs an absolute "
                    "threshold. Tick it and calibrate again to calibrate that mode too (each scan then takes about "
                    "10 s longer)."], plain.warnings

    kept = calibrated(volume, mask, tmp_path / "site2.cevae", both, thorough=True)
    assert not [w for w in kept.warnings if "thorough mode" in w], kept.warnings
