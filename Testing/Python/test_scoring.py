"""Pixel scores: the KL gradient against finite differences, and the score variants."""
import copy
import math

import pytest
import torch

from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.engine.model import CeVAE, kl_per_sample
from CeVAEAnomalyLib.engine.scoring import gaussian_blur, score_slices
from CeVAEAnomalyLib.options import PAPER, ScoreOptions


def _model():
    torch.manual_seed(0)
    return CeVAE(ModelConfig(channels=(4, 4, 4, 4), z_dim=4)).double().eval()


def test_grad_map_equals_finite_differences():
    model = _model()
    x = torch.rand(1, 64, 64, dtype=torch.float64)
    brain = torch.ones(1, 64, 64, dtype=torch.bool)
    opts = ScoreOptions(score_type="grad", grad_sigma=0.0, grad_norm="slice")
    maps, _ = score_slices(copy.deepcopy(model).float(), x.float(), brain, opts)
    # finite differences of KL w.r.t. each pixel, in float64
    flat = x.clone().reshape(-1)
    eps = 1e-6
    fd = torch.empty_like(flat)
    base = flat.clone()
    with torch.no_grad():
        batch = base.repeat(2 * flat.numel(), 1)
        idx = torch.arange(flat.numel())
        batch[2 * idx, idx] += eps
        batch[2 * idx + 1, idx] -= eps
        kls = []
        for chunk in batch.split(2048):
            kls.append(kl_per_sample(*model.encode(chunk.view(-1, 1, 64, 64))))
        kl = torch.cat(kls)
        fd = ((kl[0::2] - kl[1::2]) / (2 * eps)).abs()
    fd = ((fd - fd.min()) / (fd.max() - fd.min())).view(64, 64)
    assert torch.allclose(maps[0].double(), fd, atol=2e-3)


def test_score_types_and_options():
    model = _model().float()
    x = torch.rand(3, 64, 64)
    brain = torch.zeros(3, 64, 64, dtype=torch.bool)
    brain[:, 10:50, 12:52] = True
    rec, s = score_slices(model, x, brain, ScoreOptions(score_type="rec"))
    grad, _ = score_slices(model, x, brain, ScoreOptions(score_type="grad"))
    combi, _ = score_slices(model, x, brain, ScoreOptions(score_type="combi", combi="product"))
    assert rec.shape == grad.shape == combi.shape == (3, 64, 64)
    assert (rec[~brain] == 0).all() and (grad[~brain] == 0).all()
    assert torch.allclose(grad.flatten(1).amax(1), torch.ones(3)) and grad.min() == 0.0  # min-max per slice
    assert torch.allclose(combi, rec * grad, atol=1e-6)
    weighted, _ = score_slices(model, x, brain, ScoreOptions(combi="weighted", alpha=2.0))
    assert torch.allclose(weighted, rec * (1 + 2.0 * grad), atol=1e-6)
    # slice scores: KL per slice, mean error over brain, and summed error + KL
    with torch.no_grad():
        mu, logvar = model.encode(x[:, None])
        recon = model.decode(mu)
    kl = kl_per_sample(mu, logvar)
    err = ((x[:, None] - recon).abs()[:, 0] * brain).flatten(1).sum(1)
    assert torch.allclose(s.kl, kl, rtol=1e-5)
    assert torch.allclose(s.rec, err / brain.flatten(1).sum(1), rtol=1e-4)
    assert torch.allclose(s.neg_elbo, err + kl, rtol=1e-4)


def _sampling_model():
    """The tiny model with latents that matter: std 0.5 (logvar near log 0.25), a decoder 20x as sensitive to z."""
    model = _model().float()
    with torch.no_grad():
        model.encoder[-1].bias[4:] += math.log(0.25)
        model.decoder[0].weight *= 20.0
    return model


