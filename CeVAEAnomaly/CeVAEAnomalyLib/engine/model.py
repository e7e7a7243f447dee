"""The 2D ceVAE: one encoder shared by the VAE and the context-encoding branch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig, ModelConfig


def _encoder(cfg: ModelConfig) -> nn.Sequential:
    layers = []
    in_ch = 1
    for ch in cfg.channels:  # each 4x4 stride-2 conv halves the side: S -> S/2
        layers += [nn.Conv2d(in_ch, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        in_ch = ch
    # [B, C, b, b] -> [B, 2z, 1, 1]: mean and log-variance
    layers.append(_WholeInputConv(in_ch, 2 * cfg.z_dim, cfg.bottleneck_size))
    return nn.Sequential(*layers)


class _WholeInputConv(nn.Conv2d):
    """The encoder's last convolution: its kernel covers its whole input, so it runs as the matrix product it is (the
    same sums, several times faster than the convolution on the CPU, its gradient too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.kernel_size:  # a larger input than the model's: the convolution itself
            return super().forward(x)
        return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]


class _PointTransposedConv(nn.ConvTranspose2d):
    """The decoder's first transposed convolution: of a 1x1 input it is one matrix product (see
    :class:`_WholeInputConv`)."""

    def forward(self, x: torch.Tensor, output_size: Optional[list] = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (1, 1) or output_size is not None:
            return super().forward(x, output_size)
        kh, kw = self.kernel_size
        out = F.linear(x.flatten(1), self.weight.flatten(1).T, self.bias.repeat_interleave(kh * kw))
        return out.view(-1, self.out_channels, kh, kw)


def _decoder(cfg: ModelConfig) -> nn.Sequential:
    chans = list(cfg.channels[::-1])  # e.g. 256, 64, 32, 16
    layers = [_PointTransposedConv(cfg.z_dim, chans[0], cfg.bottleneck_size), nn.LeakyReLU(0.2)]
    for in_ch, out_ch in zip(chans, chans[1:]):
        layers += [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
    layers.append(nn.ConvTranspose2d(chans[-1], 1, 4, stride=2, padding=1))  # linear output
    return nn.Sequential(*layers)


class CeVAE(nn.Module):
    """VAE whose encoder is shared with a context encoder (Zimmerer et al., 2019)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg)
        self.decoder = _decoder(cfg)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [B,1,S,S] -> (mu, logvar), each [B,z]."""
        h = self.encoder(x).flatten(1)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,z] -> reconstruction [B,1,S,S]."""
        return self.decoder(z[:, :, None, None])

    def forward(self, x: torch.Tensor, x_corrupted: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, ...]:
        """VAE branch: sampled reconstruction, mu and logvar of ``x`` (the latent noise from ``generator``, a CPU
        generator, if given; else from torch's global one).

        With ``x_corrupted`` the context-encoding branch runs in the same pass (one stacked
        encoder and decoder call) and its reconstruction from the latent mean comes fourth.
        Training calls the model once per step this way, so DistributedDataParallel sees
        every use of the weights.
        """
        if x_corrupted is None:
            mu, logvar = self.encode(x)
            z = mu + latent_noise(mu, generator) * torch.exp(0.5 * logvar)
            return self.decode(z), mu, logvar
        n = x.shape[0]
        mu_all, logvar_all = self.encode(torch.cat([x, x_corrupted]))
        mu, logvar = mu_all[:n], logvar_all[:n]
        z = mu + latent_noise(mu, generator) * torch.exp(0.5 * logvar)
        rec = self.decode(torch.cat([z, mu_all[n:]]))
        return rec[:n], mu, logvar, rec[n:]


def latent_noise(like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``: from ``generator`` (a CPU generator, so that a seeded draw is the
    same on every device; it leaves torch's global random state alone), else from the global generator."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latents: [B,z] -> [B]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def rec_error(x: torch.Tensor, y: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Element-wise reconstruction error, same shape as x."""
    d = x - y
    return d.abs() if kind == "l1" else d.pow(2)


def cevae_loss(
    model: nn.Module, x: torch.Tensor, x_corrupted: torch.Tensor, cfg: LossConfig,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, dict]:
    """(1-c)·(β·KL + rec_VAE) + c·rec_CE; KL is a mean over latents, rec a mean over pixels.

    ``model`` is a :class:`CeVAE` or a DistributedDataParallel wrapper of one; ``generator``: where the latent
    samples come from (:func:`latent_noise`).

    The CE branch encodes the corrupted slice and decodes the latent mean (no sampling); it
    must restore the clean slice.
    """
    c = cfg.ce_weight
    terms = {}
    total = x.new_zeros(())
    if c > 0.0:  # one call computes both branches
        rec, mu, logvar, rec_ce_img = model(x, x_corrupted, generator)
    else:
        rec, mu, logvar = model(x, generator=generator)
    if c < 1.0:
        kl = kl_per_sample(mu, logvar).mean() / mu.shape[1]
        rec_vae = rec_error(rec, x, cfg.rec).mean()
        total = total + (1.0 - c) * (cfg.beta * kl + rec_vae)
        terms.update(kl=kl.detach(), rec_vae=rec_vae.detach())
    if c > 0.0:
        rec_ce = rec_error(rec_ce_img, x, cfg.rec).mean()
        total = total + c * rec_ce
        terms["rec_ce"] = rec_ce.detach()
    terms["loss"] = total.detach()
    return total, terms
