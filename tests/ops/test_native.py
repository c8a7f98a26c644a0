"""The C++ (and, compile-only here, CUDA) fused GroupNorm kernels of d2o_fast/ops/native.py.

Forward and backward are compared with the float64 PyTorch reference (autograd through
group_norm_act_reference) on random, non-zero inputs: every dtype, both memory layouts,
every combination of add/scale/shift/silu, awkward shapes, and each CPU capability build
(DEFAULT / AVX2 / AVX512) this machine supports.
"""

import importlib
import itertools
import os
import pathlib
import shutil
import subprocess
import types

import pytest
import torch

from d2o_fast.ops import native, native_sources
from d2o_fast.ops.group_norm_act import GroupNormActError, group_norm_act_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not native.available('cpu'),
                                reason=f'native CPU kernels unavailable: {native.unavailable_reason()}')

# Max |kernel - reference| / max |reference| per output.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
EPS = 1e-5
FLAGS = list(itertools.product((False, True), repeat=4))  # add, scale, shift, silu

# (N, C, H, W, num_groups): N = 1; H * W = 1; 4 channels per group with C = 20 (not a
# multiple of any vector width); 2 channels per group with C = 6 (fewer than one vector); C = 72 and H * W = 80
# (a block of four 16-lane vectors, then a partial vector in channels and a single full one in rows).
SHAPES = [(1, 8, 4, 4, 2), (3, 12, 1, 1, 3), (2, 20, 5, 7, 5), (2, 6, 3, 3, 3), (2, 64, 8, 8, 32),
          (2, 72, 8, 10, 8)]


def _layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _make_case(shape, dtype, channels_last, add, scale, shift, seed=0, param_dtype=torch.float32, x_mean=0.5):
    N, C, H, W, _ = shape
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)
    x = (randn(N, C, H, W) * 2 + x_mean).to(dtype).contiguous(memory_format=_layout(channels_last))
    weight = (1 + 0.5 * randn(C)).to(param_dtype)
    bias = randn(C).to(param_dtype)
    a = randn(N, C).to(param_dtype) if add else None
    s = (0.5 * randn(N, C)).to(param_dtype) if scale else None
    t = randn(N, C).to(param_dtype) if shift else None
    dy = randn(N, C, H, W).to(dtype).contiguous(memory_format=_layout(channels_last))
    return x, weight, bias, a, s, t, dy


def _reference(x, weight, bias, add, scale, shift, dy, num_groups, silu):
    """float64 outputs and gradients (None for absent inputs)."""
    inputs = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias, add, scale, shift)]
    y = group_norm_act_reference(inputs[0], inputs[1], inputs[2], num_groups, EPS, add=inputs[3], scale=inputs[4],
                                 shift=inputs[5], silu=silu)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy.double()))
    h = x.double() + (0 if add is None else add.double()[:, :, None, None])
    hg = h.reshape(x.shape[0], num_groups, -1)
    mean = hg.mean(-1)
    rstd = (hg.var(-1, unbiased=False) + EPS).rsqrt()
    return y.detach(), mean, rstd, [None if t is None else next(grads) for t in inputs]


