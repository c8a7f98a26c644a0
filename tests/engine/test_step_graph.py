"""The graph-structured step (--cudagraphs step: G step + D step + EMA over static input buffers, R1 eager after it)
trains exactly like the plain step; on CPU it runs the same code without capture. And the state handling that capture
relies on: a copy / in-place restore that keeps every tensor's identity, and load_state_dict dropping the graph."""

import pytest
import torch

from d2o_fast.engine.compile import SpeedOptionError, StepGraph, check_speed_options
from d2o_fast.engine.config import resolve_config
from d2o_fast.nets import labelled_batch
from tests.engine.test_no_host_sync import d2o_trainer

RES = 16


def full_state(trainer):
    """Every tensor an iteration changes: weights, EMA, buffers, both optimizers' state and the scaler's."""
    state = {f'{name}.{k}': v for name in ('G', 'G_ema', 'D') for k, v in getattr(trainer, name).state_dict().items()}
    for name in ('opt_g', 'opt_d'):
        opt = getattr(trainer, name)
        for i, p in enumerate(opt.param_groups[0]['params']):
            for k, v in opt.state.get(p, {}).items():
                state[f'{name}.{i}.{k}'] = v
    state.update({f'scaler.{k}': torch.tensor(float(v)) for k, v in trainer.scaler.state_dict().items()})
    return state


def batches(trainer, count):
    n = trainer.batch_gpu * trainer.rounds
    return [labelled_batch(n, [3, RES, RES], trainer.G.label_dim, 10 + i, values='uniform', labels='random',
                           device=trainer.device) for i in range(count)]


@pytest.mark.parametrize('freeze,precision,reuse_fakes', [(1, 'fp32', False), (0, 'fp16', False), (2, 'fp32', True)])
def test_graph_structured_step_trains_exactly_like_the_plain_step(freeze, precision, reuse_fakes):
    """Five iterations with two accumulation rounds, R1 at steps 2 and 4: the same weights, EMA, D, optimizer and
    scaler state, bit for bit, and the same statistics (with --reuse-fakes too: no D-step noise buffer then)."""
    plain = d2o_trainer('stylegan2', freeze, precision, static_step=False, rounds=2, reuse_fakes=reuse_fakes)
    graphed = d2o_trainer('stylegan2', freeze, precision, static_step=True, rounds=2, reuse_fakes=reuse_fakes)
    assert graphed.step_graph is not None and not graphed.step_graph.capture   # CPU: the structure, no capture
    for step, (images, labels) in enumerate(batches(plain, 5)):
        a = plain.step(images, labels, step, step * 4)
        b = graphed.step(images, labels, step, step * 4)
        assert list(a) == list(b) and ('r1_penalty' in a) == (step in (2, 4))
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    assert graphed.static['images'].shape == (4, 3, RES, RES)   # the inputs went through the static buffers
    assert ('z_d' in graphed.static) != reuse_fakes
    state_plain, state_graphed = full_state(plain), full_state(graphed)
    assert list(state_plain) == list(state_graphed) and any(k.startswith('opt_d.') for k in state_plain)
    for k, v in state_plain.items():
        assert torch.equal(state_graphed[k], v), k
    assert not torch.equal(plain.G_ema.state_dict()['model.map_label.weight'],
                           d2o_trainer('stylegan2', freeze, precision).G_ema.state_dict()['model.map_label.weight'])


@pytest.mark.parametrize('keep_new', [False, True])
def test_restore_state_keeps_every_tensor_and_matches_a_fresh_start(keep_new):
    """copy_state / restore_state (around StepGraph's warm-up before capture) put the values back into the same
    tensors (memory a captured graph points at). Optimizer state created in between is dropped, or kept and zeroed
    (a captured graph points at it), which trains exactly like a fresh optimizer."""
    trainer = d2o_trainer('stylegan2', 1, 'fp32', static_step=True)
    (images, labels), = batches(trainer, 1)
    saved = trainer.copy_state()
    before = {k: (v, v.clone()) for k, v in full_state(trainer).items()}
    trainer.step(images, labels, 2, 8)   # with R1: every part of the state moves
    tensors = full_state(trainer)
    trainer.restore_state(saved, keep_new)   # keep_new: what a captured step does
    after = full_state(trainer)
    for k, (tensor, value) in before.items():   # same memory (state_dict() makes new views of it), same values
        assert after[k].data_ptr() == tensor.data_ptr() and torch.equal(after[k], value), k
    created = [k for k in tensors if k.startswith('opt_') and k not in before]
    assert created
    for k in created:
        if keep_new:
            assert after[k].data_ptr() == tensors[k].data_ptr() and not after[k].any(), k
        else:
            assert k not in after, k
    fresh = d2o_trainer('stylegan2', 1, 'fp32', static_step=True)
    for step in (3, 4):
        a, b = trainer.step(images, labels, step, 4 * step), fresh.step(images, labels, step, 4 * step)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for k, v in full_state(fresh).items():
        assert torch.equal(full_state(trainer)[k], v), k


def test_load_state_dict_drops_the_graph():
    trainer = d2o_trainer('stylegan2', 1, 'fp32', static_step=True)
    trainer.step_graph.graph, trainer.step_graph.outputs = object(), torch.zeros(4)   # stands for a captured graph
    trainer.load_state_dict(trainer.state_dict())
    assert trainer.step_graph.graph is None and trainer.step_graph.outputs is None


def test_step_graph_without_capture_runs_its_body_each_call():
    calls = []
    graph = StepGraph(lambda: calls.append(1) or torch.ones(2), capture=False, save=None, restore=None)
    assert torch.equal(graph(), torch.ones(2)) and torch.equal(graph(), torch.ones(2)) and len(calls) == 2


def test_the_step_graph_needs_one_process_and_a_fixed_batch_shape():
    cfg = resolve_config('demo', cudagraphs='step')
    check_speed_options(cfg, torch.device('cuda'), world_size=1)
    with pytest.raises(SpeedOptionError, match='--cudagraphs networks'):
        check_speed_options(cfg, torch.device('cuda'), world_size=2)
    trainer = d2o_trainer('stylegan2', 1, 'fp32', static_step=True)
    (images, labels), = batches(trainer, 1)
    trainer.step(images, labels, 1, 4)
    with pytest.raises(SpeedOptionError, match='same batch shape'):
        trainer.step(images[:2], labels[:2], 2, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='captures a CUDA graph')
def test_captured_step_trains_like_the_plain_step_on_cuda():
    """On a GPU: the captured step (captured lazily at the first step, recaptured after load_state_dict) against the
    plain step, five iterations with R1 and accumulation rounds; equal up to the GPU's run-to-run rounding."""
    cuda = torch.device('cuda')
    plain = d2o_trainer('stylegan2', 1, 'fp32', static_step=False, device=cuda)
    graphed = d2o_trainer('stylegan2', 1, 'fp32', static_step=True, device=cuda)
    assert graphed.step_graph.capture
    for step, (images, labels) in enumerate(batches(plain, 5)):
        if step == 3:   # resuming replaces the optimizer's state tensors: the graph must be captured again
            graphed.load_state_dict(graphed.state_dict())
            assert graphed.step_graph.graph is None
        a = plain.step(images, labels, step, step * 4)
        b = graphed.step(images, labels, step, step * 4)
        assert graphed.step_graph.graph is not None
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f'{step} {k}')
    state_plain, state_graphed = full_state(plain), full_state(graphed)
    for k, v in state_plain.items():
        torch.testing.assert_close(state_graphed[k].to(v.device), v, rtol=1e-4, atol=1e-5, msg=k)
