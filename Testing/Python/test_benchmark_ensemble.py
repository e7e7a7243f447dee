"""The acquisition benchmark's ensemble script: the mean of the cached network maps, the rest of the case
kept, and cases that are not the same volume refused; and the script starts without torch (it once imported it,
through benchmark_acquisition_maps, for a one-line listing of the cases: seconds of start-up for milliseconds of
work)."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "benchmark_acquisition_ensemble.py"


def write_case(path: Path, combi_value: float, gt_flip: bool = False) -> None:
    shape = (4, 5, 6)
    gt = np.zeros(shape, bool)
    gt[1, 2, 3] = True
    if gt_flip:
        gt = ~gt
    np.savez(path, combi=np.full(shape, combi_value, np.float32), combi_m=np.zeros(shape, np.float16),
             final=np.zeros(shape, np.float32), image=np.ones(shape, np.float16), brain=np.ones(shape, bool), gt=gt,
             box_start=np.zeros(3, np.int64), slice_index=np.arange(4), slice_neg_elbo=np.full(4, combi_value),
             seconds=np.array([1.0, 2.0]), meta=np.array('{"subject": "s"}'))


@pytest.fixture
def run(monkeypatch):
    """``run(*maps, out)``: the script as ``python SCRIPT --maps M1 --maps M2 ... --out OUT`` runs it, in this process;
    None where it finished, else the message it exited with."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as for a script run by path

    def run_script(*args: Path) -> Optional[str]:
        argv = [str(SCRIPT)]
        for maps in args[:-1]:
            argv += ["--maps", str(maps)]
        monkeypatch.setattr(sys, "argv", [*argv, "--out", str(args[-1])])
        try:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        except SystemExit as exc:
            return str(exc.code)
        return None

    return run_script


def test_the_ensemble_case_is_the_mean_of_the_network_maps(tmp_path, run):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir(), b.mkdir()
    write_case(a / "s--clean--healthy.npz", 1.0)
    write_case(b / "s--clean--healthy.npz", 3.0)
    assert run(a, b, out) is None
    with np.load(out / "s--clean--healthy.npz") as z:
        np.testing.assert_array_equal(z["combi"], np.full((4, 5, 6), 2.0, np.float32))
        np.testing.assert_array_equal(z["slice_neg_elbo"], np.full(4, 2.0))
        np.testing.assert_array_equal(z["seconds"], [2.0, 4.0])
        assert z["gt"].sum() == 1 and str(z["meta"]) == '{"subject": "s"}'
    assert sorted(p.name for p in out.iterdir()) == ["s--clean--healthy.npz"]


def test_cases_of_another_volume_are_refused(tmp_path, run):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir(), b.mkdir()
    write_case(a / "s--clean--healthy.npz", 1.0)
    write_case(b / "s--clean--healthy.npz", 3.0, gt_flip=True)
    assert "gt differs" in run(a, b, out)
    assert not list(out.glob("*.npz"))


def test_a_case_missing_from_one_cache_is_refused(tmp_path, run):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir(), b.mkdir()
    write_case(a / "s--clean--healthy.npz", 1.0)
    assert "1 case(s) missing" in run(a, b, out)


def test_the_script_imports_without_torch():
    """Its imports run in a process where torch cannot be imported: they must not need it."""
    code = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            "import benchmark_acquisition_ensemble")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO / "CeVAEAnomaly", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
