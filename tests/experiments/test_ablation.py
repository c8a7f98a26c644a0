"""`python -m d2o_fast.experiments`: studies over seeds write a table with mean and sd per arm, verdicts, a plot and
their provenance. Quality is not asserted here (tiny networks, a few steps): the structure of the report is."""

import json
import os

import pytest
import torch

from d2o_fast.checkpoint import save_snapshot
from d2o_fast.experiments import arms
from d2o_fast.experiments.__main__ import main
from d2o_fast.experiments.report import arm_summary, mean_curve, run_summary
from d2o_fast.nets import architecture_kwargs, build_network


def _record(seed, fids, accs):
    curve = [dict(kimg=0.5 * i, demo_fid=f, demo_accuracy=a) for i, (f, a) in enumerate(zip(fids, accs))]
    return dict(seed=seed, curve=curve, wall_s=60.0)


def test_run_and_arm_statistics_by_hand():
    run = run_summary(_record(0, [40.0, 10.0, 30.0, 20.0, 25.0], [0.2, 0.9, 0.5, 0.6, 0.7]))
    assert (run['start_fid'], run['end_fid'], run['best_fid']) == (40.0, 25.0, 10.0)
    assert run['last3_fid'] == pytest.approx(25.0) and run['last3_accuracy'] == pytest.approx(0.6)
    assert not run['diverged']
    assert run_summary(_record(1, [40.0, 45.0, 10.0], [0.1, 0.1, 0.9]))['diverged']  # once worse than its start
    summary = arm_summary(arms.D2O_F1, [_record(0, [40.0, 20.0], [0.1, 0.8]), _record(1, [40.0, 30.0], [0.1, 0.9])])
    assert summary['end_fid'] == pytest.approx(25.0) and summary['end_fid_sd'] == pytest.approx(50 ** 0.5)
    assert summary['end_accuracy'] == pytest.approx(0.85) and summary['diverged'] == 0
    assert mean_curve([_record(0, [40.0, 20.0], [0, 0]), _record(1, [40.0, 30.0], [0, 0])])[1] == pytest.approx((0.5, 25.0, 50 ** 0.5))


@pytest.fixture(scope='module')
def tiny_demo_model(tmp_path_factory):
    """A tiny stand-in for the shipped model: 32x32, 10 classes (the demo data and classifier need both)."""
    torch.manual_seed(0)
    net = build_network('EDMPrecond', **architecture_kwargs('ddpmpp', 32, 3, 10, model_channels=8, channel_mult=[1, 2],
                                                            num_blocks=1, attn_resolutions=[], dropout=0.0))
    with torch.no_grad():  # EDM zero-inits the output layers: make the stand-in differ from a re-initialised one
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp('init') / 'tiny-digits.safetensors'
    save_snapshot(net, str(path))
    return str(path)


TINY = ['--kimg', '0.032', '--tick-kimg', '0.016', '--eval-images', '20', '--disc-channels', '16', '--grid-size', '4']


