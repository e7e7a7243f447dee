"""Pixel and slice anomaly scores from a trained ceVAE.

- ``rec``: |x - decode(mu)| (or the mean over ``mc_samples`` decodings of z ~ q(z|x)).
- ``grad``: |dKL/dx| (or of the whole negative ELBO, Gaussian likelihood), back-propagated to the input, smoothed with a
  Gaussian and normalised (per volume or per slice).
- ``combi``: the two combined element-wise, by default rec × grad normalised per slice (the best
  variant of the leave-one-subject-out benchmark); :data:`PAPER` is the published setting
  (rec × grad normalised per volume, σ = 3 px).

Slice scores: KL, reconstruction error and the negative ELBO of every slice.
Encoding and the gradient are computed once per slice; only decoding repeats for MC samples.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..options import DEFAULT_BATCH_SIZE, ScoreOptions
from .config import LossConfig
from .devices import mixed_precision
from .model import CeVAE, kl_per_sample, latent_noise, rec_error
from ..progress import ProgressCallback, report

@dataclass
class SliceScores:
    """Per-slice scores, each a tensor [N]."""

    kl: torch.Tensor
    rec: torch.Tensor  # mean reconstruction error over brain pixels
    neg_elbo: torch.Tensor  # summed error over brain pixels + KL


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of [N,1,H,W] maps (reflect padding).

    Each axis is one small matrix product (the padded convolution written as an [n,n] matrix),
    which is many times faster than a single-channel convolution on the CPU.
    """
    if sigma <= 0:
        return maps
    rows = _blur_matrix(maps.shape[-2], float(sigma)).to(maps.device, maps.dtype)
    cols = _blur_matrix(maps.shape[-1], float(sigma)).to(maps.device, maps.dtype)
    return torch.matmul(rows.T, torch.matmul(maps, cols))


@lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """[n,n] float64 matrix M with v @ M = the Gaussian-smoothed v (kernel radius 3 sigma, reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    pad = min(radius, n - 1)
    k = k[radius - pad : radius + pad + 1]
    basis = F.pad(torch.eye(n, dtype=torch.float64)[:, None, :], (pad, pad), mode="reflect")
    return F.conv1d(basis, k.view(1, 1, -1))[:, 0, :]


def _minmax(maps: torch.Tensor, per_slice: bool) -> torch.Tensor:
    dims = (1, 2, 3) if per_slice else (0, 1, 2, 3)
    lo = maps.amin(dim=dims, keepdim=True)
    hi = maps.amax(dim=dims, keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def _batch_maps(
    model: CeVAE, x: torch.Tensor, brain: torch.Tensor, opts: ScoreOptions, need_grad: bool,
    attribution: bool, beta: float, samples: torch.Generator,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """For a batch [B,1,S,S]: rec, |grad| (or None), the attribution map max(0, grad * (x - recon))
    (or None) and (kl, rec_mean, neg_elbo) per slice; ``samples``: where latent samples (``mc_samples``) come
    from."""
    x = x.detach().requires_grad_(need_grad)
    elbo_grad = need_grad and opts.grad_target == "elbo"
    with torch.enable_grad() if need_grad else torch.no_grad():
        mu, logvar = (t.float() for t in model.encode(x))  # KL in float32 under autocast too
        kl = kl_per_sample(mu, logvar)  # [B]
        grad = recon = None
        if need_grad and opts.grad_target == "kl":  # slices are independent: sum gives per-slice grads
            grad = torch.autograd.grad(kl.sum(), x)[0]
        if opts.mc_samples == 0 or attribution or elbo_grad:
            recon = model.decode(mu if elbo_grad else mu.detach())
        if elbo_grad:
            # negative ELBO per slice with a Gaussian likelihood (an L1 error would give a
            # gradient of constant magnitude): mean squared error + beta * KL per latent
            err = (rec_error(x, recon, "l2") * brain).flatten(1).mean(1)
            grad = torch.autograd.grad((err + beta * kl / mu.shape[1]).sum(), x)[0]
    with torch.no_grad():
        x = x.detach()
        attr = (grad * (x - recon.detach())).clamp_min(0) if attribution else None
        grad = grad.abs() if grad is not None else None
        if opts.mc_samples > 0:  # only decoding repeats
            std = torch.exp(0.5 * logvar.detach())
            rec = torch.zeros_like(x)
            for _ in range(opts.mc_samples):
                z = mu.detach() + latent_noise(std, samples) * std
                rec += rec_error(x, model.decode(z), opts.rec_kind)
            rec /= opts.mc_samples
        else:
            rec = rec_error(x, recon.detach(), opts.rec_kind)
        rec = rec * brain
        n_brain = brain.flatten(1).sum(1).clamp_min(1)
        rec_sum = rec.flatten(1).sum(1)
        stats = (kl.detach(), rec_sum / n_brain, rec_sum + kl.detach())
    return rec, grad, attr, stats


def scoring_copy(model: CeVAE, own: bool = False) -> CeVAE:
    """``model`` with no weight taking a gradient, as scoring runs it: the same maps bit for bit, without autograd's
    work for the weights (a fifth of the network's CPU time); a copy (the weights, a few MB), unless ``own`` (the
    caller's own copy, changed in place). The caller's model keeps its gradients (training, adaptation)."""
    return (model if own else copy.deepcopy(model)).requires_grad_(False)


@dataclass
class NetworkMaps:
    """What one pass of the network gives for a stack of slices (maps [N,1,S,S], 0 outside the brain)."""

    rec: torch.Tensor
    grad: Optional[torch.Tensor]  # |dKL/dx| (or |dELBO/dx|), unsmoothed; None if not needed
    attribution: Optional[torch.Tensor]  # max(0, grad * (x - recon)); None if not needed
    brain: torch.Tensor  # float [N,1,S,S]
    slices: SliceScores


def network_maps(
    model: CeVAE,
    slices: torch.Tensor,
    brain: torch.Tensor,
    options: Sequence[ScoreOptions],
    batch_size: int = DEFAULT_BATCH_SIZE,
    beta: float = LossConfig.beta,
    amp: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> NetworkMaps:
    """Run the network once over [N,S,S] slices (brain: bool [N,S,S]) for every scoring in ``options``.

    The scorings may differ in score type and combination only: the network-side settings
    (gradient target, MC samples, reconstruction error) are those of ``options[0]``.
    """
    opts = options[0]
    device = next(model.parameters()).device
    need_grad = any(o.needs_grad for o in options)
    attribution = any(o.score_type == "combi" and o.combi == "attribution" for o in options)
    n = slices.shape[0]
    recs, grads, attrs, stats, brains = [], [], [], [], []
    autocast = mixed_precision(device, amp)
    samples = torch.Generator().manual_seed(0)  # sampled scores: the same in every run, whatever ran before
    report(progress, 0.0, "Scoring slices")
    for start in range(0, n, batch_size):
        x = slices[start : start + batch_size, None].to(device, torch.float32)
        b = brain[start : start + batch_size, None].to(device, torch.float32)
        with autocast:
            rec, grad, attr, st = _batch_maps(model, x, b, opts, need_grad, attribution, beta, samples)
        recs.append(rec.float())
        brains.append(b)
        if grad is not None:
            grads.append(grad.float() * b)
        if attr is not None:
            attrs.append(attr.float() * b)
        stats.append(torch.stack([s.float() for s in st], 1))
        report(progress, min(start + batch_size, n) / n, "Scoring slices")
    st = torch.cat(stats)
    return NetworkMaps(
        rec=torch.cat(recs),
        grad=torch.cat(grads) if grads else None,
        attribution=torch.cat(attrs) if attrs else None,
        brain=torch.cat(brains),
        slices=SliceScores(st[:, 0], st[:, 1], st[:, 2]),
    )


def pixel_map(raw: NetworkMaps, opts: ScoreOptions) -> torch.Tensor:
    """The [N,S,S] pixel score map of ``opts`` from the network's maps."""
    rec = gaussian_blur(raw.rec, opts.rec_sigma) if opts.rec_sigma > 0 else raw.rec
    maps = rec
    if opts.needs_grad:
        attribution = opts.score_type == "combi" and opts.combi == "attribution"
        source = raw.attribution if attribution else raw.grad
        if source is None:
            raise ValueError("the network pass was run without the gradient this scoring needs")
        g = gaussian_blur(source, opts.grad_sigma)
        if opts.grad_norm != "none":
            g = _minmax(g, opts.grad_norm == "slice")
        if opts.score_type == "grad" or attribution:
            maps = g
        elif opts.combi == "product":
            maps = rec * g
        elif opts.combi == "weighted":
            maps = rec * (1.0 + opts.alpha * g)
        else:
            maps = torch.sqrt(rec * g)
    return (maps * raw.brain)[:, 0]


def score_slices(
    model: CeVAE,
    slices: torch.Tensor,
    brain: torch.Tensor,
    opts: ScoreOptions,
    batch_size: int = DEFAULT_BATCH_SIZE,
    beta: float = LossConfig.beta,
    amp: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> Tuple[torch.Tensor, SliceScores]:
    """Score [N,S,S] slices (brain: bool [N,S,S]); returns maps [N,S,S] on the model's device."""
    raw = network_maps(model, slices, brain, [opts], batch_size, beta, amp, progress)
    return pixel_map(raw, opts), raw.slices
