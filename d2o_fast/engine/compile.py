"""Speed options applied to the networks from outside their code (as torchtitan does): the models stay plain
PyTorch, the trainer decides how they run.

    check_speed_options(cfg, device)        # --cudagraphs off CUDA -> SpeedOptionError
    to_channels_last(module)                # NHWC weights; inputs are converted by the caller
    apply_activation_checkpointing(net)     # every U-Net block recomputes its activations in backward
    compile_forward(module, cfg)            # torch.compile, static shapes, fullgraph; CUDA graphs on request

CUDA graphs (--cudagraphs) use torch.compile mode='reduce-overhead': the forward and backward graphs of
G and D are captured per phase (CUDA graph trees); the optimizer runs as one fused Adam kernel outside the
graphs and R1's double backward stays eager. That keeps the capture inside code torch owns (static input
buffers, memory pool, re-capture on new shapes) instead of a hand-written torch.cuda.graph of the whole
step, at the cost of one launch per phase for the optimizer.
"""

import torch
import torch.utils.checkpoint

from d2o_fast.errors import D2OFastError
from d2o_fast.nets.layers import UNetBlock


class SpeedOptionError(D2OFastError, ValueError):
    """A speed option that cannot run on this device or with this configuration."""


def check_speed_options(cfg, device):
    if getattr(cfg, 'cudagraphs', False) and device.type != 'cuda':
        raise SpeedOptionError(f'--cudagraphs needs a CUDA device (this run is on {device.type}); drop the flag')


#----------------------------------------------------------------------------
# Memory layout.

def to_channels_last(module):
    """4-D weights and buffers in NHWC; convolutions then run without layout conversions when inputs are NHWC too."""
    return module.to(memory_format=torch.channels_last)


def channels_last_input(x, enabled):
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x


#----------------------------------------------------------------------------
# Activation checkpointing.

class CheckpointedUNetBlock(UNetBlock):
    """A UNetBlock whose activations are recomputed during backward instead of stored (non-reentrant
    torch.utils.checkpoint, so frozen weights and inputs without grad are fine). Same parameters, names
    and state dict as UNetBlock: blocks are switched by class, not wrapped."""

    def forward(self, x, emb):
        return torch.utils.checkpoint.checkpoint(super().forward, x, emb, use_reentrant=False)


def apply_activation_checkpointing(net):
    """Switch every UNetBlock of `net` to CheckpointedUNetBlock; returns how many blocks were switched."""
    count = 0
    for module in net.modules():
        if type(module) is UNetBlock:
            module.__class__ = CheckpointedUNetBlock
            count += 1
    return count


def remove_activation_checkpointing(net):
    for module in net.modules():
        if type(module) is CheckpointedUNetBlock:
            module.__class__ = UNetBlock


#----------------------------------------------------------------------------
# torch.compile.

def compile_forward(module, cudagraphs=False, fullgraph=True):
    """The module's forward compiled for static shapes (one graph per input shape and grad mode).

    fullgraph=True makes any graph break an error, so a slow path cannot hide inside a "compiled" step.
    """
    mode = 'reduce-overhead' if cudagraphs else None
    return torch.compile(module, dynamic=False, fullgraph=fullgraph, mode=mode)


def mark_step_begin(cudagraphs):
    """Tell CUDA graph trees that a new iteration starts, so last iteration's outputs may be overwritten."""
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
