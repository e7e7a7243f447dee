"""The row-order benchmark: each lesion table order and slice table order ranks what it says, and its default is the
detector's own."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO


@pytest.fixture
def rows(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("benchmark_row_orders")


def two_blobs() -> dict:
    """A 1 mm case: lesion A, 64 voxels at 10 in slices 2-5; healthy B, 216 voxels at 4 in slices 7-12, asymmetric."""
    z = np.zeros((14, 12, 12), np.float32)
    z[2:6, 2:6, 2:6] = 10.0
    z[7:13, 5:11, 5:11] = 4.0
    gt = np.zeros(z.shape, bool)
    gt[2:6, 2:6, 2:6] = True
    asym = np.where(z == 4.0, 0.5, 0.1).astype(np.float32)
    elbo = np.zeros(14)
    elbo[9] = 1.0  # the ELBO points at B's slice
    return dict(final=z, gt=gt, asym=asym, brain=np.ones(z.shape, bool), spacing=np.ones(3), slice_axis=2,
                box_start=np.zeros(3, int), slice_index=np.arange(14), slice_neg_elbo=elbo)


def test_each_lesion_table_order_puts_first_the_component_it_ranks_highest(rows):
    c = two_blobs()
    t = 3.5
    kept, labels = rows.components(c["final"], c, t, 0.0)
    stats = rows.component_stats(c["final"], labels, [k for k, _ in kept], t, c["asym"], c["gt"])
    a = next(s for s in stats if s["lesion"])
    assert (a["voxels"], a["summed"], a["max"], a["mean"]) == (64, 640, 10, 10)
    assert a["summed_above"] == 640 and a["asymmetry"] == pytest.approx(0.1)
    first = rows.first_rows(stats)
    assert set(first) == set(rows.ORDERS)
    # B: 216 voxels, summed 864 (excess 108, none above 1.5 t, asymmetry 0.5); A: excess 416, summed above 640
    assert first == {
        "summed score (the default)": False, "max score (= peak over threshold)": True, "volume": False,
        "mean score": True, "excess mass Σ(z − t)": True, "summed score of the voxels above 1.5 t": True,
        "mean asymmetry term (side-weighted)": False,
    }
    assert rows.first_rows([]) == {name: None for name in rows.ORDERS}


def test_the_default_order_is_the_detectors_lesion_table_order(rows):
    """The detector's own component table (postprocess.components, order "summed") puts B first, as the default does."""
    from CeVAEAnomalyLib.engine.detector import COMPONENT_ORDER
    from CeVAEAnomalyLib.engine.postprocess import components

    c = two_blobs()
    kept, labels = rows.components(c["final"], c, 3.5, 0.0)
    ours = rows.first_rows(rows.component_stats(c["final"], labels, [k for k, _ in kept], 3.5, c["asym"], c["gt"]))
    score = sitk.GetImageFromArray(c["final"])
    table = components(sitk.GetImageFromArray((c["final"] > 3.5).astype(np.uint8)), score, COMPONENT_ORDER)
    peak = score.TransformPhysicalPointToIndex(table[0].peak_lps)[::-1]
    assert len(table) == 2 and not c["gt"][peak] and ours["summed score (the default)"] is False


def test_slice_orders_rank_by_map_by_elbo_and_by_excess(rows):
    c = two_blobs()
    top = rows.top_slices(c, c["final"], 3.5, 0.8)
    assert top["map max alone"] and top["summed excess over the threshold Σ(z − t)₊"]  # A's slices
    assert not top["negative ELBO alone"]  # slice 9, B's
    assert top["the default: map max and −ELBO rank-fused (map weight 0.8)"]
    assert len(top) == len(rows.slice_orders(c, c["final"], 3.5, 0.8))


def test_a_case_is_labelled_with_the_shipped_rule_before_its_rows_are_ordered(rows):
    """At t = 3.5 the shipped peak filter (peak > 2 t) drops B (peak 4): one row, the lesion, whatever the order."""
    c = two_blobs()
    rng = np.random.default_rng(0)
    c.update(image=rng.random(c["final"].shape).astype(np.float32), combi=c["final"].copy(), brain_m=c["brain"])
    c.update(image_m=c["image"][..., ::-1], combi_m=c["final"][..., ::-1])
    assert rows.LABELS[rows.DEFAULT_LABELS][1] == 2.0
    first, top, n, ceiling = rows.evaluate_case(c, 3.5)
    assert n == 1 and ceiling is True and all(first.values()) and top["map max alone"]
    first, top, n, ceiling = rows.evaluate_case(c, 20.0)  # nothing above the threshold: no row
    assert n == 0 and ceiling is None and set(first.values()) == {None}
