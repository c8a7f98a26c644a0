"""The paper-configuration benchmark (benchmarks/paper_config.py) on small networks: our paths build the real
D2OTrainer with the options they claim, every case runs the timed iteration, R1 and the FLOP count, and the
results files are written (saying when no peer was measured). The full-size numbers come from
`python benchmarks/paper_config.py [--authors-src DIR]` (nothing here asserts a time).

    pytest benchmarks/test_paper_config.py
"""

import json
import subprocess
import sys

import pytest
import torch

import paper_config
from d2o_fast.nets import architecture_kwargs

SMALL_G = architecture_kwargs('ncsnpp', 32, 3, 0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                              attn_resolutions=[16], dropout=0)
SMALL_D = dict(backbones=('tf_efficientnet_lite0',), input_size=128)


def test_paths_configure_the_engine():
    eager = paper_config.build_trainer('d2o', 'eager', 2, SMALL_G, SMALL_D)
    fast = paper_config.build_trainer('d2o-f', 'fastest', 2, SMALL_G, SMALL_D)
    assert eager.g_dtype is None and eager.d_dtype is None and not eager.D.channels_last
    assert fast.g_dtype == torch.bfloat16 and fast.d_dtype == torch.bfloat16 and fast.D.channels_last
    assert fast.cfg.disc_pair_forward and not eager.cfg.disc_pair_forward
    assert eager.cfg.freeze == 0 and fast.cfg.freeze == 1
    assert len(fast.g_params) < len(eager.g_params)
    assert fast.G.init_kwargs['dropout'] == 0  # as the training entry point
    reuse = paper_config.build_trainer('d2o-f', 'reuse', 2, SMALL_G, SMALL_D)
    assert reuse.reuse_fakes and not fast.reuse_fakes and not eager.reuse_fakes
    for reuse_path, base in paper_config.REUSE_OF.items():
        options = dict(paper_config.OUR_PATHS[reuse_path])
        assert options.pop('reuse_fakes') is True and options == paper_config.OUR_PATHS[base]


@pytest.fixture(scope='module')
def small_runs():
    return {path: paper_config.run_case('d2o-f', path, batch=2, iters=1, threads=1, generator_kwargs=SMALL_G,
                                        disc_overrides=SMALL_D) for path in paper_config.OUR_PATHS}


@pytest.mark.parametrize('path', paper_config.PATHS)
def test_run_case(path, small_runs):
    r = small_runs[path]
    assert (r['side'], r['variant'], r['path'], r['freeze'], r['r1_interval']) == ('ours', 'd2o-f', path, 1, 16)
    assert r['s_per_it'] == pytest.approx(r['step_s'] + r['r1_s'] / 16)
    assert r['img_per_s'] == pytest.approx(2 / r['s_per_it'])
    assert r['peak_rss_gb'] > 0.1 and r['r1_s'] > 0 and r['g_phase_s'] > 0 and r['d_phase_s'] > 0
    assert 0 < r['g_phase_s'] + r['d_phase_s'] <= r['step_s']
    assert all(map(lambda v: v == v and abs(v) < 1e3, (r['loss_g'], r['loss_d'])))  # finite losses
    flops = r['flops']
    assert flops['G'] > 0 and flops['D'] > 0 and flops['R1'] > 0
    assert flops['per_iteration'] == pytest.approx(flops['G'] + flops['D'] + flops['R1'] / 16)
    assert r['threads'] == 1 and r['torch'] == torch.__version__ and r['kernels']


def test_both_paths_count_the_same_flops(small_runs):
    """bf16 and channels_last change how the step runs, not what it computes (the pair forward runs the backbones
    once on fakes and reals together: the same convolutions)."""
    eager, fastest = small_runs['eager']['flops'], small_runs['fastest']['flops']
    for phase in ('G', 'D', 'R1'):
        assert fastest[phase] == pytest.approx(eager[phase], rel=1e-6), phase


@pytest.mark.parametrize('reuse_path', sorted(paper_config.REUSE_OF))
def test_reuse_removes_the_d_steps_generator_and_backbone_pass_on_fakes(small_runs, reuse_path):
    """A reuse path's D step counts exactly the FLOPs of its base path minus a no-grad generator forward and a
    pass of the frozen feature networks on the fakes (counted here on their own); G and R1 steps are unchanged."""
    base_path = paper_config.REUSE_OF[reuse_path]
    fastest, reuse = small_runs[base_path]['flops'], small_runs[reuse_path]['flops']
    assert reuse['G'] == fastest['G'] and reuse['R1'] == fastest['R1']
    trainer = paper_config.build_trainer('d2o-f', base_path, 2, SMALL_G, SMALL_D)
    z = torch.randn(2, 3, 32, 32)
    with paper_config.flop_counter() as counter:
        fake = trainer.generate(z, None, grad=False)
    g_forward = counter.get_total_flops()
    with paper_config.flop_counter() as counter, torch.no_grad():
        trainer.D.features(fake)
    backbones = counter.get_total_flops()
    assert g_forward > 0 and backbones > 0
    assert fastest['D'] - reuse['D'] == g_forward + backbones
    assert reuse['per_iteration'] < fastest['per_iteration']


