"""What one slice costs a network (ModelConfig.slice_cost): the figures are the real network's, and every model this
project trains or documents stays far below the limits a model file is held to."""
from __future__ import annotations

from typing import Tuple

import pytest
import torch
from torch import nn

from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.config import MAX_SLICE_MULTIPLY_ADDS, MAX_SLICE_VALUES, ModelConfig
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.engine.model import CeVAE


def counted(cfg: ModelConfig) -> Tuple[int, int]:
    """(values, multiply-adds) of one slice through the real network, counted at each convolution (on the meta
    device: nothing is allocated)."""
    totals = [0, 0]

    def count(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        taps = module.kernel_size[0] * module.kernel_size[1]
        totals[0] += output.numel()
        if isinstance(module, nn.ConvTranspose2d):  # each input element is added into taps outputs per channel
            totals[1] += inputs[0].numel() * module.out_channels * taps
        else:  # each output element sums taps inputs per channel
            totals[1] += output.numel() * module.in_channels * taps

    with torch.device("meta"):
        model = CeVAE(cfg)
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.register_forward_hook(count)
        model.decode(model.encode(torch.empty(1, 1, cfg.input_size, cfg.input_size))[0])
    return totals[0], totals[1]


@pytest.mark.parametrize("cfg", [
    ModelConfig(), ModelConfig(input_size=128), ModelConfig(channels=(8,) * 6, z_dim=3),
    ModelConfig(input_size=128, channels=(4096, 1), z_dim=1), ModelConfig(input_size=128, channels=(7, 300), z_dim=50),
    ModelConfig(input_size=128, channels=(128, 512, 2048), z_dim=1),
], ids=str)
def test_the_cost_is_that_of_the_real_network(cfg):
    assert cfg.slice_cost() == counted(cfg)


@pytest.mark.parametrize("cfg,margin", [
    (read_header(default_model_path()).model, 50),  # the bundled model
    (ModelConfig(), 50),  # train's default
    (ModelConfig(input_size=128), 10),  # train --input-size 128, measured in docs/benchmark.md
    (ModelConfig(input_size=128, channels=(32, 64, 128, 256, 512), z_dim=512), 5),  # twice as wide, one layer more
    (ModelConfig(input_size=128, channels=(64, 128, 256, 512), z_dim=512), 3),  # four times as wide
], ids=str)
def test_models_this_project_trains_stay_far_below_the_limits(cfg, margin):
    values, adds = cfg.slice_cost()
    assert values * margin <= MAX_SLICE_VALUES and adds * margin <= MAX_SLICE_MULTIPLY_ADDS
    assert cfg.cost_excess() is None


@pytest.mark.parametrize("cfg,excess", [
    (ModelConfig(input_size=128, channels=(4096, 1), z_dim=1),
     "computes 33,572,866 values per slice (the outputs of its layers), more than the limit of 4,000,000"),
    (ModelConfig(input_size=128, channels=(128, 512, 2048), z_dim=1),
     "needs 10,755,768,320 multiply-adds per slice, more than the limit of 10,000,000,000"),
], ids=str)
def test_a_network_beyond_the_limits_is_said_with_its_figure(cfg, excess):
    assert cfg.cost_excess() == excess