def _relative_error(value, expected):
    return ((value.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _check(shape, dtype, channels_last, add, scale, shift, silu, **case_kwargs):
    num_groups = shape[-1]
    x, weight, bias, a, s, t, dy = _make_case(shape, dtype, channels_last, add, scale, shift, **case_kwargs)
    y, mean, rstd = native.forward(x, weight, bias, a, s, t, num_groups, EPS, silu)
    grads = native.backward(dy, x, weight, bias, a, s, t, mean, rstd, num_groups, silu)
    y_ref, mean_ref, rstd_ref, grads_ref = _reference(x, weight, bias, a, s, t, dy, num_groups, silu)

    where = f'{shape} {dtype} channels_last={channels_last} add={add} scale={scale} shift={shift} silu={silu}'
    assert y.dtype == x.dtype and y.shape == x.shape, where
    assert y.is_contiguous(memory_format=_layout(channels_last)), where
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (shape[0], num_groups), where
    tol = TOLERANCE[dtype]
    assert _relative_error(mean, mean_ref) < 1e-5 and _relative_error(rstd, rstd_ref) < 1e-5, where
    assert _relative_error(y, y_ref) < tol, f'y: {where}'
    names = ('dx', 'dweight', 'dbias', 'dadd', 'dscale', 'dshift')
    for name, grad, ref, given in zip(names, grads, grads_ref, (x, weight, bias, a, s, t)):
        if given is None:
            assert grad is None, f'{name} should be None: {where}'
            continue
        assert grad.dtype == given.dtype and grad.shape == given.shape, f'{name}: {where}'
        grad_tol = max(tol, TOLERANCE[grad.dtype])  # the gradient is rounded to its input's dtype
        assert _relative_error(grad, ref) < grad_tol, f'{name} off by {_relative_error(grad, ref):.2e}: {where}'
    if dtype is torch.float32:
        assert grads[0].is_contiguous(memory_format=_layout(channels_last)), where

#----------------------------------------------------------------------------
# Numerics.

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_every_flag_combination(shape, dtype, channels_last):
    for add, scale, shift, silu in FLAGS:
        _check(shape, dtype, channels_last, add, scale, shift, silu)


@pytest.fixture(params=native.extension().supported_cpu_capabilities() if native.available('cpu') else ['none'])
def cpu_capability(request):
    ext = native.extension()
    ext.force_cpu_capability(request.param)
    assert ext.active_cpu_capability() == request.param
    yield request.param
    ext.force_cpu_capability('')


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_each_cpu_capability(cpu_capability, dtype, channels_last):
    """Every ISA build of the kernels: odd channel counts exercise the partial-vector tails."""
    for shape in [(2, 20, 5, 7, 5), (1, 36, 9, 3, 9)]:
        for add, scale, shift, silu in [(True, True, True, True), (False, False, False, False), (True, False, True, True)]:
            _check(shape, dtype, channels_last, add, scale, shift, silu)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('shape', [(1, 8, 128, 128, 2), (1, 16, 128, 128, 2), (2, 24, 37, 41, 6)],
                         ids=['group-64k', 'group-128k', 'partial-chunk'])
def test_large_spatial_extent(shape, channels_last):
    """128 x 128 pixels: several chunks per sample (NHWC) and long rows (NCHW); 37 x 41 pixels of 24 channels: NHWC
    chunks whose last one is partial (1517 rows in chunks of 341). NCHW keeps a group's dz between its
    passes in dx for float32; bfloat16 keeps it in a scratch up to 64Ki elements (4 channels here) and recomputes
    it beyond (8 channels)."""
    _check(shape, torch.float32, channels_last, True, True, True, True)
    _check(shape, torch.bfloat16, channels_last, True, False, False, True)


def test_statistics_are_stable_for_large_means():
    """x = 1000 + N(0, 2): a one-pass E[x^2] - E[x]^2 in float32 would lose the variance."""
    _check((2, 16, 16, 16, 4), torch.float32, False, True, True, False, True, x_mean=1000.0)
    _check((2, 16, 16, 16, 4), torch.float32, True, True, True, False, True, x_mean=1000.0)


def test_reduced_precision_parameters_keep_their_dtypes():
    _check((2, 16, 4, 4, 4), torch.float32, False, True, True, True, True, param_dtype=torch.bfloat16)
    _check((2, 16, 4, 4, 4), torch.bfloat16, True, True, True, True, True, param_dtype=torch.float16)


def test_saturated_silu_stays_finite():
    x = torch.linspace(-300, 300, 2 * 8 * 16).reshape(2, 8, 4, 4)
    w, b = torch.full((8,), 50.0), torch.zeros(8)
    y, mean, rstd = native.forward(x, w, b, None, None, None, 2, EPS, True)
    dx, *_ = native.backward(torch.ones_like(x), x, w, b, None, None, None, mean, rstd, 2, True)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y, group_norm_act_reference(x, w, b, 2, EPS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_silu_matches_float64_over_its_whole_range(channels_last):
    """Pre-activations from -120 to 120 (the vectorised sigmoid clamps its exponent and uses a reciprocal estimate):
    y and dx stay within float32 tolerance of float64 relative to each element's own magnitude."""
    z = torch.linspace(-120, 120, 2 * 16 * 8 * 8, dtype=torch.float64)
    x = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))].reshape(2, 16, 8, 8)
    x32 = x.float().contiguous(memory_format=_layout(channels_last))
    w, b = torch.ones(16), torch.zeros(16)
    y, mean, rstd = native.forward(x32, w, b, None, None, None, 4, EPS, True)
    dy = torch.ones_like(x32)
    dx, *_ = native.backward(dy, x32, w, b, None, None, None, mean, rstd, 4, True)
    xd = x32.double().requires_grad_()
    y_ref = group_norm_act_reference(xd, w.double(), b.double(), 4, EPS)
    dx_ref, = torch.autograd.grad(y_ref, xd, dy.double())
    assert ((y.double() - y_ref).abs() <= 2e-5 * y_ref.abs() + 1e-6).all()
    assert ((dx.double() - dx_ref).abs() <= 2e-5 * dx_ref.abs().max()).all()


