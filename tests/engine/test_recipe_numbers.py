"""The recipe's numbers against references written out in the test (closed forms and literal constants), never
against another path of the same code: GAN losses, R1 weight and schedule, lazy-R1 Adam, EMA ramp-up, the
generator's preconditioning, EDM's loss and warm-up, nan_to_num, the freeze sets, gradient averaging, RNG state."""

import math
import random

import numpy as np
import pytest
import torch

from d2o_fast.engine import distributed as dist
from d2o_fast.engine.config import PRETRAIN_PRESETS, PretrainConfig, resolve_config
from d2o_fast.engine.ema import ema_beta
from d2o_fast.engine.edm_trainer import EDMTrainer, edm_loss
from d2o_fast.engine.gan import discriminator_loss, generator_loss
from d2o_fast.engine.optim import finish_gradients
from d2o_fast.engine.state import capture_rng, restore_rng
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import D2OPrecond, EDMPrecond, apply_freeze, architecture_kwargs, build_network
from d2o_fast.nets.layers import UNetBlock
from tests.engine.conftest import CLASSES, RES, tiny_edm

N_PIX = 3 * RES * RES


def tiny_generator(label_dim=0, seed=0):
    torch.manual_seed(seed)
    return build_network('D2OPrecond', **architecture_kwargs('ddpmpp', RES, 3, label_dim, model_channels=8, channel_mult=[1, 2],
                                                             num_blocks=1, attn_resolutions=[8], dropout=0.0))


class QuadD(torch.nn.Module):
    """D(x) = w.x + a |x|^2: grad_x D = w + 2 a x in closed form, and R1's double backward reaches w and a."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(N_PIX, generator=g, dtype=torch.float64) / N_PIX ** 0.5)
        self.a = torch.nn.Parameter(torch.tensor(1e-3, dtype=torch.float64))   # logits of order 1 on 16x16 images

    def trainable_parameters(self):
        return [self.w, self.a]

    def forward(self, x, c=None):
        x = x.flatten(1).double()
        return (x @ self.w + self.a * x.square().sum(1)).unsqueeze(1)


def quad_trainer(batch=4, rounds=2, G=None, **overrides):
    values = dict(init='random', arch='ddpmpp', batch=batch, seed=5, lr=1e-3, dlr=2e-3, precision='fp32', cond=False)
    values.update(overrides)
    cfg = resolve_config('demo', **values)
    return D2OTrainer(G if G is not None else tiny_generator(), QuadD(), cfg, torch.device('cpu'), batch_gpu=batch // rounds,
                      rounds=rounds)


def random_images(n, seed=1):
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


#----------------------------------------------------------------------------
# GAN losses on given logits.

def test_losses_on_given_logits():
    ln = math.log
    fake = torch.tensor([[0.0], [ln(3)]])
    real = torch.tensor([[ln(3)], [-ln(3)]])
    # softplus(t) = ln(1 + e^t): softplus(0) = ln 2, softplus(ln 3) = ln 4, softplus(-ln 3) = ln(4/3).
    assert generator_loss(fake).item() == pytest.approx((ln(2) + ln(4 / 3)) / 2, rel=1e-6)
    assert discriminator_loss(fake, real).item() == pytest.approx((ln(2) + ln(4)) / 2 + (ln(4 / 3) + ln(4)) / 2, rel=1e-6)
    # Two feature networks (1 and 2 logits per image): each part's own mean, parts added, then the image mean.
    parts = [torch.tensor([[0.0], [0.0]]), torch.tensor([[ln(3), -ln(3)], [0.0, ln(3)]])]
    image0 = ln(2) + (ln(4 / 3) + ln(4)) / 2
    image1 = ln(2) + (ln(2) + ln(4 / 3)) / 2
    assert generator_loss(parts).item() == pytest.approx((image0 + image1) / 2, rel=1e-6)
    d_fake0 = ln(2) + (ln(4) + ln(4 / 3)) / 2
    d_fake1 = ln(2) + (ln(2) + ln(4)) / 2
    assert discriminator_loss(parts, fake).item() == pytest.approx((d_fake0 + d_fake1) / 2 + (ln(2) + ln(4 / 3)) / 2, rel=1e-6)


#----------------------------------------------------------------------------
# R1: weight, interval scaling, schedule.

@pytest.mark.parametrize('interval', [1, 4])
def test_r1_gradient_is_gamma_half_times_interval_times_the_mean_penalty_gradient(interval):
    """mean_i |w + 2 a x_i|^2 differentiated by hand: d/dw = 2 mean_i (w + 2 a x_i), d/da = 4 mean_i (w.x_i + 2 a |x_i|^2);
    the R1 step's gradient is gamma / 2 * interval times that (two accumulation rounds, one image mean)."""
    gamma = 0.3
    trainer = quad_trainer(r1_gamma=gamma, r1_interval=interval)
    D = trainer.D
    w, a = D.w.detach().clone(), D.a.item()
    images = random_images(4)
    trainer.r1_phase(*trainer.split(images, torch.zeros(4, 0)))
    x = images.flatten(1).double()
    d_w = 2 * (w + 2 * a * x).mean(0)
    d_a = 4 * (x @ w + 2 * a * x.square().sum(1)).mean()
    weight = gamma / 2 * interval
    # The input gradient is taken in float32 (the images' dtype): agreement to float32 rounding.
    torch.testing.assert_close(D.w.grad, weight * d_w, rtol=1e-5, atol=1e-6 * weight * d_w.abs().max().item())
    assert D.a.grad.item() == pytest.approx(weight * d_a.item(), rel=1e-5)


