"""What a resumed adaptation says of the time it takes: the estimate before a run counts every fine-tuning step, so a
resume whose checkpoints already hold the fine-tuning was told the whole adaptation's time again (at the defaults,
six runs of 100 steps: about 22 min of fine-tuning on a busy CPU, where only the calibration was left). Once its
checkpoints are read, it now says how many steps they hold and what is left."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

import CeVAEAnomalyLib.training.adapt as adapt_mod
from CeVAEAnomalyLib.progress import Cancelled
from test_adapt import QUICK, masked, site  # noqa: F401 (site: the module's fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_resume_after_the_fine_tuning_says_only_the_calibration_is_left(tiny_bundle, site, tmp_path, caplog):
    def stop_at_calibration(fraction: float, message: str) -> None:
        if message.startswith("Calibrating"):
            raise Cancelled()

    out, scans = tmp_path / "site.cevae", masked(site, "a", "b")
    with pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, scans, out, QUICK, stop_at_calibration)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="CeVAEAnomalyLib.training.adapt"):
        adapt_mod.adapt(tiny_bundle, scans, out, replace(QUICK, resume=True))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming")]
    assert said == ["Resuming: the checkpoints hold 12 of the 12 fine-tuning steps (3 runs of 4), so the fine-tuning "
                    "is done; the calibration takes its estimated time."]


def test_the_fine_tuning_left_is_estimated_from_the_steps_not_yet_done():
    from CeVAEAnomalyLib.training.adapt_plan import resumed_note

    assert resumed_note(0, 3, 100, 64).startswith("Resuming: the checkpoints hold 0 of the 300 fine-tuning steps")
    # 150 steps left at the measured 0.45 steps/s of batch 64: 333 s
    assert resumed_note(150, 3, 100, 64).endswith("so the rest of the fine-tuning takes roughly 6 min on a 2-core CPU "
                                                  "busy with other jobs; then the calibration takes its estimated "
                                                  "time.")
    assert "on cuda much less" in resumed_note(150, 3, 100, 64, "cuda")
