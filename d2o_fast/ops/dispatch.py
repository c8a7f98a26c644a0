"""Which kernel backend runs the fused ops, decided in this one place.

Backends:
    'auto'   CUDA tensors: the CUDA extension, else Triton, else torch.
             CPU tensors:  the C++ extension, else torch.
             (The Triton interpreter runs on CPU but is for tests only: never auto-selected.)
    'triton' Triton kernels (d2o_fast/ops/triton_group_norm.py).
    'cuda'   the CUDA extension (d2o_fast/ops/native.py); CUDA tensors only.
    'cpu'    the C++/OpenMP extension (d2o_fast/ops/native.py); CPU tensors only.
    'torch'  the pure-PyTorch reference path, no custom kernels.

Chosen with `set_backend(name)` or the environment variable D2O_FAST_KERNELS (the training
CLI's --kernels); `set_backend` wins. Choose before `torch.compile`: a compiled graph keeps
the backend it was traced with.

Every fast backend is self-checked against the reference the first time it meets a new
configuration (`SelfCheck`); a failing one is replaced by the reference for that
configuration with one warning, so nobody gets silently wrong numbers from a kernel that
was never run on their hardware.
"""

import importlib
import os
import warnings

import torch

from d2o_fast.errors import D2OFastError

BACKENDS = ('auto', 'triton', 'cuda', 'cpu', 'torch')
ENV_VAR = 'D2O_FAST_KERNELS'


class KernelBackendError(D2OFastError, ValueError):
    """An unknown backend name, or a backend that cannot run on the tensors it was asked to."""


class KernelFallbackWarning(RuntimeWarning):
    """A fast kernel disagreed with the reference (or crashed) and the reference is used instead."""

#----------------------------------------------------------------------------
# The chosen backend.

_chosen = None  # set by set_backend(); None = read ENV_VAR


def _validate(name, origin):
    if name not in BACKENDS:
        raise KernelBackendError(f'unknown kernel backend {name!r} (from {origin}); expected one of {", ".join(BACKENDS)}')
    return name


def set_backend(name):
    """Select the kernel backend for all fused ops ('auto', 'triton', 'cuda', 'cpu', 'torch'); None = back to the env var."""
    global _chosen
    _chosen = None if name is None else _validate(name, 'set_backend')
    _resolve.cache_clear()


def get_backend():
    """The requested backend name (before resolving 'auto' for a device)."""
    if _chosen is not None:
        return _chosen
    return _validate(os.environ.get(ENV_VAR, 'auto') or 'auto', f'${ENV_VAR}')

#----------------------------------------------------------------------------
# Backend implementations. Each module implements the op contract and has available(device_type).

# Backend name -> module implementing the fused GroupNorm contract. native.py serves both 'cpu' and 'cuda'.
_MODULES = {
    'triton': 'd2o_fast.ops.triton_group_norm',
    'cuda': 'd2o_fast.ops.native',
    'cpu': 'd2o_fast.ops.native',
}

# Extra implementations registered at run time (tests inject deliberately broken ones here).
_registered = {}


def register_backend(name, implementation):
    """Make `implementation` (forward/backward/available as in the contract) serve backend `name`; None removes it."""
    if implementation is None:
        _registered.pop(name, None)
    else:
        _registered[name] = implementation
    _resolve.cache_clear()
    SelfCheck.reset()


def implementation(name):
    """The module (or registered object) behind backend `name`, or None if it cannot be imported."""
    if name in _registered:
        return _registered[name]
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def is_available(name, device_type):
    impl = implementation(name)
    if impl is None:
        return False
    try:
        return bool(impl.available(device_type))
    except Exception as e:  # a broken build must not take the whole program down: the reference still works
        warnings.warn(f'kernel backend {name!r} failed to load ({type(e).__name__}: {e}); not using it', KernelFallbackWarning)
        return False

#----------------------------------------------------------------------------
# Resolution: requested name + device type -> concrete backend.

_AUTO_ORDER = {'cuda': ('cuda', 'triton'), 'cpu': ('cpu',)}


def _resolve_uncached(requested, device_type):
    if requested == 'torch' or device_type not in _AUTO_ORDER:  # meta, mps, ...: the reference handles them
        return 'torch'
    if requested == 'auto':
        return next((name for name in _AUTO_ORDER[device_type] if is_available(name, device_type)), 'torch')
    if not is_available(requested, device_type):
        raise KernelBackendError(f'kernel backend {requested!r} is not available for {device_type} tensors; '
                                 f'use "auto" or "torch" (set_backend / ${ENV_VAR} / --kernels)')
    return requested


def _memoize(fn):
    cache = {}

    def wrapper(*args):
        if args not in cache:
            cache[args] = fn(*args)
        return cache[args]
    wrapper.cache_clear = cache.clear
    return wrapper


_resolve = _memoize(_resolve_uncached)


@torch.compiler.assume_constant_result
def resolve_backend(device_type: str) -> str:
    """Concrete backend for tensors on `device_type`; a trace-time constant under torch.compile."""
    return _resolve(get_backend(), device_type)

#----------------------------------------------------------------------------
# Precision the hardware runs natively.

def native_bf16(device_type):
    """Whether bfloat16 math is fast on this device: on CUDA, and on CPUs where oneDNN has a bf16 path (AVX512 /
    AMX). On an AVX2-only CPU oneDNN falls back to reference kernels: a 3x3 convolution there takes ~40x the
    float32 time."""
    if device_type == 'cuda':
        return True
    return device_type == 'cpu' and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


#----------------------------------------------------------------------------
# Self-check: the first use of a backend per configuration is compared with the reference.

class SelfCheck:
    """Per-configuration verdicts: key -> True (kernel trusted) / False (use the reference)."""

    _verdicts = {}

    @classmethod
    def passed(cls, key, check):
        """Run `check()` (returns None if fine, else an error description) once per key; warn once on failure."""
        verdict = cls._verdicts.get(key)
        if verdict is None:
            try:
                problem = check()
            except Exception as e:
                problem = f'{type(e).__name__}: {e}'
            verdict = problem is None
            cls._verdicts[key] = verdict
            if not verdict:
                warnings.warn(f'kernel backend {key[0]!r} failed its self-check for {_describe(key)}: {problem}; '
                              f'falling back to the PyTorch reference for this configuration', KernelFallbackWarning, stacklevel=3)
        return verdict

    @classmethod
    def reset(cls):
        cls._verdicts.clear()

    @classmethod
    def verdicts(cls):
        return dict(cls._verdicts)


def _describe(key):
    return ', '.join(str(k) for k in key[1:])


__all__ = ['BACKENDS', 'ENV_VAR', 'KernelBackendError', 'KernelFallbackWarning', 'set_backend', 'get_backend',
           'register_backend', 'implementation', 'is_available', 'resolve_backend', 'SelfCheck', 'native_bf16']
