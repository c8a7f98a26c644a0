"""The shipped demo classifier: loads, classifies the demo digits, gives a demo FID of ~0 on real data."""

import numpy as np
import pytest
import torch

from d2o_fast.data.demo import demo_images
from d2o_fast.metrics import MetricsError
from d2o_fast.metrics.demo_classifier import (DEFAULT_WEIGHTS, classify, demo_classifier_info, demo_metrics,
                                              demo_reference_stats, load_demo_classifier, split_demo_data,
                                              train_demo_classifier)
from d2o_fast.metrics.feature_stats import frechet_distance


@pytest.fixture(scope='module')
def real():
    images, labels = demo_images()
    return torch.from_numpy(images).to(torch.float32) / 127.5 - 1, torch.from_numpy(labels)


def test_shipped_weights_classify_demo_digits(real):
    classifier = load_demo_classifier()
    info = demo_classifier_info()
    assert float(info['val_accuracy']) >= 0.95 and 'train-demo-classifier' in info['command']
    _, _, val_x, val_y = split_demo_data()
    assert (classify(classifier, val_x) == val_y).double().mean() >= 0.95  # held-out digits
    images, labels = real
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    result = demo_metrics(images, one_hot)
    assert result['accuracy'] >= 0.95 and result['num_images'] == 1797
    assert demo_metrics(images, labels)['accuracy'] == result['accuracy']  # int labels work the same
    # The data against its own statistics: ~0 (the uint8 round trip is exact).
    assert abs(result['fid']) < 1e-4  # sqrtm round-off only
    assert demo_metrics(images, None)['accuracy'] is None


def test_demo_fid_separates_real_from_noise_and_halves(real):
    images, labels = real
    ref = demo_reference_stats()
    noise = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_result = demo_metrics(noise, labels[:500], ref)
    half_a = demo_metrics(images[0::2], labels[0::2], ref)
    assert noise_result['fid'] > 50 * max(half_a['fid'], 1e-3)
    assert noise_result['accuracy'] < 0.5
    # Cross-check the Frechet distance against a direct computation on the classifier features.
    classifier = load_demo_classifier()
    with torch.no_grad():
        f_half = classifier((images[0::2] * 127.5 + 128).clamp(0, 255).to(torch.uint8), return_features=True).double()
    mu, sigma = f_half.mean(0).numpy(), np.cov(f_half.numpy(), rowvar=False)
    direct = frechet_distance(mu, sigma, ref['mu'], ref['sigma'])
    assert half_a['fid'] == pytest.approx(direct, rel=1e-4)  # float32 features batched differently


def test_training_runs_and_is_deterministic(tmp_path):
    a = train_demo_classifier(str(tmp_path / 'a.safetensors'), epochs=1, log=lambda _msg: None)
    b = train_demo_classifier(str(tmp_path / 'b.safetensors'), epochs=1, log=lambda _msg: None)
    net_a, net_b = load_demo_classifier(a['path']), load_demo_classifier(b['path'])
    for (name, pa), pb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert 0 <= a['val_accuracy'] <= 1


def test_classifier_errors(tmp_path):
    with pytest.raises(MetricsError, match='train-demo-classifier'):
        load_demo_classifier(str(tmp_path / 'missing.safetensors'))
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'garbage')
    with pytest.raises(MetricsError, match='not a demo classifier file'):
        load_demo_classifier(str(bad))
    with pytest.raises(MetricsError, match=r'\[N, 3, 32, 32\]'):
        demo_metrics(torch.zeros(4, 3, 16, 16))
    with pytest.raises(MetricsError, match='uint8'):
        load_demo_classifier()(torch.zeros(2, 3, 32, 32))
    assert DEFAULT_WEIGHTS.endswith('demo_classifier.safetensors')
