"""The performance benchmark's bare network scores the slices the detection scores (Testing/benchmarks)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import SimpleITK as sitk

from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.engine.preprocess import mask_array, prepare
from CeVAEAnomalyLib.options import ScoreOptions

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_performance.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_performance", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_bare_network_slices_cover_every_orientation_of_the_scoring(head):
    """With the bundled model's three orientations the detection scores three stacks; the bare network used to
    time the axial one alone, so the ratio end to end / bare compared three passes with one."""
    image_path, mask_path = head
    cfg = PreprocessConfig()
    image = sitk.ReadImage(str(image_path))
    brain = mask_array(sitk.ReadImage(str(mask_path)), image)
    counts = {o: prepare(image, brain, cfg, o).slices.shape[0] for o in ("axial", "coronal", "sagittal")}
    bench = _bench()
    fused = bench.model_slices(image_path, mask_path, cfg, ScoreOptions(orientations="axial,coronal,sagittal"))
    axial = bench.model_slices(image_path, mask_path, cfg, ScoreOptions())
    assert fused.shape[0] == sum(counts.values()) > counts["axial"]
    assert axial.shape[0] == counts["axial"]
