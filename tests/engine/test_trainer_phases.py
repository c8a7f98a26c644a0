"""D2OTrainer phases with the speed options against the plain path: the D step with fakes and reals in one
discriminator pass (disc_pair_forward) gives the same losses, logits and updated D as two calls."""

import copy

import pytest
import torch

from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine.config import resolve_config
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import architecture_kwargs, build_network

RES = 16


def tiny_trainer(disc, pair, c_dim, seed=0):
    torch.manual_seed(seed)
    G = build_network('D2OPrecond', **architecture_kwargs('ddpmpp', RES, 3, c_dim, model_channels=8, channel_mult=[1, 2],
                                                          num_blocks=1, attn_resolutions=[8], dropout=0.0))
    if disc == 'projected':
        D = build_discriminator('projected', RES, 3, c_dim, backbones=('tf_efficientnet_lite0',), pretrained=False,
                                input_size=128)
    else:
        D = build_discriminator('stylegan2', RES, 3, c_dim, channel_base=256, channel_max=32)
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
