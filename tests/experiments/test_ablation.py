"""`python -m d2o_fast.experiments ablation`: four methods on the same budget, a table, a JSON and a plot."""

import json
import os
import subprocess
import sys

import pytest

from d2o_fast.experiments import METHODS, format_ablation_table


def _point(kimg, fid, acc):
    return dict(kimg=kimg, demo_fid=fid, demo_accuracy=acc)


def test_table_reports_end_best_and_mean_of_last_three():
    curve = [_point(0, 40.0, 0.2), _point(1, 10.0, 0.9), _point(2, 30.0, 0.5), _point(3, 20.0, 0.6), _point(4, 25.0, 0.7)]
    table = format_ablation_table([dict(method='D2O', curve=curve, final=curve[-1])])
    row = table.splitlines()[2]
    assert row == '| D2O | 4.0k | 40.00 | 25.00 | 10.00 | 25.00 | 70.0% | 60.0% |'


@pytest.mark.slow
def test_ablation_command_runs_all_methods(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'd2o_fast.experiments', 'ablation', '--kimg', '0.032', '--eval-images', '20',
                           '--outdir', str(tmp_path / 'out')], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / 'out'
    results = json.load(open(out / 'ablation.json'))
    assert [r['method'] for r in results] == [name for name, _ in METHODS]
    for r in results:
        assert r['curve'][0]['kimg'] == 0 and r['final']['kimg'] == pytest.approx(0.032)
        assert all(p['demo_fid'] > 0 and 0 <= p['demo_accuracy'] <= 1 for p in r['curve'])
    # Pre-trained methods start from the same generator; the random-init GAN does not.
    starts = [r['curve'][0]['demo_fid'] for r in results]
    assert starts[0] == starts[1] == starts[2] != starts[3]
    table = open(out / 'ablation.md').read()
    assert table.startswith('Command: python -m d2o_fast.experiments ablation --kimg 0.032')
    assert all(name in table for name, _ in METHODS)
    assert os.path.getsize(out / 'ablation.png') > 10_000


def test_bad_budget_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'd2o_fast.experiments', 'ablation', '--kimg', '0'], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and '--kimg must be positive' in proc.stderr