@pytest.mark.slow
def test_ablation_over_two_seeds_writes_table_verdicts_plot_and_provenance(tmp_path, tiny_demo_model, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'ablation'
    main(['ablation', '--seeds', '2', '--outdir', str(out), '--init', tiny_demo_model, *TINY])
    report = json.loads((out / 'ablation.json').read_text())
    assert [a['arm'] for a in report['arms']] == [a.name for a in arms.ABLATION]
    for a in report['arms']:
        assert a['seeds'] == [0, 1] and a['end_fid'] > 0 and a['end_fid_sd'] >= 0
        assert all(r['end_kimg'] == pytest.approx(0.032) for r in a['runs'])
    starts = [a['start_fid'] for a in report['arms']]
    assert starts[0] == starts[1] == starts[2] != starts[3]  # one pre-trained start; the random init differs
    assert [v['claim'][:4] for v in report['verdicts']] == ['(i) ', '(ii)', '(ii)', '(iii', '(iii']
    assert all(isinstance(v['supported'], bool) and v['evidence'] for v in report['verdicts'])
    assert report['provenance']['command'].startswith('python -m d2o_fast.experiments ablation --seeds 2')
    assert {'commit', 'machine', 'torch', 'threads', 'date'} <= set(report['provenance'])
    md = (out / 'ablation.md').read_text()
    assert '± ' in md and '## Verdicts' in md and all(a.name in md for a in arms.ABLATION)
    assert os.path.getsize(out / 'ablation.png') > 10_000

    # Re-running the same command trains nothing again: every run folder is finished and read back.
    before = {p: os.path.getmtime(p) for p in (out / 'runs').glob('*/study-run.json')}
    main(['ablation', '--seeds', '2', '--outdir', str(out), '--init', tiny_demo_model, *TINY])
    assert {p: os.path.getmtime(p) for p in (out / 'runs').glob('*/study-run.json')} == before


def test_bad_arguments_are_user_errors(tmp_path, user_error):
    assert '--kimg must be positive' in user_error(main, ['ablation', '--kimg', '0', '--outdir', tmp_path])
    assert '--seeds must be at least 1' in user_error(main, ['sweep', '--seeds', '0', '--outdir', tmp_path])
    assert '--methods' in user_error(main, ['sweep', '--methods', 'd2o,gan', '--outdir', tmp_path])


def test_reuse_verdict_by_hand():
    """Gap and two standard errors from hand-computed values: fresh fakes end at 20 and 30 (sd sqrt(50)), reuse at
    24 and 26 (sd sqrt(2)); gap +0, 2 SE = 2 sqrt(50/2 + 2/2) = 10.2. Then reuse at 40 and 42: gap +16 > 2 SE."""
    from d2o_fast.experiments.studies import reuse_verdicts
    base = arm_summary(arms.D2O_F1, [_record(0, [50.0, 20.0], [0, 0]), _record(1, [50.0, 30.0], [0, 0])])
    same = arm_summary(arms.D2O_F1_REUSE, [_record(0, [50.0, 24.0], [0, 0]), _record(1, [50.0, 26.0], [0, 0])])
    end, *_ = reuse_verdicts([base, same])
    assert end['gap'] == pytest.approx(0.0) and end['two_se'] == pytest.approx(2 * 26 ** 0.5)
    assert end['supported'] and end['within_spread'] and 'within the seed spread' in end['evidence']
    worse = arm_summary(arms.D2O_F1_REUSE, [_record(0, [50.0, 40.0], [0, 0]), _record(1, [50.0, 42.0], [0, 0])])
    end, *_ = reuse_verdicts([base, worse])
    assert end['gap'] == pytest.approx(16.0) and not end['supported'] and not end['within_spread']
    assert end['evidence'].endswith('so worse')


def test_reuse_verdict_on_class_accuracy_by_hand():
    """Higher is better: fresh fakes end at 96% and 98% (sd 1.41 points), reuse at 90% and 91% (sd 0.71): gap -6.5
    points, 2 SE = 2 sqrt(2/2 + 0.5/2) = 2.24 points, so worse. Reuse at 99% and 100% is better."""
    from d2o_fast.experiments.studies import reuse_verdicts
    base = arm_summary(arms.D2O_F1, [_record(0, [50.0, 20.0], [0.1, 0.96]), _record(1, [50.0, 20.0], [0.1, 0.98])])
    lower = arm_summary(arms.D2O_F1_REUSE, [_record(0, [50.0, 20.0], [0.1, 0.90]), _record(1, [50.0, 20.0], [0.1, 0.91])])
    end_fid, _, end_acc, _ = reuse_verdicts([base, lower])
    assert end_fid['supported'] and end_fid['within_spread']
    assert end_acc['gap'] == pytest.approx(-0.065) and end_acc['two_se'] == pytest.approx(2 * 1.25 ** 0.5 / 100)
    assert not end_acc['supported'] and end_acc['evidence'].endswith('gap -6.5 points, two standard errors of the gap '
                                                                      '2.2%, so worse')
    higher = arm_summary(arms.D2O_F1_REUSE, [_record(0, [50.0, 20.0], [0.1, 0.99]), _record(1, [50.0, 20.0], [0.1, 1.0])])
    end_acc = reuse_verdicts([base, higher])[2]
    assert end_acc['supported'] and not end_acc['within_spread'] and end_acc['evidence'].endswith('so better')


def test_reuse_study_over_two_seeds(tmp_path, tiny_demo_model, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'reuse'
    main(['reuse', '--seeds', '2', '--outdir', str(out), '--init', tiny_demo_model, *TINY])
    report = json.loads((out / 'reuse.json').read_text())
    assert [a['arm'] for a in report['arms']] == [a.name for a in arms.REUSE]
    assert [a['overrides'].get('reuse_fakes', False) for a in report['arms']] == [False, True]
    for a in report['arms']:
        assert a['seeds'] == [0, 1] and a['end_fid'] > 0 and all(r['end_kimg'] == pytest.approx(0.032) for r in a['runs'])
    runs = {a['arm']: a['runs'] for a in report['arms']}
    assert [r['end_fid'] for r in runs[arms.D2O_F1.name]] != [r['end_fid'] for r in runs[arms.D2O_F1_REUSE.name]]
    configs = [json.loads((out / 'runs' / f'{a.slug}-seed0' / 'config.json').read_text()) for a in arms.REUSE]
    assert [c['reuse_fakes'] for c in configs] == [False, True]
    assert len(report['verdicts']) == 4 and all(isinstance(v['supported'], bool) for v in report['verdicts'])
    assert report['provenance']['command'].startswith('python -m d2o_fast.experiments reuse --seeds 2')
    md = (out / 'reuse.md').read_text()
    assert '## Verdict' in md and ('within the seed spread' in md or 'so better' in md or 'so worse' in md)
    assert os.path.getsize(out / 'reuse.png') > 10_000


def _finished_demo_run(runs_dir, seed, tuned_fid, accuracy):
    """A demo-seeds run folder as the demo command leaves it: its output beside one finished run folder."""
    outdir = runs_dir / f'demo-seed{seed}'
    run_dir = outdir / '00000-demo-demo-freeze1-stylegan2-batch16'
    run_dir.mkdir(parents=True)
    (outdir / 'command-output.txt').write_text('the printed table\n')
    (run_dir / 'finished').write_text('')
    table = [dict(fid=40.0 + seed, accuracy=0.2), dict(fid=8.0, accuracy=0.2), dict(fid=tuned_fid, accuracy=accuracy)]
    command = f'-m d2o_fast.train --compile --seed {seed} --outdir {outdir}'
    record = dict(_record(seed, [40.0 + seed, tuned_fid], [0.2, accuracy]), arm='demo', run_dir=str(run_dir),
                  command=command, table=table)
    (run_dir / 'study-run.json').write_text(json.dumps(record))
    return record


def test_demo_seeds_skips_finished_seeds_and_reports_each_against_the_bars(tmp_path, monkeypatch):
    from d2o_fast.experiments import runs, studies
    runs_dir = tmp_path / 'runs'
    records = [_finished_demo_run(runs_dir, 0, 12.0, 0.95), _finished_demo_run(runs_dir, 1, 25.0, 0.97)]

    run = runs.subprocess.run

    def no_training(cmd, *args, **kwargs):
        assert '-m' not in cmd, f'a finished seed was run again: {cmd}'
        return run(cmd, *args, **kwargs)  # git, for the provenance
    monkeypatch.setattr(runs.subprocess, 'run', no_training)
    out = tmp_path / 'demo-seeds'
    assert studies.demo_seeds(range(2), str(out), str(runs_dir), [], ['demo-seeds', '--seeds', '2']) == records
    md = (out / 'demo-seeds.md').read_text()
    assert f'--seed S --outdir {runs_dir}/demo-seedS`' in md
    assert '| 0 | 40.00 | 8.00 | 12.00 | 95.0% | yes |' in md  # 12 <= 40 / 2 and 95% >= 90%
    assert '| 1 | 41.00 | 8.00 | 25.00 | 97.0% | NO |' in md   # 25 > 41 / 2
    assert '| mean ± sd | | | 18.50 ± 9.19 | 96.0 ± 1.4% | 1 / 2 |' in md
    assert json.loads((out / 'demo-seeds.json').read_text())['runs'] == records