def test_results_files_without_a_peer(small_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(paper_config, 'RESULTS_DIR', tmp_path)
    meta = dict(device=paper_config.device_description(), threads=1, command='pytest', config='small',
                torch=torch.__version__, commit=paper_config.git_commit(paper_config.REPO_DIR))
    results = [dict(small_runs[path], repeat=0) for path in paper_config.PATHS]
    paper_config.write_results(results, meta)
    saved = json.loads((tmp_path / 'paper_config.json').read_text())
    assert [r['path'] for r in saved['results']] == list(paper_config.PATHS) and saved['device'] == meta['device']
    assert saved['ratios'] == [] and len(saved['table']) == len(paper_config.PATHS)
    md = (tmp_path / 'paper_config.md').read_text()
    assert 'No peer was measured in this run' in md and 'Ours / theirs' not in md
    assert sorted(r['reuse'] for r in saved['reuse_ratios']) == sorted(paper_config.REUSE_OF)
    assert '## Reusing the G step\'s fakes' in md
    for reuse in saved['reuse_ratios']:
        assert (reuse['variant'], reuse['base']) == ('d2o-f', paper_config.REUSE_OF[reuse['reuse']])
        assert reuse['flops'] == pytest.approx(small_runs[reuse['reuse']]['flops']['per_iteration']
                                               / small_runs[reuse['base']]['flops']['per_iteration'])
        assert reuse['flops'] < 1 and reuse['d_flops'] < 1
        assert f'| d2o-f | {reuse["reuse"]} | {reuse["base"]} | {reuse["flops"]:.3f} |' in md
    for path in paper_config.PATHS:
        assert f'| ours | d2o-f | {path} |' in md
    assert f'torch {torch.__version__}' in md and meta['commit'].split()[0] in md


def test_ratios_pair_every_path_of_ours_with_every_path_of_theirs(small_runs):
    theirs = [dict(small_runs['eager'], side='authors', path=path, s_per_it=2 * small_runs['eager']['s_per_it'],
                   peak_rss_gb=4.0, flops=dict(small_runs['eager']['flops'], per_iteration=1e12))
              for path in ('fp32', 'bf16-unet')]
    ours = [small_runs[path] for path in paper_config.PATHS]
    table = paper_config.summarize(ours + theirs)
    rows = {(r['ours'], r['theirs']): r for r in paper_config.ratios(table)}
    assert set(rows) == {(o, t) for o in paper_config.PATHS for t in ('fp32', 'bf16-unet')}
    r = rows['eager', 'fp32']
    assert r['img_per_s'] == pytest.approx(2.0)
    assert r['peak_rss'] == pytest.approx(small_runs['eager']['peak_rss_gb'] / 4.0)
    assert r['flops'] == pytest.approx(small_runs['eager']['flops']['per_iteration'] / 1e12)


def _authors_checkout(tmp_path):
    """A folder with the files check_source requires of a checkout of the authors' code (all empty)."""
    checkout = tmp_path / 'authors'
    for name in paper_config.authors_iteration.REQUIRED_FILES:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).touch()
    return checkout


def _main_with_canned_cases(monkeypatch, tmp_path, case, *argv):
    """paper_config.main() on `argv`, with `case` in place of the child processes and the results in tmp_path/results."""
    monkeypatch.setattr(paper_config, 'run_in_subprocess', case)
    monkeypatch.setattr(paper_config, 'RESULTS_DIR', tmp_path / 'results')
    monkeypatch.setattr(sys, 'argv', ['paper_config.py', *argv])
    paper_config.main()


