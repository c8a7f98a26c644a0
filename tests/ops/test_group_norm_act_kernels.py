"""Every backend of the fused GroupNorm contract against the float64 reference (forward and backward).

Backends: the contract-form reference, the Triton kernels (on CPU through the Triton
interpreter, on a GPU compiled) and the native extension when it is built. Expected values are
the reference run in float64 on the same (already rounded) inputs, its gradients by autograd.
"""

import importlib
import itertools
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from d2o_fast.ops.group_norm_act import ReferenceBackend, group_norm_act_reference

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'

# Relative/absolute tolerance by dtype; absolute ones scale with the largest expected magnitude.
# bfloat16 allows a bit over one ulp: the Triton interpreter truncates float32 -> bfloat16 instead of rounding.
TOLERANCE = {torch.float32: (1e-4, 2e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}

#----------------------------------------------------------------------------
# Backends under test.

def _triton_backend():
    """The Triton kernels: compiled on a GPU; on CPU only in a process started with TRITON_INTERPRET=1
    (it must be set before triton is first imported, which torch._dynamo already does), see test_triton_under_interpreter."""
    pytest.importorskip('triton')
    module = importlib.import_module('d2o_fast.ops.triton_group_norm')
    if not module.available(DEVICE):
        pytest.skip(f'Triton kernels unavailable on {DEVICE} in this process (covered by test_triton_under_interpreter)')
    return module


def _native_backend():
    try:
        native = importlib.import_module('d2o_fast.ops.native')
    except ImportError:
        pytest.skip('d2o_fast.ops.native not present')
    if not native.available(DEVICE):
        pytest.skip(f'native extension unavailable on {DEVICE}')
    return native


BACKENDS = {'reference': lambda: ReferenceBackend, 'triton': _triton_backend, 'native': _native_backend}


@pytest.fixture(params=list(BACKENDS), scope='module')
def backend(request):
    return BACKENDS[request.param]()

#----------------------------------------------------------------------------
# One comparison.

def make_case(shape, groups, dtype, channels_last, add, scale, shift, seed=0, param_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]

    def randn(shape, dtype, std=1.0, mean=0.0):
        return (torch.randn(shape, generator=g) * std + mean).to(DEVICE, dtype)
    x = randn(shape, dtype, 2.0, 3.0)  # mean offset: statistics must not lose precision to it
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return dict(
        x=x, weight=randn([C], param_dtype, 0.5, 1.0), bias=randn([C], param_dtype),
        add=randn([N, C], dtype) if add else None, scale=randn([N, C], dtype, 0.5) if scale else None,
        shift=randn([N, C], dtype) if shift else None), randn(shape, dtype)


def assert_close(name, got, expected):
    assert got.dtype != torch.float64, name
    rtol, atol = TOLERANCE[got.dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f'{name}: {m}')


def check_backend(impl, shape, groups, dtype, channels_last, add, scale, shift, silu, eps=1e-5, seed=0):
    case, dy = make_case(shape, groups, dtype, channels_last, add, scale, shift, seed)
    names = [k for k, v in case.items() if v is not None]
    leaves = {k: case[k].double().requires_grad_() for k in names}
    expected = group_norm_act_reference(leaves['x'], leaves['weight'], leaves['bias'], groups, eps, add=leaves.get('add'),
                                        scale=leaves.get('scale'), shift=leaves.get('shift'), silu=silu)
    expected_grads = torch.autograd.grad(expected, [leaves[k] for k in names], dy.double())
    h = leaves['x'].detach() + (leaves['add'].detach()[:, :, None, None] if add else 0)
    var, mean = torch.var_mean(h.reshape(shape[0], groups, -1), dim=2, correction=0)

    y, got_mean, got_rstd = impl.forward(*case.values(), groups, eps, silu)
    assert y.dtype == dtype and y.shape == case['x'].shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert got_mean.dtype == torch.float32 and got_mean.shape == (shape[0], groups)
    assert_close('y', y, expected.detach())
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_rstd.double(), torch.rsqrt(var + eps), rtol=1e-4, atol=1e-5)

    # dy in NCHW even for a channels_last x: the contract accepts any layout of dy.
    grads = dict(zip(['x', 'weight', 'bias', 'add', 'scale', 'shift'],
                     impl.backward(dy, *case.values(), got_mean, got_rstd, groups, silu)))
    for k in grads:
        if case[k] is None:
            assert grads[k] is None, k
    for k, want in zip(names, expected_grads):
        assert grads[k].dtype == case[k].dtype and grads[k].shape == case[k].shape, k
        assert_close('d' + k, grads[k], want)
    assert grads['x'].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