def test_r1_runs_every_interval_steps_after_the_first():
    trainer = quad_trainer(batch=2, rounds=1, r1_gamma=0.1, r1_interval=3)
    images, labels = random_images(2), torch.zeros(2, 0)
    ran = [step for step in range(8) if 'r1_penalty' in trainer.step(images, labels, step, step * 2)]
    assert ran == [3, 6]
    off = quad_trainer(batch=2, rounds=1, r1_gamma=0.0, r1_interval=1)
    assert not any('r1_penalty' in off.step(images, labels, step, step * 2) for step in range(3))


#----------------------------------------------------------------------------
# Optimizers: lazy-R1 rescaling, Adam's first two steps, nan_to_num.

def test_lazy_r1_rescales_the_discriminators_lr_and_beta2():
    for interval, d_lr, d_beta2 in [(16, 2e-3 * 16 / 17, 0.99 ** (16 / 17)), (4, 2e-3 * 0.8, 0.99 ** 0.8),
                                    (1, 1e-3, 0.99 ** 0.5)]:
        trainer = quad_trainer(r1_interval=interval)
        (d_group,), (g_group,) = trainer.opt_d.param_groups, trainer.opt_g.param_groups
        assert d_group['lr'] == pytest.approx(d_lr, rel=1e-12)
        assert d_group['betas'][0] == 0 and d_group['betas'][1] == pytest.approx(d_beta2, rel=1e-12)
        assert g_group['lr'] == 1e-3 and tuple(g_group['betas']) == (0.0, 0.99)
        assert d_group['eps'] == g_group['eps'] == 1e-8


def test_discriminator_adam_steps_by_hand():
    """beta1 = 0: step 1 moves by lr g1 / (|g1| + eps); step 2 by lr g2 / (sqrt(v2 / (1 - b2^2)) + eps) with
    v2 = b2 (1 - b2) g1^2 + (1 - b2) g2^2 (interval 16: lr = 2e-3 * 16/17, b2 = 0.99^(16/17))."""
    trainer = quad_trainer(r1_interval=16)
    D = trainer.D
    lr, b2, eps = 2e-3 * 16 / 17, 0.99 ** (16 / 17), 1e-8
    g = torch.Generator().manual_seed(3)
    g1, g2 = (torch.randn(N_PIX, generator=g, dtype=torch.float64) for _ in range(2))
    w0 = D.w.detach().clone()
    D.w.grad, D.a.grad = g1.clone(), torch.tensor(0.5, dtype=torch.float64)
    finish_gradients(trainer.d_params, trainer.opt_d)
    w1 = w0 - lr * g1 / (g1.abs() + eps)
    torch.testing.assert_close(D.w.detach(), w1, rtol=1e-7, atol=1e-12)
    D.w.grad = g2.clone()
    finish_gradients(trainer.d_params, trainer.opt_d)
    v2 = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2
    w2 = w1 - lr * g2 / ((v2 / (1 - b2 ** 2)).sqrt() + eps)
    torch.testing.assert_close(D.w.detach(), w2, rtol=1e-7, atol=1e-12)


