"""Test-time adaptation (``--test-time-steps``, the thorough mode): a fine-tuned copy scores the scan, the
bundle's model is untouched, the result is repeatable, and a run can be cancelled while adapting."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CeVAEAnomalyLib.engine.corruption import random_rectangles
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.model import cevae_loss
from CeVAEAnomalyLib.engine.scan_adaptation import adapted_copy
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import DetectionRequest, ThresholdPolicy
from CeVAEAnomalyLib.progress import Cancelled


def _adapt(bundle, slices, brain, steps, progress=None):
    pre = bundle.preprocess
    return adapted_copy(bundle.model, slices, brain, steps, bundle.header.loss, pre.clip_max,
                        pre.min_brain_fraction, progress)


def _loss(model, slices, loss_cfg, clip_max) -> float:
    g = torch.Generator().manual_seed(5)
    x = slices[:, None].float()
    xc, _ = random_rectangles(x, g, value_range=(0.0, clip_max))
    torch.manual_seed(5)
    with torch.no_grad():
        return float(cevae_loss(model, x, xc, loss_cfg)[0])


def test_adaptation_fits_the_scan_and_leaves_the_model_untouched(scan_slices, one_thread) -> None:
    bundle, slices, brain, _, _ = scan_slices
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    adapted = _adapt(bundle, slices, brain, 40)
    assert adapted is not bundle.model and not adapted.training
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(v, before[k]), f"the bundle's weight {k} changed"
    assert any(not torch.equal(v, before[k]) for k, v in adapted.state_dict().items())
    cfg, clip = bundle.header.loss, float(bundle.preprocess.clip_max)
    assert _loss(adapted, slices, cfg, clip) < _loss(bundle.model, slices, cfg, clip)


def test_adaptation_is_repeatable(scan_slices, one_thread) -> None:
    bundle, slices, brain, _, _ = scan_slices
    torch.manual_seed(123)  # the global generator's state must not matter
    a = _adapt(bundle, slices, brain, 5).state_dict()
    torch.manual_seed(456)
    caller = torch.get_rng_state()
    b = _adapt(bundle, slices, brain, 5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.get_rng_state(), caller)  # the caller's random state is left as it was


def test_two_adaptations_at_once_give_what_each_gives_alone(scan_slices) -> None:
    """Thorough detections in two threads (a console user's, a server's): no random state is shared."""
    import threading

    bundle, slices, brain, _, _ = scan_slices
    alone = _adapt(bundle, slices, brain, 4).state_dict()
    together: list = []
    threads = [threading.Thread(target=lambda: together.append(_adapt(bundle, slices, brain, 4).state_dict()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(together) == 2 and all(torch.equal(w[k], alone[k]) for w in together for k in alone)


def test_adaptation_can_be_cancelled_between_steps(scan_slices, one_thread) -> None:
    bundle, slices, brain, _, _ = scan_slices
    seen = []

    def progress(fraction: float, message: str) -> None:
        seen.append(fraction)
        if len(seen) > 3:
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        _adapt(bundle, slices, brain, 1000, progress)
    assert len(seen) == 4  # it stopped at the first report after the cancel, not after 1000 steps


def test_detector_scores_with_the_adapted_copy_and_needs_its_own_calibration(scan_slices, one_thread) -> None:
    bundle, _, _, image, mask = scan_slices
    plain = Detector.from_request(bundle, DetectionRequest.of(threshold=math.inf))
    thorough = Detector.from_request(bundle, DetectionRequest.of(threshold=math.inf, test_time_steps=20))
    a, b = plain(image, mask), thorough(image, mask)
    assert a.score.GetSize() == b.score.GetSize() == image.GetSize()
    diff = np.abs(sitk.GetArrayViewFromImage(a.score) - sitk.GetArrayViewFromImage(b.score))
    assert diff.max() > 1e-3
    again = thorough(image, mask)  # the same scan twice: the same map
    assert np.array_equal(sitk.GetArrayViewFromImage(again.score), sitk.GetArrayViewFromImage(b.score))
    # the model's calibration was made without adaptation: a calibrated threshold is refused by name
    with pytest.raises(CeVAEError, match="no calibration for these"):
        Detector(bundle, bundle.header.score_options.replace(test_time_steps=20), policy=ThresholdPolicy())


def test_test_time_steps_is_checked_like_every_option() -> None:
    with pytest.raises(CeVAEError, match="test_time_steps|test-time-steps"):
        DetectionRequest.of(test_time_steps=-1)
    with pytest.raises(CeVAEError, match="test_time_steps|test-time-steps"):
        DetectionRequest.of(test_time_steps=2.5)
