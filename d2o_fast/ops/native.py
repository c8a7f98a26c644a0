"""The C++/CUDA extension behind the 'cpu' and 'cuda' kernel backends (sources in kernels/).

Implements the fused GroupNorm backend contract of d2o_fast/ops/group_norm_act.py:
    available(device_type) -> bool
    forward(x, weight, bias, add, scale, shift, num_groups, eps, silu) -> (y, mean, rstd)
    backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu)
        -> (dx, dweight, dbias, dadd, dscale, dshift)

The extension is found in this order, once, on first use:
  1. `d2o_fast._C`, built by `pip install --no-build-isolation -e .` (CUDA kernels included
     when built with D2O_FAST_CUDA=1);
  2. a JIT build of kernels/ with torch.utils.cpp_extension.load into a cache directory
     ($D2O_FAST_EXTENSION_CACHE, default ~/.cache/d2o_fast/extensions/<torch version>); the
     CUDA sources are added when torch sees a GPU;
  3. otherwise available() is False and `unavailable_reason()` says why.
D2O_FAST_NATIVE=0 disables the extension entirely (tests of the fallback path).

The kernels register torch.ops.d2o_fast_native.group_norm_act_{forward,backward}; the Python
module `extension()` returns also reports `with_cuda` and pins the CPU capability in tests.
"""

import importlib
import importlib.util
import os
import pathlib
import re
import warnings

import torch

from d2o_fast.ops.group_norm_act import GroupNormActError, check_inputs
from d2o_fast.ops.native_sources import (CUDA_MACRO, CXX_FLAGS, DIGEST_MACRO, LINK_FLAGS, NVCC_FLAGS, build_sources,
                                         source_digest)

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[2] / 'kernels'

#----------------------------------------------------------------------------
# Loading.

_state = {'module': None, 'reason': None, 'tried': False}


def _cache_dir(with_cuda, digest):
    root = os.environ.get('D2O_FAST_EXTENSION_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'd2o_fast',
                                                                       'extensions')
    tag = f'torch{torch.__version__}-{"cuda" if with_cuda else "cpu"}-{digest}'
    path = os.path.join(root, tag.replace('+', '_'))
    os.makedirs(path, exist_ok=True)
    return path


def jit_build(with_cuda=None, verbose=False):
    """Compile kernels/ with torch.utils.cpp_extension.load (ninja) and return the module."""
    from torch.utils import cpp_extension
    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    names = build_sources(with_cuda)
    missing = [n for n in names if not (KERNELS_DIR / n).exists()]
    if missing:
        raise FileNotFoundError(f'kernel sources not found in {KERNELS_DIR}: {", ".join(missing)}')
    sources = [str(KERNELS_DIR / n) for n in names]
    digest = source_digest(KERNELS_DIR, with_cuda)
    macros = [f'-D{DIGEST_MACRO}={digest}'] + ([f'-D{CUDA_MACRO}'] if with_cuda else [])
    return cpp_extension.load(
        name='d2o_fast_native_cuda' if with_cuda else 'd2o_fast_native_cpu', sources=sources,
        extra_cflags=list(CXX_FLAGS) + macros, extra_cuda_cflags=list(NVCC_FLAGS) + macros,
        extra_ldflags=list(LINK_FLAGS), build_directory=_cache_dir(with_cuda, digest), verbose=verbose)


BUILD_MARKER = re.compile(rb'd2o_fast_build:([0-9a-f]{12}):(cpu|cuda)(?::torch([0-9]+\.[0-9]+\.[0-9]+))?')


def torch_release():
    """major.minor.patch of the running torch (what the extension's headers call TORCH_VERSION_*)."""
    return re.match(r'[0-9]+\.[0-9]+\.[0-9]+', torch.__version__).group(0)