def test_finish_gradients_replaces_non_finite_values_as_the_authors():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([float('nan'), float('inf'), -float('inf'), 2.5])
    finish_gradients([p], opt)
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.5]
    assert p.detach().tolist() == [0.0, -1e5, 1e5, -2.5]


def test_resume_restores_the_fp16_loss_scale():
    """--precision fp16: the grad scaler's scale and growth count are part of the training state."""
    saved = affine_trainer(precision='fp16').state_dict()
    saved['scaler'] = dict(saved['scaler'], scale=1024.0, _growth_tracker=7)
    trainer = affine_trainer(precision='fp16')
    assert trainer.scaler.is_enabled()
    trainer.load_state_dict(saved)
    assert trainer.scaler.get_scale() == 1024.0 and trainer.scaler.state_dict()['_growth_tracker'] == 7


#----------------------------------------------------------------------------
# EMA.

def test_ema_beta_over_the_ramp_up():
    """batch 4, ema_mimg 1e-5 (half-life cap 10 images), ramp-up 0.5: half-life min(10, images / 2)."""
    expected = {0: 0.0, 4: 0.5 ** (4 / 2), 8: 0.5, 12: 0.5 ** (4 / 6), 20: 0.5 ** 0.4, 1000: 0.5 ** 0.4}
    for seen, beta in expected.items():
        assert ema_beta(seen, 4, 1e-5, 0.5) == pytest.approx(beta, rel=1e-12, abs=1e-300), seen
    assert ema_beta(4, 4, 1e-5, 0) == pytest.approx(0.5 ** 0.4, rel=1e-12)  # no ramp-up: the cap from the start


def test_trainer_ema_uses_the_images_seen_before_the_step():
    """images_seen 12 -> half-life min(10, 6) = 6 -> beta 0.5 ** (4 / 6); EMA = beta EMA_before + (1 - beta) G_after."""
    trainer = quad_trainer(batch=4, rounds=1, ema_mimg=1e-5, ema_rampup=0.5, r1_interval=1000)
    with torch.no_grad():
        for p in trainer.G_ema.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = [p.detach().clone() for p in trainer.G_ema.parameters()]
    trainer.step(random_images(4), torch.zeros(4, 0), step=3, images_seen=12)
    beta = 0.5 ** (4 / 6)
    moved = 0
    for p_ema, p_old, p in zip(trainer.G_ema.parameters(), before, trainer.G.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p_ema, beta * p_old + (1 - beta) * p.detach(), rtol=1e-5, atol=1e-7)
            moved += 1
        else:
            assert torch.equal(p_ema, p_old)
    assert moved > 0


#----------------------------------------------------------------------------
# Preconditioning: sigma 80 and eps 2e-3.

