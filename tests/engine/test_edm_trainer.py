"""EDM pre-training honours the speed flags it accepts and refuses the ones it cannot."""

import copy

import pytest
import torch

from d2o_fast.engine.compile import CheckpointedUNetBlock
from d2o_fast.engine.config import PRETRAIN_PRESETS, PretrainConfig, resolve_config
from d2o_fast.engine.edm_trainer import EDMTrainer
from d2o_fast.errors import ConfigError
from tests.engine.conftest import CLASSES, RES, tiny_edm

BATCH = 4


def pretrain_config(**overrides):
    values = dict(dict(batch=BATCH, seed=3, precision='fp32', lr=1e-3, lr_rampup_kimg=0), **overrides)
    return resolve_config('demo', cls=PretrainConfig, presets=PRETRAIN_PRESETS, **values)


def two_steps(net, cfg):
    trainer = EDMTrainer(copy.deepcopy(net), cfg, torch.device('cpu'), BATCH, 1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(2):
        images = torch.rand(BATCH, 3, RES, RES, generator=g) * 2 - 1
        labels = torch.eye(CLASSES)[torch.arange(BATCH) % CLASSES]
        torch.manual_seed(10 + step)  # dropout draws
        losses.append(trainer.step(images, labels, step, step * BATCH)['loss'])
    return trainer, losses


def test_checkpointing_and_channels_last_train_the_same_weights():
    net = tiny_edm().set_dropout(0.1)  # dropout: the recomputed forward must replay it
    plain, plain_losses = two_steps(net, pretrain_config())
    recomputed, recomputed_losses = two_steps(net, pretrain_config(checkpointing=True))
    # Dropout masks are drawn in memory order, so NHWC would drop other elements: compared without dropout.
    net.set_dropout(0)
    nchw, nchw_losses = two_steps(net, pretrain_config())
    nhwc, nhwc_losses = two_steps(net, pretrain_config(channels_last=True))

    assert sum(isinstance(m, CheckpointedUNetBlock) for m in recomputed.G.modules()) > 0
    assert not any(isinstance(m, CheckpointedUNetBlock) for m in plain.G.modules())
    convs = [m for m in nhwc.G.modules() if isinstance(m, torch.nn.Module) and getattr(m, 'weight', None) is not None
             and m.weight.dim() == 4 and m.weight.shape[-1] > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(p.is_contiguous() for p in nhwc.G_ema.parameters())  # the EMA (what snapshots store) stays NCHW
    layouts = []
    hook = convs[-1].register_forward_hook(lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    nhwc.G(torch.randn(2, 3, RES, RES), torch.ones(2), torch.eye(CLASSES)[:2])
    hook.remove()
    assert layouts == [True]  # activations run NHWC from the NCHW input on

    assert recomputed_losses == plain_losses  # the same computation, dropout replayed
    for a, b in zip(plain.G.parameters(), recomputed.G.parameters()):
        assert torch.equal(a, b)
    assert nhwc_losses == pytest.approx(nchw_losses, rel=1e-5)
    for a, b in zip(nchw.G.parameters(), nhwc.G.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('overrides, pattern', [
    (dict(cudagraphs='step'), '--cudagraphs is not implemented for EDM pre-training'),
    (dict(precision='fp16'), '--precision fp16 needs loss scaling'),
])
def test_flags_pretraining_cannot_honour_are_refused(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        pretrain_config(**overrides)
