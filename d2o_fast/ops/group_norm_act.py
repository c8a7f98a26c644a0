"""Fused GroupNorm + per-(sample, channel) modulation + optional SiLU.

    y = act(GN(x + add) * (1 + scale) + shift)

with GN's own affine weight/bias, statistics in float32 whatever the input dtype.
This is the one op family behind every norm site of SongUNet (norm1(x + params))
and DhariwalUNet (adaptive scale/shift). `group_norm_act_reference` is the ground truth
the fast kernels are tested against.

Backend contract (implemented by triton_group_norm.py, native.py and the reference below):

    forward(x, weight, bias, add, scale, shift, num_groups: int, eps: float, silu: bool) -> (y, mean, rstd)
        x: [N, C, H, W] float32/bfloat16/float16, contiguous in NCHW or channels_last;
        add/scale/shift: None or contiguous [N, C] tensors (any float dtype); weight/bias: [C] (any float dtype);
        y: same dtype & memory format as x; mean, rstd: float32 [N, num_groups] (statistics of x + add).
    backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups: int, silu: bool)
        -> (dx, dweight, dbias, dadd, dscale, dshift)
        dy: shape of x (any layout; the kernels use x's); dx has x's dtype and memory format;
        None for inputs that were None; every gradient has the dtype of its input.
    available(device_type) -> bool

Dispatch (d2o_fast/ops/dispatch.py) picks the backend; the non-'torch' backends run behind
the torch.library custom ops d2o_fast::group_norm_act_fwd_v2 / _bwd_v2 (fake kernels + autograd
registered), so torch.compile(fullgraph=True) traces through them without a graph break.
They take inputs of any strides (tagged flexible_layout, so Inductor's channels_last convolution
graphs reach the kernels without transposes) and give the backends the layout above.
Their first run per configuration is self-checked against the reference.
"""

import torch
import torch.nn.functional as F

from d2o_fast.errors import D2OFastError
from d2o_fast.ops.dispatch import SelfCheck, implementation, resolve_backend

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GroupNormActError(D2OFastError, ValueError):
    """Inputs the fused GroupNorm op cannot accept (wrong shapes, group count, dtype)."""

#----------------------------------------------------------------------------
# Pure PyTorch reference.

def memory_format_of(x):
    """channels_last for tensors laid out that way, else contiguous_format."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _as_nc11(t, x):
    return t.reshape(x.shape[0], x.shape[1], 1, 1)


def group_norm_act_reference(x, weight, bias, num_groups, eps, add=None, scale=None, shift=None, silu=True):
    """Reference: float32 math (float64 for float64 inputs), output in x's dtype and memory format."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute_dtype)  # no copy for float32
    if add is not None:
        h = h + _as_nc11(add, x).to(compute_dtype)
    w, b = weight.to(compute_dtype), bias.to(compute_dtype)
    if scale is None and shift is None:
        h = F.group_norm(h, num_groups, weight=w, bias=b, eps=eps)
    else:
        # GN(h) * (1 + scale) + shift == xhat * A + B with per-(sample, channel) A, B: one pass over h instead of three.
        s1 = 1 + _as_nc11(scale, x).to(compute_dtype) if scale is not None else 1
        A = w.reshape(1, -1, 1, 1) * s1
        B = b.reshape(1, -1, 1, 1) * s1
        if shift is not None:
            B = B + _as_nc11(shift, x).to(compute_dtype)
        h = torch.addcmul(B, F.group_norm(h, num_groups, eps=eps), A)
    if silu:
        h = F.silu(h, inplace=not h.requires_grad)
    return h.to(dtype=x.dtype, memory_format=memory_format_of(x))

#----------------------------------------------------------------------------
# The reference in contract form: the fallback behind the custom ops, and a readable spec of the kernels' math.

