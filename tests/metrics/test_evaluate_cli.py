"""The FID command line: ref -> .npz, calc from a folder (proxy label), errors as messages without a traceback."""

import numpy as np
import pytest
import torch

from d2o_fast.checkpoint import save_snapshot
from d2o_fast.evaluate import main
from d2o_fast.metrics import fid_from_stats, generator_stats, image_stats, load_detector, load_stats
from d2o_fast.nets import architecture_kwargs, build_network
from tests.metrics.conftest import random_images, write_folder


def test_ref_then_calc_from_folder(tmp_path, capsys, detector_path):
    real = write_folder(tmp_path / 'real', random_images(40, seed=0))
    fake = write_folder(tmp_path / 'fake', random_images(30, seed=5))
    ref_path = str(tmp_path / 'ref.npz')
    main(['ref', '--data', real, '--dest', ref_path, '--detector', detector_path, '--batch', '16'])
    assert 'reference statistics of 40 images' in capsys.readouterr().out
    ref = load_stats(ref_path)
    main(['calc', '--images', fake, '--ref', ref_path, '--detector', detector_path, '--num', '30'])
    line = capsys.readouterr().out.strip()
    label, value = line.rsplit(': ', 1)
    assert label == 'proxy FID (30 images)'
    expected = fid_from_stats(image_stats(fake, load_detector(detector_path)), ref)['fid']
    assert float(value) == pytest.approx(expected, abs=1e-4) and expected > 0.1


def test_cli_errors(tmp_path, detector_path, user_error):
    real = write_folder(tmp_path / 'real', random_images(8, seed=0))
    err = user_error(main, ['ref', '--data', real, '--dest', tmp_path / 'r.npz'])
    assert 'inception-2015-12-05.pkl' in err
    np.savez(tmp_path / 'r.npz', mu=np.zeros(12), sigma=np.eye(12))
    assert 'expected at least 50000' in user_error(main, ['calc', '--images', real, '--ref', tmp_path / 'r.npz',
                                                         '--detector', detector_path])
    assert 'no such file or directory' in user_error(main, ['calc', '--images', tmp_path / 'none', '--ref',
                                                           tmp_path / 'r.npz', '--detector', detector_path, '--num', '4'])
    assert 'cannot parse seeds' in user_error(main, ['calc', '--snapshot', tmp_path / 'x.pt', '--ref', tmp_path / 'r.npz',
                                                    '--detector', detector_path, '--seeds', '1-x'])


def tiny_generator(res, label_dim):
    kw = architecture_kwargs('ddpmpp', res, 3, label_dim=label_dim, model_channels=16, channel_mult=[1, 2],
                             attn_resolutions=[], num_blocks=1, dropout=0.0)
    net = build_network('D2OPrecond', **kw).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # EDM zero-initialises output layers
    return net


def test_calc_from_snapshot_matches_generator_stats(tmp_path, capsys, detector_path, user_error):
    net = tiny_generator(16, label_dim=3)
    snapshot = str(tmp_path / 'gen.safetensors')
    save_snapshot(net, snapshot)
    ref_path = str(tmp_path / 'ref.npz')
    main(['ref', '--data', write_folder(tmp_path / 'real', random_images(20, seed=0)), '--dest', ref_path,
          '--detector', detector_path])
    capsys.readouterr()
    main(['calc', '--snapshot', snapshot, '--ref', ref_path, '--detector', detector_path, '--seeds', '3-10',
          '--batch', '3'])
    label, value = capsys.readouterr().out.strip().rsplit(': ', 1)
    assert label == 'proxy FID (8 images)'
    expected = fid_from_stats(generator_stats(net, load_detector(detector_path), range(3, 11)), load_stats(ref_path))
    assert float(value) == pytest.approx(expected['fid'], rel=1e-4)
    assert 'cannot load the generator' in user_error(main, ['calc', '--snapshot', tmp_path / 'none.safetensors', '--ref',
                                                           ref_path, '--detector', detector_path, '--num', '4'])


def test_demo_command_reports_fid_and_accuracy(tmp_path, capsys):
    snapshot = str(tmp_path / 'gen.safetensors')
    save_snapshot(tiny_generator(32, label_dim=10), snapshot)
    main(['demo', '--snapshot', snapshot, '--num', '12', '--batch', '5'])
    out = capsys.readouterr().out
    assert out.startswith('demo FID (12 images): ') and 'class accuracy: 0.' in out
