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
        stats = trainer.discriminator_phase(reals, conds, step=3, rank=0)
        results[pair] = stats, trainer.D.state_dict()
    (stats_two, state_two), (stats_pair, state_pair) = results[False], results[True]
    for k in stats_two:
        torch.testing.assert_close(stats_pair[k], stats_two[k], rtol=1e-5, atol=1e-6, msg=k)
    for k, v in state_two.items():  # updated heads, BN running stats, spectral-norm vectors
        torch.testing.assert_close(state_pair[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(v, before[k]) for k, v in state_pair.items())  # the step did update D
