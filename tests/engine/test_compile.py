"""Speed options of the trainer: activation checkpointing, channels_last, torch.compile, CUDA-graph refusal on
CPU, the frozen-backbone step doing only the work it needs, and the CLI with --compile / --profile."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine.compile import (CheckpointedUNetBlock, SpeedOptionError, apply_activation_checkpointing,
                                     remove_activation_checkpointing)
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import apply_freeze, build_network
from tests.engine.conftest import CLASSES, RES, tiny_config, tiny_edm

CPU = torch.device('cpu')
BATCH = 8


def _as_d2o(edm):
    G = build_network('D2OPrecond', **edm.init_kwargs)
    G.load_state_dict(edm.state_dict())
    return G


def tiny_trainer(tmp_path, tiny_init, tiny_data, seed=0, **overrides):
    """fp32 unless asked otherwise (the demo preset trains in bf16), so that paths can be compared closely."""
    cfg = tiny_config(tmp_path, tiny_init, tiny_data, **{'precision': 'fp32', **overrides})
    torch.manual_seed(seed)
    G = _as_d2o(tiny_edm(seed=seed))
    D = build_discriminator('stylegan2', img_resolution=RES, img_channels=3, c_dim=CLASSES, channel_max=16)
    return D2OTrainer(G, D, cfg, CPU, batch_gpu=BATCH, rounds=1)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand([BATCH, 3, RES, RES], generator=g) * 2 - 1
    labels = torch.eye(CLASSES)[torch.arange(BATCH) % CLASSES]
    return images, labels


def optimizer_state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))

#----------------------------------------------------------------------------
# Activation checkpointing.

@pytest.mark.parametrize('freeze', [0, 1])
def test_checkpointed_blocks_give_the_same_gradients(freeze):
    G = _as_d2o(tiny_edm())
    apply_freeze(G, freeze)
    G_ckpt = copy.deepcopy(G)
    switched = apply_activation_checkpointing(G_ckpt)
    assert switched == sum(1 for name, _ in G.named_modules() if type(_).__name__ == 'UNetBlock') > 0
    assert list(G.state_dict()) == list(G_ckpt.state_dict())  # names unchanged: freeze rule and snapshots agree

    g = torch.Generator().manual_seed(5)
    x = torch.randn([4, 3, RES, RES], generator=g) * 80
    sigma = torch.full([4], 80.0)
    labels = torch.eye(CLASSES)[[0, 1, 2, 3]]
    out, out_ckpt = G(x, sigma, labels), G_ckpt(x, sigma, labels)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    (out_ckpt * weights).sum().backward()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    trainable = 0
    for (name, p), p_ckpt in zip(G.named_parameters(), G_ckpt.parameters()):
        if not p.requires_grad:
            assert p.grad is None and p_ckpt.grad is None, name
            continue
        trainable += 1
        torch.testing.assert_close(p_ckpt.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert trainable > 0
    remove_activation_checkpointing(G_ckpt)
    assert not any(isinstance(m, CheckpointedUNetBlock) for m in G_ckpt.modules())


def test_checkpointing_and_channels_last_train_like_the_plain_step(tmp_path, tiny_init, tiny_data):
    images, labels = batch()
    plain = tiny_trainer(tmp_path / 'a', tiny_init, tiny_data)
    fast = tiny_trainer(tmp_path / 'b', tiny_init, tiny_data, checkpointing=True, channels_last=True)
    assert any(isinstance(m, CheckpointedUNetBlock) for m in fast.G.modules())
    assert not any(isinstance(m, CheckpointedUNetBlock) for m in fast.G_ema.modules())
    conv = fast.G.model.enc['16x16_block0'].conv0.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # The same G-step gradients (different conv algorithms in NHWC: rounding-level differences only).
    reals, conds = images.chunk(1), labels.chunk(1)
    zs = plain.draws(0, images.shape[1:], 0)[0].chunk(1)
    plain.generator_phase(reals, conds, zs)
    fast.generator_phase(reals, conds, zs)
    for (name, p), q in zip(plain.G.named_parameters(), fast.G.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3 * p.grad.abs().max().item() + 1e-12, msg=name)
    # Then whole iterations (step 2 includes R1). Adam's first updates are nearly lr * sign(grad), which
    # amplifies rounding differences, so the losses are compared loosely.
    for step in range(1, 3):
        stats_plain = plain.step(images, labels, step, step * BATCH)
        stats_fast = fast.step(images, labels, step, step * BATCH)
        for k in stats_plain:
            assert stats_fast[k].item() == pytest.approx(stats_plain[k].item(), rel=2e-2, abs=1e-3), k


#----------------------------------------------------------------------------
# Refusals.

@pytest.mark.parametrize('mode', ['networks', 'step'])
def test_cudagraphs_is_refused_on_cpu(mode, tmp_path, tiny_init, tiny_data):
    with pytest.raises(SpeedOptionError, match='--cudagraphs needs a CUDA device'):
        tiny_trainer(tmp_path, tiny_init, tiny_data, cudagraphs=mode)


def test_cudagraphs_flag_values():
    from d2o_fast.cli import parse_config
    from d2o_fast.engine.config import PRESETS, TrainConfig
    for argv, mode in [([], 'off'), (['--cudagraphs'], 'step'), (['--cudagraphs', '--compile'], 'step'),
                       (['--cudagraphs', 'networks'], 'networks'), (['--cudagraphs', 'off'], 'off')]:
        cfg, _ = parse_config(argv, 'train', '', TrainConfig, PRESETS)
        assert cfg.cudagraphs == mode, argv
    with pytest.raises(SystemExit):
        parse_config(['--cudagraphs', 'yes'], 'train', '', TrainConfig, PRESETS)
    from d2o_fast.engine.config import resolve_config
    with pytest.raises(ValueError, match='--cudagraphs must be off, networks or step'):
        resolve_config('demo', cudagraphs=True)

#----------------------------------------------------------------------------
# The frozen-backbone step does only the work it needs.

def test_each_phase_touches_only_what_it_trains(tmp_path, tiny_init, tiny_data):
    trainer = tiny_trainer(tmp_path, tiny_init, tiny_data, freeze=1)
    images, labels = batch()
    reals, conds = images.chunk(1), labels.chunk(1)
    seen = []
    generate = trainer.generate

    def spy(z, c, grad):
        out = generate(z, c, grad)
        seen.append((grad, out.requires_grad, [p.requires_grad for p in trainer.d_params]))
        return out
    trainer.generate = spy

    z_g, z_d = trainer.draws(0, images.shape[1:], 0)
    trainer.generator_phase(reals, conds, z_g.chunk(1))
    assert seen[-1][0] and seen[-1][1] and not any(seen[-1][2])  # G step: D's parameters do not require grad
    assert all(p.grad is None for p in trainer.d_params)            # ... so D gets no weight gradients
    frozen = [p for p in trainer.G.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)           # frozen G weights: no gradient either
    assert all(p.grad is not None for p in trainer.g_params)
    assert all(p.requires_grad for p in trainer.d_params)           # restored for the D step

    for p in trainer.G.parameters():
        p.grad = None
    trainer.discriminator_phase(reals, conds, z_d.chunk(1))
    assert seen[-1][0] is False and seen[-1][1] is False             # D step: G ran without a graph
    assert all(p.grad is None for p in trainer.G.parameters())
    assert all(p.grad is not None for p in trainer.d_params)


def test_frozen_backbone_optimizer_state_is_a_quarter_or_less(tmp_path, tiny_init, tiny_data):
    images, labels = batch()
    state = {}
    for freeze in (0, 1):
        trainer = tiny_trainer(tmp_path / f'f{freeze}', tiny_init, tiny_data, freeze=freeze)
        trainer.step(images, labels, 0, 0)
        params = {id(p) for p in trainer.opt_g.param_groups[0]['params']}
        assert params == {id(p) for p in trainer.G.parameters() if p.requires_grad}  # only trainable ones
        assert {id(p) for p in trainer.opt_g.state} <= params
        state[freeze] = optimizer_state_bytes(trainer.opt_g)
    assert 0 < state[1] <= 0.25 * state[0], state

#----------------------------------------------------------------------------
# torch.compile (slow: Inductor compiles C++ for forward and backward of G and D).

@pytest.mark.slow
@pytest.mark.parametrize('reuse_fakes', [False, True])
def test_compiled_step_matches_eager(tmp_path, tiny_init, tiny_data, reuse_fakes):
    """With --reuse-fakes the compiled D.features and D.heads_forward run on fakes, the compiled D on reals."""
    torch._dynamo.reset()
    images, labels = batch()
    eager = tiny_trainer(tmp_path / 'e', tiny_init, tiny_data, r1_interval=1, reuse_fakes=reuse_fakes)
    # compile_fakes: the D step's no-grad generator forward compiled too (the CUDA default; eager on CPU).
    compiled = tiny_trainer(tmp_path / 'c', tiny_init, tiny_data, r1_interval=1, compile=True, compile_fakes=True,
                            reuse_fakes=reuse_fakes)
    assert (compiled.D_heads is not None and compiled.D_heads != compiled.D.heads_forward) == reuse_fakes
    assert compiled.warmup_seconds > 0 and 'compile + warm-up' in compiled.speed_summary()
    assert compiled.G_fakes is compiled.G_fwd and compiled.G_fwd is not compiled.G
    # The warm-up left no trace: same weights, no optimizer state.
    for p, q in zip(eager.G.parameters(), compiled.G.parameters()):
        assert torch.equal(p, q)
    assert not compiled.opt_g.state and not compiled.opt_d.state
    for step in range(2):  # step 1 runs R1 through the eager discriminator
        stats_eager = eager.step(images, labels, step, step * BATCH)
        stats_compiled = compiled.step(images, labels, step, step * BATCH)
        for k in stats_eager:
            assert stats_compiled[k].item() == pytest.approx(stats_eager[k].item(), rel=1e-3, abs=1e-4), k
    for (name, p), q in zip(eager.G.named_parameters(), compiled.G.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)

#----------------------------------------------------------------------------
# The CLI, as a user runs it.

TINY_CLI = ['--disc', 'stylegan2', '--disc-channels', '16', '--batch', '8', '--kimg', '0.064', '--tick-kimg', '0.032',
            '--eval-demo', 'false', '--grid-size', '4', '--workers', '1', '--r1-interval', '2']


def run_train(args, tmp_path, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'd2o_fast.train', *TINY_CLI, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = [os.path.join(tmp_path, 'runs', d) for d in os.listdir(tmp_path / 'runs')]
    assert len(run_dirs) == 1
    return proc, run_dirs[0]


def assert_trace(run_dir):
    trace = json.load(open(os.path.join(run_dir, 'trace.json')))
    names = {e.get('name') for e in trace['traceEvents']}
    for phase in ('G step', 'D step', 'G forward', 'D backward', 'EMA', 'data'):
        assert phase in names, phase


def test_cli_profile_writes_a_trace(tmp_path, tiny_init, tiny_data):
    proc, run_dir = run_train(['--init', tiny_init, '--data', tiny_data, '--outdir', 'runs', '--profile', 'true'], tmp_path)
    assert 'Profiler trace written' in proc.stdout
    assert_trace(run_dir)
    assert 'compile off' in open(os.path.join(run_dir, 'log.txt')).read()


@pytest.mark.slow
def test_cli_compile_bf16_with_profile(tmp_path, tiny_init, tiny_data):
    args = ['--init', tiny_init, '--data', tiny_data, '--outdir', 'runs', '--compile', 'true', '--precision', 'bf16',
            '--profile', 'true']
    proc, run_dir = run_train(args, tmp_path)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert log.count('compile + warm-up') == 1 and 'G precision torch.bfloat16' in log
    assert 'compile on (D-step fakes eager)' in log  # the CPU default
    ticks = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(ticks) == 2 and all(t['loss_g'] == t['loss_g'] for t in ticks)
    assert_trace(run_dir)
