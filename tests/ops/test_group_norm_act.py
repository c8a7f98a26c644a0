"""The public fused GroupNorm op: reference accuracy, input errors, backend dispatch, self-check
fallback, the torch.library custom ops, and torch.compile of whole U-Nets without graph breaks.

The kernels themselves are compared with the float64 reference in test_group_norm_act_kernels.py.
"""

import itertools
import warnings

import pytest
import torch

from d2o_fast.ops import (GroupNormActError, KernelBackendError, KernelFallbackWarning, get_backend, group_norm_act,
                          group_norm_act_reference, resolve_backend, set_backend)
from d2o_fast.ops.dispatch import ENV_VAR, SelfCheck, is_available, register_backend
from d2o_fast.ops.group_norm_act import ReferenceBackend, _bwd_op, _fwd_op, reference_backward, reference_forward

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    """Each test starts from 'auto' with no injected backends and no self-check verdicts."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_backend(None)
    yield
    for name in ('cpu', 'cuda', 'triton'):
        register_backend(name, None)
    set_backend(None)
    SelfCheck.reset()


def random_inputs(shape=(2, 16, 5, 6), groups=4, dtype=torch.float32, channels_last=False, add=True, scale=True,
                  shift=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mod = lambda on, std: (torch.randn(N, C, generator=g) * std).to(dtype) if on else None
    return dict(x=x, weight=torch.randn(C, generator=g) * 0.5 + 1, bias=torch.randn(C, generator=g),
                add=mod(add, 1.0), scale=mod(scale, 0.5), shift=mod(shift, 1.0)), groups


def run_with_grads(fn, inputs, groups, silu, eps=1e-5, dy=None, dtype=None):
    """y and the gradients of sum(y * dy) w.r.t. every present input, computed in `dtype` (default: as given)."""
    # detach() keeps the inputs' strides (views stay views).
    leaves = {k: (v.to(dtype) if dtype else v.detach()).requires_grad_() for k, v in inputs.items() if v is not None}
    y = fn(leaves['x'], leaves['weight'], leaves['bias'], groups, eps, add=leaves.get('add'), scale=leaves.get('scale'),
           shift=leaves.get('shift'), silu=silu)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)) if dy is None else dy
    dy = dy.to(y.device, y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads)), dy


def assert_matches_float64(inputs, groups, silu, fn=group_norm_act):
    y, grads, dy = run_with_grads(fn, inputs, groups, silu)
    y64, grads64, _ = run_with_grads(group_norm_act_reference, inputs, groups, silu, dy=dy, dtype=torch.float64)
    x = inputs['x']
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    for name, got, want in [('y', y, y64)] + [(f'd{k}', grads[k], grads64[k]) for k in grads]:
        rtol, atol = TOLERANCE[got.dtype]
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * max(1.0, want.abs().max().item()),
                                   msg=lambda m: f'{name}: {m}')

#----------------------------------------------------------------------------
# The 'torch' path (the CPU fallback) against the float64 reference.

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('flags', [(True, True, True, True), (False, False, False, False), (True, False, False, True),
                                   (False, True, True, False), (False, False, True, True)],
                         ids=lambda f: ''.join(n for n, on in zip(['add', 'scale', 'shift', 'silu'], f) if on) or 'plain')
def test_torch_path_matches_float64(dtype, channels_last, flags):
    set_backend('torch')
    add, scale, shift, silu = flags
    inputs, groups = random_inputs(dtype=dtype, channels_last=channels_last, add=add, scale=scale, shift=shift)
    assert_matches_float64(inputs, groups, silu)


def test_modulation_shapes_and_views():
    """[N, C, 1, 1] modulations and the non-contiguous [N, C] halves UNetBlock gets from chunk()."""
    inputs, groups = random_inputs()
    params = torch.randn(2, 32)
    scale, shift = params.chunk(2, dim=1)
    assert not scale.is_contiguous()
    expected = group_norm_act_reference(inputs['x'], inputs['weight'], inputs['bias'], groups, 1e-5,
                                        scale=scale.contiguous(), shift=shift.contiguous())
    for backend in ('torch', 'cpu'):
        if backend == 'cpu':
            register_backend('cpu', ReferenceBackend)
        set_backend(backend)
        for s, t in [(scale, shift), (scale[:, :, None, None], shift[:, :, None, None])]:
            y = group_norm_act(inputs['x'], inputs['weight'], inputs['bias'], groups, 1e-5, scale=s, shift=t)
            torch.testing.assert_close(y, expected)


def test_torch_path_without_grad_does_not_touch_inputs():
    """The in-place SiLU of the inference path only ever writes to its own intermediates."""
    set_backend('torch')
    inputs, groups = random_inputs(add=False, scale=False, shift=False)
    x = inputs['x'].clone()
    with torch.no_grad():
        y = group_norm_act(x, inputs['weight'], inputs['bias'], groups, 1e-5, silu=True)
    assert torch.equal(x, inputs['x']) and y.data_ptr() != x.data_ptr()

#----------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize('case,match', [
    (dict(x=torch.randn(2, 8, 4)), r'\[N, C, H, W\]'),
    (dict(groups=3), 'cannot be split into 3 groups'),
    (dict(weight=torch.ones(7)), r'weight as a float \[8\] tensor on cpu, got \[7\]'),
    (dict(add=torch.randn(2, 8, 2)), r'add as a float \[2, 8\] or \[2, 8, 1, 1\] tensor on cpu, got \[2, 8, 2\]'),
    (dict(scale=torch.randn(8)), r'scale as a float .* got \[8\]'),
    (dict(shift=torch.ones(2, 8, dtype=torch.int32)), r'shift as a float .* got \[2, 8\] torch.int32'),
    (dict(x=torch.ones(2, 8, 4, 4, dtype=torch.int64)), 'floating-point'),
])
def test_bad_input_raises(case, match):
    args = dict(x=torch.randn(2, 8, 4, 4), weight=torch.ones(8), bias=torch.zeros(8), groups=2, add=None, scale=None,
                shift=None)
    args.update(case)
    with pytest.raises(GroupNormActError, match=match):
        group_norm_act(args['x'], args['weight'], args['bias'], args['groups'], 1e-5, add=args['add'], scale=args['scale'],
                       shift=args['shift'])

#----------------------------------------------------------------------------
# Dispatch.

class _Unavailable(ReferenceBackend):
    available = staticmethod(lambda device_type: False)


def test_backend_names_and_env_var(monkeypatch):
    assert get_backend() == 'auto'
    monkeypatch.setenv(ENV_VAR, 'torch')
    assert get_backend() == 'torch' and resolve_backend('cpu') == 'torch'
    set_backend('auto')  # set_backend wins over the environment
    assert get_backend() == 'auto'
    with pytest.raises(KernelBackendError, match='unknown kernel backend'):
        set_backend('fastest')
    set_backend(None)
    monkeypatch.setenv(ENV_VAR, 'gpu')
    with pytest.raises(KernelBackendError, match=ENV_VAR):
        get_backend()


def test_auto_on_cpu_prefers_native_and_never_the_interpreter():
    register_backend('triton', ReferenceBackend)  # pretend the Triton kernels could run on CPU (the interpreter)
    register_backend('cpu', _Unavailable)
    assert resolve_backend('cpu') == 'torch'
    register_backend('cpu', ReferenceBackend)
    assert resolve_backend('cpu') == 'cpu'
    assert resolve_backend('meta') == 'torch'


def test_auto_on_cuda_order():
    register_backend('cuda', _Unavailable)
    register_backend('triton', _Unavailable)
    assert resolve_backend('cuda') == 'torch'
    register_backend('triton', ReferenceBackend)
    assert resolve_backend('cuda') == 'triton'
    register_backend('cuda', ReferenceBackend)
    assert resolve_backend('cuda') == 'cuda'


def test_explicit_backend_unavailable_for_device_raises():
    register_backend('cuda', _Unavailable)
    set_backend('cuda')
    inputs, groups = random_inputs()
    with pytest.raises(KernelBackendError, match="'cuda' is not available for cpu tensors"):
        group_norm_act(inputs['x'], inputs['weight'], inputs['bias'], groups, 1e-5)


def test_native_backend_is_used_when_available():
    if not is_available('cpu', 'cpu'):
        pytest.skip('native CPU extension not built')
    assert resolve_backend('cpu') == 'cpu'
    inputs, groups = random_inputs(dtype=torch.bfloat16, channels_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error', KernelFallbackWarning)
        assert_matches_float64(inputs, groups, silu=True)
    assert all(SelfCheck.verdicts().values()) and SelfCheck.verdicts()

#----------------------------------------------------------------------------
# Self-check: a wrong or crashing kernel is replaced by the reference, with one warning.

class _WrongForward(ReferenceBackend):
    @staticmethod
    def forward(*args):
        y, mean, rstd = reference_forward(*args)
        return y + 0.05, mean, rstd


class _WrongBackward(ReferenceBackend):
    @staticmethod
    def backward(*args):
        dx, *rest = reference_backward(*args)
        return (dx * 1.1, *rest)


class _WrongMemoryFormat(ReferenceBackend):
    @staticmethod
    def forward(*args):
        y, mean, rstd = reference_forward(*args)
        return y.contiguous(), mean, rstd


class _Crashing(ReferenceBackend):
    @staticmethod
    def forward(*args):
        raise RuntimeError('no kernel image is available for execution on the device')


@pytest.mark.parametrize('broken,message', [(_WrongForward, 'y differs'), (_WrongBackward, 'dx differs'),
                                            (_WrongMemoryFormat, 'memory format'), (_Crashing, 'no kernel image')])
def test_broken_backend_falls_back_with_one_warning(broken, message):
    register_backend('cpu', broken)
    set_backend('cpu')
    inputs, groups = random_inputs(channels_last=True)
    with pytest.warns(KernelFallbackWarning) as record:
        for _ in range(3):
            assert_matches_float64(inputs, groups, silu=True)
    texts = [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]
    assert len(texts) == 1, texts
    assert "'cpu'" in texts[0] and message in texts[0]
    assert list(SelfCheck.verdicts().values()) == [False]


def test_self_check_runs_once_per_configuration():
    calls = []

    class Counting(ReferenceBackend):
        @staticmethod
        def forward(*args):
            calls.append(args[0].shape)
            return reference_forward(*args)
    register_backend('cpu', Counting)
    set_backend('cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('error', KernelFallbackWarning)
        for channels_last, silu in itertools.product([False, True], [False, True]):
            inputs, groups = random_inputs(channels_last=channels_last)
            for _ in range(2):
                run_with_grads(group_norm_act, inputs, groups, silu)
    verdicts = SelfCheck.verdicts()
    assert len(verdicts) == 4 and all(verdicts.values())
    # Per configuration: two self-check shapes, then the two real calls.
    assert len(calls) == 4 * (2 + 2)

#----------------------------------------------------------------------------
# The custom ops.

@pytest.mark.parametrize('flags', [(True, True, True, True), (False, False, False, False)], ids=['all', 'none'])
def test_custom_op_opcheck(flags):
    register_backend('cpu', ReferenceBackend)
    add, scale, shift, silu = flags
    inputs, groups = random_inputs(shape=(2, 8, 3, 3), groups=2, channels_last=True, add=add, scale=scale, shift=shift)
    args = [inputs[k].requires_grad_() if inputs[k] is not None else None for k in ('x', 'weight', 'bias', 'add', 'scale', 'shift')]
    torch.library.opcheck(_fwd_op._opoverload, (*args, groups, 1e-5, silu, 'cpu'),
                          test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))

def strided_inputs(layout, seed=3):
    """Inputs with the strides Inductor may hand the flexible_layout ops: x a channel slice of a wider tensor
    (not dense) or with H and W transposed (dense in neither format), add/scale/shift halves of [N, 2C] rows."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = 2, 8, 5, 6
    wide = torch.randn(N, 2 * C, H, W, generator=g) * 2 + 1
    x = {'channel_slice_nhwc': wide.contiguous(memory_format=torch.channels_last)[:, 3:3 + C],
         'channel_slice_nchw': wide[:, 3:3 + C],
         'hw_transposed': torch.randn(N, C, W, H, generator=g).transpose(2, 3)}[layout]
    halves = lambda: (torch.randn(N, 2 * C, generator=g) * 0.5).chunk(2, dim=1)
    add, scale = halves()
    shift, _ = halves()
    return dict(x=x, weight=torch.randn(C, generator=g) * 0.5 + 1, bias=torch.randn(C, generator=g),
                add=add, scale=scale, shift=shift), 4


