"""The option dataclasses: validation, overrides, and calibration lookup across option versions."""
import json
from pathlib import Path
import math
from dataclasses import fields

import numpy as np
import pytest

from CeVAEAnomalyLib.engine.calibration import calibrate, calibration_key, find_calibration
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import (
    PAPER,
    DetectionRequest,
    PostprocessOptions,
    RunOptions,
    ScoreOptions,
    ThresholdPolicy,
    flag_of,
    option_field,
    option_range,
    parse_orientations,
    real_number,
)


@pytest.mark.parametrize("kwargs, message", [
    ({"score_type": "magic"}, "Unknown score type 'magic'"),
    ({"combi": "sum"}, "Unknown combination 'sum'"),
    ({"grad_norm": "global"}, "Unknown gradient normalisation"),
    ({"grad_sigma": -1.0}, r"grad_sigma \(--grad-sigma\) must be a number in \[0, 1000\], got -1.0"),
    ({"rec_sigma": math.nan}, r"rec_sigma \(--rec-sigma\) must be"),
    ({"mc_samples": 1.5}, r"mc_samples \(--mc-samples\) must be a whole number"),
    ({"alpha": math.inf}, r"alpha \(--alpha\) must be"),
])
def test_score_options_refuse_bad_values_by_name(kwargs, message):
    with pytest.raises(CeVAEError, match=message):
        ScoreOptions(**kwargs)


@pytest.mark.parametrize("kwargs", [{"rim_mm": -0.5}, {"median_radius": 1.5}, {"min_volume_mm3": math.nan},
                                    {"median_radius": True}])
def test_postprocess_options_refuse_bad_values(kwargs):
    with pytest.raises(CeVAEError):
        PostprocessOptions(**kwargs)


def test_replace_applies_changes_ignores_none_and_validates():
    base = ScoreOptions()
    paper = base.replace(**PAPER)
    assert paper.grad_norm == "volume" and paper.score_type == base.score_type
    assert base.replace(score_type=None, mc_samples=4) == ScoreOptions(mc_samples=4)
    with pytest.raises(CeVAEError):
        base.replace(grad_target="everything")


def test_from_dict_fills_defaults_and_names_unknown_keys():
    assert ScoreOptions.from_dict({"score_type": "rec"}) == ScoreOptions(score_type="rec")
    with pytest.raises(CeVAEError, match="'colour'"):
        PostprocessOptions.from_dict({"rim_mm": 1.0, "colour": "red"})


def test_threshold_policy_and_run_options():
    assert ThresholdPolicy(threshold=math.inf).threshold == math.inf  # "no labelmap" for calibration
    for bad in ({"threshold": math.nan}, {"threshold": -math.inf}, {"fpr": 0.0}, {"fpr": 1.0}):
        with pytest.raises(CeVAEError):
            ThresholdPolicy(**bad)
    assert RunOptions(device="cuda:1").device == "cuda:1"
    with pytest.raises(CeVAEError, match="device"):
        RunOptions(device="tpu")
    assert RunOptions(device="cpu:0").device == "cpu:0"
    for bad in ("cpu:abc", "cuda:x", "auto:7", "cuda:", "cuda:-1"):  # torch would raise its own error, or ignore it
        with pytest.raises(CeVAEError, match=f"Unknown device '{bad}'"):
            RunOptions(device=bad)
    with pytest.raises(CeVAEError, match="batch_size"):
        RunOptions(batch_size=0)


def test_parse_orientations():
    assert parse_orientations(" axial, sagittal ") == ("axial", "sagittal")
    for bad in (",", "", "axial,oblique"):
        with pytest.raises(CeVAEError):
            parse_orientations(bad)


def _header_with(key: str) -> dict:
    entry = calibrate([np.linspace(0.0, 1.0, 10001, dtype=np.float32)], "test")
    return {"calibration": {key: entry}}


def test_calibration_written_before_a_field_existed_is_still_found():
    """A key stored without a field that has since been added (at its default) still matches."""
    score, post = ScoreOptions(), PostprocessOptions(rim_mm=3.0)
    old = json.loads(calibration_key(score, post))
    del old["score"]["rec_kind"]  # as if the bundle predates this option
    header = _header_with(json.dumps(old, sort_keys=True))
    assert find_calibration(header["calibration"], score, post)["source"] == "test"
    # ...but not for options that differ, nor when the new field is not at its default
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(header["calibration"], score.replace(rec_kind="l2"), post)
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(header["calibration"], score, post.replace(rim_mm=2.0))


