"""Restoration-based pixel score (a lever measured by the acquisition benchmark, not a detector option).

Each slice y is restored to the nearest image the model finds healthy: x = y + d minimises
``sum over brain pixels (x - decode(mu(x)))^2 + beta_sum * KL(x) + weight * |d|_1`` by proximal
gradient steps (a gradient step on the first two terms, then soft-thresholding of d, which keeps the
change sparse: only pixels the model keeps refusing to reconstruct move). The score is |d|, the size of
the change. The KL weight is the training loss's beta rescaled from means over pixels and latents to the
sums used here.
"""
from __future__ import annotations

import torch

from CeVAEAnomalyLib.engine.model import CeVAE, kl_per_sample


def restoration_change(model: CeVAE, slices: torch.Tensor, brain: torch.Tensor, beta: float, steps: int = 30,
                       step: float = 0.25, weight: float = 0.1, batch_size: int = 64) -> torch.Tensor:
    """The change d (restored = slices + d) for [N,S,S] slices (``brain``: bool [N,S,S]) as [N,1,S,S], 0
    outside the brain."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, slices.shape[0], batch_size):
        y = slices[start:start + batch_size, None].to(device, torch.float32)
        b = brain[start:start + batch_size, None].to(device, torch.float32)
        d = torch.zeros_like(y)
        for _ in range(steps):
            x = (y + d).requires_grad_(True)
            with torch.enable_grad():
                mu, logvar = model.encode(x)
                err = ((x - model.decode(mu)).pow(2) * b).flatten(1).sum(1)
                kl_weight = beta * x[0].numel() / mu.shape[1]
                loss = (err + kl_weight * kl_per_sample(mu, logvar)).sum()  # slices are independent
                g = torch.autograd.grad(loss, x)[0]
            with torch.no_grad():
                d = d - step * g
                d = torch.sign(d) * (d.abs() - step * weight).clamp_min(0) * b
        out.append(d)
    return torch.cat(out)
