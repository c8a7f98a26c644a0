"""Networks: EDM-compatible U-Nets, preconditioners, the Heun sampler, freeze levels, random labelled inputs.

Imports only d2o_fast.ops. `build_network` is the one constructor every other layer uses.
"""

import copy

import torch

from d2o_fast.nets.dhariwal_unet import DhariwalUNet
from d2o_fast.nets.freeze import apply_freeze, format_freeze_report, freeze_report, is_frozen
from d2o_fast.nets.inputs import labelled_batch
from d2o_fast.nets.precond import PRECOND_CLASSES, D2OPrecond, EDMPrecond
from d2o_fast.nets.sampler import edm_sampler
from d2o_fast.nets.song_unet import SongUNet

# EDM's architecture presets (training/train.py of NVlabs/edm).
ARCHITECTURES = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# NVIDIA's published EDM checkpoints: file stem -> the architecture inside.
EDM_CHECKPOINTS = {
    'edm-cifar10-32x32-cond-vp':     dict(arch='ddpmpp', img_resolution=32, label_dim=10, augment_dim=9, dropout=0.13),
    'edm-cifar10-32x32-cond-ve':     dict(arch='ncsnpp', img_resolution=32, label_dim=10, augment_dim=9, dropout=0.13),
    'edm-cifar10-32x32-uncond-vp':   dict(arch='ddpmpp', img_resolution=32, label_dim=0, augment_dim=9, dropout=0.13),
    'edm-cifar10-32x32-uncond-ve':   dict(arch='ncsnpp', img_resolution=32, label_dim=0, augment_dim=9, dropout=0.13),
    'edm-ffhq-64x64-uncond-vp':      dict(arch='ddpmpp', img_resolution=64, label_dim=0, augment_dim=9, dropout=0.05, channel_mult=[1, 2, 2, 2]),
    'edm-ffhq-64x64-uncond-ve':      dict(arch='ncsnpp', img_resolution=64, label_dim=0, augment_dim=9, dropout=0.05, channel_mult=[1, 2, 2, 2]),
    'edm-afhqv2-64x64-uncond-vp':    dict(arch='ddpmpp', img_resolution=64, label_dim=0, augment_dim=9, dropout=0.25, channel_mult=[1, 2, 2, 2]),
    'edm-afhqv2-64x64-uncond-ve':    dict(arch='ncsnpp', img_resolution=64, label_dim=0, augment_dim=9, dropout=0.25, channel_mult=[1, 2, 2, 2]),
    'edm-imagenet-64x64-cond-adm':   dict(arch='adm', img_resolution=64, label_dim=1000, augment_dim=0, dropout=0.10, use_fp16=True),
}


def build_network(class_name='D2OPrecond', **init_kwargs):
    """Construct a preconditioned network from its class name and EDM-style init kwargs."""
    if class_name not in PRECOND_CLASSES:
        raise ValueError(f'unknown network class {class_name!r}; expected one of {sorted(PRECOND_CLASSES)}')
    return PRECOND_CLASSES[class_name](**init_kwargs)


def architecture_kwargs(arch, img_resolution, img_channels=3, label_dim=0, **overrides):
    """Init kwargs of an EDM architecture preset ('ddpmpp', 'ncsnpp', 'adm') with overrides."""
    if arch not in ARCHITECTURES:
        raise ValueError(f'unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}')
    kwargs = copy.deepcopy(ARCHITECTURES[arch])
    kwargs.update(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
    kwargs.update(overrides)
    return kwargs


def edm_checkpoint_kwargs(stem):
    """Init kwargs of one of NVIDIA's published checkpoints (by file stem)."""
    spec = dict(EDM_CHECKPOINTS[stem])
    return architecture_kwargs(spec.pop('arch'), **spec)


def build_on_meta(class_name='D2OPrecond', **init_kwargs):
    """Build at full size without allocating or initialising memory (parameter counting)."""
    with torch.device('meta'):
        return build_network(class_name, **init_kwargs)


__all__ = ['SongUNet', 'DhariwalUNet', 'EDMPrecond', 'D2OPrecond', 'PRECOND_CLASSES', 'ARCHITECTURES', 'EDM_CHECKPOINTS',
           'build_network', 'architecture_kwargs', 'edm_checkpoint_kwargs', 'build_on_meta', 'edm_sampler',
           'apply_freeze', 'is_frozen', 'freeze_report', 'format_freeze_report', 'labelled_batch']
