"""Pixel scores: the KL gradient against finite differences, and the score variants."""
import copy

import pytest
import torch

from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.engine.model import CeVAE, kl_per_sample
from CeVAEAnomalyLib.engine.scoring import gaussian_blur, score_slices
from CeVAEAnomalyLib.options import ScoreOptions


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
    assert grad.max() == pytest.approx(1.0) and grad.min() == 0.0  # min-max over the volume
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


def test_mc_sampling_averages_several_decodings():
    model = _model().float()
    x = torch.rand(2, 64, 64)
    brain = torch.ones(2, 64, 64, dtype=torch.bool)
    one, _ = score_slices(model, x, brain, ScoreOptions(score_type="rec"))
    torch.manual_seed(1)
    mc, _ = score_slices(model, x, brain, ScoreOptions(score_type="rec", mc_samples=4))
    assert mc.shape == one.shape and not torch.allclose(mc, one)


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