#----------------------------------------------------------------------------
# Cases.

# (shape, groups): N = 1, H*W = 1, 4 channels per group, C not a multiple of any block size,
# odd H*W, large H*W with few channels, many channels per group (more than one channel block).
SHAPES = [
    ((2, 12, 5, 7), 3),
    ((1, 8, 1, 1), 2),
    ((3, 40, 3, 3), 10),
    ((1, 6, 64, 64), 2),
    ((2, 200, 2, 3), 2),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize('shape,groups', SHAPES, ids=[f'{"x".join(map(str, s))}-g{g}' for s, g in SHAPES])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_shapes_dtypes_layouts(backend, shape, groups, dtype, channels_last):
    check_backend(backend, shape, groups, dtype, channels_last, add=True, scale=True, shift=True, silu=True)


FLAGS = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize('add,scale,shift,silu', FLAGS, ids=['add' * a + 'scale' * s + 'shift' * t + 'silu' * u or 'plain'
                                                              for a, s, t, u in FLAGS])
def test_optional_inputs(backend, add, scale, shift, silu):
    # Rotate dtype and layout across the flag combinations so all of them meet each once.
    i = FLAGS.index((add, scale, shift, silu))
    check_backend(backend, (2, 16, 3, 4), 4, DTYPES[i % 3], bool(i % 2), add, scale, shift, silu, seed=i)


def test_low_precision_parameters(backend):
    """bfloat16 weight/bias with float32 activations: every gradient keeps its input's dtype."""
    case, dy = make_case((2, 8, 4, 4), 2, torch.float32, False, True, True, True, param_dtype=torch.bfloat16)
    y, mean, rstd = backend.forward(*case.values(), 2, 1e-6, True)
    grads = backend.backward(dy, *case.values(), mean, rstd, 2, True)
    assert y.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.bfloat16] + [torch.float32] * 3


@pytest.mark.skipif(DEVICE != 'cpu' or os.environ.get('TRITON_INTERPRET') == '1', reason='runs the Triton cases in-process')
def test_triton_under_interpreter():
    """This file's Triton cases in a fresh process with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    pytest.importorskip('triton')
    root = pathlib.Path(__file__).resolve().parents[2]
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(pathlib.Path(__file__).resolve()),
           '-k', 'triton and not interpreter and not compile_for_gpu']
    result = subprocess.run(cmd, cwd=root, env=dict(os.environ, TRITON_INTERPRET='1'), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = re.search(r'(\d+) passed', output)
    assert passed and int(passed.group(1)) > 40 and 'skipped' not in output, output[-3000:]


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
@pytest.mark.parametrize('ones', [False, True], ids=['general', 'specialised'])
def test_triton_kernels_compile_for_gpu(dtype, ones):
    """Lower both kernels to PTX for sm_80 (no GPU needed), with every optional input on and with integer
    arguments specialised to 1 (as triton does for H*W = 1, channels_last strides, 1 channel per group)."""
    triton = pytest.importorskip('triton')
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module = importlib.import_module('d2o_fast.ops.triton_group_norm')
    if module.INTERPRETED:
        pytest.skip('kernels were built for the interpreter in this process')
    ints = ['C', 'HW', 'G', 'CPG', 'stride_n', 'stride_c', 'stride_hw']
    activations = dict(x_ptr=dtype, y_ptr=dtype, dy_ptr=dtype, dx_ptr=dtype, add_ptr=dtype, scale_ptr=dtype, shift_ptr=dtype)
    for kernel in (module._group_norm_act_fwd_kernel, module._group_norm_act_bwd_kernel):
        constexprs = dict(HAS_ADD=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True, BLOCK_C=4, BLOCK_HW=256)
        if ones:
            constexprs.update(HW=1, CPG=1, stride_c=1)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = 'constexpr'
            elif name.endswith('_ptr'):
                signature[name] = '*' + activations.get(name, 'fp32')
            else:
                signature[name] = 'i32' if name in ints else 'fp32'
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget('cuda', 80, 32))
        except RuntimeError as e:
            if 'ptxas' in str(e).lower():
                pytest.skip(f'no ptxas: {e}')
            raise
        assert '.entry' in compiled.asm['ptx']
