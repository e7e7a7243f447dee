"""The package offers its main names at the top (lazily: importing it stays free of torch)."""
from __future__ import annotations

import subprocess
import sys

import CeVAEAnomalyLib
from conftest import REPO


def test_the_main_names_are_the_modules_own_and_listed_for_completion() -> None:
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import Detector, detect
    from CeVAEAnomalyLib.options import DetectionRequest
    from CeVAEAnomalyLib.result import DetectionResult, write_result

    assert CeVAEAnomalyLib.detect is detect and CeVAEAnomalyLib.Detector is Detector
    assert CeVAEAnomalyLib.load_bundle is load_bundle and CeVAEAnomalyLib.DetectionRequest is DetectionRequest
    assert CeVAEAnomalyLib.DetectionResult is DetectionResult and CeVAEAnomalyLib.write_result is write_result
    listed = set(dir(CeVAEAnomalyLib))
    assert {"detect", "load_bundle", "read_image", "default_model_path", "CeVAEError", "__version__"} <= listed
    assert {"engine", "options", "result"} <= listed  # submodules imported above
    assert not listed & {"Any", "List", "annotations", "importlib", "ModuleType"}  # the file's own helpers


def test_an_unknown_name_is_an_attribute_error_and_the_import_stays_free_of_torch() -> None:
    try:
        CeVAEAnomalyLib.detekt
    except AttributeError as exc:
        assert "detekt" in str(exc)
    else:
        raise AssertionError("an unknown name was found")
    code = "import sys, CeVAEAnomalyLib; dir(CeVAEAnomalyLib); print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO / "CeVAEAnomaly").stdout.split()
    assert out == ["False", "False"]
