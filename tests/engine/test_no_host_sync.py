"""A training step never reads a device value on the host: D2O and D2O-F steps (with and without an R1 step, StyleGAN2
and a small projected discriminator, fp32 / bf16 / fp16 with the grad scaler, plain and graph-structured, with and
without --reuse-fakes) and the EDM
pre-training step run with every host read of a tensor made to raise; the loop's tick meter adds their statistics
without reading them either."""

import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d2o_fast.engine.config import PRETRAIN_PRESETS, PretrainConfig, resolve_config
from d2o_fast.engine.edm_trainer import EDMTrainer
from d2o_fast.engine.loop import TickMeter
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import architecture_kwargs, build_network, labelled_batch
from d2o_fast.ops import KernelFallbackWarning
from tests.engine.conftest import tiny_generator_and_discriminator

RES, CLASSES, CPU = 16, 3, torch.device('cpu')
HOST_READS = ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__', 'cpu', 'numpy')
# ATen ops whose result the host must wait for: a scalar read, a bool, or an output shape that depends on the values.
SYNCING_OPS = {'_local_scalar_dense', 'is_nonzero', 'equal', 'allclose', 'nonzero', 'masked_select', '_unique2', 'unique_consecutive'}


class HostSyncError(AssertionError):
    pass


class RefuseSyncingOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS:
            raise HostSyncError(f'{func} inside a training step')
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every Python-level read of a tensor's value, and every ATen op that would wait for one, raises inside. A fused
    kernel's one-time self-check (which reads values and would fall back on the error) must have run before."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSyncError(f'Tensor.{name} inside a training step')
        return method
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter('error', KernelFallbackWarning)
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        with RefuseSyncingOps():
            yield


def test_the_guard_catches_each_kind_of_read(monkeypatch):
    x = torch.rand(3) + 1
    reads = [lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: float(x[0]), lambda: int(x[0]),
             lambda: x.cpu(), lambda: [0, 1][torch.tensor(1)], lambda: x.max() > 0 and None, lambda: torch.equal(x, x),
             lambda: x.nonzero(), lambda: torch.allclose(x, x)]
    for read in reads:
        with pytest.raises(HostSyncError), no_host_reads(monkeypatch):
            read()
    with no_host_reads(monkeypatch):
        y = (x * 2).sum() + torch.where(torch.isfinite(x), x, 0).max()   # device work only: allowed
    assert y.item() > 0


def d2o_trainer(disc, freeze, precision, static_step=False, rounds=2, device=CPU, reuse_fakes=False):
    G, D = tiny_generator_and_discriminator(disc, CLASSES, seed=0)
    bf16_disc = precision == 'bf16' and disc == 'stylegan2'   # oneDNN's bf16 depthwise convolutions are slow on CPU
    cfg = resolve_config('demo', init='random', arch='ddpmpp', disc=disc, freeze=freeze, batch=2 * rounds, seed=5,
                         lr=1e-3, dlr=1e-3, precision=precision, disc_precision='bf16' if bf16_disc else 'fp32',
                         r1_interval=2, reuse_fakes=reuse_fakes)
    return D2OTrainer(G, D, cfg, device, batch_gpu=2, rounds=rounds, static_step=static_step)


def run_guarded(trainer, monkeypatch, steps):
    """Steps (and the tick meter's per-step work) under the guard, after the trainer's warm-up (an iteration whose
    effects it undoes: the fused kernels' self-checks run there, the optimizers' lazy state is created in the guarded
    steps); returns what the meter reads afterwards."""
    trainer.warm_up()
    assert not trainer.opt_g.state and not trainer.opt_d.state
    n = trainer.batch_gpu * trainer.rounds
    images, labels = labelled_batch(n, [3, RES, RES], trainer.G.label_dim, 1, values='uniform', labels='random')
    labels = labels if labels is not None else torch.zeros([n, 0])
    meter = TickMeter(0, CPU)
    seen = []
    with no_host_reads(monkeypatch):
        for step in steps:
            stats = trainer.step(images, labels, step, step * n)
            meter.add(stats)
            seen.append(sorted(stats))
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in stats.values())
    means, longest_bad, bad_at_end = meter.read()
    return seen, means, longest_bad, bad_at_end


SLOW = pytest.mark.slow   # the projected discriminator's backbone at 128x128
CASES = [  # (disc, freeze, precision, static_step, reuse_fakes)
    ('stylegan2', 0, 'fp32', False, False), ('stylegan2', 1, 'bf16', False, False), ('stylegan2', 1, 'fp16', False, False),
    ('stylegan2', 0, 'fp16', True, False), ('stylegan2', 1, 'bf16', True, False),
    ('stylegan2', 3, 'fp32', False, True), ('stylegan2', 1, 'fp16', True, True),
    pytest.param('projected', 0, 'bf16', False, False, marks=SLOW), pytest.param('projected', 1, 'fp16', False, False, marks=SLOW),
    pytest.param('projected', 1, 'fp32', True, False, marks=SLOW),
    pytest.param('projected', 2, 'fp32', False, True, marks=SLOW), pytest.param('projected', 1, 'bf16', True, True, marks=SLOW),
]


@pytest.mark.parametrize('disc,freeze,precision,static_step,reuse_fakes', CASES)
def test_d2o_steps_never_read_device_values(disc, freeze, precision, static_step, reuse_fakes, monkeypatch):
    trainer = d2o_trainer(disc, freeze, precision, static_step, reuse_fakes=reuse_fakes)
    assert (trainer.step_graph is not None) == static_step
    assert trainer.scaler.is_enabled() == (precision == 'fp16')
    seen, means, longest_bad, bad_at_end = run_guarded(trainer, monkeypatch, steps=[1, 2])   # step 2 is an R1 step
    base = ['logit_fake', 'logit_real', 'loss_d', 'loss_g']
    assert seen == [base, sorted(base + ['r1_penalty'])]
    assert set(means) == set(base + ['r1_penalty']) and longest_bad == 0 and bad_at_end == 0
    assert all(v == v for v in means.values())
    if precision == 'fp16':
        assert trainer.scaler.get_scale() > 0   # the scaler ran (and its scale stayed on the device until now)


def test_edm_step_never_reads_device_values(monkeypatch):
    torch.manual_seed(0)
    net = build_network('EDMPrecond', **architecture_kwargs('ddpmpp', RES, 3, CLASSES, model_channels=8, channel_mult=[1, 2],
                                                            num_blocks=1, attn_resolutions=[8], dropout=0.1))
    cfg = resolve_config('demo', cls=PretrainConfig, presets=PRETRAIN_PRESETS, batch=4, lr_rampup_kimg=0.01)
    trainer = EDMTrainer(net, cfg, CPU, batch_gpu=2, rounds=2)
    images, labels = labelled_batch(4, [3, RES, RES], CLASSES, 1, values='uniform', labels='random')
    with torch.autocast('cpu', dtype=trainer.dtype):   # the fused kernels' self-checks, outside the guard
        net(images, torch.ones(4), labels).sum().backward()
    net.zero_grad(set_to_none=True)
    meter = TickMeter(0, CPU)
    with no_host_reads(monkeypatch):
        for step in range(2):
            meter.add(trainer.step(images, labels, step, step * 4))
    means, longest_bad, _ = meter.read()
    assert list(means) == ['loss'] and means['loss'] > 0 and longest_bad == 0