class AffineF(torch.nn.Module):
    """Stands in for the U-Net: F(x, c_noise) = 3 x + c_noise, and records what it was given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.detach().clone(), noise_labels.detach().clone())
        return self.scale * x + noise_labels.reshape(-1, 1, 1, 1)


def precond_with_affine_f(cls):
    torch.manual_seed(0)
    net = build_network(cls, **architecture_kwargs('ddpmpp', RES, 3, 0, model_channels=8, channel_mult=[1], num_blocks=1,
                                                   attn_resolutions=[], dropout=0.0))
    net.model = AffineF()
    return net


def d2o_generation_by_hand(z):
    """G(z) = c_skip 80 z + c_out F(c_in 80 z, ln(80)/4) with sd 0.5, eps 2e-3, F = 3 x + c_noise."""
    s, sd, eps = 80.0, 0.5, 2e-3
    c_skip = sd ** 2 / ((s - eps) ** 2 + sd ** 2)
    c_out = (s - eps) * sd / math.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
    c_noise = math.log(s) / 4
    x = z.double() * s
    return c_skip * x + c_out * (3 * c_in * x + c_noise), c_in * x, c_noise


def test_generator_runs_at_sigma_80_with_eps():
    net = precond_with_affine_f('D2OPrecond')
    assert D2OPrecond.sigma_generate == 80.0 and D2OPrecond.eps == 2e-3
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    expected, f_input, c_noise = d2o_generation_by_hand(z)
    torch.testing.assert_close(net.generate(z).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.model.seen[0].double(), f_input, rtol=1e-5, atol=1e-6)
    assert net.model.seen[1].tolist() == pytest.approx([c_noise] * 2, rel=1e-6)
    # At sigma = eps the generator is the identity (c_skip 1, c_out 0).
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x, torch.full([2], 2e-3)), x, rtol=1e-6, atol=1e-6)


def test_edm_denoiser_coefficients_at_sigma_1():
    """sigma 1, sd 0.5: c_skip 0.2, c_out 0.5 / sqrt(1.25), c_in 1 / sqrt(1.25), c_noise 0."""
    net = precond_with_affine_f('EDMPrecond')
    assert isinstance(net, EDMPrecond)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = 0.2 * x + 0.5 / math.sqrt(1.25) * (3 * x / math.sqrt(1.25))
    torch.testing.assert_close(net(x, torch.ones(2)), expected, rtol=1e-5, atol=1e-6)


def test_trainer_generates_at_sigma_80():
    trainer = quad_trainer(G=precond_with_affine_f('D2OPrecond'))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    expected, _, _ = d2o_generation_by_hand(z)
    torch.testing.assert_close(trainer.generate(z, None, grad=False).double(), expected, rtol=1e-5, atol=1e-5)


def affine_trainer(**overrides):
    """D2OTrainer with G = D2OPrecond around AffineF (one trainable scalar, 3) and D = QuadD, two rounds of 2 images."""
    return quad_trainer(G=precond_with_affine_f('D2OPrecond'), **overrides)


def test_generator_step_gradient_by_hand():
    """loss = mean_i softplus(-D(G(z_i))); d/d scale = mean_i -sigmoid(-D_i) (w + 2 a y_i) . (c_out c_in 80 z_i)."""
    trainer = affine_trainer()
    D = trainer.D
    images = random_images(4)
    z_g, _ = trainer.draws(3, images.shape[1:], 0)
    stats, _ = trainer.generator_phase(*trainer.split(images, torch.zeros(4, 0)), z_g.chunk(2))
    y, _, _ = d2o_generation_by_hand(z_g)
    y, x = y.flatten(1), z_g.double().flatten(1) * 80
    w, a = D.w.detach(), D.a.item()
    logits = y @ w + a * y.square().sum(1)
    c_out_c_in = (80 - 2e-3) * 0.5 / (80 ** 2 + 0.25)
    d_scale = (-torch.sigmoid(-logits) * ((w + 2 * a * y) * (c_out_c_in * x)).sum(1)).mean()
    assert abs(d_scale.item()) > 1e-3   # logits in sigmoid's sensitive range: the reference is not zero
    assert trainer.G.model.scale.grad.item() == pytest.approx(d_scale.item(), rel=1e-4)
    assert stats['loss_g'].item() == pytest.approx(torch.nn.functional.softplus(-logits).mean().item(), rel=1e-5)
    assert D.w.grad is None and D.a.grad is None   # the G step leaves D alone


def test_discriminator_step_gradient_by_hand():
    """loss = mean softplus(D(fake)) + mean softplus(-D(real)) with D = w.y + a|y|^2:
    d/dw = mean sigmoid(D_f) f - mean sigmoid(-D_r) r, d/da = mean sigmoid(D_f) |f|^2 - mean sigmoid(-D_r) |r|^2."""
    trainer = affine_trainer()
    D = trainer.D
    w, a = D.w.detach().clone(), D.a.item()
    images = random_images(4)
    _, z_d = trainer.draws(3, images.shape[1:], 0)
    stats = trainer.discriminator_phase(*trainer.split(images, torch.zeros(4, 0)), z_d.chunk(2))
    fake, _, _ = d2o_generation_by_hand(z_d)
    f, r = fake.flatten(1), images.double().flatten(1)
    d_f, d_r = f @ w + a * f.square().sum(1), r @ w + a * r.square().sum(1)
    s_f, s_r = torch.sigmoid(d_f), torch.sigmoid(-d_r)
    d_w = (s_f[:, None] * f).mean(0) - (s_r[:, None] * r).mean(0)
    d_a = (s_f * f.square().sum(1)).mean() - (s_r * r.square().sum(1)).mean()
    torch.testing.assert_close(D.w.grad, d_w, rtol=1e-4, atol=1e-6 * d_w.abs().max().item())
    assert D.a.grad.item() == pytest.approx(d_a.item(), rel=1e-4)
    softplus = torch.nn.functional.softplus
    assert stats['loss_d'].item() == pytest.approx((softplus(d_f).mean() + softplus(-d_r).mean()).item(), rel=1e-5)
    assert stats['logit_fake'].item() == pytest.approx(d_f.mean().item(), rel=1e-5)
    assert stats['logit_real'].item() == pytest.approx(d_r.mean().item(), rel=1e-5)


#----------------------------------------------------------------------------
# EDM pre-training: the loss and the learning-rate warm-up.

class HalfNet(torch.nn.Module):
    def forward(self, x, sigma, labels):
        return 0.5 * x


def test_edm_loss_by_hand():
    """D(x; s) = x / 2 on y + s n, s = exp(-1.2 + 1.2 u): loss = (s^2 + 0.25) / (0.5 s)^2 * mean((s n / 2 - y / 2)^2)."""
    g = torch.Generator().manual_seed(7)
    y, n = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = edm_loss(HalfNet(), y, None, n, u, -1.2, 1.2, 0.5)
    for i, s in enumerate([math.exp(-1.2), 1.0]):
        weight = (s ** 2 + 0.25) / (0.5 * s) ** 2
        assert got[i].item() == pytest.approx(weight * ((s * n[i] - y[i]) / 2).square().mean().item(), rel=1e-12)


def test_edm_trainer_warm_up_and_ema_by_hand():
    """lr = 1e-3 * min(images_seen / 16, 1) (lr_rampup_kimg 0.016); beta = 0.5 ** (4 / min(10, 0.5 * images_seen))."""
    cfg = resolve_config('demo', cls=PretrainConfig, presets=PRETRAIN_PRESETS, batch=4, seed=3, precision='fp32', lr=1e-3,
                         lr_rampup_kimg=0.016, ema_mimg=1e-5, ema_rampup=0.5)
    trainer = EDMTrainer(tiny_edm(), cfg, torch.device('cpu'), 4, 1)
    labels = torch.eye(CLASSES)[torch.arange(4) % CLASSES]
    with torch.no_grad():
        for p in trainer.G_ema.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for seen, lr in [(4, 1e-3 / 4), (12, 1e-3 * 0.75), (40, 1e-3)]:
        before = [p.detach().clone() for p in trainer.G_ema.parameters()]
        trainer.step(random_images(4), labels, seen // 4, seen)
        assert trainer.opt.param_groups[0]['lr'] == pytest.approx(lr, rel=1e-12)
        beta = 0.5 ** (4 / min(10, 0.5 * seen))
        for p_ema, p_old, p in zip(trainer.G_ema.parameters(), before, trainer.G.parameters()):
            torch.testing.assert_close(p_ema, beta * p_old + (1 - beta) * p.detach(), rtol=1e-5, atol=1e-7)


class ScaleNet(torch.nn.Module):
    """D(x; sigma) = s x, s = 0.8: the EDM loss and its gradient in s have a closed form."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(0.8))

    def forward(self, x, sigma, labels):
        return self.s * x


