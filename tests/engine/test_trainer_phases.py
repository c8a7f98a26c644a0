"""D2OTrainer phases with the speed options against the plain path: the D step with fakes and reals in one
discriminator pass (disc_pair_forward) gives the same losses, logits and updated D as two calls. The D and R1
steps against the authors' loss: R1's weight relative to the GAN loss is theirs."""

import copy

import pytest
import torch
from torch.nn.functional import softplus

from d2o_fast.engine.config import AUTHORS_IMAGES_PER_GPU, AUTHORS_R1_GAMMA, TrainConfig, resolve_config
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import architecture_kwargs, build_network
from tests.engine.conftest import tiny_generator_and_discriminator

RES = 16


def tiny_trainer(disc, pair, c_dim, seed=0):
    G, D = tiny_generator_and_discriminator(disc, c_dim, seed=seed)
    cfg = resolve_config('demo', init='random', arch='ddpmpp', disc=disc, batch=4, seed=5, disc_pair_forward=pair,
                         lr=1e-3, dlr=1e-3)
    return D2OTrainer(G, D, cfg, torch.device('cpu'), batch_gpu=2, rounds=2)


@pytest.mark.parametrize('disc,c_dim', [('stylegan2', 0), ('stylegan2', 3), ('projected', 0)])
def test_d_step_pair_forward_equals_two_calls(disc, c_dim):
    images = torch.rand(4, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.eye(3)[[0, 1, 2, 0]] if c_dim else torch.zeros(4, 0)
    reals = images.chunk(2)
    conds = labels.chunk(2) if c_dim else [None, None]
    results = {}
    for pair in (False, True):
        trainer = tiny_trainer(disc, pair, c_dim)
        before = copy.deepcopy(trainer.D.state_dict())
        stats = trainer.discriminator_phase(reals, conds, trainer.draws(3, reals[0].shape[1:], 0)[1].chunk(2))
        results[pair] = stats, trainer.D.state_dict()
    (stats_two, state_two), (stats_pair, state_pair) = results[False], results[True]
    for k in stats_two:
        torch.testing.assert_close(stats_pair[k], stats_two[k], rtol=1e-5, atol=1e-6, msg=k)
    for k, v in state_two.items():  # updated heads, BN running stats, spectral-norm vectors
        torch.testing.assert_close(state_pair[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(v, before[k]) for k, v in state_pair.items())  # the step did update D


def conv_backward_masks(fn):
    """(output_mask, weight shape) of every convolution_backward that `fn` runs (input, weight, bias grads)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [(tuple(e.concrete_inputs[-1]), tuple(e.input_shapes[2])) for e in prof.events()
            if e.name == 'aten::convolution_backward']


def test_frozen_convolutions_compute_no_weight_gradients():
    """G step: weight gradients only for G's trainable convs (D2O-F level 1 freezes the block convs; the projected
    D's backbones and heads are frozen in this phase), input gradients through everything in between. D step:
    weight gradients only for the heads (twice each: fakes and reals), nothing through the backbones."""
    trainer = tiny_trainer('projected', True, 0)
    assert trainer.cfg.freeze == 1
    images = torch.rand(4, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    reals, conds = images.chunk(2), [None, None]
    g_convs = [p for p in trainer.G.parameters() if p.ndim == 4]
    g_trainable = [p for p in g_convs if p.requires_grad]
    assert 0 < len(g_trainable) < len(g_convs)

    z_g, z_d = trainer.draws(1, reals[0].shape[1:], 0)
    g_step = conv_backward_masks(lambda: trainer.generator_phase(reals[:1], conds[:1], z_g.chunk(2)[:1]))
    with_weight = [shape for mask, shape in g_step if mask[1]]
    assert sorted(with_weight) == sorted(tuple(p.shape) for p in g_trainable)
    assert sum(1 for mask, _ in g_step if mask[0] and not mask[1]) > len(g_convs) - len(g_trainable)  # frozen: data only

    head_convs = [p for p in trainer.D.trainable_parameters() if p.ndim == 4]
    d_step = conv_backward_masks(lambda: trainer.discriminator_phase(reals[:1], conds[:1], z_d.chunk(2)[:1]))
    assert sorted(shape for mask, shape in d_step if mask[1]) == sorted(2 * [tuple(p.shape) for p in head_convs])
    backbone_shapes = {tuple(p.shape) for p in trainer.D.feature_networks.parameters() if p.ndim == 4}
    assert not any(shape in backbone_shapes and not mask[1] for mask, shape in d_step)  # no pass through the backbones


class TwoNetworkD(torch.nn.Module):
    """Stands in for a projected discriminator with two feature networks (6 and 2 logits per image); smooth, so
    that R1's double backward reaches its weights. Keeps the images it is shown."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = 3 * RES * RES
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n, 5, generator=g) * 2 / n ** 0.5) for _ in range(2)])
        self.v = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5, k, generator=g)) for k in (6, 2)])
        self.seen = []

    def trainable_parameters(self):
        return list(self.parameters())

    def forward(self, img, c=None):
        self.seen.append(img.detach().clone())
        return tuple(torch.tanh(img.flatten(1) @ w) @ v for w, v in zip(self.w, self.v))


