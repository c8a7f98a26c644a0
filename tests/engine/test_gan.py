"""The D2O objective and the EMA schedule, against direct computations."""

import math

import pytest
import torch
from torch.nn.functional import softplus

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
