"""The demo's closing table: rows measured during training are reused only because they are the same numbers."""

import torch

from d2o_fast import assets
from d2o_fast.checkpoint import load_network, save_snapshot
from d2o_fast.metrics.demo_report import compare_demo_generators, format_demo_table, one_step_demo_metrics

N = 20  # images per row: enough for the Frechet distance code paths, small enough for CI


def _perturbed_snapshot(tmp_path):
    """A 'fine-tuned' generator: the shipped model with its weights moved, as a D2OPrecond snapshot."""
    net = load_network(assets.demo_checkpoint_path(), as_class='D2OPrecond')
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * (p.std() if p.numel() > 1 else 1))
    path = str(tmp_path / 'tuned.safetensors')
    save_snapshot(net, path)
    return net, path


def test_training_evaluations_are_the_table_rows(tmp_path):
    init = assets.demo_checkpoint_path()
    tuned_net, tuned_path = _perturbed_snapshot(tmp_path)
    evaluate = one_step_demo_metrics(N, batch=8)
    raw_net = load_network(init, as_class='D2OPrecond')
    measured = dict(raw=evaluate(raw_net), tuned=evaluate(tuned_net))

    computed = compare_demo_generators(init, tuned_path, num_images=N, batch=8, heun_steps=2, heun_bf16=True)
    reused = compare_demo_generators(init, tuned_path, num_images=N, batch=8, heun_steps=2, heun_bf16=True, known=measured)
    for a, b in zip(computed, reused):
        assert a['name'] == b['name'] and a['nfe'] == b['nfe']
        assert abs(a['fid'] - b['fid']) <= 1e-6 * max(1.0, abs(a['fid'])), (a, b)
        assert a['accuracy'] == b['accuracy']
    # The rows differ from each other: three generators, not one number three times.
    fids = [r['fid'] for r in computed]
    assert len({round(f, 6) for f in fids}) == 3, fids
    assert computed[1]['nfe'] == 3 and 'bf16' in computed[1]['name']
    assert '| (b) pre-trained + Heun sampler (2 steps, bf16) | 3 |' in format_demo_table(computed)


def test_known_rows_are_taken_as_given(tmp_path):
    init = assets.demo_checkpoint_path()
    _, tuned_path = _perturbed_snapshot(tmp_path)
    known = dict(raw=dict(demo_fid=123.0, demo_accuracy=0.5), tuned=dict(demo_fid=4.5, demo_accuracy=0.9))
    rows = compare_demo_generators(init, tuned_path, num_images=N, batch=8, heun_steps=2, heun_bf16=False, known=known)
    assert (rows[0]['fid'], rows[0]['accuracy']) == (123.0, 0.5)
    assert (rows[2]['fid'], rows[2]['accuracy']) == (4.5, 0.9)
    assert rows[1]['fid'] > 0 and 'bf16' not in rows[1]['name']


def test_measured_rows_only_for_what_the_run_evaluated():
    from d2o_fast.engine.config import resolve_config
    from d2o_fast.engine.loop import LoopResult
    from d2o_fast.train import measured_rows
    cfg = resolve_config('demo')
    start, mid, end = (dict(demo_fid=f, demo_accuracy=0.5, kimg=k) for f, k in [(40.0, 0.0), (20.0, 2.048), (5.0, 5.008)])
    full = LoopResult('run', 5008, 'snap', evaluations=[start, mid, end])
    assert measured_rows(cfg, full) == dict(raw=start, tuned=end)
    resumed = LoopResult('run', 5008, 'snap', evaluations=[mid, end])          # kimg 0 was in another process
    assert measured_rows(cfg, resumed) == dict(tuned=end)
    assert measured_rows(resolve_config('demo', reinit=True, freeze=0), full) == dict(tuned=end)  # kimg 0 is random init
    assert measured_rows(cfg, LoopResult('run', 6000, 'snap', evaluations=[start, mid, end])) == dict(raw=start)


def test_the_teacher_row_is_computed_once_per_checkpoint_settings_and_code(tmp_path, monkeypatch):
    from d2o_fast.metrics import demo_report
    monkeypatch.setenv('D2O_FAST_CACHE', str(tmp_path / 'cache'))
    init = assets.demo_checkpoint_path()
    first = demo_report.teacher_demo_metrics(init, N, batch=8, heun_steps=2, bf16=False)
    assert first == demo_report._teacher_metrics(init, N, 8, 2, False, torch.device('cpu'))
    real, calls = demo_report._teacher_metrics, []
    monkeypatch.setattr(demo_report, '_teacher_metrics', lambda *args: calls.append(args) or real(*args))
    assert demo_report.teacher_demo_metrics(init, N, batch=8, heun_steps=2, bf16=False) == first and calls == []
    three_steps = demo_report.teacher_demo_metrics(init, N, batch=8, heun_steps=3, bf16=False)
    assert len(calls) == 1 and three_steps != first
    _, other_checkpoint = _perturbed_snapshot(tmp_path)
    demo_report.teacher_demo_metrics(other_checkpoint, N, batch=8, heun_steps=2, bf16=False)
    assert len(calls) == 2
    monkeypatch.setattr(demo_report, 'sources_sha256', lambda root, suffixes: 'edited code')
    assert demo_report.teacher_demo_metrics(init, N, batch=8, heun_steps=2, bf16=False) == first and len(calls) == 3
    assert len(list((tmp_path / 'cache' / 'teacher-rows').glob('*.json'))) == 4


def test_sources_digest_follows_names_and_bytes(tmp_path):
    from d2o_fast.files import sources_sha256
    (tmp_path / 'pkg' / 'sub').mkdir(parents=True)
    (tmp_path / 'pkg' / 'a.py').write_text('x = 1\n')
    (tmp_path / 'pkg' / 'sub' / 'b.py').write_text('y = 2\n')
    (tmp_path / 'pkg' / 'notes.txt').write_text('not code')
    before = sources_sha256(tmp_path / 'pkg')
    (tmp_path / 'pkg' / 'notes.txt').write_text('still not code')
    assert sources_sha256(tmp_path / 'pkg') == before
    (tmp_path / 'pkg' / 'sub' / 'b.py').write_text('y = 3\n')
    assert sources_sha256(tmp_path / 'pkg') != before
    (tmp_path / 'pkg' / 'sub' / 'b.py').write_text('y = 2\n')
    (tmp_path / 'pkg' / 'sub' / 'b.py').rename(tmp_path / 'pkg' / 'sub' / 'c.py')
    assert sources_sha256(tmp_path / 'pkg') != before
    assert sources_sha256(tmp_path / 'pkg', ('.py', '.txt')) != sources_sha256(tmp_path / 'pkg')
