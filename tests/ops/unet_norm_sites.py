"""Every GroupNorm call of the four U-Nets D2O starts from, as data: the fused kernels' GPU tests run on all of them.

    UNET_NORM_SITES[checkpoint stem] = sorted (channels, height, width, eps, modulation, silu); 32 groups everywhere
    modulation: 'none' (plain GN), 'add' (SongUNet: GN(x + emb)), 'scale_shift' (DhariwalUNet: GN(x) * (1 + s) + t)

`norm_sites(stem)` finds them with a forward pass on the meta device; test_unet_norm_sites.py keeps the table equal
to it. The DDPM++ and NCSN++ U-Nets of CIFAR-10 share their sites; the 64x64 NCSN++ (FFHQ, AFHQv2) adds the 64x64
level; ImageNet's ADM has the most.
"""

import torch

from d2o_fast.nets import build_network, edm_checkpoint_kwargs
from d2o_fast.nets.layers import GroupNorm

NUM_GROUPS = 32

UNET_NORM_SITES = {
    'edm-cifar10-32x32-cond-ve': [
        (128, 32, 32, 1e-06, 'none', True), (256, 8, 8, 1e-06, 'add', True), (256, 8, 8, 1e-06, 'none', False),
        (256, 8, 8, 1e-06, 'none', True), (256, 16, 16, 1e-06, 'add', True), (256, 16, 16, 1e-06, 'none', False),
        (256, 16, 16, 1e-06, 'none', True), (256, 32, 32, 1e-06, 'add', True), (256, 32, 32, 1e-06, 'none', True),
        (384, 32, 32, 1e-06, 'none', True), (512, 8, 8, 1e-06, 'none', True), (512, 16, 16, 1e-06, 'none', True),
        (512, 32, 32, 1e-06, 'none', True),
    ],
    'edm-cifar10-32x32-cond-vp': [
        (128, 32, 32, 1e-06, 'none', True), (256, 8, 8, 1e-06, 'add', True), (256, 8, 8, 1e-06, 'none', False),
        (256, 8, 8, 1e-06, 'none', True), (256, 16, 16, 1e-06, 'add', True), (256, 16, 16, 1e-06, 'none', False),
        (256, 16, 16, 1e-06, 'none', True), (256, 32, 32, 1e-06, 'add', True), (256, 32, 32, 1e-06, 'none', True),
        (384, 32, 32, 1e-06, 'none', True), (512, 8, 8, 1e-06, 'none', True), (512, 16, 16, 1e-06, 'none', True),
        (512, 32, 32, 1e-06, 'none', True),
    ],
    'edm-ffhq-64x64-uncond-ve': [
        (128, 32, 32, 1e-06, 'add', True), (128, 32, 32, 1e-06, 'none', True), (128, 64, 64, 1e-06, 'add', True),
        (128, 64, 64, 1e-06, 'none', True), (256, 8, 8, 1e-06, 'add', True), (256, 8, 8, 1e-06, 'none', False),
        (256, 8, 8, 1e-06, 'none', True), (256, 16, 16, 1e-06, 'add', True), (256, 16, 16, 1e-06, 'none', False),
        (256, 16, 16, 1e-06, 'none', True), (256, 32, 32, 1e-06, 'add', True), (256, 32, 32, 1e-06, 'none', True),
        (256, 64, 64, 1e-06, 'add', True), (256, 64, 64, 1e-06, 'none', True), (384, 32, 32, 1e-06, 'none', True),
        (384, 64, 64, 1e-06, 'none', True), (512, 8, 8, 1e-06, 'none', True), (512, 16, 16, 1e-06, 'none', True),
        (512, 32, 32, 1e-06, 'none', True),
    ],
    'edm-imagenet-64x64-cond-adm': [
        (192, 32, 32, 1e-05, 'none', True), (192, 32, 32, 1e-05, 'scale_shift', True),
        (192, 64, 64, 1e-05, 'none', True), (192, 64, 64, 1e-05, 'scale_shift', True),
        (384, 16, 16, 1e-05, 'none', True), (384, 16, 16, 1e-05, 'scale_shift', True),
        (384, 32, 32, 1e-05, 'none', False), (384, 32, 32, 1e-05, 'none', True),
        (384, 32, 32, 1e-05, 'scale_shift', True), (384, 64, 64, 1e-05, 'none', True),
        (384, 64, 64, 1e-05, 'scale_shift', True), (576, 8, 8, 1e-05, 'none', True),
        (576, 8, 8, 1e-05, 'scale_shift', True), (576, 16, 16, 1e-05, 'none', False),
        (576, 16, 16, 1e-05, 'none', True), (576, 16, 16, 1e-05, 'scale_shift', True),
        (576, 32, 32, 1e-05, 'none', True), (576, 32, 32, 1e-05, 'scale_shift', True),
        (576, 64, 64, 1e-05, 'none', True), (768, 8, 8, 1e-05, 'none', False), (768, 8, 8, 1e-05, 'none', True),
        (768, 8, 8, 1e-05, 'scale_shift', True), (768, 16, 16, 1e-05, 'scale_shift', True),
        (768, 32, 32, 1e-05, 'none', True), (960, 16, 16, 1e-05, 'none', True), (960, 32, 32, 1e-05, 'none', True),
        (1152, 16, 16, 1e-05, 'none', True), (1344, 8, 8, 1e-05, 'none', True), (1344, 16, 16, 1e-05, 'none', True),
        (1536, 8, 8, 1e-05, 'none', True),
    ],
}


def all_sites():
    """The union of every network's sites, sorted."""
    return sorted({site for sites in UNET_NORM_SITES.values() for site in sites})


def norm_sites(stem):
    """(channels, height, width, eps, modulation, silu) of every GroupNorm call in one forward of the network."""
    kwargs = edm_checkpoint_kwargs(stem)
    with torch.device('meta'):
        net = build_network('EDMPrecond', **kwargs)
    sites = set()

    def record(module, args, call_kwargs, output):
        assert module.num_groups == NUM_GROUPS, module.num_groups
        x = args[0]
        modulation = ('add' if call_kwargs.get('add') is not None else
                      'scale_shift' if call_kwargs.get('scale') is not None else 'none')
        sites.add((x.shape[1], x.shape[2], x.shape[3], module.eps, modulation, bool(call_kwargs.get('silu'))))
    for module in net.modules():
        if isinstance(module, GroupNorm):
            module.register_forward_hook(record, with_kwargs=True)
    meta = lambda *shape: torch.empty(*shape, device='meta')
    extra = {'augment_labels': meta(1, kwargs['augment_dim'])} if kwargs.get('augment_dim') else {}
    with torch.no_grad():
        net(meta(1, 3, net.img_resolution, net.img_resolution), meta(1).fill_(1),
            meta(1, net.label_dim) if net.label_dim else None, **extra)
    return sorted(sites)