def test_a_run_with_a_peer_writes_the_ratios(small_runs, tmp_path, monkeypatch, capsys):
    """main() with --authors-src: every case of the schedule runs (here: canned results in place of the child
    processes), the report names the peer and gives ours / theirs for every pair of paths."""
    checkout = _authors_checkout(tmp_path)
    ran = []

    def fake_case(side, variant, path, batch, iters, threads, authors_src=None):
        ran.append((side, variant, path))
        base = small_runs['eager' if side == 'authors' else path]
        slower = 3.0 if side == 'authors' else 1.0
        return dict(base, side=side, variant=variant, path=path, s_per_it=base['s_per_it'] * slower,
                    img_per_s=base['img_per_s'] / slower)
    _main_with_canned_cases(monkeypatch, tmp_path, fake_case, '--authors-src', str(checkout), '--repeats', '2')
    ours = list(paper_config.OUR_PATHS)
    assert ran == paper_config.schedule(paper_config.VARIANTS, ours, ['fp32'], 0) + paper_config.schedule(
        paper_config.VARIANTS, ours, ['fp32'], 1)
    saved = json.loads((tmp_path / 'results' / 'paper_config.json').read_text())
    assert saved['authors_src'] == str(checkout.resolve()) and saved['authors_commit'] is None
    assert saved['cpu_capability'] == torch.backends.cpu.get_cpu_capability() and 'onednn_bf16' in saved
    assert len(saved['results']) == len(ran) and {t['repeats'] for t in saved['table']} == {2}
    by_pair = {(r['variant'], r['ours'], r['theirs']): r for r in saved['ratios']}
    assert set(by_pair) == {(v, o, 'fp32') for v in paper_config.VARIANTS for o in paper_config.PATHS}
    assert by_pair['d2o', 'eager', 'fp32']['img_per_s'] == pytest.approx(3.0)
    md = (tmp_path / 'results' / 'paper_config.md').read_text()
    assert 'CPU kernels: ' in md and 'No peer was measured' not in md and '## Ours / theirs, same run' in md and '| d2o | eager | fp32 | 3.00x |' in md
    assert 'ours eager    / theirs fp32     : images/s 3.00x' in capsys.readouterr().out


def test_a_subset_of_variants_and_paths_runs_only_those_cases(small_runs, tmp_path, monkeypatch):
    checkout = _authors_checkout(tmp_path)
    ran = []

    def fake_case(side, variant, path, batch, iters, threads, authors_src=None):
        ran.append((side, variant, path))
        return dict(small_runs['eager' if side == 'authors' else path], side=side, variant=variant, path=path)
    _main_with_canned_cases(monkeypatch, tmp_path, fake_case, '--authors-src', str(checkout), '--variants', 'd2o-f',
                            '--paths', 'eager,eager-reuse')
    assert ran == [('ours', 'd2o-f', 'eager'), ('authors', 'd2o-f', 'fp32'), ('ours', 'd2o-f', 'eager-reuse')]
    saved = json.loads((tmp_path / 'results' / 'paper_config.json').read_text())
    assert [(r['reuse'], r['base']) for r in saved['reuse_ratios']] == [('eager-reuse', 'eager')]
    assert {(r['variant'], r['ours']) for r in saved['ratios']} == {('d2o-f', 'eager'), ('d2o-f', 'eager-reuse')}


def test_schedule_interleaves_ours_and_theirs_and_alternates_the_order():
    ours = list(paper_config.OUR_PATHS)
    first = paper_config.schedule(paper_config.VARIANTS, ours, ['fp32', 'bf16-unet'], repeat=0)
    assert first[:4] == [('ours', 'd2o', 'eager'), ('authors', 'd2o', 'fp32'), ('ours', 'd2o', 'fastest'),
                         ('authors', 'd2o', 'bf16-unet')]
    assert len(first) == len(set(first)) == 2 * (len(paper_config.OUR_PATHS) + 2)
    assert paper_config.schedule(paper_config.VARIANTS, ours, ['fp32', 'bf16-unet'], repeat=1) == first[::-1]
    one = paper_config.schedule(paper_config.VARIANTS, ours, ['fp32'], repeat=0)
    assert one[:3] == [('ours', 'd2o', 'eager'), ('authors', 'd2o', 'fp32'), ('ours', 'd2o', 'fastest')]
    assert all(side == 'ours' for side, _, _ in paper_config.schedule(paper_config.VARIANTS, ours, [], repeat=0))
    assert paper_config.schedule(['d2o-f'], ['eager'], ['fp32'], repeat=0) == [('ours', 'd2o-f', 'eager'),
                                                                            ('authors', 'd2o-f', 'fp32')]


@pytest.mark.parametrize('args, message', [
    (['--authors-src', '/nonexistent/authors'], 'no such directory'),
    (['--authors-src', '.'], 'is not a checkout of github.com/Zyriix/D2O'),
    (['--variant', 'd2o', '--path', 'fp32'], "is not a path of side 'ours'"),
    (['--variant', 'd2o', '--path', 'fp32', '--side', 'authors'], 'needs --authors-src'),
    (['--iters', '0'], '--iters must be at least 1'),
    (['--authors-paths', 'fp32,fp16'], '--authors-paths fp32,fp16: expected'),
    (['--paths', 'eager,compiled'], '--paths eager,compiled: expected'),
    (['--variants', 'd2o,edm'], '--variants d2o,edm: expected'),
])
def test_bad_arguments_exit_with_a_message(args, message, tmp_path):
    done = subprocess.run([sys.executable, paper_config.__file__, *args], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
