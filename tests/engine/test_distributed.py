"""Two gloo processes launched by torchrun train exactly what one process trains (same seed, same global batch)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from d2o_fast.engine.state import list_states


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train(tmp_path, name, tiny_init, tiny_data, nproc, extra=()):
    outdir = tmp_path / name
    args = ['--init', tiny_init, '--data', tiny_data, '--disc', 'stylegan2', '--disc-channels', '16', '--batch', '8',
            '--kimg', '0.048', '--tick-kimg', '0.016', '--snapshot-ticks', '3', '--checkpoint-ticks', '3', '--eval-demo', 'false',
            '--grid-size', '4', '--r1-interval', '2', '--r1-gamma', '0.1', '--lr', '1e-3', '--dlr', '1e-3', '--ema-mimg', '0.001',
            '--workers', '1', '--seed', '5', '--precision', 'fp32', '--resume', 'none', '--outdir', str(outdir), *extra]
    if nproc == 1:
        cmd = [sys.executable, '-m', 'd2o_fast.train', *args]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
               f'--master_port={free_port()}', '-m', 'd2o_fast.train', *args]
    env = dict(os.environ, OMP_NUM_THREADS='1', D2O_FAST_TRACEBACK='1')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [os.path.join(outdir, d) for d in os.listdir(outdir)]
    assert len(runs) == 1
    return torch.load(list_states(runs[0])[-1], weights_only=True), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize('reuse', [[], ['--reuse-fakes']], ids=['default', 'reuse-fakes'])
def test_two_processes_match_one(tmp_path, tiny_init, tiny_data, reuse):
    one, _ = train(tmp_path, 'one', tiny_init, tiny_data, nproc=1, extra=reuse)
    two, log = train(tmp_path, 'two', tiny_init, tiny_data, nproc=2, extra=reuse)
    assert '2 process(es) x 4 images' in log
    assert one['images_seen'] == two['images_seen'] == 48
    # One process with two accumulation rounds of 4 is the same computation again.
    rounds, _ = train(tmp_path, 'rounds', tiny_init, tiny_data, nproc=1, extra=['--batch-gpu', '4', *reuse])
    for other in (two, rounds):
        for part in ('G', 'G_ema', 'D'):
            for k, v in one['trainer'][part].items():
                torch.testing.assert_close(other['trainer'][part][k], v, rtol=1e-4, atol=1e-5, msg=f'{part}.{k}')
    assert len(two['rng']) == 2  # every rank's RNG state is kept
