"""Optimizer and precision plumbing shared by the trainers."""

import contextlib
import warnings

import torch

from d2o_fast.engine import distributed as dist
from d2o_fast.ops import native_bf16

ADAM_EPS = 1e-8
GRAD_CLAMP = 1e5   # nan_to_num bounds for gradients, as the authors

# --precision names: the autocast dtype of each (None: no autocast); 'auto' = bf16 where native, else fp32.
AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}
PRECISIONS = ('auto', *AUTOCAST_DTYPES)
# The discriminator's: no fp16, whose loss scaling follows the generator's precision only.
DISC_PRECISIONS = ('fp32', 'bf16')


def autocast_dtype(precision, device):
    """'auto' = bf16 where the device runs it natively (CUDA, AVX512/AMX CPUs), else fp32; None means no autocast."""
    if precision == 'auto':
        precision = 'bf16' if native_bf16(device.type) else 'fp32'
    elif precision == 'bf16' and not native_bf16(device.type):
        warnings.warn(f'bf16 on this {device.type} is emulated and much slower than fp32; --precision auto picks fp32 here',
                      stacklevel=2)
    return AUTOCAST_DTYPES[precision]


def autocast_context(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_adam(params, lr, betas, device, capturable=False):
    """Fused Adam (one kernel over all tensors, on CUDA and CPU). Unlike foreach / single-tensor Adam, whose bias
    correction reads the step count with .item(), it keeps the step on the device and applies GradScaler's
    inf check itself, so an optimizer step never waits for the device. capturable: it may run inside a CUDA graph."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=ADAM_EPS, fused=True, capturable=capturable)


@contextlib.contextmanager
def stepping_outside_graph():
    """A capturable optimizer (--cudagraphs step) also steps eagerly (warm-up, R1 steps); torch warns once about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='This instance was constructed with capturable=True')
        yield


def finish_gradients(params, optimizer, scaler=None):
    """Average across ranks, unscale (fp16), replace NaN/Inf, step. Averaging first means every rank checks the same
    gradients for Inf/NaN, so all of them skip (fp16) or take the same step."""
    dist.average_gradients(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=GRAD_CLAMP, neginf=-GRAD_CLAMP, out=p.grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
