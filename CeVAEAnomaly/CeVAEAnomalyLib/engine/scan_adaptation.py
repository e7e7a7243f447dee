"""Test-time adaptation (the "thorough" mode): score a scan with a copy of the model fine-tuned on its own slices.

A model trained on a few clean scans reconstructs a scan from another scanner (other contrast,
noise, slice thickness, enhancing vessels after contrast) worse everywhere, and those global
errors become false alarms. A short fine-tuning on the scan's own slices, with the training loss
(VAE and context-encoder branches), fits what is common to the whole scan far more than a lesion in
a few of its slices. The copy is discarded after scoring; the bundle is never changed. Seeded, so the
same scan and options give the same map on the CPU.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .config import LossConfig
from .corruption import random_rectangles
from .model import CeVAE, cevae_loss
from ..progress import ProgressCallback, report

TEST_TIME_BATCH = 32  # slices per fine-tuning step
TEST_TIME_LR = 1e-4  # half the training rate: a nudge towards the scan, not a new model
TEST_TIME_SEED = 0


def adapted_copy(model: CeVAE, slices: torch.Tensor, brain: torch.Tensor, steps: int, loss: LossConfig,
                 clip_max: float, min_brain_fraction: float,
                 progress: Optional[ProgressCallback] = None) -> CeVAE:
    """A copy of ``model`` fine-tuned for ``steps`` steps on the slices [N,S,S] (brain: bool [N,S,S]) that
    hold at least ``min_brain_fraction`` of brain, in eval mode on the model's device.

    ``progress`` may raise :class:`~..progress.Cancelled` between steps; the model itself is untouched.
    """
    device = next(model.parameters()).device
    share = brain.flatten(1).float().mean(1)
    train = slices[share >= min_brain_fraction]
    if len(train) == 0:
        train = slices[share > 0] if bool((share > 0).any()) else slices
    net = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(TEST_TIME_SEED)  # batches and rectangles
    latents = torch.Generator().manual_seed(TEST_TIME_SEED)  # latent samples: no global random state is used
    optimiser = torch.optim.Adam(net.parameters(), lr=TEST_TIME_LR)
    report(progress, 0.0, "Adapting the model to this scan")
    with torch.enable_grad():
        for step in range(steps):
            pick = torch.randint(len(train), (min(TEST_TIME_BATCH, len(train)),), generator=generator)
            x = train[pick, None].to(torch.float32)
            corrupted, _ = random_rectangles(x, generator, value_range=(0.0, float(clip_max)))
            value, _ = cevae_loss(net, x.to(device), corrupted.to(device), loss, latents)
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            report(progress, (step + 1) / steps, "Adapting the model to this scan")
    return net.eval()
