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

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import CeVAEError
from .model import CeVAE, kl_per_sample, rec_error
from ..progress import ProgressCallback, report

SCORE_TYPES = ("combi", "rec", "grad")
COMBI_MODES = ("product", "weighted", "geometric", "attribution")
GRAD_TARGETS = ("kl", "elbo")
GRAD_NORMS = ("volume", "slice", "none")


@dataclass(frozen=True)
class ScoreOptions:
    """How pixel maps are made; the defaults are the project's best measured variant."""

    score_type: str = "combi"
    # product: rec*g; weighted: rec*(1+alpha*g); geometric: sqrt(rec*g);
    # attribution: max(0, dKL/dx * (x - decode(mu))), each pixel's first-order share of the KL
    combi: str = "product"
    alpha: float = 1.0
    grad_target: str = "kl"
    grad_sigma: float = 3.0  # Gaussian smoothing of |grad|, in model pixels (0: none)
    grad_norm: str = "slice"  # min-max normalisation per slice, over the volume, or none
    rec_sigma: float = 0.0  # optional smoothing of the reconstruction error
    mc_samples: int = 0  # 0: decode mu; N: mean error over N samples of z
    rec_kind: str = "l1"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("score type", self.score_type, SCORE_TYPES),
            ("combination", self.combi, COMBI_MODES),
            ("gradient target", self.grad_target, GRAD_TARGETS),
            ("gradient normalisation", self.grad_norm, GRAD_NORMS),
            ("reconstruction error", self.rec_kind, ("l1", "l2")),
        ):
            if value not in allowed:
                raise CeVAEError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")
        if self.mc_samples < 0:
            raise CeVAEError("mc_samples must be 0 or more.")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


# The published ceVAE score (Zimmerer et al., 2019): rec × min-max normalised, smoothed |dKL/dx|.
PAPER = dict(combi="product", grad_target="kl", grad_sigma=3.0, grad_norm="volume", rec_sigma=0.0, mc_samples=0)


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
    model: CeVAE, x: torch.Tensor, brain: torch.Tensor, opts: ScoreOptions, need_grad: bool, beta: float
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """rec [B,1,S,S], the raw gradient map [B,1,S,S] or None, and (kl, rec_mean, neg_elbo) per slice.

    The gradient map is |grad|, or for ``combi="attribution"`` max(0, grad * (x - recon)).
    """
    attribution = need_grad and opts.score_type == "combi" and opts.combi == "attribution"
    x = x.detach().requires_grad_(need_grad)
    with torch.enable_grad() if need_grad else torch.no_grad():
        mu, logvar = (t.float() for t in model.encode(x))  # KL in float32 under autocast too
        kl = kl_per_sample(mu, logvar)  # [B]
        grad = recon = None
        if need_grad and opts.grad_target == "kl":  # slices are independent: sum gives per-slice grads
            grad = torch.autograd.grad(kl.sum(), x)[0]
        if opts.mc_samples == 0 or attribution or (need_grad and opts.grad_target == "elbo"):
            recon = model.decode(mu if (need_grad and opts.grad_target == "elbo") else mu.detach())
        if need_grad and opts.grad_target == "elbo":
            # negative ELBO per slice with a Gaussian likelihood (an L1 error would give a
            # gradient of constant magnitude): mean squared error + beta * KL per latent
            err = (rec_error(x, recon, "l2") * brain).flatten(1).mean(1)
            grad = torch.autograd.grad((err + beta * kl / mu.shape[1]).sum(), x)[0]
    with torch.no_grad():
        x = x.detach()
        if grad is not None:
            grad = (grad * (x - recon.detach())).clamp_min(0) if attribution else grad.abs()
        if opts.mc_samples > 0:  # only decoding repeats
            std = torch.exp(0.5 * logvar.detach())
            rec = torch.zeros_like(x)
            for _ in range(opts.mc_samples):
                z = mu.detach() + torch.randn_like(std) * std
                rec += rec_error(x, model.decode(z), opts.rec_kind)
            rec /= opts.mc_samples
        else:
            rec = rec_error(x, recon.detach(), opts.rec_kind)
        rec = rec * brain
        n_brain = brain.flatten(1).sum(1).clamp_min(1)
        rec_sum = rec.flatten(1).sum(1)
        stats = (kl.detach(), rec_sum / n_brain, rec_sum + kl.detach())
    return rec, grad, stats


def score_slices(
    model: CeVAE,
    slices: torch.Tensor,
    brain: torch.Tensor,
    opts: ScoreOptions,
    batch_size: int = 64,
    beta: float = 0.01,
    amp: bool = False,
    progress: Optional[ProgressCallback] = None,
    timings: Optional[Dict[str, float]] = None,
) -> Tuple[torch.Tensor, SliceScores]:
    """Score [N,S,S] slices (brain: bool [N,S,S]); returns maps [N,S,S] on the model's device.

    ``timings``, if given, receives the seconds of the network pass ("network") and of making the
    maps from its outputs ("scoring").
    """
    device = next(model.parameters()).device
    t0 = _clock(device) if timings is not None else 0.0
    need_grad = opts.score_type in ("grad", "combi")
    n = slices.shape[0]
    recs, grads, stats = [], [], []
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)
        if amp else nullcontext()
    )
    for start in range(0, n, batch_size):
        x = slices[start : start + batch_size, None].to(device, torch.float32)
        b = brain[start : start + batch_size, None].to(device, torch.float32)
        with autocast:
            rec, grad, st = _batch_maps(model, x, b, opts, need_grad, beta)
        recs.append(rec.float())
        if grad is not None:
            grads.append(grad.float() * b)
        stats.append(torch.stack([s.float() for s in st], 1))
        report(progress, min(start + batch_size, n) / n, "Scoring slices")
    t1 = _clock(device) if timings is not None else 0.0
    rec = torch.cat(recs)
    rec = gaussian_blur(rec, opts.rec_sigma) if opts.rec_sigma > 0 else rec
    maps = rec
    if need_grad:
        g = gaussian_blur(torch.cat(grads), opts.grad_sigma)
        if opts.grad_norm != "none":
            g = _minmax(g, opts.grad_norm == "slice")
        if opts.score_type == "grad" or opts.combi == "attribution":
            maps = g
        elif opts.combi == "product":
            maps = rec * g
        elif opts.combi == "weighted":
            maps = rec * (1.0 + opts.alpha * g)
        else:
            maps = torch.sqrt(rec * g)
    maps = maps * brain[:, None].to(device, maps.dtype)
    st = torch.cat(stats)
    if timings is not None:
        timings["network"] = t1 - t0
        timings["scoring"] = _clock(device) - t1
    return maps[:, 0], SliceScores(st[:, 0], st[:, 1], st[:, 2])


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
