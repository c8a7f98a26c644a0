"""Fused GroupNorm + per-(sample, channel) modulation + optional SiLU.

    y = act(GN(x + add) * (1 + scale) + shift)

with GN's own affine weight/bias, statistics in float32 whatever the input dtype.
This is the one op family behind every norm site of SongUNet (norm1(x + params))
and DhariwalUNet (adaptive scale/shift). `group_norm_act_reference` is the ground truth
the fast kernels are tested against.
"""

import torch

#----------------------------------------------------------------------------
# Pure PyTorch reference.

def _as_nc11(t, x):
    return None if t is None else t.reshape(x.shape[0], x.shape[1], 1, 1)


def group_norm_act_reference(x, weight, bias, num_groups, eps, add=None, scale=None, shift=None, silu=True):
    """Reference: float32 math, output in x's dtype and memory format."""
    dtype = x.dtype
    h = x.float()
    if add is not None:
        h = h + _as_nc11(add, x).float()
    h = torch.nn.functional.group_norm(h, num_groups, weight=weight.float(), bias=bias.float(), eps=eps)
    if scale is not None:
        h = h * (1 + _as_nc11(scale, x).float())
    if shift is not None:
        h = h + _as_nc11(shift, x).float()
    if silu:
        h = torch.nn.functional.silu(h)
    return h.to(dtype)

#----------------------------------------------------------------------------
# Public entry point.

def group_norm_act(x, weight, bias, num_groups, eps, add=None, scale=None, shift=None, silu=True):
    """y = act(GN(x + add) * (1 + scale) + shift); add/scale/shift are [N, C] or [N, C, 1, 1]."""
    return group_norm_act_reference(x, weight, bias, num_groups, eps, add=add, scale=scale, shift=shift, silu=silu)