def test_nan_input_propagates():
    """A NaN in x shows in its group's output (the sigmoid's clamp must not turn it into a number)."""
    x = torch.randn(2, 8, 4, 4)
    x[1, 5, 2, 3] = float('nan')
    y, mean, rstd = native.forward(x, torch.ones(8), torch.zeros(8), None, None, None, 2, EPS, True)
    assert torch.isnan(y[1, 4:]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[1, :4]).all()


def test_group_channels_with_far_apart_means():
    """Channels of one group centred at -1000 .. 1000 with unit spread, 8x8 rows: the NCHW statistics over the whole
    contiguous group (no per-row reduction) keep the variance of the mixture."""
    for channels_last in (False, True):
        x, weight, bias, a, s, t, dy = _make_case((2, 32, 8, 8, 2), torch.float32, channels_last, True, True, True)
        offsets = torch.linspace(-1000, 1000, 32)[None, :, None, None]
        x = (x + offsets).contiguous(memory_format=_layout(channels_last))
        y, mean, rstd = native.forward(x, weight, bias, a, s, t, 2, EPS, True)
        y_ref, mean_ref, rstd_ref, _ = _reference(x, weight, bias, a, s, t, dy, 2, True)
        assert _relative_error(mean, mean_ref) < 1e-5 and _relative_error(rstd, rstd_ref) < 1e-5
        assert _relative_error(y, y_ref) < TOLERANCE[torch.float32]


def test_dy_in_another_layout():
    x, weight, bias, a, s, t, dy = _make_case((2, 8, 4, 4, 2), torch.float32, True, True, True, True)
    y, mean, rstd = native.forward(x, weight, bias, a, s, t, 2, EPS, True)
    expected = native.backward(dy, x, weight, bias, a, s, t, mean, rstd, 2, True)
    got = native.backward(dy.contiguous(), x, weight, bias, a, s, t, mean, rstd, 2, True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)

#----------------------------------------------------------------------------
# Errors and loading.

def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8, 4, 4)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(GroupNormActError, match='cannot be split into 3 groups'):
        native.forward(x, w, b, None, None, None, 3, EPS, True)
    with pytest.raises(GroupNormActError, match='add as a float'):
        native.forward(x, w, b, torch.randn(2, 7), None, None, 2, EPS, True)
    with pytest.raises(GroupNormActError, match='a float32/bfloat16/float16 x'):
        native.forward(x.double(), w, b, None, None, None, 2, EPS, True)
    with pytest.raises(GroupNormActError, match='weight'):
        native.forward(x, torch.ones(4), b, None, None, None, 2, EPS, True)
    with pytest.raises(GroupNormActError, match='shape'):
        native.forward(torch.randn(2, 8), w, b, None, None, None, 2, EPS, True)
    with pytest.raises(GroupNormActError, match='mean'):
        native.backward(x, x, w, b, None, None, None, torch.zeros(3), torch.ones(4), 2, True)