@pytest.mark.parametrize('layout', ['channel_slice_nhwc', 'channel_slice_nchw', 'hw_transposed'])
def test_custom_op_any_input_strides(layout):
    """The ops take any strides (they are tagged flexible_layout); the native kernels, which compute on dense
    tensors, get them in their layout and the results match the reference."""
    inputs, groups = strided_inputs(layout)
    assert not inputs['x'].is_contiguous() and not inputs['scale'].is_contiguous()
    if not is_available('cpu', 'cpu'):
        register_backend('cpu', ReferenceBackend)
    set_backend('cpu')
    assert_matches_float64(inputs, groups, silu=True)
    register_backend('cpu', ReferenceBackend)
    args = [inputs[k].requires_grad_() for k in ('x', 'weight', 'bias', 'add', 'scale', 'shift')]
    torch.library.opcheck(_fwd_op._opoverload, (*args, groups, 1e-5, True, 'cpu'),
                          test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))


def test_inductor_passes_channels_last_through_custom_ops():
    """On CPU Inductor lays convolution graphs out channels_last. The ops take those tensors as they are: the
    compiled code calls them on the convolution's NHWC output and plans NHWC outputs (forward y and backward dx), and
    the compiled step matches eager."""
    from torch._inductor.utils import run_and_get_code
    if not is_available('cpu', 'cpu'):
        register_backend('cpu', ReferenceBackend)
    set_backend('cpu')
    torch.manual_seed(0)
    conv1, conv2, emb = torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 3, padding=1), torch.nn.Linear(5, 32)
    weight, bias = (torch.randn(16) * 0.5 + 1).requires_grad_(), torch.randn(16).requires_grad_()
    params = [weight, bias, *conv1.parameters(), *conv2.parameters(), *emb.parameters()]
    x, e = torch.randn(2, 4, 6, 6), torch.randn(2, 5)

    def loss_fn(x, e):
        scale, shift = emb(e).chunk(2, dim=1)
        return conv2(group_norm_act(conv1(x), weight, bias, 4, 1e-5, scale=scale, shift=shift)).square().mean()

    def step(fn):
        for p in params:
            p.grad = None
        loss = fn(x, e)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in params]
    expected = step(loss_fn)
    torch._dynamo.reset()
    # Compiled afresh: Inductor's caches key graphs by their code, not by the ops' layout tags.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got, codes = run_and_get_code(step, torch.compile(loss_fn, fullgraph=True))
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    nhwc = '(2, 16, 6, 6), (576, 1, 96, 16)'
    for op in (_fwd_op, _bwd_op):
        name = op._qualname.replace('::', '.')  # as the generated code spells it
        planned = [line for code in codes for line in code.splitlines()
                   if 'assert_size_stride' in line and f'{name}.default' in line and '(2, 16, 6, 6)' in line]
        assert planned and all(nhwc in line for line in planned), (op, planned)