def authors_gradients(D, fakes, reals):
    """The authors' loss on one GPU (training/loss.py): their discriminator hands one row per image per feature
    network, the GAN loss adds the rows' means (a sum over images and networks), R1 is 16 * gamma / 2 times the
    image mean of |d(sum of all logits) / dx|^2, gamma = 1e-4. Returns the gradients of D step and R1 step."""
    def rows(images):
        return [row for part in D(images) for row in part]
    loss = sum(softplus(r).mean() for r in rows(fakes)) + sum(softplus(-r).mean() for r in rows(reals))
    grad_d = torch.autograd.grad(loss, D.trainable_parameters())
    x = reals.clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(sum(r.sum() for r in rows(x)), [x], create_graph=True)
    r1 = grad_x.square().sum(dim=[1, 2, 3]) * (AUTHORS_R1_GAMMA / 2)
    grad_r1 = torch.autograd.grad(r1.mean() * 16, D.trainable_parameters())
    return grad_d, grad_r1


def test_r1_balance_is_the_authors():
    """Their 64 images on one GPU against the default config on the same 64 images (two accumulation rounds): our
    D-step and R1-step gradients are both theirs / 64, so R1 weighs against the GAN loss as in their runs."""
    n = AUTHORS_IMAGES_PER_GPU
    assert TrainConfig().r1_gamma == pytest.approx(1e-4 / 64) and TrainConfig().r1_interval == 16
    torch.manual_seed(0)
    G = build_network('D2OPrecond', **architecture_kwargs('ddpmpp', RES, 3, 0, model_channels=8, channel_mult=[1, 2],
                                                          num_blocks=1, attn_resolutions=[8], dropout=0.0))
    cfg = resolve_config('demo', init='random', arch='ddpmpp', batch=n, seed=5, cond=False)
    assert cfg.r1_gamma == TrainConfig().r1_gamma and cfg.r1_interval == 16
    trainer = D2OTrainer(G, TwoNetworkD(), cfg, torch.device('cpu'), batch_gpu=n // 2, rounds=2)
    D = trainer.D
    reference = copy.deepcopy(D)
    reals = (torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1).chunk(2)

    trainer.discriminator_phase(reals, [None, None], trainer.draws(16, reals[0].shape[1:], 0)[1].chunk(2))
    ours_d = [p.grad.clone() for p in D.trainable_parameters()]
    fakes = torch.cat([D.seen[0], D.seen[2]])  # per round: fakes, then reals
    D.load_state_dict(reference.state_dict())  # R1 at the same weights as theirs
    trainer.r1_phase(reals, [None, None])
    ours_r1 = [p.grad.clone() for p in D.trainable_parameters()]

    theirs_d, theirs_r1 = authors_gradients(reference, fakes, torch.cat(reals))
    for ours, theirs in ((ours_d, theirs_d), (ours_r1, theirs_r1)):
        for a, b in zip(ours, theirs):
            assert b.abs().sum() > 0
            torch.testing.assert_close(a * n, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
