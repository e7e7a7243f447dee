"""Training data: healthy volumes to slices, and batch augmentation on the device."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.config import PreprocessConfig
from ..io.images import read_image
from ..io.manifest import Subject
from ..engine.preprocess import mask_array, prepare

log = logging.getLogger(__name__)


def split_subjects(subjects: Sequence[Subject], val_fraction: float, seed: int) -> Tuple[List[Subject], List[Subject]]:
    """Subject-level split (no subject in both); at least one training subject."""
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = int(round(len(subjects) * val_fraction))
    n_val = min(n_val, len(subjects) - 1)
    val = [subjects[i] for i in sorted(order[:n_val])]
    train = [subjects[i] for i in sorted(order[n_val:])]
    return train, val


def subject_slices(
    subject: Subject, cfg: PreprocessConfig, orientations: Sequence[str] = ("axial",), min_fraction: Optional[float] = None
) -> np.ndarray:
    """Normalised model slices [N,S,S] of one subject with enough brain in them."""
    from ..engine.brainmask import given_or_computed_mask

    image = read_image(subject.image)
    brain = mask_array(given_or_computed_mask(image, subject.mask, subject.image.name), image)
    frac = cfg.min_brain_fraction if min_fraction is None else min_fraction
    out = []
    for orientation in orientations:
        stack = prepare(image, brain, cfg, orientation)
        keep = stack.brain.reshape(len(stack.brain), -1).mean(1) >= frac
        out.append(stack.slices[keep])
    return np.concatenate(out)


def load_slices(subjects: Sequence[Subject], cfg: PreprocessConfig, orientations: Sequence[str]) -> torch.Tensor:
    """All subjects' slices as one float32 tensor [N,1,S,S]."""
    if not subjects:
        return torch.zeros(0, 1, cfg.input_size, cfg.input_size)
    arrays = [subject_slices(s, cfg, orientations) for s in subjects]
    return torch.from_numpy(np.concatenate(arrays))[:, None]


@dataclass(frozen=True)
class AugmentConfig:
    """MRI-suited augmentation strengths (0 disables a step); see README for the why."""

    flip: float = 0.5  # left-right flip probability (brains are near-symmetric)
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    elastic: float = 0.02  # displacement amplitude of a smooth random field (fraction of the side)
    gamma: float = 0.3  # log-uniform gamma in [exp(-g), exp(g)] (contrast changes between scanners)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    bias_field: float = 0.2  # amplitude of a smooth multiplicative field (coil inhomogeneity)
    noise: float = 0.03  # max std of Gaussian noise (scanner noise levels)


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
        out = out + torch.randn(out.shape, generator=g).to(dev) * (torch.rand(b, 1, 1, 1, generator=g).to(dev) * cfg.noise)
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
