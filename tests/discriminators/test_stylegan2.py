"""Residual StyleGAN2 discriminator: resolutions, conditioning, gradients, minibatch std, factory."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2o_fast.discriminators import DiscriminatorConfigError, StyleGAN2Discriminator, build_discriminator
from d2o_fast.discriminators.stylegan2 import Downsample2x, minibatch_stddev

TINY = dict(channel_base=256, channel_max=32)


@pytest.mark.parametrize('resolution', [8, 16, 32, 64])
@pytest.mark.parametrize('c_dim', [0, 3])
def test_shapes_and_gradients(resolution, c_dim):
    d = build_discriminator('stylegan2', resolution, 3, c_dim, **TINY)
    assert len(d.blocks) == int(math.log2(resolution)) - 2
    x = torch.randn(4, 3, resolution, resolution, requires_grad=True)
    c = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() if c_dim else None
    logits = d(x, c)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.trainable_parameters())
    assert d.trainable_parameters() == list(d.parameters())


def test_factory_build_kwargs_rebuild():
    a = build_discriminator('stylegan2', 16, 3, 2, pretrained=True, **TINY)  # pretrained is meaningless here: ignored
    assert a.build_kwargs == dict(kind='stylegan2', img_resolution=16, img_channels=3, c_dim=2, **TINY)
    b = build_discriminator(**a.build_kwargs)
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(4, 3, 16, 16), torch.eye(2)[[0, 1, 1, 0]]
    assert torch.equal(a(x, c), b(x, c))


def test_channel_widths_follow_base_and_max():
    d = StyleGAN2Discriminator(64, 3, channel_base=1024, channel_max=64)
    assert d.from_rgb.weight.shape[0] == 16  # 1024 // 64
    assert [b.conv1.weight.shape[0] for b in d.blocks] == [32, 64, 64, 64]  # at 32, 16, 8, 4; capped at 64


def test_conditioning_changes_logits():
    torch.manual_seed(0)
    d = StyleGAN2Discriminator(16, 3, c_dim=4, **TINY)
    x = torch.randn(4, 3, 16, 16)
    a = d(x, F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float())
    b = d(x, F.one_hot(torch.tensor([3, 1, 2, 0]), 4).float())
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_minibatch_stddev_matches_definition():
    x = torch.randn(8, 6, 4, 4)
    out = minibatch_stddev(x, group_size=4)
    assert out.shape == (8, 7, 4, 4) and torch.equal(out[:, :6], x)
    groups = x.reshape(2, 4, 6, 4, 4)  # sample i belongs to group i // 4 (consecutive samples)
    expected = (groups.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2, 3])
    for i in range(8):
        torch.testing.assert_close(out[i, 6], expected[i // 4].expand(4, 4))
    # Splitting the batch in multiples of the group size (data parallelism) changes nothing.
    torch.testing.assert_close(torch.cat([minibatch_stddev(x[:4]), minibatch_stddev(x[4:])]), out)
    with pytest.raises(DiscriminatorConfigError, match='divisible'):
        minibatch_stddev(torch.randn(6, 2, 4, 4), group_size=4)


def test_downsample_is_a_normalised_lowpass():
    down = Downsample2x()
    x = torch.randn(2, 3, 8, 8)
    y = down(x)
    assert y.shape == (2, 3, 4, 4)
    assert torch.allclose(down(torch.ones(1, 1, 8, 8))[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))  # DC gain 1


@pytest.mark.parametrize('autocast', [False, True])
def test_downsample_matches_the_depthwise_convolution(autocast):
    """Forward and input gradient against the stride-2 depthwise convolution in float64; with autocast the
    input is bf16, as inside the bf16 discriminator."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if autocast else torch.float32
    x = (torch.randn(2, 5, 16, 16, generator=g) * 2 + 0.5).to(dtype).requires_grad_(True)
    dy = torch.randn(2, 5, 8, 8, generator=g)
    taps = torch.tensor([1., 3., 3., 1.], dtype=torch.float64)
    k = (taps[:, None] * taps[None, :] / 64).expand(5, 1, 4, 4)
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.conv2d(x64, k, stride=2, padding=1, groups=5)
    y64.backward(dy.double())
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        y = Downsample2x()(x)
    y.backward(dy.to(dtype))
    tol = 2 * 2 ** -8 if autocast else 1e-5  # bf16: dy and the result rounded once each
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert (y.double() - y64).abs().max() <= tol * y64.abs().max()
    assert (x.grad.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()


def test_bad_arguments():
    for resolution in (4, 48, 512):
        with pytest.raises(DiscriminatorConfigError, match='power of two'):
            StyleGAN2Discriminator(resolution, 3)
    d = StyleGAN2Discriminator(16, 3, c_dim=2, **TINY)
    with pytest.raises(DiscriminatorConfigError, match='labels'):
        d(torch.randn(4, 3, 16, 16))
    with pytest.raises(DiscriminatorConfigError, match='expected images'):
        d(torch.randn(4, 3, 32, 32), torch.zeros(4, 2))
    with pytest.raises(DiscriminatorConfigError, match='c_dim=0'):
        StyleGAN2Discriminator(16, 3, **TINY)(torch.randn(4, 3, 16, 16), torch.zeros(4, 2))
