"""Triton kernels of the fused GroupNorm + modulation + SiLU op (see group_norm_act.py).

Implements the backend contract documented in `d2o_fast.ops.group_norm_act`:
    forward(x, weight, bias, add, scale, shift, num_groups, eps, silu) -> (y, mean, rstd)
    backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu)
        -> (dx, dweight, dbias, dadd, dscale, dshift)

One program per (sample, group). A group is walked as a [channels, pixels] tile grid, so
the same kernel serves NCHW (pixels contiguous) and channels_last (channels contiguous)
through three strides, for any channels-per-group and any H*W. Statistics are accumulated
in float32 with Chan's pairwise merge of per-tile (count, mean, M2), which stays accurate
when |mean| >> std, unlike sum / sum-of-squares.

With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors
(tests only; `available('cpu')` says so). The dispatcher never picks them on CPU by itself.
"""

import torch
import triton
import triton.language as tl
from triton import knobs

from d2o_fast.ops.group_norm_act import parameter_grads

# Whether the kernels below were built for the interpreter (decided at decoration time).
INTERPRETED = bool(knobs.runtime.interpret)

# Elements per [channels, pixels] tile: large enough to keep a GPU busy, small enough for registers.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_C = 64


def available(device_type):
    """Whether these kernels can run on tensors of `device_type`."""
    if device_type == 'cuda':
        return torch.cuda.is_available() and not INTERPRETED
    return device_type == 'cpu' and INTERPRETED

#----------------------------------------------------------------------------
# Kernels.

