"""Tiny networks and data for engine tests: a 16x16, 4-class dataset and a small EDM-format init snapshot."""

import numpy as np
import pytest
import torch

from d2o_fast.checkpoint import save_snapshot
from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine.config import resolve_config
from d2o_fast.nets import architecture_kwargs, build_network

RES, CLASSES = 16, 4


def tiny_edm(label_dim=CLASSES, seed=0):
    torch.manual_seed(seed)
    kw = architecture_kwargs('ddpmpp', RES, 3, label_dim, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                             attn_resolutions=[8], dropout=0.0)
    net = build_network('EDMPrecond', **kw)
    with torch.no_grad():  # EDM zero-inits output layers; make the pre-trained stand-in non-trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def tiny_generator_and_discriminator(disc, c_dim, seed=0):
    """A 16x16 D2O generator (8 channels, random weights, no dropout) and a small `disc` discriminator: the
    projected one with a single EfficientNet-Lite0 backbone (random weights), or StyleGAN2 at width 32."""
    torch.manual_seed(seed)
    G = build_network('D2OPrecond', **architecture_kwargs('ddpmpp', RES, 3, c_dim, model_channels=8, channel_mult=[1, 2],
                                                          num_blocks=1, attn_resolutions=[8], dropout=0.0))
    if disc == 'projected':
        D = build_discriminator('projected', RES, 3, c_dim, backbones=('tf_efficientnet_lite0',), pretrained=False,
                                input_size=128)
    else:
        D = build_discriminator('stylegan2', RES, 3, c_dim, channel_base=256, channel_max=32)
    return G, D


@pytest.fixture(scope='session')
def tiny_init(tmp_path_factory):
    path = tmp_path_factory.mktemp('init') / 'tiny-edm.safetensors'
    save_snapshot(tiny_edm(), str(path))
    return str(path)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """64 random (never constant) images with labels, as a uint8 .npz."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, RES, RES, 3), dtype=np.uint8)
    labels = np.arange(64) % CLASSES
    path = tmp_path_factory.mktemp('data') / 'tiny.npz'
    np.savez(path, images=images, labels=labels)
    return str(path)


def tiny_config(tmp_path, init, data, **overrides):
    values = dict(init=init, data=data, disc='stylegan2', disc_channels=16, batch=8, kimg=0.064, tick_kimg=0.016,
                  snapshot_ticks=2, checkpoint_ticks=1, keep_checkpoints=2, eval_demo=False, grid_size=8, r1_interval=2,
                  r1_gamma=0.1, lr=1e-3, dlr=1e-3, ema_mimg=0.001, outdir=str(tmp_path / 'runs'), workers=1, seed=3)
    values.update(overrides)
    return resolve_config('demo', **values)
