"""The sample-making scripts refuse in one line, naming what is missing and how to install it, where the research
extra they need is not installed (they stopped with an ImportError traceback)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

WITHOUT = """
import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError("No module named " + repr(name), name=name)
sys.meta_path.insert(0, Blocked())
sys.argv = [{script!r}, "--out-dir", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("name, module", [("make_lesion_sample.py", "scipy"), ("make_sample_thumbnails.py", "PIL")])
def test_a_sample_script_without_the_research_extra_refuses_in_one_line(tmp_path, name, module):
    script = str(REPO / "scripts" / name)
    done = subprocess.run([sys.executable, "-c", WITHOUT.format(module=module, script=script, out=str(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert f"needs {module}" in lines[0] and "pip install 'cevae-anomaly[research]'" in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written
