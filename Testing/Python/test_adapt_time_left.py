"""The time an adaptation takes, as its user sees it: the estimate before it starts is a rough one (measured on a
busy 2-core CPU, it said 12 min where 3 were taken), and once fine-tuning runs the progress says the measured pace
and the time left. Timed with a clock the test gives: no test here asserts that anything is fast."""
from __future__ import annotations

from typing import List

import pytest

import CeVAEAnomalyLib.training.adapt as adapt_mod
from CeVAEAnomalyLib.training.adapt_plan import (TIMED_STEPS, AdaptOptions, Pace, calibration_left, describe_estimate,
                                                 fine_tuning_left)
from test_adapt import QUICK, site, subjects  # noqa: F401 (site: the module's fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_before_a_run_is_said_to_be_rough_and_for_a_busy_cpu():
    text = describe_estimate(2, "cpu")
    assert "rough estimate" in text and "busy" in text and "time left" in text


def test_the_pace_is_measured_between_steps_and_gives_the_time_left():
    clock = Clock()
    pace = Pace(total=300, after=TIMED_STEPS, clock=clock)
    pace.tick(1)  # the first step's end: where the timing starts
    for step in range(2, TIMED_STEPS + 1):
        clock.now += 0.25
        pace.tick(step)
        assert pace.rate() is None and fine_tuning_left(pace) == ""  # not yet enough steps timed
    clock.now += 0.25
    pace.tick(TIMED_STEPS + 1)
    assert pace.rate() == pytest.approx(4.0)  # 4 steps/s: one every 0.25 s
    assert pace.seconds_left() == pytest.approx((300 - TIMED_STEPS - 1) / 4.0)
    assert fine_tuning_left(pace) == " (4.0 steps/s; fine-tuning ends in about 1 min)"


def test_what_runs_between_runs_and_repeated_reports_do_not_count_as_step_time():
    clock = Clock()
    pace = Pace(total=30, after=2, clock=clock)
    for step in (1, 2, 3):  # a run: one step every 2 s
        pace.tick(step)
        clock.now += 2.0
    pace.pause()
    clock.now += 600.0  # the next run loads its slices
    pace.tick(11)  # (a resumed run starts after its checkpoint's step)
    clock.now += 1.0
    pace.tick(11)  # another message of the same step: the interval goes on
    clock.now += 1.0
    pace.tick(12)
    assert pace.rate() == pytest.approx(0.5)
    assert pace.seconds_left() == pytest.approx(36.0)
    assert fine_tuning_left(pace) == " (0.50 steps/s; fine-tuning ends in under a minute)"


def test_calibration_says_the_time_left_once_a_scan_is_calibrated():
    clock = Clock()
    pace = Pace(total=3, after=1, clock=clock)
    pace.tick(0.0)
    clock.now += 60.0
    pace.tick(0.5)
    assert calibration_left(pace) == ""
    clock.now += 90.0
    pace.tick(1.0)
    assert calibration_left(pace) == " (about 5 min left)"  # 150 s a scan, 2 to go


def test_an_adaptation_s_progress_says_the_pace_and_time_left_once_measured(tmp_path, tiny_bundle, site):
    """The command line and the Slicer panel show these messages (ConsoleProgress, the worker's progress lines)."""
    messages: List[str] = []
    options = AdaptOptions(**{**QUICK.__dict__, "steps": TIMED_STEPS + 2})
    adapt_mod.adapt(tiny_bundle, subjects(site, "a", "b"), tmp_path / "site.cevae", options,
                    lambda f, m: messages.append(m))
    steps = [m for m in messages if m.startswith("Fine-tuning")]
    first = [m for m in steps if m.startswith("Fine-tuning 1/3")]
    assert not any("steps/s" in m for m in first[:TIMED_STEPS])  # the first step only starts the timing
    assert all("steps/s; fine-tuning ends in " in m
               for m in steps[TIMED_STEPS + 1:]), steps
    calibrating = [m for m in messages if m.startswith("Calibrating: Healthy volume 2/2")]
    assert calibrating and all(m.endswith(" left)") for m in calibrating)
    assert not any(m.endswith(" left)") for m in messages if m.startswith("Calibrating: Healthy volume 1/2"))
