"""The acquisition benchmark scripts: labelmap rules, the held-out choice of an operating point, the maps
script's orientation fusion."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("benchmark_acquisition"), importlib.import_module("benchmark_operating_point")


def blobs_case() -> dict:
    """A 1 mm case with two blobs: A peaks at 10 (core 4 voxels wide in x, rim at 4), B stays at 4; lesion = A."""
    z = np.zeros((12, 12, 30), np.float32)
    z[4:8, 4:8, 2:11] = 4.0  # A's rim
    z[4:8, 4:8, 5:9] = 10.0  # A's core
    z[4:8, 4:8, 18:27] = 4.0  # B
    gt = np.zeros(z.shape, bool)
    gt[4:8, 4:8, 2:11] = True
    slices = np.arange(12)
    return dict(subject="s", variant="clean", case="lesion-mixed", recipe="mixed", spacing=np.ones(3), gt=gt,
                brain=np.ones(z.shape, bool), voxel_ml=0.001, slice_axis=2, box_start=np.zeros(3, int),
                slice_index=slices, slice_neg_elbo=np.zeros(12), z=z)


def test_hysteresis_grows_components_that_reach_the_threshold_and_only_those(scripts):
    ba, _ = scripts
    c = blobs_case()
    plain, labels = ba.components(c["z"], c, 5.0, 0.0)
    assert len(plain) == 1 and (labels == plain[0][0]).sum() == 4 * 4 * 4  # A's core only
    grown, labels = ba.components(c["z"], c, 5.0, 0.0, grow=0.7)
    assert len(grown) == 1 and (labels == grown[0][0]).sum() == 4 * 4 * 9  # A with its rim; B never reaches 5
    low, _ = ba.components(c["z"], c, 3.5, 0.0)
    assert len(low) == 2  # the same low threshold without seeds keeps B too


def test_the_peak_filter_keeps_a_large_component_just_under_its_peak_when_asked(scripts):
    ba, _ = scripts
    c = blobs_case()  # at t = 3.5 with peak > 2 t: A (peak 10) stays, B (peak 4, 144 voxels = 0.144 ml) goes
    assert len(ba.components(c["z"], c, 3.5, 50.0, peak=2.0)[0]) == 1
    assert len(ba.components(c["z"], c, 3.5, 50.0, peak=2.0, big_ml=0.1)[0]) == 2
    assert len(ba.components(c["z"], c, 3.5, 50.0, peak=2.0, big_ml=0.2)[0]) == 1
    rule = next(r for r, ml in ba.BIG.items() if ml == 1.0)
    assert ba.LABELS[rule] == ba.LABELS[ba.DEFAULT_LABELS] and rule.endswith("or ≥ 1 ml")


def test_the_calibrated_mass_rule_keeps_only_components_heavier_than_every_healthy_one(scripts):
    ba, _ = scripts
    c = blobs_case()
    healthy = blobs_case()
    healthy["z"][:, :, :15] = 0.0  # a healthy scan with B alone: 144 voxels, 0.5 above a threshold of 3.5
    null = ba.largest_excess([(healthy["z"], healthy)], 3.5)
    assert null == pytest.approx(144 * 0.5)
    kept, labels = ba.components(c["z"], c, 3.5, 50.0, mass=null)
    assert len(kept) == 1 and c["gt"][labels == kept[0][0]].all()  # A (excess 64·6.5 + 80·0.5) stays, B goes
    assert len(ba.components(c["z"], c, 3.5, 50.0)[0]) == 2  # without the rule both are kept
    assert ba.largest_excess([(np.zeros_like(c["z"]), c)], 3.5) == 0.0  # no healthy component: nothing to exceed


def test_case_records_score_each_setting_and_jump_to_the_top_slice_without_components(scripts):
    _, op = scripts
    c = blobs_case()
    recs = op.case_records(c, c["z"], "default", {1e-4: 5.0, 1e-5: 20.0})
    assert len(recs) == 2 * len(op.GROWS) + len(op.PEAKS)
    by = {(r["rate"], r["grow"]): r for r in recs if r["peak"] == 1.0}
    peaks = {r["peak"]: r for r in recs if r["peak"] > 1}
    assert set(peaks) == set(op.PEAKS) and all(r["rate"] == 1e-4 for r in peaks.values())  # at the first rate
    assert peaks[1.5]["components"] == 1 and peaks[1.5]["first"]  # A peaks at 10 > 1.5 × 5
    assert peaks[3.0]["components"] == 0 and peaks[3.0]["jump"] == by[(1e-5, 1.0)]["jump"]  # 10 < 3 × 5: the top slice
    assert by[(1e-4, 1.0)]["components"] == 1 and by[(1e-4, 1.0)]["first"]
    assert by[(1e-4, 0.7)]["dice"] == pytest.approx(1.0)  # the grown component is the whole lesion
    assert by[(1e-4, 1.0)]["dice"] == pytest.approx(2 * 64 / (64 + 144))
    nothing = by[(1e-5, 1.0)]  # nothing reaches 20: no row, and the jump goes to the top slice
    assert nothing["components"] == 0 and not nothing["first"]
    assert nothing["jump"] == op.ba.top_slice_on_lesion(c, c["z"], 0.7)


def record(subject: str, setting: tuple, dice: float, ml: float) -> list:
    m, rate, grow, peak = setting
    base = dict(subject=subject, variant="clean", map=m, rate=rate, grow=grow, peak=peak, threshold=1.0)
    return [dict(base, case="healthy", components=1, ml=ml),
            dict(base, case="lesion-mixed", components=1, ml=0.5, dice=dice, first=True, jump=True)]


def test_each_subject_gets_the_setting_chosen_on_the_other_subjects(scripts):
    _, op = scripts
    default, grown = op.DEFAULT, ("default", op.RATES[0], 0.7, 1.0)
    recs = []
    for s in ("a", "b"):  # growing helps a and b ...
        recs += record(s, default, 0.2, 0.1) + record(s, grown, 0.4, 0.1)
    recs += record("c", default, 0.3, 0.1) + record("c", grown, 0.2, 0.1)  # ... and hurts c
    for name, h in op.held_out(recs).items():
        assert h["chosen"]["c"] == list(grown), name  # chosen on a and b, although worse on c
        assert h["chosen"]["a"] == list(grown), name  # on b and c: 0.3 against 0.25
        assert h["figures"]["dice"] == pytest.approx((0.4 + 0.4 + 0.2) / 3)


def test_a_setting_that_flags_more_healthy_scans_than_the_default_is_not_chosen_by_the_strict_merit(scripts):
    _, op = scripts
    default, grown = op.DEFAULT, ("default", op.RATES[0], 0.5, 1.0)
    recs = []
    for s in ("a", "b", "c"):
        recs += record(s, default, 0.2, 0.5) + record(s, grown, 0.5, 3.0)  # more Dice, healthy scans over 1 ml
    strict = op.held_out(recs)["mean Dice, at least the default's share of healthy scans within target"]
    assert all(k == list(default) for k in strict["chosen"].values())
    assert strict["figures"]["within"] == 1.0


def test_orientation_mean_of_the_axial_slicing_alone_is_the_detectors_raw_map(monkeypatch, tiny_bundle):
    """The maps script's three-orientation fusion: axial alone reproduces the detector's own raw map on the
    region; the mean over two orientations is another map, still 0 outside the brain."""
    import math

    import SimpleITK as sitk

    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import Detector
    from CeVAEAnomalyLib.engine.preprocess import brain_region
    from CeVAEAnomalyLib.options import PostprocessOptions, ThresholdPolicy
    from conftest import make_head

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    maps = importlib.import_module("benchmark_acquisition_maps")
    image, mask = make_head(seed=4)
    raw = Detector(load_bundle(tiny_bundle), post=PostprocessOptions(), policy=ThresholdPolicy(threshold=math.inf))
    res = raw(image, mask)
    brain = sitk.GetArrayViewFromImage(res.brain_mask) > 0
    region = brain_region(brain, 2)
    axial = maps.orientation_mean(raw, image, brain, region, ("axial",))
    np.testing.assert_allclose(axial, sitk.GetArrayViewFromImage(res.score)[region], rtol=1e-5, atol=1e-6)
    both = maps.orientation_mean(raw, image, brain, region, ("axial", "coronal"))
    assert np.isfinite(both).all() and not np.allclose(both, axial)
    assert (both[~brain[region]] == 0).all()
    reused = maps.orientation_mean(raw, image, brain, region, ("axial", "coronal"), axial=axial)
    np.testing.assert_allclose(reused, both, rtol=1e-5, atol=1e-6)  # the axial map the detector made, not redone


def test_the_benchmark_ranks_slices_with_the_detectors_weight_for_each_map(scripts):
    """A cache of several orientations (it keeps the axial map beside the fused one) gets the fused weight,
    except for its axial map alone; a single-orientation cache the plain weight."""
    from CeVAEAnomalyLib.engine.detector import SLICE_MAP_WEIGHT, SLICE_MAP_WEIGHT_FUSED

    ba, _ = scripts
    single = blobs_case()
    fused = dict(single, combi_axial=single["z"])
    assert ba.detector_slice_weight(single, "default") == SLICE_MAP_WEIGHT
    assert ba.detector_slice_weight(fused, "default") == SLICE_MAP_WEIGHT_FUSED
    assert ba.detector_slice_weight(fused, ba.AXIAL) == SLICE_MAP_WEIGHT


def test_an_area_corrected_slice_summary_lets_a_small_lesion_slice_outrank_a_large_healthy_one(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bs = importlib.import_module("benchmark_slice_summaries")
    z = np.zeros((4, 20, 20), np.float32)
    brain = np.zeros(z.shape, bool)
    brain[0] = True  # a full slice: 400 brain voxels, healthy, one voxel at 5
    z[0, 3, 3] = 5.0
    brain[1:, 8:12, 8:12] = True  # small slices: 16 brain voxels; slice 1 holds a lesion peaking at 4.5
    z[1, 8:12, 8:12] = 4.5
    gt = np.zeros(z.shape, bool)
    gt[1, 8:12, 8:12] = True
    c = dict(slice_axis=2, brain=brain, gt=gt, box_start=np.zeros(3, int), slice_index=np.arange(4),
             slice_neg_elbo=np.zeros(4))
    f = bs.slice_features(c, z)
    assert f["voxels"].tolist() == [400, 16, 16, 16] and f["lesion"].tolist() == [False, True, False, False]
    assert f["maximum"].tolist() == pytest.approx([5.0, 4.5, 0.0, 0.0])
    assert f["mean of the 10 highest"][0] == pytest.approx(0.5) and f["mean of the 10 highest"][1] == pytest.approx(4.5)
    assert not bs.top_slice_hit(c, f, ("maximum", 0.0, 0.9))  # the full slice's maximum wins
    assert bs.top_slice_hit(c, f, ("maximum", 0.5, 0.9))  # 5 - 0.5 ln 400 = 2.0 < 4.5 - 0.5 ln 16 = 3.1
    assert bs.top_slice_hit(c, f, ("mean of the 10 highest", 0.0, 0.9))
    hits = {("maximum", 0.0, 0.8): [True, True, False, False], ("maximum", 0.5, 0.8): [False, False, True, True]}
    subjects = ["a", "a", "b", "b"]
    assert bs.held_out_choice(hits, subjects, "a") == ("maximum", 0.5, 0.8)  # chosen on b's cases only
    assert bs.held_out_choice(hits, subjects, "b") == ("maximum", 0.0, 0.8)


def test_the_ceilings_bound_the_shipped_labelmap_with_oracle_thresholds_and_components(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    ceiling = importlib.import_module("benchmark_ceiling")
    c = blobs_case()  # lesion A: core 10 (64 voxels), rim 4 (144 voxels in all); B at 4 is healthy
    figures = ceiling.case_figures(c, c["z"], 4.5)
    assert ceiling.MIN_MM3 == 50.0 and figures["brain maximum in a lesion"] == 1.0
    core = 2 * 64 / (64 + 144)
    if ceiling.ba.SHIPPED_PEAK < 10 / 4.5:  # the bundled peak filter keeps A's core at t = 4.5
        assert figures["shipped"] == pytest.approx(core)
    assert figures["shipped t, oracle components"] == pytest.approx(core)  # B never reaches 4.5
    assert figures["oracle threshold"] == pytest.approx(2 * 144 / (288 + 144))  # a threshold under 4 keeps A and B
    assert figures["oracle threshold and components"] == pytest.approx(1.0)  # ... and dropping B gives A exactly
    z = c["z"].copy()
    z[5, 5, 20] = 11.0  # the brain's maximum now lies in B
    assert ceiling.case_figures(c, z, 4.5)["brain maximum in a lesion"] == 0.0


def test_a_subject_is_calibrated_only_on_the_calibration_subjects_and_never_on_itself(scripts):
    ba, _ = scripts
    tops = {("default", s, "clean", "healthy"): ba.healthy_top(np.full(1000, value, np.float32))
            for s, value in (("a", 1.0), ("b", 2.0), ("new", 50.0), ("rescan", 70.0))}
    calibration = ("a", "b")
    assert ba.threshold_for(tops, "default", "new", "clean", "clean", calibration) == 2.0  # not its own, not "rescan"
    assert ba.threshold_for(tops, "default", "b", "clean", "clean", calibration) == 1.0
    assert np.isnan(ba.threshold_for(tops, "default", "new", "thick 3 mm", "variant", calibration))


def test_a_heads_slice_weight_is_chosen_on_other_people_only(monkeypatch):
    """Each head gets the weight best on the other people's cases, never on its own or its rescan's."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    sw = importlib.import_module("benchmark_slice_weight")
    weights = sw.FUSION_WEIGHTS

    def rates(best: float) -> dict:  # 4 cases: all hit at `best`, none elsewhere
        return {w: [w == best] * 4 for w in weights}

    hits = {"a": rates(0.5), "b": rates(1.0), "b_rescan": rates(0.5), "c": rates(1.0)}
    result = sw.held_out_choice(hits, {"b_rescan": "b"})
    assert result["a"]["chosen_on_others"] == 1.0 and result["a"]["held_out_top_slice"] == 0.0  # b and c agree
    # b: a and c disagree (tie), its rescan does not count: the tie goes to the shipped weight's side
    assert result["b"]["chosen_on_others"] in (0.5, 1.0)
    assert abs(result["b"]["chosen_on_others"] - sw.SLICE_MAP_WEIGHT_FUSED) == min(
        abs(w - sw.SLICE_MAP_WEIGHT_FUSED) for w in (0.5, 1.0))
    assert result["c"]["chosen_on_others"] == 0.5  # a and b's rescan outweigh b
    assert result["c"]["shipped_weight_top_slice"] == float(sw.SLICE_MAP_WEIGHT_FUSED == 1.0)


