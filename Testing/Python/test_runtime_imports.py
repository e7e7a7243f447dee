"""The runtime package (what the Slicer extension and a plain ``pip install`` carry) needs none of the research
extras: SciPy and Matplotlib are not in Slicer's Python. ``adapt`` once imported SciPy and failed there."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SCRIPT = """
import importlib, pkgutil, sys
for name in ("scipy", "matplotlib", "CeVAEAnomalyResearch"):
    sys.modules[name] = None  # as if not installed: importing it fails
import CeVAEAnomalyLib
failed = []
for module in pkgutil.walk_packages(CeVAEAnomalyLib.__path__, "CeVAEAnomalyLib."):
    if not module.name.endswith("__main__"):
        try:
            importlib.import_module(module.name)
        except ImportError as exc:
            failed.append(f"{module.name}: {exc}")
print("\\n".join(failed) or "all imported")
"""


def test_every_runtime_module_imports_without_the_research_extras():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO / "CeVAEAnomaly", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "all imported"
