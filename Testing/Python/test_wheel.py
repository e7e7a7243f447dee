"""A plain ``pip install`` of the wheel detects with the bundled model and the automatic brain mask.

The wheel is built from a copy of the sources and installed with ``--no-deps`` into a fresh
virtual environment made without ``--system-site-packages``. Its dependencies (torch, numpy,
SimpleITK, safetensors) are made visible by a ``.pth`` line naming this interpreter's
site-packages, which is appended after the new environment's own: Python does not run the ``.pth``
files of such a directory, so the editable install of the repository there stays inert, and
``CeVAEAnomalyLib`` (with its data) can only come from the wheel. This proves what the wheel
holds and that it works; pip resolving the dependencies themselves is not re-run here (it would
download or copy about 1 GB).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow

PACKAGE_DATA = ("cevae_t1_default.cevae", "colin27_t1_2mm.nii.gz", "colin27_brainmask_2mm.nii.gz",
                "colin27_lesions_t1_2mm.nii.gz", "colin27_lesions_truth_2mm.nii.gz",
                "NOTICE.md", "README.md")  # the notices travel with the data
SAMPLE = SHARED_DATA / "robex_t1.nii.gz"
SAMPLE_MASK = SHARED_DATA / "robex_brainmask.nii.gz"


def _run(cmd: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of pyproject.toml, README.md and CeVAEAnomaly/."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "CeVAEAnomaly", src / "CeVAEAnomaly",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(root / "dist"), str(src)], cwd=root)
    (built,) = (root / "dist").glob("cevae_anomaly-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with only the wheel installed (dependencies through a .pth)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=env_dir.parent)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=env_dir.parent)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=env_dir.parent).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_cevae_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return env_dir


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_wheel_holds_the_model_and_templates_and_no_tests(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        packaged: Dict[str, str] = {
            n.rsplit("/", 1)[-1]: _sha256(zf.read(n)) for n in names if n.startswith("CeVAEAnomalyLib/data/")
        }
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    data_dir = REPO / "CeVAEAnomaly" / "CeVAEAnomalyLib" / "data"
    for name in PACKAGE_DATA:
        assert packaged.get(name) == _sha256((data_dir / name).read_bytes()), name
    assert not [n for n in names if n.startswith("Testing/") or "/test_" in n or n.startswith("test_")
                or n.endswith("conftest.py")]
    assert not [n for n in names if n.endswith("CeVAEAnomaly.py") or n.startswith("Scripts/")]
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = {r.split(">")[0].split(";")[0].strip() for r in requires if "extra ==" not in r}
    assert core == {"torch", "numpy", "SimpleITK", "safetensors"}, requires  # the runtime; research code is an extra
    assert any(r.startswith("scipy") and 'extra == "research"' in r for r in requires), requires
    assert "Requires-Python: >=3.9" in metadata
    assert "cevae-anomaly = CeVAEAnomalyLib.cli:main" in entry_points


@pytest.mark.skipif(not SAMPLE.exists(), reason="healthy sample data not present")
def test_installed_wheel_detects_with_default_model_and_automatic_mask(venv, tmp_path):
    python = venv / "bin" / "python"
    where = _run([str(python), "-c", "import CeVAEAnomalyLib.data as d; print(d.default_model_path())"],
                 cwd=tmp_path).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where

    out = tmp_path / "out"
    _run([str(venv / "bin" / "cevae-anomaly"), "detect", str(SAMPLE), "--score", str(out / "score.nii.gz"),
          "--labelmap", str(out / "labelmap.nii.gz"), "--slice-scores", str(out / "slices.csv"),
          "--components", str(out / "components.csv"), "--device", "cpu",
          # the model's map alone is non-zero on the whole brain (the default normalisation zeroes half of it, the
          # rim its edge: 3 mm, a fifth of the mask detection scores, which lies 1 mm inside the template's brain)
          "--no-normalise", "--asymmetry-mm", "0", "--rim-mm", "0", "--threshold", "0.5"], cwd=tmp_path)

    image = sitk.ReadImage(str(SAMPLE))
    score = sitk.ReadImage(str(out / "score.nii.gz"))
    labelmap = sitk.ReadImage(str(out / "labelmap.nii.gz"))
    for result in (score, labelmap):
        assert result.GetSize() == image.GetSize()
        np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
    scores = sitk.GetArrayFromImage(score)
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert set(np.unique(sitk.GetArrayFromImage(labelmap))) <= {0, 1}
    # Scores are zero outside the brain mask that was computed from the template: it must be this
    # scan's brain (reference mask of the sample data), not the whole head or nothing.
    scored = scores != 0
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_MASK))) > 0
    dice = 2 * (scored & brain).sum() / (scored.sum() + brain.sum())
    assert dice > 0.8, dice
    slices = (out / "slices.csv").read_text().splitlines()
    assert slices[0] == "axis,index,anomaly,kl,rec,neg_elbo,map_max,flagged" and len(slices) > 50
    assert (out / "components.csv").read_text().splitlines()[0].startswith("component,voxels,volume_ml,summed_score")
