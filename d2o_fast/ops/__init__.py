"""Fused kernels and their pure-PyTorch references. Imports nothing else of d2o_fast."""

from d2o_fast.ops.group_norm_act import group_norm_act, group_norm_act_reference

__all__ = ['group_norm_act', 'group_norm_act_reference']
