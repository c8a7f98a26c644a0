"""The entry points as a user meets them: errors without a traceback and exit 1, a real SIGTERM, sampling."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from d2o_fast.engine.state import list_states

TINY = ['--disc', 'stylegan2', '--disc-channels', '16', '--batch', '8', '--tick-kimg', '0.016', '--eval-demo', 'false',
        '--grid-size', '4', '--workers', '1']


def run(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('D2O_FAST_TRACEBACK', None)
    return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def assert_user_error(proc, pattern):
    """Exit 1, the message (`error: ...`, every line of it) last on stderr, no traceback."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    message = proc.stderr[proc.stderr.rindex('error: '):]
    assert pattern in message, proc.stderr


@pytest.fixture(scope='module')
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad')
    rng = np.random.default_rng(1)
    np.savez(root / 'res8.npz', images=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), labels=np.arange(16) % 4)
    np.savez(root / 'gray.npz', images=rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8), labels=np.arange(16) % 4)
    np.savez(root / 'nolabels.npz', images=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    (root / 'corrupt.zip').write_bytes(b'PK\x03\x04 this is not a zip archive')
    (root / 'garbage.pkl').write_bytes(b'\x80\x04not really a pickle')
    return root


@pytest.mark.parametrize('case, pattern', [
    (['--data', 'missing.zip'], 'missing.zip'),
    (['--data', '{bad}/corrupt.zip'], 'corrupt.zip'),
    (['--data', '{bad}/res8.npz'], 'resolution'),
    (['--data', '{bad}/gray.npz'], 'channel'),
    (['--data', '{bad}/nolabels.npz'], 'label'),
    (['--init', '{bad}/garbage.pkl'], 'garbage.pkl'),
    (['--reinit', 'true'], '--reinit trains from random weights'),
    (['--batch-gpu', '3'], 'not a multiple of --batch-gpu 3'),
])
def test_bad_input_gets_its_message_and_exit_1(case, pattern, tmp_path, tiny_init, tiny_data, bad_data):
    args = {'--init': tiny_init, '--data': tiny_data}
    for flag, value in zip(case[::2], case[1::2]):
        args[flag] = value.format(bad=bad_data)
    argv = [x for kv in args.items() for x in kv] + TINY + ['--kimg', '0.016', '--outdir', str(tmp_path / 'runs')]
    assert_user_error(run(['d2o_fast.train', *argv], tmp_path), pattern)


def test_sigterm_saves_then_exits_and_rerun_finishes(tmp_path, tiny_init, tiny_data):
    argv = ['d2o_fast.train', '--init', tiny_init, '--data', tiny_data, *TINY, '--kimg', '2', '--checkpoint-ticks', '1000',
            '--snapshot-ticks', '1000', '--outdir', str(tmp_path / 'runs')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    runs = tmp_path / 'runs'
    while time.time() < deadline:  # wait until training has started ticking
        stats = list(runs.glob('*/stats.jsonl')) if runs.exists() else []
        if stats and stats[0].read_text().count('\n') >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert 'Stopped by signal 15' in out, out[-2000:]
    run_dir = str(next(runs.iterdir()))
    states = list_states(run_dir)
    assert len(states) == 1 and not os.path.exists(os.path.join(run_dir, 'finished'))
    assert any(f.endswith('.safetensors') for f in os.listdir(run_dir))


def test_sample_cli_grid_and_files(tmp_path, tiny_init):
    proc = run(['d2o_fast.sample', '--ckpt', tiny_init, '--seeds', '0-5', '--grid', str(tmp_path / 'g.png'),
                '--outdir', str(tmp_path / 'imgs'), '--batch', '4', '--steps', '3'], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'g.png').stat().st_size > 0
    assert sorted(os.listdir(tmp_path / 'imgs')) == [f'seed{i:06d}.png' for i in range(6)]
    assert_user_error(run(['d2o_fast.sample', '--ckpt', str(tmp_path / 'nope.pkl'), '--grid', 'x.png'], tmp_path), 'nope.pkl')


def test_dry_run_prints_the_resolved_config(tmp_path):
    proc = run(['d2o_fast.train', '--preset', 'cifar10-cond', '--freeze', '1', '--batch-gpu', '32', '--dry-run'], tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json
    cfg = json.loads(proc.stdout)
    assert cfg['freeze'] == 1 and cfg['batch'] == 256 and cfg['batch_gpu'] == 32 and cfg['disc'] == 'projected'
    assert cfg['disc_backbones'] == ['vgg16_bn', 'tf_efficientnet_lite0'] and cfg['lr'] == 1e-4