def _stale_reason(path):
    """Why the prebuilt d2o_fast._C at `path` must not be loaded (None if it may): built against another torch
    release than the running one (its C++ ABI need not match), or from other kernel sources than the ones beside
    this package (an editable install whose kernels/ changed since `pip install`). Decided from the build marker
    compiled into the binary (kernels/extension.cpp), without loading it: two modules that register the same torch
    ops cannot both be loaded into one process."""
    found = BUILD_MARKER.search(pathlib.Path(path).read_bytes())
    with_cuda = bool(found) and found.group(2) == b'cuda'
    built_torch = found.group(3).decode() if found and found.group(3) else None
    if built_torch != torch_release():
        return (f'd2o_fast._C was built for torch {built_torch or "(unknown release)"}, '
                f'this is torch {torch.__version__}')
    if not all((KERNELS_DIR / n).exists() for n in build_sources(with_cuda)):
        return None  # an installed wheel: the module is all there is
    built = found.group(1).decode() if found else 'unknown'
    current = source_digest(KERNELS_DIR, with_cuda)
    if built != current:
        return f'd2o_fast._C was built from other kernel sources ({built}; kernels/ is now {current})'
    return None


def _prebuilt_path():
    """File of the prebuilt d2o_fast._C, or None."""
    spec = importlib.util.find_spec('d2o_fast._C')
    return spec.origin if spec is not None else None


def extension():
    """The loaded extension module, or None (see unavailable_reason())."""
    if _state['tried']:
        return _state['module']
    _state['tried'] = True
    if os.environ.get('D2O_FAST_NATIVE', '1') == '0':
        _state['reason'] = 'disabled by D2O_FAST_NATIVE=0'
        return None
    path = _prebuilt_path()
    prebuilt_error = 'no d2o_fast._C module' if path is None else _stale_reason(path)
    if path is not None and prebuilt_error is None:
        try:
            _state['module'] = importlib.import_module('d2o_fast._C')
            return _state['module']
        except ImportError as e:
            prebuilt_error = e
    elif path is not None:
        warnings.warn(f'{prebuilt_error}; using a JIT build of the current sources instead', RuntimeWarning)
    try:
        _state['module'] = jit_build()
    except Exception as e:  # no compiler, no sources, failed build: the other backends still work
        _state['reason'] = (f'd2o_fast._C is not usable ({prebuilt_error}) and the JIT build failed '
                            f'({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e})')
        warnings.warn(f'd2o_fast native kernels unavailable: {_state["reason"]}', RuntimeWarning)
    return _state['module']


def unavailable_reason():
    """Why available() is False (None if the extension loaded)."""
    extension()
    return _state['reason']


def available(device_type):
    """True if the extension can run fused GroupNorm on tensors of `device_type` ('cpu' or 'cuda')."""
    module = extension()
    if module is None:
        return False
    if device_type == 'cpu':
        return True
    if device_type == 'cuda':
        return bool(module.with_cuda) and torch.cuda.is_available()
    return False

#----------------------------------------------------------------------------
# Validation beyond the op's own input check (the C++ side checks again, but with less readable errors).

def _check_device(device_type):
    if not available(device_type):
        raise GroupNormActError(f'native group_norm_act is not available for {device_type} tensors: '
                                f'{unavailable_reason() or "extension built without CUDA"}')


def _check_statistics(x, mean, rstd, num_groups):
    for name, t in (('mean', mean), ('rstd', rstd)):
        if t.dtype != torch.float32 or t.numel() != x.shape[0] * num_groups or t.device != x.device:
            raise GroupNormActError(f'native group_norm_act expects {name} as float32 [{x.shape[0]}, {num_groups}] '
                                    f'on {x.device}, got {(list(t.shape), t.dtype, str(t.device))}')

#----------------------------------------------------------------------------
# The backend contract.

def forward(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    _check_device(x.device.type)
    check_inputs(x, weight, bias, num_groups, add, scale, shift, kernel=True)
    return torch.ops.d2o_fast_native.group_norm_act_forward(x, weight, bias, add, scale, shift, int(num_groups),
                                                            float(eps), bool(silu))


def backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    _check_device(x.device.type)
    check_inputs(x, weight, bias, num_groups, add, scale, shift, kernel=True)
    _check_statistics(x, mean, rstd, num_groups)
    if dy.shape != x.shape or dy.device != x.device:
        raise GroupNormActError(f'native group_norm_act: dy {list(dy.shape)} on {dy.device} does not match '
                                f'x {list(x.shape)} on {x.device}')
    return tuple(torch.ops.d2o_fast_native.group_norm_act_backward(dy, x, weight, bias, add, scale, shift, mean, rstd,
                                                                   int(num_groups), bool(silu)))


__all__ = ['available', 'forward', 'backward', 'extension', 'unavailable_reason', 'jit_build', 'KERNELS_DIR']