def test_edm_step_gradient_by_hand():
    """Two rounds of 2 images: loss = mean_i w_i mean((s u_i - y_i)^2), u = y + sigma n, sigma = exp(-1.2 + 1.2 m),
    w = (sigma^2 + 0.25) / (0.5 sigma)^2; d/ds = mean_i w_i mean(2 (s u_i - y_i) u_i)."""
    cfg = resolve_config('demo', cls=PretrainConfig, presets=PRETRAIN_PRESETS, batch=4, seed=3, precision='fp32', lr=1e-3,
                         lr_rampup_kimg=0)
    trainer = EDMTrainer(ScaleNet(), cfg, torch.device('cpu'), 2, 2)
    y = random_images(4).double()
    noise, m = trainer._draws(5, y.shape[1:], 0)
    stats = trainer.step(y.float(), torch.zeros(4, 0), 5, 20)
    sigma = (m.double() * 1.2 - 1.2).exp().reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
    u = y + sigma * noise.double()
    per_image = (weight * (0.8 * u - y) ** 2).mean(dim=[1, 2, 3])
    d_s = (weight * 2 * (0.8 * u - y) * u).mean(dim=[1, 2, 3]).mean()
    assert stats['loss'].item() == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert trainer.G.s.grad.item() == pytest.approx(d_s.item(), rel=1e-5)