def test_the_modality_profiles_resample_without_integrating_and_keep_the_mask_binary(monkeypatch):
    """benchmark_adapt --profiles: a point-sampled copy lies on an isotropic grid over the same extent, its
    voxels are the input's at the grid points (no slab averaging), and its mask stays 0/1."""
    from conftest import make_head

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    ba = importlib.import_module("benchmark_adapt")
    image, mask = make_head(spacing=(1.0, 1.0, 1.0), seed=3)
    mm = 3.0
    img, msk = ba._resampled(image, mask, mm)
    assert img.GetSpacing() == pytest.approx((mm,) * 3) and img.GetOrigin() == image.GetOrigin()
    assert img.GetSize() == tuple(int(round(n / 3)) for n in image.GetSize())
    a, b = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(img)
    np.testing.assert_allclose(b, a[::3, ::3, ::3][tuple(slice(0, n) for n in b.shape)], rtol=1e-5, atol=1e-5)
    assert set(np.unique(sitk.GetArrayFromImage(msk))) <= {0, 1}


def test_a_ventricle_larger_on_one_side_is_a_displaced_boundary_and_a_dark_lesion_in_tissue_is_not(scripts):
    """displaced_csf: the band where one ventricle is wider than its mirror (within 3 mm of the mirror's CSF) is
    left out of the asymmetry; a CSF-dark lesion far from the other side's CSF is kept."""
    ba, _ = scripts
    image = np.full((20, 20, 40), 0.7, np.float32)  # tissue, (k, j, i) at 1 mm
    image[5:15, 5:15, 4:8] = 0.8  # a brighter tissue class, so the 3-class cut falls below the tissue
    image[8:12, 8:12, 10:14] = 0.1  # the left ventricle, 4 voxels wide in i ...
    image[8:12, 8:12, 26:32] = 0.1  # ... the right one 6 wide (mirror of i is 39 - i: 26..31 faces 8..13)
    image[8:12, 8:12, 36:38] = 0.1  # a dark lesion far from any CSF on the other side (mirror 2..3)
    brain = np.ones(image.shape, bool)
    shifted = ba.displaced_csf(image, image[:, :, ::-1], brain, brain, (1.0, 1.0, 1.0))
    assert shifted[8:12, 8:12, 26:32].any() and shifted[8:12, 8:12, 8:10].any()  # the wider ventricle's band
    assert not shifted[8:12, 8:12, 36:38].any() and not shifted[:, :, 1:4].any()  # the lesion and its mirror
    assert not shifted[0:5].any()  # tissue facing tissue


