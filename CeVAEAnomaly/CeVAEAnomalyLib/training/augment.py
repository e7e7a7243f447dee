"""Batch augmentation on the device: one vectorised pass of MRI-suited geometric and intensity changes."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentConfig


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Augment a batch [B,1,S,S] in one vectorised pass; background stays 0."""
    b, _, s, _ = x.shape
    dev = x.device

    def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1]
        return (torch.rand(*shape, generator=g) * 2 - 1).to(dev)

    ang = u(b) * np.deg2rad(cfg.rotate_deg)
    sc = 1 + u(b) * cfg.scale
    flip = torch.where((torch.rand(b, generator=g) < cfg.flip).to(dev), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = torch.cos(ang) / sc * flip
    theta[:, 0, 1] = -torch.sin(ang) / sc
    theta[:, 1, 0] = torch.sin(ang) / sc * flip
    theta[:, 1, 1] = torch.cos(ang) / sc
    theta[:, :, 2] = u(b, 2) * cfg.translate * 2
    grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
    if cfg.elastic > 0:
        disp = _smooth_field(u(b, 2, 5, 5) * cfg.elastic * 2, s)
        grid = grid + disp.permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fg = out > 1e-3
    gamma = torch.exp(u(b, 1, 1, 1) * cfg.gamma)
    out = out.clamp_min(0).pow(gamma)
    out = out * (1 + u(b, 1, 1, 1) * cfg.intensity_scale) + u(b, 1, 1, 1) * cfg.intensity_shift
    if cfg.bias_field > 0:
        out = out * torch.exp(_smooth_field(u(b, 1, 3, 3) * cfg.bias_field, s))
    if cfg.noise > 0:
        noise = torch.randn(out.shape, generator=g).to(dev)  # (drawn before the levels, as before)
        out = out + noise * (torch.rand(b, 1, 1, 1, generator=g).to(dev) * cfg.noise)
    return torch.where(fg, out, torch.zeros_like(out))


def _smooth_field(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling (corners aligned) of [B,C,n,n] to [B,C,size,size], as two small matrix products
    (an order of magnitude faster than ``F.interpolate`` on the CPU)."""
    up = _bicubic_matrix(coarse.shape[-1], size).to(coarse.device, coarse.dtype)
    return up @ coarse @ up.T


@lru_cache(maxsize=8)
def _bicubic_matrix(n: int, size: int) -> torch.Tensor:
    """[size, n] weights of bicubic interpolation from n to size samples, corners aligned."""
    basis = torch.eye(n, dtype=torch.float64)[:, None, :, None]
    return F.interpolate(basis, size=(size, 1), mode="bicubic", align_corners=True)[:, 0, :, 0].T