def _per_channel(stat, num_channels):
    """[N, G] group statistic -> [N, C, 1, 1]."""
    return stat.repeat_interleave(num_channels // stat.shape[1], dim=1)[:, :, None, None]


def reference_forward(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    N, C = x.shape[:2]
    ct = torch.promote_types(x.dtype, torch.float32)
    h = x.to(ct) if add is None else x.to(ct) + add.to(ct).reshape(N, C, 1, 1)
    var, mean = torch.var_mean(h.reshape(N, num_groups, -1), dim=2, correction=0)
    y = group_norm_act_reference(x, weight, bias, num_groups, eps, add=add, scale=scale, shift=shift, silu=silu)
    return y, mean, torch.rsqrt(var + eps)


def reference_backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    # xhat = (h - mean) * rstd, g = xhat * w + b, u = g * (1 + s) + shift, y = act(u), du = dy * act'(u):
    #   dh = rstd * (du * (1 + s) * w - c1 - xhat * c2),  c1 / c2 = group means of du * (1 + s) * w * (1 | xhat)
    N, C, H, W = x.shape
    ct = torch.promote_types(x.dtype, torch.float32)  # float32 math; float64 for float64 inputs
    h = x.to(ct) if add is None else x.to(ct) + add.to(ct).reshape(N, C, 1, 1)
    xhat = (h - _per_channel(mean.to(ct), C)) * _per_channel(rstd.to(ct), C)
    w, b = weight.to(ct).reshape(1, C, 1, 1), bias.to(ct).reshape(1, C, 1, 1)
    s1 = 1 + scale.to(ct).reshape(N, C, 1, 1) if scale is not None else torch.ones_like(w)
    du = dy.to(ct)
    if silu:
        u = (xhat * w + b) * s1
        if shift is not None:
            u = u + shift.to(ct).reshape(N, C, 1, 1)
        sig = torch.sigmoid(u)
        du = du * sig * (1 + u * (1 - sig))
    sum_du = du.sum(dim=(2, 3))
    sum_du_xhat = (du * xhat).sum(dim=(2, 3))
    k = (w * s1).reshape(-1, C)
    group_mean = lambda t: _per_channel((k * t).reshape(N, num_groups, -1).mean(dim=2) / (H * W), C)
    dh = _per_channel(rstd.to(ct), C) * (du * k.reshape(-1, C, 1, 1) - group_mean(sum_du) - xhat * group_mean(sum_du_xhat))
    dx = dh.to(dtype=x.dtype, memory_format=memory_format_of(x))
    dadd = dh.sum(dim=(2, 3)) if add is not None else None
    return parameter_grads(sum_du, sum_du_xhat, dx, dadd, weight, bias, add, scale, shift)


def parameter_grads(sum_du, sum_du_xhat, dx, dadd, weight, bias, add, scale, shift):
    """Contract outputs from the float32 [N, C] sums S1 = sum_hw du and S2 = sum_hw du * xhat (shared by backends)."""
    ct = sum_du.dtype
    s1 = 1 + scale.to(ct) if scale is not None else 1
    dweight = (sum_du_xhat * s1).sum(0).to(weight.dtype)
    dbias = (sum_du * s1).sum(0).to(bias.dtype)
    dscale = (sum_du_xhat * weight.to(ct) + sum_du * bias.to(ct)).to(scale.dtype) if scale is not None else None
    dshift = sum_du.to(shift.dtype) if shift is not None else None
    dadd = dadd.to(add.dtype) if add is not None else None
    return dx, dweight, dbias, dadd, dscale, dshift


class ReferenceBackend:
    """The reference as a backend object (what a backend that fails its self-check is replaced by)."""
    forward = staticmethod(reference_forward)
    backward = staticmethod(reference_backward)
    available = staticmethod(lambda device_type: True)

#----------------------------------------------------------------------------
# Self-check of a backend against the float64 reference.

# Largest accepted error relative to max(1, max |expected|), by the dtype of the compared output.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _random_case(x, weight, add, scale, shift, shape, num_groups, generator):
    """Random inputs with the caller's dtypes, layout and device."""
    N, C = shape[:2]
    dev = x.device

    def randn(shape, dtype, std=1.0, mean=0.0):
        return (torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean).to(dev, dtype)
    fmt = memory_format_of(x)
    case = dict(
        x=randn(shape, x.dtype, 2.0, 0.5).contiguous(memory_format=fmt),
        weight=randn([C], weight.dtype, 0.5, 1.0), bias=randn([C], weight.dtype),
        add=randn([N, C], add.dtype, 0.5) if add is not None else None,
        scale=randn([N, C], scale.dtype, 0.5) if scale is not None else None,
        shift=randn([N, C], shift.dtype, 0.5) if shift is not None else None)
    dy = randn(shape, x.dtype).contiguous(memory_format=fmt)
    return case, dy


def compare_with_reference(impl, x, weight, add, scale, shift, num_groups, eps, silu):
    """None if backend `impl` matches the float64 reference on small random inputs shaped like the call, else why not."""
    generator = torch.Generator().manual_seed(1234)
    C = x.shape[1]
    for shape, groups in [((2, C, 3, 5), num_groups), ((2, 12, 5, 7), 3)]:
        case, dy = _random_case(x, weight, add, scale, shift, shape, groups, generator)
        case64 = {k: None if v is None else v.double() for k, v in case.items()}
        # The float64 contract reference (autograd is unavailable here: custom-op kernels run below the autograd key).
        y64, mean64, rstd64 = reference_forward(*case64.values(), groups, eps, silu)
        expected = reference_backward(dy.double(), *case64.values(), mean64, rstd64, groups, silu)

        y, mean, rstd = impl.forward(*case.values(), groups, eps, silu)
        got = tuple(impl.backward(dy, *case.values(), mean, rstd, groups, silu))
        if len(got) != 6:
            return f'backward returned {len(got)} values instead of 6'
        like = [case['x'], mean64.float(), mean64.float()] + list(case.values())
        checks = zip(['y', 'mean', 'rstd', 'dx', 'dweight', 'dbias', 'dadd', 'dscale', 'dshift'],
                     (y, mean, rstd, *got), (y64, mean64, rstd64, *expected), like)
        for name, value, want, like_tensor in checks:
            problem = _mismatch(name, value, want, like_tensor, shape)
            if problem is not None:
                return problem
        if memory_format_of(y) != memory_format_of(case['x']) or memory_format_of(got[0]) != memory_format_of(case['x']):
            return f'wrong memory format of y or dx for shape {list(shape)}'
    return None


def _mismatch(name, value, expected, like, shape):
    if expected is None:
        return None if value is None else f'{name} should be None'
    if value is None or value.shape != expected.shape or value.dtype != like.dtype:
        desc = None if value is None else f'{value.dtype} {list(value.shape)}'
        return f'{name} is {desc}, expected {like.dtype} {list(expected.shape)}'
    err = (value.double() - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    if not err <= SELF_CHECK_TOLERANCE[like.dtype]:  # also catches NaN
        return f'{name} differs from the reference by {err:.3g} (relative) for shape {list(shape)}'
    return None


def _trusted(backend, x, weight, add, scale, shift, num_groups, eps, silu):
    """The backend's implementation if it passed its self-check for this configuration, else the reference."""
    impl = implementation(backend)
    key = (backend, str(x.device), x.dtype, memory_format_of(x), weight.dtype,
           *(None if t is None else t.dtype for t in (add, scale, shift)), f'silu={silu}')
    check = lambda: compare_with_reference(impl, x, weight, add, scale, shift, num_groups, eps, silu)
    return impl if SelfCheck.passed(key, check) else ReferenceBackend

#----------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake kernels and autograd.

# Both ops are tagged flexible_layout: Inductor hands them its tensors in whatever layout it chose for them. On
# CPU it lays convolution graphs out channels_last; under the default constraint (the traced strides, NCHW) it
# would transpose every tensor into and out of each op. The ops then bring their inputs into the layout the
# kernels take (_kernel_layout; a no-op for the dense tensors Inductor produces) and give their outputs x's strides,
# and the fakes state exactly that, so the strides Inductor plans with are the ones the kernels return.
_FLEXIBLE = (torch.Tag.flexible_layout,)
# The ops' names carry the version of that layout contract (v2: flexible_layout). Inductor's on-disk caches key a
# compiled graph by its code, which names the ops but not their tags, so graphs compiled against the NCHW-only v1 ops
# would otherwise be reused from a warm cache: correct, but with the transposes, and running the NCHW kernels, whose
# rounding gives another training trajectory than a fresh compile.
_FWD_NAME, _BWD_NAME = 'd2o_fast::group_norm_act_fwd_v2', 'd2o_fast::group_norm_act_bwd_v2'


def _kernel_layout(x, *params):
    """x dense in its own memory format (NCHW or channels_last), every other tensor contiguous (None stays None)."""
    return (x.contiguous(memory_format=memory_format_of(x)),
            *(None if t is None else t.contiguous() for t in params))


def _strided_like(t, x):
    """t (shaped like x) with x's strides: a backend that returns another valid layout is copied, never trusted."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


@torch.library.custom_op(_FWD_NAME, mutates_args=(), tags=_FLEXIBLE)
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: torch.Tensor | None,
            scale: torch.Tensor | None, shift: torch.Tensor | None, num_groups: int, eps: float, silu: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, weight, bias, add, scale, shift = _kernel_layout(x, weight, bias, add, scale, shift)
    impl = _trusted(backend, x, weight, add, scale, shift, num_groups, eps, silu)
    y, mean, rstd = impl.forward(x, weight, bias, add, scale, shift, num_groups, eps, silu)
    return _strided_like(y, x), mean.contiguous(), rstd.contiguous()


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias, add, scale, shift, num_groups, eps, silu, backend):
    x = _kernel_layout(x)[0]
    stats = x.new_empty([x.shape[0], num_groups], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op(_BWD_NAME, mutates_args=(), tags=_FLEXIBLE)
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: torch.Tensor | None,
            scale: torch.Tensor | None, shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
            num_groups: int, eps: float, silu: bool, backend: str) -> list[torch.Tensor]:
    """[dx, dweight, dbias] + [dadd, dscale, dshift for those inputs that are not None] (ops cannot return None)."""
    # dy may have any layout: the backend contract has every backend bring it to x's.
    x, weight, bias, add, scale, shift, mean, rstd = _kernel_layout(x, weight, bias, add, scale, shift, mean, rstd)
    impl = _trusted(backend, x, weight, add, scale, shift, num_groups, eps, silu)
    grads = [g for g in impl.backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu)
             if g is not None]
    return [_strided_like(grads[0], x)] + [g.contiguous() for g in grads[1:]]


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, eps, silu, backend):
    x, *params = _kernel_layout(x, weight, bias, add, scale, shift)
    return [torch.empty_like(t) for t in (x, *params) if t is not None]


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, scale, shift, num_groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.config = (num_groups, eps, silu, backend)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    num_groups, eps, silu, backend = ctx.config
    grads = iter(_bwd_op(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, eps, silu, backend))
    dx, dweight, dbias = next(grads), next(grads), next(grads)
    dadd, dscale, dshift = (next(grads) if t is not None else None for t in (add, scale, shift))
    return dx, dweight, dbias, dadd, dscale, dshift, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)

#----------------------------------------------------------------------------
# Public entry point.

def check_inputs(x, weight, bias, num_groups, add=None, scale=None, shift=None, kernel=False):
    """Raise GroupNormActError unless the tensors fit the op; kernel=True adds what the fused kernels also need
    (a FAST_DTYPES x with at least one element)."""
    if x.dim() != 4:
        raise GroupNormActError(f'group_norm_act expects x of shape [N, C, H, W], got {list(x.shape)}')
    if not x.is_floating_point() or (kernel and x.dtype not in FAST_DTYPES):
        allowed = '/'.join(str(d).replace('torch.', '') for d in FAST_DTYPES) if kernel else 'floating-point'
        raise GroupNormActError(f'group_norm_act expects a {allowed} x, got {x.dtype}')
    if kernel and x.numel() == 0:
        raise GroupNormActError(f'group_norm_act got an empty x of shape {list(x.shape)}')
    N, C = x.shape[:2]
    if num_groups < 1 or C % num_groups != 0:
        raise GroupNormActError(f'group_norm_act: {C} channels cannot be split into {num_groups} groups')
    for name, t in (('weight', weight), ('bias', bias), ('add', add), ('scale', scale), ('shift', shift)):
        shapes = [(C,)] if name in ('weight', 'bias') else [(N, C), (N, C, 1, 1)]
        if t is None and name not in ('weight', 'bias'):
            continue
        if t is None or tuple(t.shape) not in shapes or not t.is_floating_point() or t.device != x.device:
            wanted = ' or '.join(str(list(s)) for s in shapes)
            got = None if t is None else f'{list(t.shape)} {t.dtype} on {t.device}'
            raise GroupNormActError(f'group_norm_act expects {name} as a float {wanted} tensor on {x.device}, got {got}')


def group_norm_act(x, weight, bias, num_groups, eps, add=None, scale=None, shift=None, silu=True):
    """y = act(GN(x + add) * (1 + scale) + shift); add/scale/shift are [N, C] or [N, C, 1, 1]."""
    check_inputs(x, weight, bias, num_groups, add, scale, shift)
    backend = resolve_backend(x.device.type)
    if backend == 'torch' or x.dtype not in FAST_DTYPES:
        return group_norm_act_reference(x, weight, bias, num_groups, eps, add=add, scale=scale, shift=shift, silu=silu)
    N, C = x.shape[:2]
    add, scale, shift = (None if t is None else t.reshape(N, C) for t in (add, scale, shift))
    y, _, _ = _fwd_op(x, weight, bias, add, scale, shift, int(num_groups), float(eps), bool(silu), backend)
    return y


__all__ = ['group_norm_act', 'group_norm_act_reference', 'reference_forward', 'reference_backward', 'parameter_grads', 'ReferenceBackend',
           'compare_with_reference', 'memory_format_of', 'check_inputs', 'GroupNormActError', 'SELF_CHECK_TOLERANCE', 'FAST_DTYPES']
