"""The training loop end to end on a tiny cifar-shaped problem: outputs, exact resume, faults."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from d2o_fast.checkpoint import CheckpointError, load_network
from d2o_fast.engine import loop as loop_module
from d2o_fast.engine.loop import TrainingError, training_loop
from d2o_fast.engine.config import PRETRAIN_PRESETS, PretrainConfig, resolve_config
from d2o_fast.engine.tasks import build_d2o_task, build_edm_task
from d2o_fast.engine.state import list_states
from tests.engine.conftest import tiny_config


def final_state(run_dir):
    return torch.load(list_states(run_dir)[-1], weights_only=True)


def test_run_writes_everything_a_person_looks_at(tmp_path, tiny_init, tiny_data):
    cfg = tiny_config(tmp_path, tiny_init, tiny_data, freeze=1)
    result = training_loop(cfg, build_d2o_task, quiet=True)
    files = sorted(os.listdir(result.run_dir))
    assert result.images_seen == 64 and not result.stopped_by_signal
    for name in ['config.json', 'log.txt', 'stats.jsonl', 'fakes-init.png', 'finished']:
        assert name in files, name
    assert any(f.startswith('events.out.tfevents') for f in files)
    assert len(glob.glob(os.path.join(result.run_dir, 'fakes-0*.png'))) >= 1
    assert len(list_states(result.run_dir)) == 2  # keep_checkpoints=2 of 4 ticks
    ticks = [json.loads(line) for line in open(os.path.join(result.run_dir, 'stats.jsonl'))]
    assert len(ticks) == 4 and ticks[-1]['kimg'] == pytest.approx(0.064)
    for key in ['loss_g', 'loss_d', 'logit_real', 'logit_fake', 'img_per_sec', 'peak_mem_gb', 'eta_sec']:
        assert key in ticks[-1]
    assert any('r1_penalty' in t for t in ticks)  # R1 every 2 steps
    config = json.load(open(os.path.join(result.run_dir, 'config.json')))
    assert config['freeze'] == 1 and config['identity'] == cfg.identity()

    # The D2O-F snapshot stores only trainable tensors + the base hash, and loads back as the full EMA.
    snap = load_file(result.snapshot)
    G = load_network(result.snapshot)
    assert len(snap) < len(G.state_dict())
    ema = final_state(result.run_dir)['trainer']['G_ema']
    for k, v in G.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    # Frozen weights are still exactly the pre-trained ones; trainable ones moved.
    init = load_network(tiny_init, as_class='D2OPrecond').state_dict()
    assert torch.equal(G.state_dict()['model.enc.16x16_block0.conv0.weight'], init['model.enc.16x16_block0.conv0.weight'])
    assert not torch.equal(G.state_dict()['model.enc.16x16_block0.affine.weight'], init['model.enc.16x16_block0.affine.weight'])


def stopped_then_rerun(cfg, build_task, steps=2):
    """The same command stopped by a signal after `steps` steps, then run again; returns both results."""
    calls = {'n': 0}
    original = loop_module.StopRequest.__bool__

    def stop_after(self):
        calls['n'] += 1
        return calls['n'] > steps or original(self)
    loop_module.StopRequest.__bool__ = stop_after
    try:
        first = training_loop(cfg, build_task, quiet=True)
    finally:
        loop_module.StopRequest.__bool__ = original
    return first, training_loop(cfg, build_task, quiet=True)


def assert_same_training_state(a, b, parts):
    for part in parts:
        for k in a['trainer'][part]:
            torch.testing.assert_close(b['trainer'][part][k], a['trainer'][part][k], rtol=0, atol=0, msg=f'{part}.{k}')


@pytest.mark.parametrize('reuse_fakes', [False, True])
def test_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_init, tiny_data, reuse_fakes):
    """Bit for bit; with --reuse-fakes too (its D step uses only the same iteration's G step: nothing more to save)."""
    straight = training_loop(tiny_config(tmp_path / 'a', tiny_init, tiny_data, kimg=0.048, reuse_fakes=reuse_fakes),
                             build_d2o_task, quiet=True)
    first, second = stopped_then_rerun(tiny_config(tmp_path / 'b', tiny_init, tiny_data, kimg=0.048,
                                                   reuse_fakes=reuse_fakes), build_d2o_task)
    assert first.stopped_by_signal and 0 < first.images_seen < 48
    assert second.run_dir == first.run_dir and second.images_seen == 48
    assert_same_training_state(final_state(straight.run_dir), final_state(second.run_dir), ['G', 'G_ema', 'D'])
    assert json.load(open(os.path.join(second.run_dir, 'config.json')))['reuse_fakes'] == reuse_fakes


def tiny_pretrain_config(tmp_path, data):
    return resolve_config('demo', cls=PretrainConfig, presets=PRETRAIN_PRESETS, data=data, model_channels=8,
                          channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.1, batch=8, kimg=0.032,
                          tick_kimg=0.008, snapshot_ticks=4, checkpoint_ticks=1, keep_checkpoints=1, grid_size=2,
                          grid_steps=2, lr=1e-3, lr_rampup_kimg=0, ema_mimg=0.001, precision='fp32', workers=1, seed=3,
                          outdir=str(tmp_path / 'runs'))


def test_pretraining_with_dropout_resumes_exactly(tmp_path, tiny_data):
    """EDM pre-training draws its dropout masks from the global torch RNG: a resumed run matches an uninterrupted one
    bit for bit only if the training state restores that RNG too."""
    straight = training_loop(tiny_pretrain_config(tmp_path / 'a', tiny_data), build_edm_task, quiet=True)
    first, second = stopped_then_rerun(tiny_pretrain_config(tmp_path / 'b', tiny_data), build_edm_task)
    assert first.stopped_by_signal and 0 < first.images_seen < 32 and second.images_seen == 32
    a, b = final_state(straight.run_dir), final_state(second.run_dir)
    assert_same_training_state(a, b, ['G', 'G_ema'])
    # Dropout was on, so the weights depend on the masks drawn after the resume.
    assert any(m.dropout == 0.1 for m in load_network(straight.snapshot).modules() if hasattr(m, 'dropout'))


def test_resume_refuses_another_architecture(tmp_path, tiny_init, tiny_data):
    cfg = tiny_config(tmp_path, tiny_init, tiny_data, kimg=0.016)
    result = training_loop(cfg, build_d2o_task, quiet=True)
    other_init = tmp_path / 'other.safetensors'
    from d2o_fast.checkpoint import save_snapshot
    from tests.engine.conftest import tiny_edm
    net = tiny_edm()
    net2 = type(net)(**dict(net.init_kwargs, model_channels=12))
    save_snapshot(net2, str(other_init))
    with pytest.raises(CheckpointError, match='another architecture'):
        training_loop(tiny_config(tmp_path, str(other_init), tiny_data, kimg=0.016, run_dir=result.run_dir), build_d2o_task, quiet=True)


def test_non_finite_losses_stop_and_keep_the_last_good_state(tmp_path, tiny_init, tiny_data, monkeypatch):
    """Detected at tick ends (2 steps per tick here): no state is saved from a tick that ends non-finite, and the run
    stops at the first tick end after --nan-patience consecutive non-finite steps."""
    cfg = tiny_config(tmp_path, tiny_init, tiny_data, kimg=0.032, nan_patience=3)
    result = training_loop(cfg, build_d2o_task, quiet=True)
    good = list_states(result.run_dir)[-1]
    good_bytes = open(good, 'rb').read()
    from d2o_fast.engine.trainer import D2OTrainer
    real_step = D2OTrainer.step
    monkeypatch.setattr(D2OTrainer, 'step', lambda self, *a, **k: dict(real_step(self, *a, **k), loss_g=torch.tensor(float('nan'))))
    with pytest.raises(TrainingError, match='NaN/Inf for 4 consecutive steps') as error:
        training_loop(tiny_config(tmp_path, tiny_init, tiny_data, kimg=0.064, nan_patience=3, run_dir=result.run_dir),
                      build_d2o_task, quiet=True)
    assert '--nan-patience 3' in str(error.value)
    assert list_states(result.run_dir)[-1] == good and open(good, 'rb').read() == good_bytes
    log = open(os.path.join(result.run_dir, 'log.txt')).read()
    assert 'the last 2 step(s) had non-finite losses' in log   # the tick at 0.048 kimg


def test_tick_meter_reads_means_and_non_finite_runs():
    """Means over the steps where a statistic exists and is finite; the longest run of steps with a non-finite loss
    in the tick (runs continue across ticks) and the run at its end. Hand-computed."""
    nan = float('nan')
    meter = loop_module.TickMeter(0, torch.device('cpu'))
    steps = [dict(loss_g=1.0, logit_real=0.5), dict(loss_g=nan, logit_real=1.5), dict(loss_g=3.0, logit_real=nan, r1_penalty=2.0),
             dict(loss_g=float('inf'), logit_real=2.5), dict(loss_g=nan, logit_real=3.5)]
    for stats in steps:
        meter.add({k: torch.tensor(v) for k, v in stats.items()})
    means, longest, at_end = meter.read()
    assert means == dict(loss_g=2.0, logit_real=2.0, r1_penalty=2.0) and longest == 2 and at_end == 2
    meter.start(5 * 16)
    meter.add(dict(loss_g=torch.tensor(nan), logit_real=torch.tensor(nan)))
    means, longest, at_end = meter.read()
    assert means == {} and longest == 3 and at_end == 3   # the run went on from the last tick
    meter.start(6 * 16)
    meter.add(dict(loss_g=torch.tensor(1.0), logit_fake=torch.tensor(nan)))   # a non-finite logit is not a bad step
    assert meter.read() == (dict(loss_g=1.0), 0, 0)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_init, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_init, tiny_data, kimg=0.016)
    result = training_loop(cfg, build_d2o_task, quiet=True)
    good = list_states(result.run_dir)[-1]
    good_bytes = open(good, 'rb').read()
    import d2o_fast.engine.state as state_module

    def broken_save(obj, path):
        with open(path, 'wb') as f:
            f.write(b'partial')
        raise OSError('No space left on device')
    monkeypatch.setattr(state_module.torch, 'save', broken_save)
    with pytest.raises(OSError, match='No space left'):
        training_loop(tiny_config(tmp_path, tiny_init, tiny_data, kimg=0.032, run_dir=result.run_dir), build_d2o_task, quiet=True)
    assert list_states(result.run_dir) == [good] and open(good, 'rb').read() == good_bytes
    assert not glob.glob(os.path.join(result.run_dir, '*.tmp*'), include_hidden=True)


def test_partial_snapshot_loads_onto_a_base_with_another_dropout(tmp_path):
    """The generator trains without dropout; its D2O-F snapshot still builds on a base that had some."""
    from d2o_fast.checkpoint import save_snapshot
    from d2o_fast.nets import apply_freeze
    from tests.engine.conftest import tiny_edm
    base = tiny_edm().set_dropout(0.1)
    save_snapshot(base, str(tmp_path / 'base.safetensors'))
    G = load_network(str(tmp_path / 'base.safetensors'), as_class='D2OPrecond').set_dropout(0)
    apply_freeze(G, 1)
    with torch.no_grad():
        G.model.map_layer0.weight.add_(1.0)  # a trainable tensor that differs from the base
    save_snapshot(G, str(tmp_path / 'snap.safetensors'), base=str(tmp_path / 'base.safetensors'), trainable_only=True)
    loaded = load_network(str(tmp_path / 'snap.safetensors'))
    assert loaded.init_kwargs['dropout'] == 0
    for k, v in G.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
