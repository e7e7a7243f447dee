"""Context-encoding corruption: blot out random rectangles with random constants."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def random_rectangles(
    x: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    max_rects: int = 3,
    max_side_frac: float = 0.5,
    value_range: Optional[Tuple[float, float]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return a corrupted copy of x [B,1,H,W] and the boolean mask of blotted pixels.

    Each sample gets 1..max_rects rectangles with sides 1..max_side_frac·side, each filled with
    its own constant drawn uniformly inside the data range (of the batch, or ``value_range``).
    Later rectangles may overlap earlier ones, but every rectangle is drawn: none is dropped.
    """
    b, _, h, w = x.shape
    dev = x.device
    lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
    g = generator

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device="cpu").to(dev)

    n_rects = torch.randint(1, max_rects + 1, (b,), generator=g).to(dev)  # [B]
    max_h, max_w = max(1, int(h * max_side_frac)), max(1, int(w * max_side_frac))
    rh = (rand(b, max_rects) * max_h).long() + 1  # [B,R] heights 1..max_h
    rw = (rand(b, max_rects) * max_w).long() + 1
    y0 = (rand(b, max_rects) * (h - rh + 1).float()).long()  # so the rectangle fits
    x0 = (rand(b, max_rects) * (w - rw + 1).float()).long()
    fill = lo + rand(b, max_rects) * (hi - lo)

    ys = torch.arange(h, device=dev)[None, None, :, None]  # [1,1,H,1]
    xs = torch.arange(w, device=dev)[None, None, None, :]
    inside = (
        (ys >= y0[..., None, None]) & (ys < (y0 + rh)[..., None, None])
        & (xs >= x0[..., None, None]) & (xs < (x0 + rw)[..., None, None])
    )  # [B,R,H,W]
    active = torch.arange(max_rects, device=dev)[None, :] < n_rects[:, None]  # [B,R]
    inside = inside & active[..., None, None]
    out = x.clone()
    for r in range(max_rects):  # paint in order; all active rectangles are applied
        m = inside[:, r : r + 1]
        out = torch.where(m, fill[:, r, None, None, None].to(x.dtype), out)
    return out, inside.any(dim=1, keepdim=True)
