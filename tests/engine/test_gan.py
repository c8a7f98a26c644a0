"""The D2O objective and the EMA schedule, against direct computations."""

import math

import pytest
import torch
from torch.nn.functional import softplus

from d2o_fast.discriminators import StyleGAN2Discriminator
from d2o_fast.engine.ema import ema_beta, make_ema, update_ema
from d2o_fast.engine.gan import discriminator_loss, generator_loss, r1_penalty


def test_non_saturating_losses():
    fake = torch.randn(5, 7)
    real = torch.randn(5, 7)
    torch.testing.assert_close(generator_loss(fake), softplus(-fake).mean())
    torch.testing.assert_close(discriminator_loss(fake, real), softplus(fake).mean() + softplus(-real).mean())
    # A list of parts (one per feature network): each part averaged over its logits, parts summed.
    parts = [torch.randn(5, 3), torch.randn(5, 11)]
    torch.testing.assert_close(generator_loss(parts), softplus(-parts[0]).mean() + softplus(-parts[1]).mean())


# Logits per image of each feature network: tf_efficientnet_lite0 alone; the CIFAR-10 pair (vgg16_bn's 4 heads of
# 11x11, tf_efficientnet_lite0's 4 of 4x4); three networks of three sizes.
PART_WIDTHS = [(64,), (484, 64), (484, 64, 16)]


def sigmoid(t):
    return 1 / (1 + math.exp(-t))


def hand_logit_gradients(parts, sign):
    """d/dl of mean_i sum_b mean_k softplus(sign * l[b][i][k]), element by element in float64:
    sign * sigmoid(sign * l) / (B * K_b)."""
    out = []
    for part in parts:
        batch, width = part.shape
        out.append(torch.tensor([[sign * sigmoid(sign * part[i, k].item()) / (batch * width) for k in range(width)]
                                 for i in range(batch)], dtype=torch.float64))
    return out


def loss_gradients(loss_fn, parts):
    parts = [p.clone().requires_grad_(True) for p in parts]
    loss_fn(parts).backward()
    return [p.grad for p in parts]


@pytest.mark.parametrize('widths', PART_WIDTHS)
def test_each_feature_network_carries_its_own_mean(widths):
    """The G loss, and the D loss on fakes and on reals, give every part the gradient of its own mean: per part,
    sign * sigmoid(sign * l) / (B * K_b), whatever the other parts' sizes."""
    g = torch.Generator().manual_seed(len(widths))
    fake = [torch.randn(3, k, generator=g, dtype=torch.float64) * 2 for k in widths]
    real = [torch.randn(3, k, generator=g, dtype=torch.float64) * 2 for k in widths]
    cases = [(lambda p: generator_loss(p), fake, -1),
             (lambda p: discriminator_loss(p, [t.detach() for t in real]), fake, +1),
             (lambda p: discriminator_loss([t.detach() for t in fake], p), real, -1)]
    for loss_fn, parts, sign in cases:
        got = loss_gradients(loss_fn, parts)
        for a, b in zip(got, hand_logit_gradients(parts, sign)):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('widths', PART_WIDTHS)
def test_each_feature_network_gets_an_equal_share(widths):
    """With the same logit everywhere, the hand formula above gives every part the same total |d loss / d logits|,
    sigmoid(sign * l) / B per image: with two feature networks each carries half, not 484 : 64."""
    batch = 3
    full = lambda value: [torch.full([batch, k], value, dtype=torch.float64) for k in widths]
    cases = [(generator_loss, 0.7, -1),
             (lambda p: discriminator_loss(p, full(0.0)), -0.4, +1),
             (lambda p: discriminator_loss(full(0.0), p), 1.3, -1)]
    for loss_fn, value, sign in cases:
        grads = loss_gradients(loss_fn, full(value))
        totals = [g.sum().item() for g in grads]
        assert totals == pytest.approx([sign * sigmoid(sign * value)] * len(widths), rel=1e-6)  # the loss runs in fp32
        shares = [g.abs().sum().item() for g in grads]
        assert [s / sum(shares) for s in shares] == pytest.approx([1 / len(widths)] * len(widths), rel=1e-6)