def test_mc_sampling_is_the_mean_error_over_sampled_decodings():
    """rec with N samples: mean over N of |x - decode(mu + eps * exp(logvar / 2))|, eps ~ N(0, I), in the brain."""
    model = _sampling_model()
    x = torch.rand(2, 64, 64)
    brain = torch.ones(2, 64, 64, dtype=torch.bool)
    brain[1, :, :20] = False
    torch.manual_seed(7)
    caller = torch.get_rng_state()
    mc, s = score_slices(model, x, brain, ScoreOptions(score_type="rec", mc_samples=3))
    assert torch.equal(torch.get_rng_state(), caller)  # the draws come from a generator of their own, seeded 0
    torch.manual_seed(8)
    again, _ = score_slices(model, x, brain, ScoreOptions(score_type="rec", mc_samples=3))
    assert torch.equal(again, mc)  # the same map in every run, whatever ran before

    draws = torch.Generator().manual_seed(0)  # one [slices, z] block of eps per sample, decoded one slice at a time
    eps = [torch.randn(2, 4, generator=draws) for _ in range(3)]
    with torch.no_grad():
        expected, std_squared = torch.zeros(2, 64, 64), torch.zeros(2, 64, 64)
        for k in range(2):
            mu, logvar = model.encode(x[k][None, None])
            for e in eps:
                expected[k] += (x[k] - model.decode(mu + e[k] * torch.exp(0.5 * logvar))[0, 0]).abs() / 3
                std_squared[k] += (x[k] - model.decode(mu + e[k] * torch.exp(logvar))[0, 0]).abs() / 3
    expected *= brain
    assert torch.allclose(mc, expected, atol=1e-5)
    assert torch.allclose(s.rec, expected.flatten(1).sum(1) / brain.flatten(1).sum(1), rtol=1e-5)
    # the test tells the right sampling from plausible wrong ones
    one, _ = score_slices(model, x, brain, ScoreOptions(score_type="rec"))
    for wrong in (one, std_squared * brain):
        assert (mc - wrong).abs().max() > 100 * 1e-5


def _kl_gradients(model, x, brain):
    """|dKL/dx| of each slice on its own, in float64, zero outside the brain."""
    model = copy.deepcopy(model).double()
    grads = []
    for k in range(x.shape[0]):
        xk = x[k].double()[None, None].requires_grad_(True)
        grads.append(torch.autograd.grad(kl_per_sample(*model.encode(xk)).sum(), xk)[0][0, 0].abs())
    return torch.stack(grads) * brain


def test_published_score_normalises_the_gradient_over_the_whole_volume():
    """PAPER: rec x min-max(|dKL/dx| smoothed with sigma 3) with one min and one max for the volume."""
    model = _model().float()
    torch.manual_seed(3)
    x = torch.rand(3, 64, 64)
    x[1] = 0.5  # a flat slice: its gradient is smaller than the textured slices'
    brain = torch.zeros(3, 64, 64, dtype=torch.bool)
    brain[:, 10:50, 12:52] = True
    grad = _kl_gradients(model, x, brain)

    raw, _ = score_slices(model, x, brain, ScoreOptions(score_type="grad", grad_sigma=0.0, grad_norm="volume"))
    expected = (grad - grad.min()) / (grad.max() - grad.min())
    assert torch.allclose(raw.double(), expected, atol=1e-4)
    peaks = raw.flatten(1).amax(1)
    assert torch.allclose(peaks.double(), grad.flatten(1).amax(1) / grad.max(), atol=1e-4)
    assert peaks.max() == pytest.approx(1.0) and peaks.min() < 0.9  # not normalised per slice
    assert raw[~brain].abs().max() == 0 and raw.min() == 0

    paper, _ = score_slices(model, x, brain, ScoreOptions(**PAPER))
    smooth = gaussian_blur(grad[:, None], 3.0)[:, 0]
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    with torch.no_grad():
        rec = (x[:, None] - model.decode(model.encode(x[:, None])[0])).abs()[:, 0]
    assert torch.allclose(paper.double(), (rec.double() * smooth * brain), atol=1e-4)


def test_unknown_options_are_refused():
    with pytest.raises(CeVAEError, match="score type"):
        ScoreOptions(score_type="magic")
    with pytest.raises(CeVAEError, match="combination"):
        ScoreOptions(combi="sum")


def test_gaussian_blur_preserves_mass_and_constant():
    m = torch.zeros(1, 1, 32, 32)
    m[0, 0, 16, 16] = 1.0
    b = gaussian_blur(m, 2.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert b[0, 0, 16, 16] < 0.1
    c = gaussian_blur(torch.full((1, 1, 16, 16), 3.0), 1.5)
    assert torch.allclose(c, torch.full_like(c, 3.0))
