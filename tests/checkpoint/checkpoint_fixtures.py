"""Tiny networks of every architecture and EDM-style pickles of them, for the checkpoint tests."""

import torch

from d2o_fast.nets import build_network
from tests.checkpoint import persistence_imitation as persistence
from tests.nets.test_networks import inputs, jitter, tiny


def _adm_with_attention(**overrides):
    kw = tiny('adm', **overrides)
    kw['model_channels'] = 64  # 64 and 128 channels: 1 and 2 attention heads at 8x8
    return kw


VARIANTS = {
    'ddpmpp-cond-aug': tiny('ddpmpp', label_dim=10, augment_dim=9),
    'ncsnpp-uncond': tiny('ncsnpp'),
    'skip-encoder-skip-decoder': tiny('ddpmpp', encoder_type='skip', decoder_type='skip', label_dim=3),
    'adm-cond': _adm_with_attention(label_dim=5),
}


def make_net(variant, class_name='EDMPrecond', seed=1):
    """A tiny net whose modules record their constructor arguments, as EDM's persistent classes do."""
    with persistence.recording_init_args():
        net = build_network(class_name, **VARIANTS[variant])
    return jitter(net, seed=seed).eval()


def write_pickle(path, obj, **dump_kwargs):
    """An EDM-layout pickle: a dict {'ema': net, ...} (or a bare net), persistence-style."""
    with persistence.fake_upstream_modules():
        if isinstance(obj, dict) and 'dataset_kwargs' not in obj:
            dataset_kwargs = persistence.easy_dict(class_name='training.dataset.ImageFolderDataset', path='cifar10.zip',
                                                   use_labels=True, xflip=False)
            obj = dict(obj, loss_fn=persistence.EDMLoss(), augment_pipe=None, dataset_kwargs=dataset_kwargs)
        with open(path, 'wb') as f:
            persistence.dump(obj, f, **dump_kwargs)
    return path


def outputs(net, variant, seed=1):
    x, sigma, labels, extra = inputs(VARIANTS[variant], seed=seed)
    with torch.no_grad():
        return net(x, sigma, labels, **extra)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