def test_single_output_discriminator_losses_are_one_plain_mean():
    """The StyleGAN2 discriminator's one logit per image: the losses and their gradients are, bit for bit, one mean
    over the batch, as they were before the projected discriminator returned one part per feature network."""
    torch.manual_seed(0)
    d = StyleGAN2Discriminator(16, 3, 0, channel_base=256, channel_max=32)
    g = torch.Generator().manual_seed(1)
    fake, real = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    grads = []
    for loss_fn in (lambda f, r: generator_loss(f) + discriminator_loss(f, r),
                    lambda f, r: softplus(-f).mean() + (softplus(f).mean() + softplus(-r).mean())):
        d.zero_grad(set_to_none=True)
        f, r = d(fake, None), d(real, None)
        assert f.shape == (4, 1)
        loss = loss_fn(f, r)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in d.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert torch.equal(generator_loss(f), softplus(-f).mean())
    assert torch.equal(discriminator_loss(f, r), softplus(f).mean() + softplus(-r).mean())
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x, None).sum(), [x])
    assert torch.equal(r1_penalty(d, real, None).detach(), grad.square().sum(dim=[1, 2, 3]))


class LinearD(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, c):
        return (x.flatten(1) * self.w).sum(1, keepdim=True) + x.flatten(1).square().sum(1, keepdim=True)


def test_r1_penalty_is_squared_input_gradient_and_trainable():
    D = LinearD(3 * 4 * 4)
    x = torch.randn(6, 3, 4, 4)
    # d/dx [w.x + |x|^2] = w + 2x
    expected = (D.w + 2 * x.flatten(1)).square().sum(1)
    penalty = r1_penalty(D, x, None)
    torch.testing.assert_close(penalty, expected)
    penalty.mean().backward()  # double backward reaches D's parameters
    torch.testing.assert_close(D.w.grad, (2 * (D.w + 2 * x.flatten(1))).mean(0))


def test_ema_beta_half_life_ramp():
    # Early: half-life = 5% of images seen.
    assert ema_beta(10_000, 100, 0.5, 0.05) == pytest.approx(0.5 ** (100 / 500))
    # Late: capped at ema_mimg.
    assert ema_beta(10 ** 9, 256, 0.5, 0.05) == pytest.approx(0.5 ** (256 / 5e5))
    assert ema_beta(0, 256, 0.5, 0.05) == pytest.approx(0.0, abs=1e-300)
    assert math.isclose(ema_beta(10 ** 9, 256, 0.5, None), 0.5 ** (256 / 5e5))


def test_update_ema_averages_trainable_parameters_only():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = make_ema(net)
    net[0].weight.requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(2.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(ema, net, beta=0.75)
    torch.testing.assert_close(ema[0].weight, before['0.weight'])          # frozen: untouched
    torch.testing.assert_close(ema[0].bias, 0.25 * net[0].bias + 0.75 * before['0.bias'])
    torch.testing.assert_close(ema[1].running_mean, net[1].running_mean)  # buffers copied


@pytest.mark.parametrize('native', [True, False])
def test_precision_auto_is_bf16_only_where_native(native, monkeypatch):
    """--precision auto: bf16 on CUDA and on CPUs that run it natively, fp32 on CPUs that would emulate it."""
    import warnings

    from d2o_fast.engine import optim
    monkeypatch.setattr(optim, 'native_bf16', lambda device_type: device_type == 'cuda' or native)
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert optim.autocast_dtype('auto', cuda) is torch.bfloat16
    assert optim.autocast_dtype('auto', cpu) is (torch.bfloat16 if native else None)
    assert optim.autocast_dtype('fp32', cpu) is None and optim.autocast_dtype('fp16', cpu) is torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert optim.autocast_dtype('bf16', cpu) is torch.bfloat16  # an explicit request is honoured ...
    assert bool(caught) is not native                              # ... with a warning where it is emulated