def test_the_two_scale_maps_combine_each_scales_own_chain_of_the_case_asked_for(scripts):
    """chain_at keeps the single-scale maps of the last case only: the two-scale maps are the mean and maximum of the
    σ 2 and 4.5 mm chains of that case, never of the case before, and σ changes the map."""
    ba, _ = scripts
    rng = np.random.default_rng(0)

    def case(lesion_value: float) -> dict:
        image = rng.normal(0.6, 0.05, (24, 24, 32)).astype(np.float32)  # (k, j, i) at 1 mm, mirrored along i
        image[10:14, 10:14, 6:10] = lesion_value
        combi = rng.gamma(2.0, 1.0, image.shape).astype(np.float32)
        brain = np.zeros(image.shape, bool)
        brain[2:22, 2:22, 2:30] = True
        return dict(image=image, image_m=image[:, :, ::-1].copy(), combi=combi, combi_m=combi[:, :, ::-1].copy(),
                    brain=brain, brain_m=brain[:, :, ::-1].copy(), spacing=np.ones(3))

    first, second = case(1.2), case(0.1)
    for c in (first, second):
        two, wide = ba.chain(c, sigma=2.0), ba.chain(c, sigma=4.5)
        np.testing.assert_array_equal(ba.MAPS[ba.TWO_SCALE_MEAN](c), (two + wide) / 2)
        np.testing.assert_array_equal(ba.MAPS[ba.TWO_SCALE_MAX](c), np.maximum(two, wide))
        np.testing.assert_array_equal(ba.MAPS[ba.SIGMA_2](c), two)
        assert not np.allclose(two, wide) and not np.allclose(ba.MAPS[ba.SIGMA_15](c), ba.MAPS["default"](c))
    assert not np.allclose(ba.chain_at(first, 2.0), ba.chain_at(second, 2.0))