def test_set_dropout_changes_every_block():
    """Train mode: with dropout 0 two forward passes agree exactly, with 0.5 they do not; the rate is recorded."""
    net = tiny_edm().train()
    x, sigma, labels = torch.randn(2, 3, RES, RES), torch.ones(2), torch.eye(CLASSES)[:2]
    net.set_dropout(0.5)
    assert not torch.equal(net(x, sigma, labels), net(x, sigma, labels))
    assert all(m.dropout == 0.5 for m in net.modules() if isinstance(m, UNetBlock)) and net.init_kwargs['dropout'] == 0.5
    net.set_dropout(0.0)
    assert torch.equal(net(x, sigma, labels), net(x, sigma, labels))


#----------------------------------------------------------------------------
# Freeze levels, by module structure: UNetBlock's conv0 / conv1 / attention proj, then qkv, then the 1x1 skip.

LEVEL_MODULES = {0: (), 1: ('conv0', 'conv1', 'proj'), 2: ('conv0', 'conv1', 'proj', 'qkv'),
                 3: ('conv0', 'conv1', 'proj', 'qkv', 'skip')}


@pytest.mark.parametrize('level', [0, 1, 2, 3])
def test_each_freeze_level_freezes_exactly_its_modules(level):
    net = tiny_edm()
    frozen = set()
    for block in net.modules():
        if isinstance(block, UNetBlock):
            for attr in LEVEL_MODULES[level]:
                sub = getattr(block, attr, None)
                if sub is not None:
                    frozen |= {id(p) for p in sub.parameters()}
    trainable = apply_freeze(net, level)
    everything = {id(p) for p in net.parameters()}
    assert {id(p) for p in trainable} == everything - frozen
    assert {id(p) for p in net.parameters() if not p.requires_grad} == frozen
    blocks = sum(isinstance(m, UNetBlock) for m in net.modules())
    attention = sum(isinstance(m, UNetBlock) and m.num_heads > 0 for m in net.modules())
    with_skip = sum(isinstance(m, UNetBlock) and m.skip is not None for m in net.modules())
    # Weight and bias per frozen convolution.
    assert len(frozen) == 2 * {0: 0, 1: 2 * blocks + attention, 2: 2 * blocks + 2 * attention,
                               3: 2 * blocks + 2 * attention + with_skip}[level]


#----------------------------------------------------------------------------
# Gradient averaging across two gloo processes.