def test_a_missing_calibration_names_the_options_that_differ_and_the_ways_out():
    score, post = ScoreOptions(), PostprocessOptions(rim_mm=3.0)
    header = _header_with(calibration_key(score, post))
    with pytest.raises(CeVAEError) as err:
        find_calibration(header["calibration"], score.replace(rec_kind="l2"), post.replace(rim_mm=2.0))
    message = str(err.value)
    assert ("(these differ from the nearest calibrated setting: --rec-kind l2 (calibrated: --rec-kind l1), "
            "--rim-mm 2 (calibrated: --rim-mm 3))") in message
    assert "--threshold" in message and "cevae-anomaly calibrate" in message


def test_calibration_keys_this_version_cannot_read_are_skipped():
    score, post = ScoreOptions(), PostprocessOptions()
    stale = json.loads(calibration_key(score, post))
    stale["score"]["removed_option"] = 1
    header = _header_with(json.dumps(stale))
    header["calibration"]["not json"] = header["calibration"][json.dumps(stale)]
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(header["calibration"], score, post)


# --- one detection request ---------------------------------------------------------------------
def test_request_routes_each_option_to_its_part_and_round_trips():
    request = DetectionRequest.of(score_type="rec", rim_mm=2.0, asymmetry_side=False, fpr=0.01, batch_size=8,
                                  device="cpu", mc_samples=None)
    assert request.score == {"score_type": "rec"} and request.post == {"rim_mm": 2.0, "asymmetry_side": False}
    assert request.policy == ThresholdPolicy(fpr=0.01) and request.run == RunOptions(device="cpu", batch_size=8)
    assert DetectionRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert request.with_options(threshold=0.5).policy == ThresholdPolicy(threshold=0.5, fpr=0.01)
    # a rate given on top replaces a threshold given before (which would otherwise win without a word)
    assert request.with_options(threshold=0.5).with_options(fpr=0.02).policy == ThresholdPolicy(fpr=0.02)
    model_score, model_post = ScoreOptions(grad_norm="volume"), PostprocessOptions(rim_mm=3.0, normalise=True)
    score, post = request.options(model_score, model_post)
    assert score == ScoreOptions(score_type="rec", grad_norm="volume")  # the model's, with the overrides
    assert post == PostprocessOptions(rim_mm=2.0, normalise=True)
    assert DetectionRequest(paper=True).options(ScoreOptions(), model_post)[0] == ScoreOptions().replace(**PAPER)


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, r"batch_size \(--batch-size\) must be a whole number in \[1, 4096\], got 0\."),
    ({"rim_mm": -1.0}, r"rim_mm \(--rim-mm\) must be a number in \[0, 50\], got -1\.0\."),
    ({"min_volume_mm3": math.nan}, r"min_volume_mm3 \(--min-volume\) must be"),
    ({"threshold": -math.inf}, r"threshold \(--threshold\) must be"),
    ({"score_type": "best"}, r"Unknown score type 'best'"),
    ({"colour": "red"}, r"Unknown detection option\(s\) 'colour'"),
])
def test_request_refuses_bad_values_with_the_options_message(options, message):
    with pytest.raises(CeVAEError, match=message):
        DetectionRequest.of(**options)


def test_an_unknown_option_is_refused_listing_every_name_the_request_takes():
    """DetectionRequest.of(colour="red") listed the option names it knows without paper, which it takes too."""
    with pytest.raises(CeVAEError) as caught:
        DetectionRequest.of(colour="red")
    known = str(caught.value).split("; known: ")[1].rstrip(".").split(", ")
    parts = (ScoreOptions, PostprocessOptions, ThresholdPolicy, RunOptions)
    assert sorted(known) == sorted(["paper", *(f.name for part in parts for f in fields(part))])


@pytest.mark.parametrize("orientations, message", [("axial,foo", "Unknown orientation 'foo'"),
                                                  ("sagittal", "Orientations must start with axial"),
                                                  ("axial,axial", "name each orientation once"),
                                                  (",", "at least one slice orientation")])
def test_a_request_checks_its_orientations_when_it_is_made(orientations, message):
    """DetectionRequest.of(orientations="axial,foo") was taken (checked as text only) and refused only when a
    detector was built from it."""
    with pytest.raises(CeVAEError, match=message):
        DetectionRequest.of(orientations=orientations)
    with pytest.raises(CeVAEError, match=message):
        DetectionRequest.from_dict({"score": {"orientations": orientations}})
    assert DetectionRequest.of(orientations="axial, coronal").score == {"orientations": "axial,coronal"}


