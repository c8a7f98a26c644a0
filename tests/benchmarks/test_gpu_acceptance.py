"""The GPU acceptance command (benchmarks/gpu_acceptance.py): its CPU smoke end to end, and the orchestration's
parts (budgets, deadlines, background builds, test results, exit codes, the report of a GPU run) on stand-ins."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks import acceptance_report
from benchmarks import gpu_acceptance as acceptance

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPORT_STAGES = ['environment', 'warm_caches', 'gpu_tests', 'demo', 'bandwidth', 'train_step']


def python(code):
    return [sys.executable, '-c', textwrap.dedent(code)]

#----------------------------------------------------------------------------
# Budgets and deadlines.

def test_budgets_fit_the_total():
    for mode in acceptance.MODES:
        stages = sum(s.budget_s[mode] for s in acceptance.STAGES)
        assert stages + acceptance.MARGIN_S[mode] <= acceptance.TOTAL_BUDGET_S[mode], mode
    assert acceptance.TOTAL_BUDGET_S['gpu'] == 8 * 60  # one H100, 8 minutes
    train_step = next(s for s in acceptance.STAGES if s.name == 'train_step')
    assert sum(p.budget_s for p in acceptance.TRAIN_PATHS) <= train_step.budget_s['gpu']


def test_unused_time_passes_to_later_stages():
    assert acceptance.with_slack(10, 20, 100) == 80       # 70 s nobody else needs
    assert acceptance.with_slack(10, 20, 25) == 10        # never less than its own budget
    clock = acceptance.Clock(100, 10, scale=2)            # deadline 190 s
    assert clock.timeout(30, 40) == pytest.approx(190 - 2 * 40, abs=1)


def test_processes_are_cut_at_their_deadline_with_their_children(tmp_path):
    pid_file = tmp_path / 'child.pid'
    hang = python(f'''
        import pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
        pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))
        time.sleep(120)''')
    quick = python('raise SystemExit(3)')
    codes, seconds = acceptance.run_processes([(hang, tmp_path / 'a.log', None), (quick, tmp_path / 'b.log', None)], 3)
    assert codes == [None, 3] and seconds < 30
    child = int(pid_file.read_text())
    time.sleep(0.5)
    status = pathlib.Path(f'/proc/{child}/status')
    assert not status.exists() or 'State:\tZ' in status.read_text()  # gone, or a zombie waiting to be reaped


def test_background_stops_the_running_command_and_drops_the_rest(tmp_path):
    marker = tmp_path / 'third-ran'
    commands = [(python('pass'), tmp_path / '1.log', None),
                (python('import time; time.sleep(120)'), tmp_path / '2.log', None),
                (python(f'open({str(marker)!r}, "w")'), tmp_path / '3.log', None)]
    background = acceptance.Background(commands)
    t0 = time.monotonic()
    while background.proc is None or background.proc.args != commands[1][0]:
        assert time.monotonic() - t0 < 60
        time.sleep(0.1)
    assert background.stop() == [0] and not marker.exists() and time.monotonic() - t0 < 60

def test_compile_caches_warm_in_the_background_until_the_measurements(tmp_path, monkeypatch):
    """GPU mode: the compiled paths are built one after another in the background; stopping it reports those
    whose build finished (the first stand-in build finishes, the second hangs, the others never start)."""
    def stand_in(self, stage, result, *args):
        hang = 'time.sleep(120)' if 'step' in ' '.join(args) else ''
        return python(f'''
            import json, pathlib, time
            {hang}
            pathlib.Path({str(result)!r}).write_text(json.dumps(dict(status='passed')))''')
    monkeypatch.setattr(acceptance.Acceptance, 'worker', stand_in)
    run = acceptance.Acceptance(tmp_path, 'gpu', ['train_step'], shards=None, budget_scale=1.0)
    run.start_warming()
    compiled = [p.name for p in acceptance.TRAIN_PATHS if p.config.get('compile')]
    first = tmp_path / 'stages' / f'warm--{acceptance.slug(compiled[0])}.json'
    t0 = time.monotonic()
    while not first.exists():
        assert time.monotonic() - t0 < 60
        time.sleep(0.1)
    result = run.stop_warming()
    assert result['status'] == 'overrun' and result['details'] == dict(built=compiled[:1], paths=compiled)
    assert time.monotonic() - t0 < 60

#----------------------------------------------------------------------------
# Reading the stages' output.

JUNIT = '''<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.ops.test_group_norm_act_gpu" name="test_unet_sites[cuda-a]" time="0.5"/>
<testcase classname="tests.ops.test_group_norm_act_gpu" name="test_unet_sites[triton-b]" time="2.5">
  <failure message="AssertionError: dx: Tensor-likes are not close!&#10;Mismatched elements: 3">trace</failure></testcase>
<testcase classname="tests.data.test_dali_gpu" name="test_jpeg" time="0.0">
  <skipped type="pytest.skip" message="could not import 'apex'">skip</skipped></testcase>
<testcase classname="tests.engine.test_trainer_gpu" name="test_run" time="9.0"><error message="fixture failed"/></testcase>
</testsuite></testsuites>'''
VERBOSE = '''tests/ops/test_group_norm_act_gpu.py::test_edge_shapes[cuda-x] PASSED [  1%]
tests/ops/test_group_norm_act_gpu.py::test_edge_shapes[cuda-y] SKIPPED (needs a CUDA device) [  2%]
tests/ops/test_group_norm_act_gpu.py::test_edge_shapes[cuda-z] '''


def test_test_results_from_junit_and_from_a_cut_shard(tmp_path):
    (tmp_path / 'j0.xml').write_text(JUNIT)
    (tmp_path / 'l1.log').write_text(VERBOSE)
    xmls, logs = [tmp_path / 'j0.xml', tmp_path / 'j1.xml'], [tmp_path / 'l0.log', tmp_path / 'l1.log']
    result = acceptance.summarize_tests([1, None], xmls, logs, 12.0, ['f.py'], smoke=False)
    assert result['status'] == 'failed' and result['details']['counts'] == dict(passed=2, failed=1, error=1, skipped=2)
    assert result['failed_checks'] == [
        'tests.ops.test_group_norm_act_gpu::test_unet_sites[triton-b]: AssertionError: dx: Tensor-likes are not close!',
        'tests.engine.test_trainer_gpu::test_run: fixture failed']
    assert result['details']['problems'] == ['shard 1 cut at the stage budget']
    assert result['details']['skip_reasons'] == {"could not import 'apex'": 1, '': 1}
    assert result['details']['slowest'][0] == dict(id='tests.engine.test_trainer_gpu::test_run', seconds=9.0)

    cut = acceptance.summarize_tests([None], [tmp_path / 'none.xml'], [tmp_path / 'l1.log'], 5.0, [], smoke=False)
    assert cut['status'] == 'overrun' and not cut['failed_checks']
    nothing_ran = acceptance.summarize_tests([5], [tmp_path / 'none.xml'], [tmp_path / 'empty.log'], 1.0, [], smoke=False)
    assert nothing_ran['status'] == 'failed' and nothing_ran['failed_checks'] == ['no GPU test ran']


def test_exit_codes():
    stage = lambda kind, status, failed=(): dict(kind=kind, status=status, failed_checks=list(failed))
    passed = [stage('correctness', 'passed'), stage('measurement', 'passed')]
    assert acceptance.exit_code(passed) == 0
    assert acceptance.exit_code(passed + [stage('measurement', 'overrun'), stage('preparation', 'overrun')]) == 0
    assert acceptance.exit_code(passed + [stage('correctness', 'overrun')]) == 2
    assert acceptance.exit_code(passed + [stage('correctness', 'overrun'), stage('correctness', 'failed')]) == 1
    assert acceptance.exit_code(passed + [stage('measurement', 'passed', ['triton self-check failed'])]) == 1


def test_gpu_test_files_are_the_marked_ones():
    files = {str(p.relative_to(ROOT)) for p in acceptance.gpu_test_files()}
    assert {'tests/ops/test_group_norm_act_gpu.py', 'tests/data/test_dali_gpu.py', 'tests/engine/test_trainer_gpu.py',
            'tests/checkpoint/test_precision.py'} <= files

#----------------------------------------------------------------------------
# The report of a GPU run (what the workers return there), read as a user would.

def gpu_report():
    row = lambda impl, fwd, share: dict(shape=[64, 128, 32, 32], layout='nhwc', modulation='add', dtype='bfloat16',
                                        implementation=impl, forward_ms=0.05, backward_ms=0.09, forward_gbs=fwd,
                                        backward_gbs=fwd * 0.9, forward_share_of_peak=share,
                                        backward_share_of_peak=share * 0.9)
    variants = lambda d2o, d2o_f: {'d2o': dict(img_per_s=d2o, peak_mem_gb=20.5, build_s=95.0),
                                   'd2o-f': dict(img_per_s=d2o_f, peak_mem_gb=18.25, build_s=40.0)}
    paths = [dict(path='eager fp32', status='passed', summary='', details=dict(
                 batch=64, kernels='torch', variants=variants(250.0, 300.0), d2o_f_over_d2o=1.2)),
             dict(path='compiled bf16 + fused', status='passed', summary='', details=dict(
                 batch=64, kernels='auto', variants=variants(1000.0, 1250.0), d2o_f_over_d2o=1.25)),
             dict(path='compiled bf16 + fused + CUDA graphs (step)', status='skipped', details={},
                  summary='this engine has no --cudagraphs step'),
             dict(path='compiled bf16', status='overrun', details={}, summary='cut at its budget of 25 s')]
    details = {
        'environment': dict(versions=dict(torch='2.13.0+cu130', triton='3.9.0'), checks=[
            dict(name='CUDA kernels of the fused op', ok=True, required=True, detail='available')],
            gpu=dict(name='NVIDIA H100 80GB HBM3', peak_bandwidth_gbs=3352.3, nvml=dict(nvml='ok', power_w=120.5))),
        'warm_caches': dict(built=['compiled bf16 + fused'], paths=['compiled bf16 + fused', 'compiled bf16']),
        'gpu_tests': dict(shards=4, files=['a.py'], counts=dict(passed=700, failed=1, error=0, skipped=2),
                          failures=['tests.x::test_y[triton]: AssertionError'], skip_reasons={'no apex': 2},
                          slowest=[dict(id='tests.x::test_z', seconds=12.5)], problems=[]),
        'demo': dict(table=[dict(name='(a) raw', nfe=1, fid=44.0, accuracy=0.19), dict(name='(b) heun', nfe=35, fid=7.7,
                     accuracy=None), dict(name='(c) tuned', nfe=1, fid=6.1, accuracy=1.0)],
                     setup=['Data: ... device cuda:0; loader DaliLoader; kernels auto'],
                     ticks=[dict(kimg=0.5, img_per_sec=900.0, gpu_util=55.0)]),
        'bandwidth': dict(peak_gbs=3352.3, peak_source='NVML clock x bus width', reps=30,
                          implementations=['cuda', 'triton', 'torch'],
                          rows=[row('cuda', 2600.0, 0.78), row('torch', 700.0, 0.21)],
                          self_check=[dict(backend='cuda', device='cuda:0', dtype='torch.bfloat16', layout='nhwc',
                                           configuration='torch.float32, torch.bfloat16, None, None, silu=True',
                                           trusted=True)]),
        'train_step': dict(paths=paths)}
    statuses = dict(gpu_tests='failed', train_step='overrun', warm_caches='overrun')
    stages = [dict(name=n, title=n.title(), kind='correctness', checks='what it checks', status=statuses.get(n, 'passed'),
                   budget_s=60, wall_s=30.0, summary=f'{n} summary', logs=[f'/out/stages/{n}.log'],
                   failed_checks=['tests.x::test_y[triton]: AssertionError'] if n == 'gpu_tests' else [],
                   details=details[n]) for n in REPORT_STAGES]
    return dict(schema=acceptance.SCHEMA, mode='gpu', command='benchmarks/gpu_acceptance.py --outdir /out',
                started='2026-01-01T00:00:00+00:00', wall_s=455.0, budget_s=480, exit_code=1, verdict='failed',
                stages=stages)


def test_report_of_a_gpu_run(tmp_path):
    json_path, md_path = acceptance_report.write_report(gpu_report(), tmp_path)
    assert json.loads(json_path.read_text())['verdict'] == 'failed'
    md = md_path.read_text()
    assert md.startswith('# GPU acceptance: FAILED (exit code 1)')
    assert '| 3 | Gpu_Tests | correctness | **failed** | 30 / 60 | gpu_tests summary |' in md
    assert '- tests.x::test_y[triton]: AssertionError' in md and '| no apex | 2 |' in md
    assert '| name | NVIDIA H100 80GB HBM3 |' in md and '| power_w | 120.5 |' in md
    assert '| 64x128x32x32 | nhwc | add | bfloat16 | cuda | 0.050 | 2600 | 78% | 0.090 | 2340 | 70% |' in md
    assert '| cuda | cuda:0 | torch.bfloat16 | nhwc | torch.float32, torch.bfloat16, None, None, silu=True | yes |' in md
    assert ('| compiled bf16 + fused | passed | 1000.0 | 1250.0 | 1.25x | 4.00x / 4.17x | 20.50 / 18.25 | 95 / 40 | '
            'auto |') in md
    assert '| compiled bf16 + fused + CUDA graphs (step) | skipped |' in md and 'this engine has no --cudagraphs' in md
    assert '| (b) heun | 35 | 7.70 | - |' in md and '| (c) tuned | 1 | 6.10 | 100.0% |' in md
    for stage in gpu_report()['stages']:
        assert acceptance_report.HOW_TO_READ[stage['name']] in md

#----------------------------------------------------------------------------
# The CPU smoke: the whole command on tiny CPU stand-ins.

@pytest.mark.slow
def test_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_acceptance.py'), '--outdir', str(tmp_path),
                           '--cpu-smoke'], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / 'acceptance.json').read_text())
    assert report['schema'] == acceptance.SCHEMA and report['mode'] == 'cpu-smoke' and report['verdict'] == 'passed'
    assert {'command', 'started', 'wall_s', 'budget_s', 'exit_code', 'stages'} <= set(report)
    stages = {s['name']: s for s in report['stages']}
    assert [s['name'] for s in report['stages']] == REPORT_STAGES
    for s in report['stages']:
        assert s['status'] in acceptance.STATUSES and s['kind'] in ('correctness', 'measurement', 'preparation')
        assert s['checks'] and s['summary'] and s['budget_s'] >= 0 and not s['failed_checks']
    assert stages['warm_caches']['status'] == 'skipped'
    assert [s['status'] for n, s in stages.items() if n != 'warm_caches'] == ['passed'] * 5
    counts = stages['gpu_tests']['details']['counts']
    assert counts['skipped'] > 700 and counts['passed'] == counts['failed'] == counts['error'] == 0
    assert stages['gpu_tests']['details']['skip_reasons'] == {'needs a CUDA device': counts['skipped']}
    assert len(stages['demo']['details']['table']) == 3
    rows = stages['bandwidth']['details']['rows']
    assert {r['implementation'] for r in rows} == {'cpu', 'torch'} and all(r['forward_ms'] > 0 for r in rows)
    assert all(v['trusted'] for v in stages['bandwidth']['details']['self_check'])
    paths = {p['path']: p for p in stages['train_step']['details']['paths']}
    assert list(paths) == [p.name for p in acceptance.TRAIN_PATHS]
    for path in acceptance.TRAIN_PATHS:
        row = paths[path.name]
        if path.smoke:
            assert row['status'] == 'passed' and row['details']['variants']['d2o-f']['img_per_s'] > 0
        else:
            assert row['status'] == 'skipped' and (row['summary'] == 'GPU only') == path.gpu_only
    md = (tmp_path / 'acceptance.md').read_text()
    assert md.startswith('# GPU acceptance: PASSED (exit code 0)')
    assert all(f'## {i + 1}. {s["title"]}: {s["status"]}' in md for i, s in enumerate(report['stages']))


@pytest.mark.slow
def test_gpu_tests_in_shards(tmp_path):
    """Two pytest processes share the GPU tests: each collects all, keeps its half, and the results add up."""
    run = acceptance.Acceptance(tmp_path, 'cpu-smoke', ['gpu_tests'], shards=2, budget_scale=1.0)
    result = run.gpu_tests(acceptance.STAGES[1], timeout=600)
    assert result['status'] == 'passed' and result['details']['shards'] == 2
    per_shard = [acceptance.read_junit(tmp_path / 'stages' / f'gpu_tests-{i}.xml') for i in range(2)]
    ids = [{c['id'] for c in cases} for cases in per_shard]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert result['details']['counts']['skipped'] == len(ids[0]) + len(ids[1]) > 700


def test_without_a_gpu_the_gpu_mode_stops_after_the_environment(tmp_path):
    torch = pytest.importorskip('torch')
    if torch.cuda.is_available():
        pytest.skip('a GPU is present')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_acceptance.py'), '--outdir', str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    report = json.loads((tmp_path / 'acceptance.json').read_text())
    assert proc.returncode == 1 and report['mode'] == 'gpu' and report['verdict'] == 'failed'
    stages = {s['name']: s for s in report['stages']}
    assert stages['environment']['status'] == 'failed' and 'CUDA device' in stages['environment']['failed_checks']
    assert all(s['status'] == 'skipped' and 'no CUDA device' in s['summary']
               for name, s in stages.items() if name != 'environment')
