"""Context-encoding corruption: blot out random rectangles with random constants."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class Rectangles:
    """Up to R rectangles per sample: corners, sides and fill values [B,R]; ``active`` [B,R]."""

    y0: torch.Tensor
    x0: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    fill: torch.Tensor
    active: torch.Tensor


def sample_rectangles(
    b: int, h: int, w: int, value_range: Tuple[float, float],
    generator: Optional[torch.Generator] = None, max_rects: int = 3, max_side_frac: float = 0.5,
) -> Rectangles:
    """1..max_rects rectangles per sample, sides 1..max_side_frac·side, fills uniform in the range."""
    g = generator
    lo, hi = value_range
    n = torch.randint(1, max_rects + 1, (b,), generator=g)
    max_h, max_w = max(1, int(h * max_side_frac)), max(1, int(w * max_side_frac))
    rh = (torch.rand(b, max_rects, generator=g) * max_h).long() + 1
    rw = (torch.rand(b, max_rects, generator=g) * max_w).long() + 1
    y0 = (torch.rand(b, max_rects, generator=g) * (h - rh + 1)).long()  # the rectangle fits
    x0 = (torch.rand(b, max_rects, generator=g) * (w - rw + 1)).long()
    fill = lo + torch.rand(b, max_rects, generator=g) * (hi - lo)
    active = torch.arange(max_rects)[None, :] < n[:, None]
    return Rectangles(y0, x0, rh, rw, fill, active)


def apply_rectangles(x: torch.Tensor, r: Rectangles) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paint every active rectangle onto a copy of x [B,1,H,W], in order; also return the union mask."""
    _, _, h, w = x.shape
    dev = x.device
    y0, x0, rh, rw, fill, active = (t.to(dev) for t in (r.y0, r.x0, r.h, r.w, r.fill, r.active))
    ys = torch.arange(h, device=dev)[None, None, :, None]  # [1,1,H,1]
    xs = torch.arange(w, device=dev)[None, None, None, :]  # [1,1,1,W]
    inside = (
        (ys >= y0[..., None, None]) & (ys < (y0 + rh)[..., None, None])
        & (xs >= x0[..., None, None]) & (xs < (x0 + rw)[..., None, None])
        & active[..., None, None]
    )  # [B,R,H,W]
    out = x
    for k in range(inside.shape[1]):
        out = torch.where(inside[:, k : k + 1], fill[:, k, None, None, None].to(x.dtype), out)
    return out, inside.any(dim=1, keepdim=True)


def random_rectangles(
    x: torch.Tensor, generator: Optional[torch.Generator] = None,
    value_range: Optional[Tuple[float, float]] = None, max_rects: int = 3, max_side_frac: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Corrupted copy of x [B,1,H,W] and the mask of blotted pixels (range: the batch's, if not given)."""
    rng = value_range if value_range is not None else (float(x.min()), float(x.max()))
    rects = sample_rectangles(x.shape[0], x.shape[2], x.shape[3], rng, generator, max_rects, max_side_frac)
    return apply_rectangles(x, rects)
