"""The option dataclasses: validation, overrides, and calibration lookup across option versions."""
import json
import math

import numpy as np
import pytest

from CeVAEAnomalyLib.engine.calibration import calibrate, calibration_key, find_calibration
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import (
    PAPER,
    PostprocessOptions,
    RunOptions,
    ScoreOptions,
    ThresholdPolicy,
    parse_orientations,
)


@pytest.mark.parametrize("kwargs, message", [
    ({"score_type": "magic"}, "Unknown score type 'magic'"),
    ({"combi": "sum"}, "Unknown combination 'sum'"),
    ({"grad_norm": "global"}, "Unknown gradient normalisation"),
    ({"grad_sigma": -1.0}, "grad_sigma must be a finite number of at least 0"),
    ({"rec_sigma": math.nan}, "rec_sigma must be"),
    ({"mc_samples": 1.5}, "mc_samples must be a whole number"),
    ({"alpha": math.inf}, "alpha must be"),
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
    assert find_calibration(header, score, post)["source"] == "test"
    # ...but not for options that differ, nor when the new field is not at its default
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(header, score.replace(rec_kind="l2"), post)
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(header, score, post.replace(rim_mm=2.0))


def test_calibration_keys_this_version_cannot_read_are_skipped():
    score, post = ScoreOptions(), PostprocessOptions()
    stale = json.loads(calibration_key(score, post))
    stale["score"]["removed_option"] = 1
    header = _header_with(json.dumps(stale))
    header["calibration"]["not json"] = header["calibration"][json.dumps(stale)]
    with pytest.raises(CeVAEError, match="no calibration"):
        find_calibration(header, score, post)
