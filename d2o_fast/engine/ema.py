"""EMA of the generator with the authors' half-life ramp-up.

half-life = min(ema_mimg * 1e6, rampup * images_seen); beta = 0.5 ** (batch / half-life).
Only parameters are averaged (buffers are copied), as in EDM and D2O.
"""

import copy

import torch


def ema_beta(images_seen, batch, ema_mimg, rampup):
    half_life = ema_mimg * 1e6
    if rampup:
        half_life = min(half_life, images_seen * rampup)
    return 0.5 ** (batch / max(half_life, 1e-8))


def make_ema(net):
    return copy.deepcopy(net).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema, net, beta):
    """ema <- lerp(net, ema, beta); beta is a float, or a 0-d tensor on the device (a CUDA graph reads it at replay)."""
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        if p_net.requires_grad:  # frozen parameters never change: nothing to average
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)