def _run(ba, variants, hits):
    """A result as one run of benchmark_acquisition.py over ``variants`` writes it (two subjects)."""
    row = dict(auprc=0.3, best_dice=0.4, dice=0.2, dice_per_case=[0.2], recipes=["mixed"], case_subjects=["a"],
               healthy_ml=[0.5, 0.1], healthy_components=[1, 0], first_row_lesion=1.0, first_row_when_marked=[True],
               jump_lesion=1.0, top_slice=1.0, top_slice_per_case=[True], thresholds=[5.0])
    rows = {f"default | clean | {ba.DEFAULT_LABELS}": {v: {**row, "dice": 0.1 * (i + 1)}
                                                       for i, v in enumerate(variants)}}
    return {"moved_tissue": {v: {} for v in variants}, "chain_vs_detector_max_abs_difference": {f"a / {v}": 0.01
                                                                                                 for v in variants},
            "subjects": ["a", "b"], "calibration_subjects": ["a", "b"], "variants": variants, "fpr": 1e-3,
            "rows": rows, "slice_weight_hits": hits, "slice_weights": ba.slice_weights(hits, ["a", "b"])}


def test_runs_over_disjoint_variants_merge_into_the_result_one_run_gives(scripts):
    ba, _ = scripts
    ws = [str(w) for w in ba.FUSION_WEIGHTS]
    # subject a: weight 0.5 hits in the first run's variant, 1.0 in the second's; b hits with 0.9 everywhere
    first = {"a": {w: [["thick 5 mm", w == "0.5"]] for w in ws}, "b": {w: [["thick 5 mm", w == "0.9"]] for w in ws}}
    second = {"a": {w: [["clean", w == "1.0"], ["clean", w == "1.0"]] for w in ws},
              "b": {w: [["clean", w == "0.9"]] for w in ws}}
    merged = ba.merge_results([_run(ba, ["thick 5 mm"], first), _run(ba, ["clean"], second)])
    assert merged["variants"] == ["clean", "thick 5 mm"]  # the benchmark's order, not the runs'
    assert list(merged["rows"][f"default | clean | {ba.DEFAULT_LABELS}"]) == ["clean", "thick 5 mm"]
    together = {s: {w: first[s][w] + second[s][w] for w in ws} for s in ("a", "b")}
    assert merged["slice_weights"] == ba.slice_weights(together, ["a", "b"])
    assert merged["slice_weights"]["chosen_on_other_subjects"] == {"a": 0.9, "b": 1.0}  # b: a's 1.0 hits 2 of 3
    assert merged["slice_weights"] != _run(ba, ["clean"], second)["slice_weights"]
    assert set(merged["chain_vs_detector_max_abs_difference"]) == {"a / clean", "a / thick 5 mm"}
    assert "| clean | 0.300 | 0.400 | 0.100 |" in ba.render(merged)