def test_cpu_capability_pinning_rejects_unknown_names():
    with pytest.raises(ValueError, match='not supported'):
        native.extension().force_cpu_capability('SSE9')


def test_disabled_extension_reports_why(monkeypatch):
    monkeypatch.setattr(native, '_state', {'module': None, 'reason': None, 'tried': False})
    monkeypatch.setenv('D2O_FAST_NATIVE', '0')
    assert not native.available('cpu') and not native.available('cuda')
    assert 'D2O_FAST_NATIVE=0' in native.unavailable_reason()
    with pytest.raises(GroupNormActError, match='not available'):
        native.forward(torch.randn(1, 4, 2, 2), torch.ones(4), torch.zeros(4), None, None, None, 2, EPS, True)


def test_build_order_puts_the_per_isa_objects_last():
    """setuptools sorts an extension's sources before linking; the baseline-ISA objects must stay ahead of the
    AVX2/AVX512 ones (their inline functions win at link time), with or without the CUDA sources."""
    for with_cuda in (False, True):
        order = native_sources.build_sources(with_cuda)
        assert list(order) == sorted(order)
        isa = [i for i, name in enumerate(order) if name.startswith('isa/')]
        assert len(isa) == 3 and isa == list(range(len(order) - 3, len(order))), order
        assert all((native.KERNELS_DIR / name).exists() for name in order)


def test_a_prebuilt_module_older_than_the_sources_is_not_loaded(monkeypatch, tmp_path):
    """An editable install's d2o_fast._C built before kernels/ changed, or against another torch release: the loader
    reads the build marker in the binary, does not load it (its torch ops would clash with the fresh build's; another
    torch's C++ ABI need not match), warns and JIT-builds instead."""
    module = native.extension()
    if module is None:
        pytest.skip(f'native kernels unavailable: {native.unavailable_reason()}')
    current = native_sources.source_digest(native.KERNELS_DIR, bool(module.with_cuda))
    assert module.source_digest == current
    kind = 'cuda' if module.with_cuda else 'cpu'
    assert module.torch_version == native.torch_release()

    def marker(digest, torch_version):
        path = tmp_path / f'{digest}-{torch_version}.so'
        path.write_bytes(b'\x7fELF...d2o_fast_build:' + f'{digest}:{kind}{torch_version}'.encode() + b'\0...')
        return path
    fresh = marker(current, f':torch{native.torch_release()}')
    stale = marker('0123456789ab', f':torch{native.torch_release()}')
    assert native._stale_reason(fresh) is None
    assert 'other kernel sources' in native._stale_reason(stale)
    major, minor, patch = native.torch_release().split('.')
    for other_torch in (f':torch{major}.{int(minor) + 1}.{patch}', f':torch{major}.{minor}.{int(patch) + 1}', ''):
        assert 'was built for torch' in native._stale_reason(marker(current, other_torch))
    if native._prebuilt_path() is not None:  # the module the install built carries the current sources' marker
        assert native._stale_reason(native._prebuilt_path()) is None
    monkeypatch.setattr(native, '_state', {'module': None, 'reason': None, 'tried': False})
    monkeypatch.setattr(native, '_prebuilt_path', lambda: str(stale))
    monkeypatch.setattr(importlib, 'import_module', lambda name: pytest.fail(f'{name} must not be imported'))
    jit_module = types.SimpleNamespace(with_cuda=module.with_cuda, source_digest=current)
    monkeypatch.setattr(native, 'jit_build', lambda: jit_module)
    with pytest.warns(RuntimeWarning, match='using a JIT build'):
        assert native.extension() is jit_module


def test_no_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip('a GPU is present; the dispatcher self-check covers the CUDA kernels there')
    assert not native.available('cuda')

#----------------------------------------------------------------------------
# CUDA sources: compile-only (no GPU needed).

@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get('NVCC', 'nvcc')) is None, reason='nvcc not found on PATH')
def test_cuda_sources_compile_with_warnings_as_errors():
    result = subprocess.run(['bash', str(ROOT / '.ci' / 'build_cuda.sh')], capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'CUDA kernels compile cleanly' in result.stdout