#----------------------------------------------------------------------------
# torch.compile of whole U-Nets: no graph break, no restarted trace, same numbers as eager.

def tiny_unet(arch):
    from d2o_fast.nets import DhariwalUNet, SongUNet
    torch.manual_seed(0)
    kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2],
                  attn_resolutions=[4], num_blocks=1, dropout=0)
    net = SongUNet(**kwargs) if arch == 'song' else DhariwalUNet(**kwargs)
    with torch.no_grad():  # EDM zero-initialises output layers; offsets make every gradient path non-trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def compiled_step_matches_eager(net, compile_backend, device='cpu'):
    x, noise = torch.randn(2, 3, 8, 8).to(device), torch.randn(2).to(device)
    loss_fn = lambda x, noise: net(x, noise, None).square().mean()

    def step(fn):
        net.zero_grad()
        loss = fn(x, noise)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]
    eager_loss, eager_grads = step(loss_fn)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()
    compiled_loss, compiled_grads = step(torch.compile(loss_fn, fullgraph=True, backend=compile_backend))
    assert not torch._dynamo.utils.counters['graph_break'], dict(torch._dynamo.utils.counters['graph_break'])
    # Traced once: a restart (e.g. a NumPy scalar attribute Dynamo cannot tensorify) repeats the whole trace.
    restarts = [m.restart_reasons for m in torch._dynamo.utils.get_compilation_metrics() if m.restart_reasons]
    assert not restarts, restarts
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('arch', ['song', 'dhariwal'])
def test_compiled_unet_through_custom_op(arch):
    """Dynamo + AOTAutograd trace the custom ops (fake kernels, autograd) with fullgraph=True."""
    register_backend('cpu', ReferenceBackend)
    set_backend('cpu')
    compiled_step_matches_eager(tiny_unet(arch), 'aot_eager')


@pytest.mark.slow
def test_compiled_unet_inductor():
    """The full inductor pipeline around the custom ops (the native CPU kernels when built)."""
    if not is_available('cpu', 'cpu'):
        register_backend('cpu', ReferenceBackend)
    set_backend('cpu')
    compiled_step_matches_eager(tiny_unet('song'), 'inductor')
