"""The README's Python example runs as written (on a synthetic head saved under the names it uses)."""
from __future__ import annotations

import re

import SimpleITK as sitk

from conftest import REPO, make_head


def test_the_readmes_python_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python library", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    image, mask = make_head(seed=7)
    sitk.WriteImage(image, str(tmp_path / "t1.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "t1_mask.nii.gz"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python library)", "exec"), {})
    threshold = capsys.readouterr().out.split()[0]
    assert float(threshold) > 0
    assert sitk.ReadImage(str(tmp_path / "score.nii.gz")).GetSize() == image.GetSize()
