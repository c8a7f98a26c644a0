"""The paper-configuration benchmark (benchmarks/paper_config.py) on small networks: both paths build the
real D2OTrainer with the options they claim, run the timed iteration and R1, and the results files are
written. The full-size numbers come from `python benchmarks/paper_config.py` (nothing here asserts a time).

    pytest benchmarks/test_paper_config.py
"""

import json

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


@pytest.mark.parametrize('path', paper_config.PATHS)
def test_run_case_and_results_files(path, tmp_path, monkeypatch):
    r = paper_config.run_case('d2o-f', path, batch=2, iters=1, threads=1, generator_kwargs=SMALL_G, disc_overrides=SMALL_D)
    assert r['s_per_it'] == pytest.approx(r['step_s'] + r['r1_s'] / 16)
    assert r['img_per_s'] == pytest.approx(2 / r['s_per_it'])
    assert r['peak_rss_gb'] > 0.1 and r['r1_s'] > 0 and r['g_phase_s'] > 0 and r['d_phase_s'] > 0
    assert all(map(lambda v: v == v and abs(v) < 1e3, (r['loss_g'], r['loss_d'])))  # finite losses
    monkeypatch.setattr(paper_config, 'RESULTS_DIR', tmp_path)
    meta = dict(device=paper_config.device_description(), threads=1, command='pytest', config='small')
    paper_config.write_results([r], meta)
    saved = json.loads((tmp_path / 'paper_config.json').read_text())
    assert saved['results'][0]['path'] == path and saved['device'] == meta['device']
    md = (tmp_path / 'paper_config.md').read_text()
    assert f'| d2o-f | {path} |' in md and 'torch ' in md
