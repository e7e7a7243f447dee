"""The restoration-error lever of the acquisition benchmark: a change that the model finds more healthy,
zero outside the brain, sparser with a larger L1 weight and none at all when that weight outweighs every
gradient."""
from __future__ import annotations

import pytest
import torch

from CeVAEAnomalyLib.engine.model import kl_per_sample
from CeVAEAnomalyResearch.restoration import restoration_change

pytestmark = pytest.mark.usefixtures("one_thread")


def _objective(model, x: torch.Tensor, brain: torch.Tensor, beta: float) -> float:
    """The restoration's smooth part, summed over slices: squared error to the reconstruction plus the KL."""
    with torch.no_grad():
        mu, logvar = model.encode(x)
        err = ((x - model.decode(mu)).pow(2) * brain).flatten(1).sum(1)
        return float((err + beta * x[0].numel() / mu.shape[1] * kl_per_sample(mu, logvar)).sum())


def test_the_restored_slices_are_more_healthy_to_the_model(scan_slices):
    bundle, slices, brain, _, _ = scan_slices
    beta = bundle.header.loss.beta
    d = restoration_change(bundle.model, slices, brain, beta, steps=10, weight=0.0)
    assert d.shape == (len(slices), 1) + slices.shape[1:]
    assert float(d[~brain[:, None]].abs().max()) == 0.0 and float(d.abs().max()) > 0
    x, b = slices[:, None].float(), brain[:, None].float()
    assert _objective(bundle.model, x + d, b, beta) < _objective(bundle.model, x, b, beta)


def test_a_larger_l1_weight_changes_fewer_pixels_and_a_heavy_one_none(scan_slices):
    bundle, slices, brain, _, _ = scan_slices
    beta = bundle.header.loss.beta
    changed = [int((restoration_change(bundle.model, slices, brain, beta, steps=10, weight=w) != 0).sum())
               for w in (0.0, 0.1, 1e6)]
    assert changed[0] > changed[1] > changed[2] == 0
