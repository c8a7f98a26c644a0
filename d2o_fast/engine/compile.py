"""Speed options applied to the networks from outside their code (as torchtitan does): the models stay plain
PyTorch, the trainer decides how they run.

    check_speed_options(cfg, device, world)  # --cudagraphs off CUDA, or 'step' with several processes -> SpeedOptionError
    to_channels_last(module)                 # NHWC weights; inputs are converted by the caller
    apply_activation_checkpointing(net)      # every U-Net block recomputes its activations in backward
    compile_forward(module, cudagraphs)      # torch.compile, static shapes, fullgraph; CUDA graph trees on request
    StepGraph(body, capture, save, restore)  # a whole training iteration as one CUDA graph

CUDA graphs (--cudagraphs MODE, CUDAGRAPH_MODES):
- 'networks': torch.compile mode='reduce-overhead', i.e. CUDA graph trees capture the forward and backward graphs
  of G and D per phase; the optimizers run as fused Adam kernels outside the graphs and R1 stays eager.
- 'step': the forwards are compiled with mode=None and the trainer captures the whole G step + D step + EMA
  (forwards, backwards, gradient clean-up, both optimizer steps) into one torch.cuda.graph over static input
  buffers, replayed every iteration; R1 steps run eagerly after the replay. One process only.
"""

import torch
import torch.utils.checkpoint

from d2o_fast.errors import D2OFastError
from d2o_fast.nets.layers import UNetBlock


CUDAGRAPH_MODES = ('off', 'networks', 'step')


class SpeedOptionError(D2OFastError, ValueError):
    """A speed option that cannot run on this device or with this configuration."""


def check_speed_options(cfg, device, world_size=1):
    mode = getattr(cfg, 'cudagraphs', 'off')
    if mode not in CUDAGRAPH_MODES:
        raise SpeedOptionError(f'--cudagraphs must be one of {", ".join(CUDAGRAPH_MODES)}, got {mode!r}')
    if mode != 'off' and device.type != 'cuda':
        raise SpeedOptionError(f'--cudagraphs needs a CUDA device (this run is on {device.type}); drop the flag')
    if mode == 'step' and world_size > 1:
        # Collectives inside a captured graph (the gradient all-reduce) are not supported by this trainer.
        raise SpeedOptionError(f'--cudagraphs step captures a single process\'s step; with {world_size} processes '
                               f'use --cudagraphs networks')


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
        # The RNG state is saved for the recomputation only when dropout draws from it (it cannot be read while a
        # CUDA graph is being captured).
        preserve = bool(self.dropout) and self.training
        return torch.utils.checkpoint.checkpoint(super().forward, x, emb, use_reentrant=False, preserve_rng_state=preserve)


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
    """The module's forward compiled for static shapes (one graph per input shape and grad mode); cudagraphs=True
    adds CUDA graph trees (mode='reduce-overhead').

    fullgraph=True makes any graph break an error, so a slow path cannot hide inside a "compiled" step.
    """
    mode = 'reduce-overhead' if cudagraphs else None
    return torch.compile(module, dynamic=False, fullgraph=fullgraph, mode=mode)


def mark_step_begin(cudagraphs):
    """Tell CUDA graph trees ('networks' mode) that a new iteration starts, so last iteration's outputs may be
    overwritten."""
    if cudagraphs == 'networks':
        torch.compiler.cudagraph_mark_step_begin()


#----------------------------------------------------------------------------
# A whole training iteration as one CUDA graph.

class StepGraph:
    """Runs `body()`, a function of static buffers that the caller fills before each call, and returns its outputs.

    capture=True (CUDA): the first call warms `body` up on a side stream (lazy initialisation: optimizer state,
    compiled graphs, cuBLAS workspaces), puts every state back with `restore(save())` in place, captures `body` into
    a torch.cuda.graph and replays it; later calls only replay. The outputs are the graph's static tensors, which
    the next replay overwrites. Anything that replaces a tensor the graph reads (loading an optimizer state dict)
    must call invalidate(): the next call captures again.
    capture=False (CPU, and the reference in tests): `body()` runs eagerly, the same structure without a graph.
    """

    def __init__(self, body, capture, save, restore, warmup_iters=3):
        self.body, self.capture, self.save, self.restore = body, capture, save, restore
        self.warmup_iters = warmup_iters
        self.graph, self.outputs = None, None

    def __call__(self):
        if not self.capture:
            return self.body()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs

    def invalidate(self):
        self.graph, self.outputs = None, None

    def _capture(self):
        saved = self.save()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            for _ in range(self.warmup_iters):
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.restore(saved)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's threads may pin memory meanwhile; only this thread's calls must be capturable.
        with torch.cuda.graph(graph, capture_error_mode='thread_local'):
            self.outputs = self.body()
        self.graph = graph
