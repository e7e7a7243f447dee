"""Slicer API that the module calls exists in Slicer 5.6, the oldest supported. The tests here run on slicer-core
5.13, which has methods that Slicer 5.6 and 5.8 lack: such a call passes every test here and fails only inside an
older Slicer. The table below names those read in Slicer's sources (git tags v5.6.0, v5.8.1, v5.10.0)."""
import ast
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.slicer import mrml  # noqa: E402

MODULE_DIR = REPO / "CeVAEAnomaly"

# method name: where it was added (absent from the v5.6.0 and v5.8.1 headers, present in slicer-core)
ADDED_AFTER_5_6: Dict[str, str] = {
    "GetLabelmapConversionColorTableNodeID": "vtkMRMLSegmentationNode, Slicer 5.10 (commit 65409219f7); "
                                             "5.6 has only its setter and GetLabelmapConversionColorTableNode()",
}


def module_sources() -> List[Path]:
    """The Python files that run inside Slicer: the module file, its library and its scripts."""
    files = [MODULE_DIR / "CeVAEAnomaly.py", *sorted((MODULE_DIR / "CeVAEAnomalyLib").rglob("*.py")),
             *sorted((MODULE_DIR / "Scripts").glob("*.py"))]
    assert len(files) > 20
    return files


def test_the_module_calls_no_method_that_slicer_5_6_lacks():
    """The restore of a segmentation's labelmap conversion colour table (mrml.Undo.keep, a failed run) and the
    import of the anomalies into a segmentation (every detection) called GetLabelmapConversionColorTableNodeID,
    which Slicer 5.6 and 5.8 do not have: in them every detection failed with an AttributeError."""
    calls = [f"{path.relative_to(REPO)}:{node.lineno} {node.attr}" for path in module_sources()
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Attribute) and node.attr in ADDED_AFTER_5_6]
    assert calls == []


def test_the_conversion_colour_table_is_read_as_slicer_5_10_reads_it():
    """mrml.conversion_colour_table_id reads the node reference that Slicer 5.10's getter returns (None for none)."""
    assert all(hasattr(slicer.vtkMRMLSegmentationNode, name) for name in ADDED_AFTER_5_6)  # (else: drop from table)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "findings")
    assert mrml.conversion_colour_table_id(node) is None is node.GetLabelmapConversionColorTableNodeID()
    colours = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "colours")
    node.SetLabelmapConversionColorTableNodeID(colours.GetID())
    assert mrml.conversion_colour_table_id(node) == colours.GetID() == node.GetLabelmapConversionColorTableNodeID()