def _averaging_worker(rank, store, out):
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        a = torch.nn.Parameter(torch.zeros(2, 3))
        b = torch.nn.Parameter(torch.zeros(4))
        c = torch.nn.Parameter(torch.zeros(1))   # no gradient on either rank: stays None
        a.grad = torch.arange(6.0).reshape(2, 3) * (rank + 1)          # rank 0: k, rank 1: 2 k -> 1.5 k
        b.grad = torch.tensor([1.0, -2.0, 3.0, 10.0]) if rank == 0 else torch.tensor([3.0, 2.0, -1.0, 0.0])
        finish_gradients([a, b, c], torch.optim.SGD([a, b, c], lr=1.0))   # average, then step: p = -mean grad
        total = dist.all_reduce_sum_(torch.tensor([rank + 1.0]))
        net = torch.nn.Linear(2, 1)
        with torch.no_grad():
            net.weight.fill_(rank + 5.0)
            net.bias.fill_(-rank - 1.0)
        dist.broadcast_module(net)
        torch.save(dict(a=a.grad, b=b.grad, c=c.grad, a_new=a.detach(), total=total, w=net.weight.detach(),
                        bias=net.bias.detach()), f'{out}.{rank}')
    finally:
        torch.distributed.destroy_process_group()


def test_gradients_are_averaged_across_ranks(tmp_path):
    """Two gloo processes: finish_gradients averages (then steps), all_reduce_sum_ sums, broadcast_module copies rank 0."""
    out = str(tmp_path / 'grads')
    torch.multiprocessing.spawn(_averaging_worker, args=(str(tmp_path / 'store'), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f'{out}.{rank}', weights_only=True)
        assert got['a'].tolist() == [[0.0, 1.5, 3.0], [4.5, 6.0, 7.5]]
        assert got['a_new'].tolist() == [[-0.0, -1.5, -3.0], [-4.5, -6.0, -7.5]]
        assert got['b'].tolist() == [2.0, 0.0, 1.0, 5.0]
        assert got['c'] is None and got['total'].tolist() == [3.0]
        assert got['w'].tolist() == [[5.0, 5.0]] and got['bias'].tolist() == [-1.0]


def test_noise_streams_are_distinct_and_sliced_by_rank():
    keys = {dist.rng_key(seed, step, stream) for seed in range(3) for step in range(50) for stream in range(4)}
    assert len(keys) == 3 * 50 * 4
    full = torch.randn([6, 2, 3], generator=torch.Generator().manual_seed(1234))
    for rank in range(3):
        torch.testing.assert_close(dist.global_randn(1234, 6, [2, 3], rank, 2, 'cpu'), full[2 * rank:2 * rank + 2], rtol=0, atol=0)


def test_each_phase_draws_its_own_keyed_noise():
    """The G step's z and the D step's z: N(0, I) draws of the whole global batch from generators seeded by
    (seed * 1000003 + step) * 4 + phase, phase 1 (G) and 2 (D); this rank's slice."""
    trainer = quad_trainer(batch=4, rounds=2, seed=5)
    z_g, z_d = trainer.draws(7, [3, RES, RES], 0)
    for z, phase in ((z_g, 1), (z_d, 2)):
        full = torch.randn([4, 3, RES, RES], generator=torch.Generator().manual_seed((5 * 1_000_003 + 7) * 4 + phase))
        assert torch.equal(z, full)
    assert not torch.equal(z_g, z_d)


#----------------------------------------------------------------------------
# RNG states.

def draws():
    return (torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(3)], [random.gauss(0, 1) for _ in range(3)])


def test_rng_state_round_trip(tmp_path):
    """Capture (with numpy's and Python's cached Gaussians pending), draw, save and load the state as a training state
    is, restore, draw again: the same numbers from torch, numpy and Python."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(1), random.gauss(0, 1)   # numpy (legacy) and Python cache a second Gaussian: captured too
    state = capture_rng()
    first = draws()
    torch.save(state, tmp_path / 'rng.pt')
    assert draws() != first
    restore_rng(torch.load(tmp_path / 'rng.pt', weights_only=True))
    again = draws()
    for a, b, name in zip(again, first, ['torch.rand', 'torch.randn', 'np.rand', 'np.randn', 'random', 'gauss']):
        assert a == b, name