def test_runs_that_overlap_or_differ_in_calibration_are_not_merged(scripts):
    ba, _ = scripts
    hits = {s: {str(w): [["clean", True]] for w in ba.FUSION_WEIGHTS} for s in ("a", "b")}
    with pytest.raises(ValueError, match="more than one run: \\['clean'\\]"):
        ba.merge_results([_run(ba, ["clean"], hits), _run(ba, ["clean", "gamma 0.7"], hits)])
    other = {**_run(ba, ["gamma 0.7"], hits), "calibration_subjects": ["a"]}
    with pytest.raises(ValueError, match="calibration_subjects"):
        ba.merge_results([_run(ba, ["clean"], hits), other])


def test_lesions_are_counted_one_by_one_with_the_false_components_beside_them(scripts):
    """count_lesions (the lesion-wise table): blob A is the lesion (0.036 ml) and is found; blob B is a false
    component; the table pools them by size."""
    ba, _ = scripts
    c = blobs_case()
    labelmap = ba.components(c["z"], c, 3.5, 0.0)[1] > 0  # both blobs
    fig = {"lesion_ml": [], "lesion_found": [], "false_components": []}
    ba.count_lesions(fig, c["z"], c, labelmap)
    assert fig["lesion_found"] == [True] and fig["false_components"] == [1]
    assert fig["lesion_ml"] == pytest.approx([4 * 4 * 9 * 0.001])
    missed = {"lesion_ml": [], "lesion_found": [], "false_components": []}
    ba.count_lesions(missed, c["z"], c, np.zeros(c["z"].shape, bool))
    assert missed == {"lesion_ml": fig["lesion_ml"], "lesion_found": [False], "false_components": [0]}
    key = ba.LESIONWISE[0]
    rows = {key: {"clean": {**fig, "healthy_components": [0, 2]}, "thick 6.5 mm": {**missed, "healthy_components": [1]}}}
    table = ba._lesionwise_tables({"rows": rows})
    assert "| clean | 1 | 1.00 | 1.00 (n=1) | – | – | 1.00 / 1 | 1.00 / 2 |" in table
    assert "| all variants | 2 | 0.50 | 0.50 (n=2) | – | – | 0.50 / 1 | 1.00 / 2 |" in table
