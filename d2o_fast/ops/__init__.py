"""Fused kernels and their pure-PyTorch references. Imports nothing else of d2o_fast but its error base
(d2o_fast/errors.py)."""

from d2o_fast.ops.dispatch import (BACKENDS, KernelBackendError, KernelFallbackWarning, get_backend, native_bf16,
                                   resolve_backend, set_backend)
from d2o_fast.ops.group_norm_act import GroupNormActError, group_norm_act, group_norm_act_reference

__all__ = ['group_norm_act', 'group_norm_act_reference', 'GroupNormActError', 'BACKENDS', 'set_backend', 'get_backend',
           'resolve_backend', 'KernelBackendError', 'KernelFallbackWarning', 'native_bf16']
