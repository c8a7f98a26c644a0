"""FID: float64 moments over batch/rank splits, the Frechet formula, reference .npz, folders, generators."""

import io
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

from d2o_fast.metrics import (FeatureStats, MetricsError, fid_from_stats, frechet_distance, generator_stats,
                              image_stats, load_detector, load_stats, rank_batches, save_stats)
from d2o_fast.nets import architecture_kwargs, build_network
from tests.metrics.conftest import TinyDetector, random_images, write_folder


def direct_fid(f1, f2):
    """Slow reference: numpy mean/cov and scipy sqrtm on the whole feature matrices at once."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def features_of(images):
    with torch.no_grad():
        return TinyDetector()(torch.from_numpy(images), return_features=True).double().numpy()


def test_batched_float64_moments_equal_one_shot():
    rng = np.random.default_rng(0)
    feats = rng.normal(3.0, 2.0, size=(203, 7)) @ rng.normal(size=(7, 7))
    one_shot = FeatureStats(7)
    one_shot.update(torch.from_numpy(feats))
    mu0, s0 = one_shot.mean_cov()
    np.testing.assert_allclose(mu0, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s0, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    # Any split into batches (and float32 batches) accumulates in float64 to the same moments.
    for splits in ([1, 50, 152], [100, 103], [13] * 15 + [8]):
        stats = FeatureStats(7)
        for chunk in np.split(feats, np.cumsum(splits)[:-1]):
            stats.update(torch.from_numpy(chunk))
        mu, s = stats.mean_cov()
        assert stats.count == 203
        np.testing.assert_allclose(mu, mu0, rtol=1e-12)
        np.testing.assert_allclose(s, s0, rtol=1e-10, atol=1e-12)


def test_rank_split_covers_every_item_once():
    for n, batch, world in [(10, 3, 1), (10, 3, 2), (101, 8, 4), (5, 64, 2)]:
        shares = [rank_batches(n, batch, rank, world) for rank in range(world)]
        assert len({len(s) for s in shares}) == 1  # same number of batches on every rank (all_reduce lockstep)
        seen = torch.cat([i for s in shares for i in s]).sort().values
        assert torch.equal(seen, torch.arange(n))
    # Per-rank moments summed (what all_reduce does) equal the one-process moments.
    feats = torch.from_numpy(np.random.default_rng(1).normal(size=(37, 4)))
    total = FeatureStats(4)
    for rank in range(3):
        part = FeatureStats(4)
        for idx in rank_batches(37, 5, rank, 3):
            part.update(feats[idx])
        total.count += part.count
        total.total += part.total
        total.outer += part.outer
    whole = FeatureStats(4)
    whole.update(feats)
    for a, b in zip(total.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_frechet_distance_closed_form_gaussians():
    # Commuting covariances: FID = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, -1.0, 2.0])
    expected = 9 + 4 + 0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Rotated (non-diagonal) versions of the same Gaussians give the same distance.
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)
    # Same covariance: only the mean term remains; identical Gaussians: zero.
    s = q @ np.diag(a) @ q.T
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(13.0, rel=1e-8)
    assert abs(frechet_distance(mu1, s, mu1, s)) < 1e-8
    # Samples drawn from the Gaussians approach the closed form.
    rng = np.random.default_rng(3)
    x = rng.multivariate_normal(mu1, np.diag(a), size=200_000)
    y = rng.multivariate_normal(mu2, np.diag(b), size=200_000)
    assert direct_fid(x, y) == pytest.approx(expected, rel=0.02)
    with pytest.raises(MetricsError, match='do not match'):
        frechet_distance(mu1, np.diag(a), mu2[:2], np.diag(b[:2]))


def test_ref_npz_and_folder_fid_match_direct_computation(tmp_path, detector_path):
    detector = load_detector(detector_path)
    real, fake = random_images(60, seed=0), random_images(45, seed=1)
    real_dir, fake_dir = write_folder(tmp_path / 'real', real), write_folder(tmp_path / 'fake', fake)
    ref = image_stats(real_dir, detector, batch_size=7)
    save_stats(str(tmp_path / 'refs' / 'real.npz'), ref['mu'], ref['sigma'])
    with np.load(tmp_path / 'refs' / 'real.npz') as data:  # EDM's format: exactly mu and sigma, float64
        assert sorted(data.files) == ['mu', 'sigma']
        assert data['mu'].shape == (12,) and data['sigma'].shape == (12, 12) and data['mu'].dtype == np.float64
    loaded = load_stats(str(tmp_path / 'refs' / 'real.npz'))
    result = fid_from_stats(image_stats(fake_dir, detector, batch_size=16), loaded)
    assert result['num_images'] == 45 and result['label'] == 'proxy FID (45 images)'
    assert result['fid'] == pytest.approx(direct_fid(features_of(fake), features_of(real)), rel=1e-6)
    # A set against itself is ~0; a different set is clearly not.
    assert abs(fid_from_stats(image_stats(real_dir, detector, batch_size=64), loaded)['fid']) < 1e-6
    assert result['fid'] > 0.1
    # The first N images by sorted name; more than exist is an error.
    assert image_stats(fake_dir, detector, num_images=20)['num_images'] == 20
    with pytest.raises(MetricsError, match='found 45 images'):
        image_stats(fake_dir, detector, num_images=46)


def test_zip_source_and_grayscale_images(tmp_path, detector_path):
    detector = load_detector(detector_path)
    gray = random_images(12, seed=4, channels=1)
    folder = write_folder(tmp_path / 'gray', gray.repeat(3, axis=1))  # the RGB copy
    zpath = tmp_path / 'gray.zip'
    with zipfile.ZipFile(zpath, 'w') as zf:
        for i, img in enumerate(gray):
            buf = io.BytesIO()
            PIL.Image.fromarray(img[0]).save(buf, format='png')
            zf.writestr(f'00000/img{i:08d}.png', buf.getvalue())
    from_zip = image_stats(str(zpath), detector)
    from_folder = image_stats(folder, detector)
    np.testing.assert_allclose(from_zip['mu'], from_folder['mu'], rtol=1e-12)
    np.testing.assert_allclose(from_zip['sigma'], from_folder['sigma'], rtol=1e-10)


def test_generator_stats_are_reproducible_per_seed(detector_path):
    detector = load_detector(detector_path)
    kw = architecture_kwargs('ddpmpp', 16, 3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                             attn_resolutions=[], num_blocks=1, dropout=0.0)
    net = build_network('D2OPrecond', **kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # EDM zero-initialises output layers
    a = generator_stats(net, detector, range(10), batch_size=3)
    b = generator_stats(net, detector, range(10), batch_size=10)
    np.testing.assert_allclose(a['mu'], b['mu'], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(a['sigma'], b['sigma'], rtol=1e-4, atol=1e-7)
    assert a['num_images'] == 10
    with pytest.raises(MetricsError, match='not a one-step generator'):
        generator_stats(build_network('EDMPrecond', **kw), detector, range(4))


def test_detector_errors(tmp_path):
    with pytest.raises(MetricsError, match='inception-2015-12-05.pkl'):
        load_detector(str(tmp_path / 'nope.pt'))
    with pytest.raises(MetricsError, match='no FID detector given'):
        load_detector(None)
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a torchscript file')
    with pytest.raises(MetricsError, match='not a TorchScript detector'):
        load_detector(str(bad))
    pkl = tmp_path / 'inception-2015-12-05.pkl'
    pkl.write_bytes(b'not read with pickle.load')
    with pytest.raises(MetricsError, match='inception-2015-12-05.pt'):
        load_detector(str(pkl))
    with pytest.raises(MetricsError, match='reference statistics file not found'):
        load_stats(str(tmp_path / 'missing.npz'))
    np.savez(tmp_path / 'wrong.npz', mean=np.zeros(3))
    with pytest.raises(MetricsError, match="array 'mu' missing"):
        load_stats(str(tmp_path / 'wrong.npz'))