@triton.jit
def _group_norm_act_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    C, HW, G, CPG, stride_n, stride_c, stride_hw, eps,
    HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    x_base = x_ptr + n.to(tl.int64) * stride_n
    y_base = y_ptr + n.to(tl.int64) * stride_n
    c_offs = tl.arange(0, BLOCK_C)
    hw_offs = tl.arange(0, BLOCK_HW)

    # Pass 1: statistics of h = x + add, merged tile by tile (Chan et al.).
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + c_offs
        c_mask = cc < CPG
        ch = g * CPG + cc
        if HAS_ADD:
            a = tl.load(add_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hh = hw0 + hw_offs
            mask = c_mask[:, None] & (hh < HW)[None, :]
            offs = ch[:, None].to(tl.int64) * stride_c + hh[None, :].to(tl.int64) * stride_hw
            h = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                h = h + a[:, None]
            t_count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            t_mean = tl.sum(tl.sum(tl.where(mask, h, 0.0), axis=1), axis=0) / t_count
            d = tl.where(mask, h - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            new_count = count + t_count
            delta = t_mean - mean
            mean = mean + delta * (t_count / new_count)
            m2 = m2 + t_m2 + delta * delta * (count * t_count / new_count)
            count = new_count
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)

    # Pass 2: y = act(h * A + B) with per-channel A = rstd * w * (1 + s), B = (b - mean * rstd * w) * (1 + s) + shift.
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + c_offs
        c_mask = cc < CPG
        ch = g * CPG + cc
        w = tl.load(w_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
        A = w * rstd
        B = b - mean * A
        if HAS_SCALE:
            s1 = 1.0 + tl.load(scale_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
            A = A * s1
            B = B * s1
        if HAS_SHIFT:
            B = B + tl.load(shift_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            B = B + A * tl.load(add_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hh = hw0 + hw_offs
            mask = c_mask[:, None] & (hh < HW)[None, :]
            offs = ch[:, None].to(tl.int64) * stride_c + hh[None, :].to(tl.int64) * stride_hw
            x = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
            u = x * A[:, None] + B[:, None]
            if SILU:
                u = u / (1.0 + tl.exp(-u))
            tl.store(y_base + offs, u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_params(w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, n, C, ch, c_mask,
                    HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    """GN weight and bias, add, 1 + scale and shift of one block of channels (neutral values where absent)."""
    w = tl.load(w_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    s1 = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    sh = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_ADD:
        a = tl.load(add_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(scale_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    return w, b, a, s1, sh


@triton.jit
def _xhat_and_grad_u(x_ptr, dy_ptr, offs, mask, a, w, b, s1, sh, mean, rstd, SILU: tl.constexpr):
    """Normalised input of one tile and the gradient at u = GN(h) * (1 + scale) + shift (through SiLU if any)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    du = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x + a[:, None] - mean) * rstd
    if SILU:
        u = (xhat * w[:, None] + b[:, None]) * s1[:, None] + sh[:, None]
        sig = 1.0 / (1.0 + tl.exp(-u))
        du = du * sig * (1.0 + u * (1.0 - sig))
    return xhat, du


@triton.jit
def _group_norm_act_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    s1_ptr, s2_ptr, dadd_ptr,
    C, HW, G, CPG, stride_n, stride_c, stride_hw,
    HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # With xhat = (h - mean) * rstd, g = xhat * w + b, u = g * (1 + s) + shift, y = act(u), du = dy * act'(u):
    #   S1[c] = sum_hw du,  S2[c] = sum_hw du * xhat   (written out; dweight/dbias/dscale/dshift follow from them)
    #   dh = rstd * (du * (1 + s) * w - c1 - xhat * c2),  c1 / c2 = group means of du * (1 + s) * w * (1 | xhat)
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n
    c_offs = tl.arange(0, BLOCK_C)
    hw_offs = tl.arange(0, BLOCK_HW)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)

    # Pass 1: per-channel sums S1, S2 and the group sums behind c1, c2.
    sum1 = 0.0
    sum2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + c_offs
        c_mask = cc < CPG
        ch = g * CPG + cc
        w, b, a, s1, sh = _channel_params(w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, n, C, ch, c_mask,
                                          HAS_ADD, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hh = hw0 + hw_offs
            mask = c_mask[:, None] & (hh < HW)[None, :]
            offs = base + ch[:, None].to(tl.int64) * stride_c + hh[None, :].to(tl.int64) * stride_hw
            xhat, du = _xhat_and_grad_u(x_ptr, dy_ptr, offs, mask, a, w, b, s1, sh, mean, rstd, SILU)
            du = tl.where(mask, du, 0.0)
            acc1 += tl.sum(du, axis=1)
            acc2 += tl.sum(du * tl.where(mask, xhat, 0.0), axis=1)
        tl.store(s1_ptr + n * C + ch, acc1, mask=c_mask)
        tl.store(s2_ptr + n * C + ch, acc2, mask=c_mask)
        k = w * s1
        sum1 += tl.sum(k * acc1, axis=0)
        sum2 += tl.sum(k * acc2, axis=0)
    inv_m = 1.0 / (CPG * HW)  # no .to(): integer arguments equal to 1 are specialised to Python ints when compiled
    c1 = sum1 * inv_m
    c2 = sum2 * inv_m

    # Pass 2: dx (and dadd = sum_hw dx).
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + c_offs
        c_mask = cc < CPG
        ch = g * CPG + cc
        w, b, a, s1, sh = _channel_params(w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, n, C, ch, c_mask,
                                          HAS_ADD, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        k = w * s1
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hh = hw0 + hw_offs
            mask = c_mask[:, None] & (hh < HW)[None, :]
            offs = base + ch[:, None].to(tl.int64) * stride_c + hh[None, :].to(tl.int64) * stride_hw
            xhat, du = _xhat_and_grad_u(x_ptr, dy_ptr, offs, mask, a, w, b, s1, sh, mean, rstd, SILU)
            dh = rstd * (du * k[:, None] - c1 - xhat * c2)
            tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_ADD:
                acc += tl.sum(tl.where(mask, dh, 0.0), axis=1)
        if HAS_ADD:
            tl.store(dadd_ptr + n * C + ch, acc, mask=c_mask)

#----------------------------------------------------------------------------
# Launchers.

def _geometry(x, num_groups):
    """Grid-independent launch parameters: sizes, layout strides and tile shape."""
    N, C, H, W = x.shape
    HW = H * W
    cpg = C // num_groups
    # Canonical strides of the layout; exact for every dimension of size > 1 of a tensor contiguous in that layout.
    if x.is_contiguous():
        strides = (C * HW, HW, 1)
    else:
        strides = (C * HW, 1, C)
    block_c = min(triton.next_power_of_2(cpg), _MAX_BLOCK_C)
    block_hw = min(triton.next_power_of_2(HW), max(_TILE_ELEMENTS // block_c, 1))
    return N, C, HW, cpg, strides, block_c, block_hw


def _dummy(x):
    """Placeholder pointer for absent optional inputs (never read: guarded by a constexpr flag)."""
    return x


def forward(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    N, C, HW, cpg, (sn, sc, shw), block_c, block_hw = _geometry(x, num_groups)
    y = torch.empty_like(x)
    mean = torch.empty(N, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _group_norm_act_fwd_kernel[(N * num_groups,)](
        x, y, weight, bias,
        add if add is not None else _dummy(x), scale if scale is not None else _dummy(x),
        shift if shift is not None else _dummy(x), mean, rstd,
        C, HW, num_groups, cpg, sn, sc, shw, float(eps),
        HAS_ADD=add is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu),
        BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return y, mean, rstd


def backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    N, C, HW, cpg, (sn, sc, shw), block_c, block_hw = _geometry(x, num_groups)
    dy = dy.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last)
    dx = torch.empty_like(x)
    sum_du = torch.empty(N, C, device=x.device, dtype=torch.float32)
    sum_du_xhat = torch.empty_like(sum_du)
    dadd32 = torch.empty_like(sum_du) if add is not None else None
    _group_norm_act_bwd_kernel[(N * num_groups,)](
        dy, x, dx, weight, bias,
        add if add is not None else _dummy(x), scale if scale is not None else _dummy(x),
        shift if shift is not None else _dummy(x), mean, rstd,
        sum_du, sum_du_xhat, dadd32 if dadd32 is not None else _dummy(sum_du),
        C, HW, num_groups, cpg, sn, sc, shw,
        HAS_ADD=add is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu),
        BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return parameter_grads(sum_du, sum_du_xhat, dx, dadd32, weight, bias, add, scale, shift)