def test_malformed_option_containers_and_names_are_refused_in_one_line():
    """These raised TypeError (None is not iterable, an unexpected keyword argument), or named the letters of a
    string as unknown options."""
    cases = [(lambda: DetectionRequest(score="alpha"), r"The request's score must be a mapping of option names"),
             (lambda: DetectionRequest(post=None), r"The request's post must be a mapping of option names"),
             (lambda: DetectionRequest.from_dict(None), r"DetectionRequest must be built from a mapping, got NoneType"),
             (lambda: ThresholdPolicy.from_dict(["fpr"]), r"ThresholdPolicy must be built from a mapping, got list"),
             (lambda: PostprocessOptions().replace(rim=2.0), r"Unknown PostprocessOptions field\(s\) 'rim'")]
    for call, message in cases:
        with pytest.raises(CeVAEError, match=message):
            call()
    assert PostprocessOptions().replace(rim_mm=2.0, median_radius=None).rim_mm == 2.0


def test_an_integer_too_large_for_a_float_is_refused_as_out_of_range():
    """--batch-size or --median-radius 10**400 (or such a number in a request file) ended in "unexpected
    OverflowError": the range check turned it into a float to test for NaN."""
    huge = 10**400
    for options, flag in (({"batch_size": huge}, "batch-size"), ({"median_radius": huge}, "median-radius"),
                          ({"rim_mm": huge}, "rim-mm"), ({"fpr": huge}, "fpr"), ({"threshold": -huge}, "threshold")):
        with pytest.raises(CeVAEError, match=f"--{flag}\\) must be a"):
            DetectionRequest.of(**options)


def test_the_options_and_the_bundle_checks_take_numbers_by_one_rule():
    """real_number, used by options.check_value and bundle_checks._number: an int or float a float comparison holds
    (the bundle checks: finite too)."""
    import sys

    largest = int(sys.float_info.max)
    for value, plain, finite in ((0, True, True), (-largest, True, True), (2.5, True, True), (math.inf, True, False),
                                 (-math.inf, True, False), (math.nan, False, False), (largest + 10**300, False, False),
                                 (-10**400, False, False), (True, False, False), ("1", False, False),
                                 (None, False, False)):
        assert (real_number(value), real_number(value, finite=True)) == (plain, finite), value


def test_a_request_read_from_json_is_checked_the_same_way():
    """The worker's request file is untrusted in the same way as keyword options."""
    with pytest.raises(CeVAEError, match=r"batch_size \(--batch-size\) must be a whole number in \[1, 4096\], got 0\."):
        DetectionRequest.from_dict({"run": {"batch_size": 0}})
    with pytest.raises(CeVAEError, match=r"rim_mm \(--rim-mm\) must be a number in \[0, 50\], got -1\."):
        DetectionRequest.from_dict({"post": {"rim_mm": -1}})
    with pytest.raises(CeVAEError, match=r"Unknown post-processing option\(s\) 'colour'"):
        DetectionRequest.from_dict({"post": {"colour": 1}})


def test_command_line_flags_come_from_the_option_declarations():
    """Every option has its flag (today's names kept), and the flags build the same request."""
    from CeVAEAnomalyLib.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["detect", "in.nii.gz", "--score", "s.nii.gz", "--min-volume", "20", "--asymmetry-side",
                              "--threshold", "inf", "--batch-size", "4", "--device", "cpu", "--grad-norm", "volume"])
    request = DetectionRequest.from_args(args)
    assert request.post == {"min_volume_mm3": 20.0, "asymmetry_side": True}
    assert request.score == {"grad_norm": "volume"}
    assert request.policy.threshold == math.inf and request.run == RunOptions(device="cpu", batch_size=4)
    assert DetectionRequest.from_args(parser.parse_args(["detect", "in.nii.gz", "--score", "s.nii.gz"])) == \
        DetectionRequest()
    flags = {a for action in parser._subparsers._group_actions[0].choices["detect"]._actions
             for a in action.option_strings}
    for cls in (ScoreOptions, PostprocessOptions, ThresholdPolicy, RunOptions):
        for f in fields(cls):
            assert flag_of(f) in flags, f.name


