"""The ceVAE network, its corruption masks and its loss."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.engine.corruption import apply_rectangles, random_rectangles, sample_rectangles
from CeVAEAnomalyLib.engine.model import CeVAE, cevae_loss, kl_per_sample
from CeVAEAnomalyLib.engine.preprocess import mask_array, prepare
from CeVAEAnomalyLib.io.images import read_image


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_for_supported_sizes(size):
    model = CeVAE(ModelConfig(input_size=size))
    x = torch.rand(2, 1, size, size)
    rec, mu, logvar = model(x)
    assert rec.shape == x.shape
    assert mu.shape == logvar.shape == (2, 256)
    # MICCAI-19 layout: four 4x4 stride-2 convs 16/32/64/256, then a conv to 2z at 1x1
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 256, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs[:4])
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in model.modules())


def _network_outputs(model: CeVAE, x: torch.Tensor):
    """(mu, logvar, |dKL/dx|, reconstruction of mu): what scoring takes from the network."""
    x = x.clone().requires_grad_(True)
    mu, logvar = model.encode(x)
    grad = torch.autograd.grad(kl_per_sample(mu, logvar).sum(), x)[0]
    with torch.no_grad():
        return mu.detach(), logvar.detach(), grad, model.decode(mu)


def test_the_bottleneck_runs_as_matrix_products_with_the_convolutions_results():
    """The encoder's last convolution (its kernel covers its whole 4x4 input) and the decoder's first (of a 1x1 input)
    run as the matrix products they are, which took a quarter off the CPU time of scoring; on the bundled model and a
    real head's slices they give what the convolutions gave, to float round-off."""
    bundle = load_bundle(default_model_path(), "cpu")
    image = read_image(data_path("colin27_t1_2mm.nii.gz"))
    brain = mask_array(read_image(data_path("colin27_brainmask_2mm.nii.gz")), image)
    x = torch.from_numpy(prepare(image, brain, bundle.preprocess).slices[::4, None])
    plain = copy.deepcopy(bundle.model)
    plain.encoder[-1].__class__, plain.decoder[0].__class__ = nn.Conv2d, nn.ConvTranspose2d
    for fast, conv in zip(_network_outputs(bundle.model, x), _network_outputs(plain, x)):
        assert fast.shape == conv.shape
        assert float((fast - conv).abs().max()) <= 1e-5 * float(conv.abs().max())
    with FlopCounterMode(display=False) as counter:
        bundle.model.decode(bundle.model.encode(x)[0])
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert ops == {"aten.convolution", "aten.addmm"}
    # an input of another size than the model's runs through the convolution itself, as before
    big = torch.rand(2, 1, 128, 128)
    assert torch.equal(bundle.model.encoder(big), plain.encoder(big))


@pytest.mark.parametrize("size", [32, 96, 256])
def test_unsupported_size_is_refused(size):
    with pytest.raises(CeVAEError, match=rf"input_size \(--input-size\) must be one of 64, 128, got {size}\."):
        ModelConfig(input_size=size)


def test_every_rectangle_survives_and_fills_stay_in_range():
    g = torch.Generator().manual_seed(3)
    b, h, w = 200, 64, 64
    rects = sample_rectangles(b, h, w, (0.2, 1.3), g)
    x = torch.full((b, 1, h, w), -5.0)
    out, mask = apply_rectangles(x, rects)
    n_active = rects.active.sum(1)
    assert n_active.min() >= 1 and n_active.max() == 3  # 1..3 per sample, 3 does occur
    assert (rects.h <= h // 2).all() and (rects.w <= w // 2).all()
    assert ((rects.fill >= 0.2) & (rects.fill <= 1.3)).all()
    for i in range(b):
        painted = torch.zeros(h, w, dtype=torch.bool)
        for k in reversed(range(3)):  # later rectangles paint over earlier ones
            if not rects.active[i, k]:
                continue
            ys = slice(int(rects.y0[i, k]), int(rects.y0[i, k] + rects.h[i, k]))
            xs = slice(int(rects.x0[i, k]), int(rects.x0[i, k] + rects.w[i, k]))
            assert rects.y0[i, k] + rects.h[i, k] <= h and rects.x0[i, k] + rects.w[i, k] <= w
            region = torch.zeros(h, w, dtype=torch.bool)
            region[ys, xs] = True
            visible = region & ~painted
            if k == int(n_active[i]) - 1:
                assert visible.any()  # the last one drawn is always fully visible
            assert torch.all(out[i, 0][visible] == rects.fill[i, k])
            painted |= region
        assert torch.equal(mask[i, 0], painted)
        assert torch.all(out[i, 0][~painted] == -5.0)


def test_random_rectangles_default_range_is_the_data_range():
    x = torch.rand(16, 1, 64, 64) * 3 + 1
    out, mask = random_rectangles(x, torch.Generator().manual_seed(0))
    assert out[mask].min() >= x.min() and out[mask].max() <= x.max()
    assert torch.equal(out[~mask], x[~mask])


def test_loss_falls_on_a_tiny_dataset():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    data = torch.stack([((xx / (0.5 + 0.05 * k)) ** 2 + yy**2 < 0.6).float() * (0.5 + 0.05 * k) for k in range(8)])[:, None]
    model = CeVAE(ModelConfig(channels=(8, 16, 32, 64), z_dim=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    cfg = LossConfig()
    losses = []
    for _ in range(40):
        xc, _ = random_rectangles(data, g, value_range=(0.0, 1.0))
        loss, terms = cevae_loss(model, data, xc, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_loss_weights_follow_the_formula():
    torch.manual_seed(0)
    model = CeVAE(ModelConfig(channels=(8, 8, 8, 8), z_dim=4)).eval()
    x = torch.rand(4, 1, 64, 64)
    xc, _ = random_rectangles(x, torch.Generator().manual_seed(1))
    _, ce_only = cevae_loss(model, x, xc, LossConfig(ce_weight=1.0))
    assert set(ce_only) == {"rec_ce", "loss"} and torch.isclose(ce_only["loss"], ce_only["rec_ce"])
    torch.manual_seed(5)
    _, vae_only = cevae_loss(model, x, xc, LossConfig(ce_weight=0.0, beta=2.0))
    assert "rec_ce" not in vae_only
    assert torch.isclose(vae_only["loss"], 2.0 * vae_only["kl"] + vae_only["rec_vae"])


@pytest.mark.parametrize("rec", ["huber", "L1", ""])
def test_an_unknown_reconstruction_loss_is_refused_naming_its_option(rec):
    """The refusal named no option: a user of the library or of a run's saved options could not tell what to fix."""
    with pytest.raises(CeVAEError) as refused:
        LossConfig(rec=rec)
    assert str(refused.value) == f"rec (--rec-loss) must be one of l1, l2, got {rec!r}."