def test_an_option_is_found_by_its_name():
    """option_field: the one look-up of an option's declaration by name (the panel's ranges, the model_high of
    test_time_steps that adapt calibrates modes up to, the bundle checks of calibrated test_time_steps)."""
    for cls in (ScoreOptions, PostprocessOptions, ThresholdPolicy, RunOptions):
        assert [option_field(cls, f.name) for f in fields(cls)] == list(fields(cls))
    with pytest.raises(KeyError, match="steps"):
        option_field(ScoreOptions, "steps")


def test_bundle_checks_use_the_declared_ranges():
    from CeVAEAnomalyLib.engine.bundle_checks import _check_options

    low, high = option_range(PostprocessOptions, "rim_mm")
    _check_options({"postprocess": {"rim_mm": high}}, "postprocess", PostprocessOptions)
    for bad in (low - 1, high + 1):
        with pytest.raises(CeVAEError, match=r"postprocess\.rim_mm must be a number in \[0, 50\]"):
            _check_options({"postprocess": {"rim_mm": bad}}, "postprocess", PostprocessOptions)
        with pytest.raises(CeVAEError, match=r"rim_mm \(--rim-mm\) must be a number in \[0, 50\]"):
            PostprocessOptions(rim_mm=bad)


def test_numpy_numbers_from_a_script_are_taken_as_plain_numbers():
    request = DetectionRequest.of(batch_size=np.int64(8), fpr=np.float32(0.001), rim_mm=np.float64(2.0))
    assert request.run.batch_size == 8 and type(request.run.batch_size) is int
    assert request.policy.fpr == pytest.approx(0.001) and type(request.policy.fpr) is float
    assert json.loads(json.dumps(request.to_dict()))["post"]["rim_mm"] == 2.0  # serialisable as it is
    with pytest.raises(CeVAEError, match="batch_size .* must be a whole number"):
        DetectionRequest.of(batch_size=np.float64(2.5))


def test_numpy_numbers_are_taken_by_the_option_classes_themselves():
    """ThresholdPolicy(threshold=score_array.max()) refused the float32 maximum of a score map ("must be a number"),
    and DetectionRequest(score={...}) a NumPy integer, which DetectionRequest.of took."""
    made = [ThresholdPolicy(threshold=np.float32(1.5)), ScoreOptions(mc_samples=np.int64(2), alpha=np.float32(2)),
            PostprocessOptions(rim_mm=np.float32(2.0), median_radius=np.int32(1)), RunOptions(batch_size=np.int64(8)),
            DetectionRequest(score={"mc_samples": np.int64(2)}, post={"hysteresis": np.float32(0.5)})]
    plain = [json.loads(json.dumps(m.to_dict())) for m in made]  # serialisable as they are
    assert plain[0] == {"threshold": 1.5, "fpr": None} and plain[1]["mc_samples"] == 2 and plain[3]["batch_size"] == 8
    assert type(made[2].median_radius) is int and type(made[4].score["mc_samples"]) is int
    assert made[4].post == {"hysteresis": 0.5} and type(made[4].post["hysteresis"]) is float
    with pytest.raises(CeVAEError, match="mc_samples .* must be a whole number"):
        ScoreOptions(mc_samples=np.float64(2.0))


def test_paper_given_with_the_other_options_switches_the_published_score():
    assert DetectionRequest.of(fpr=0.01).with_options(paper=True, batch_size=4).paper
    assert not DetectionRequest.of(paper=True).with_options(paper=False).paper
    assert DetectionRequest.of(paper=True).with_options(batch_size=4).paper  # kept when not given


def test_a_device_name_is_checked_where_the_device_is_chosen_too():
    """train and calibrate choose their device by name without a request: the same words, and a GPU index this
    machine lacks is refused (where CUDA is missing, cuda:N falls back to the CPU, as cuda does)."""
    import torch

    from CeVAEAnomalyLib.engine.devices import resolve_device

    with pytest.raises(CeVAEError, match="Unknown device 'cpu:abc'"):
        resolve_device("cpu:abc")
    if torch.cuda.is_available():
        with pytest.raises(CeVAEError, match="There is no GPU 'cuda:99'"):
            resolve_device("cuda:99")
    else:
        assert resolve_device("cuda:99").type == "cpu"


def test_a_path_option_starting_with_a_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
    """`--score=~/x.nii.gz`: the shell does not expand ~ after "=", and the output went to a folder named "~"."""
    from CeVAEAnomalyLib.options import path_value

    monkeypatch.setenv("HOME", str(tmp_path))
    assert path_value("~/x.nii.gz") == tmp_path / "x.nii.gz"
    assert path_value("a/~b") == Path("a/~b")
