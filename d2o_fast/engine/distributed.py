"""torch.distributed set-up for torchrun (NCCL on CUDA, gloo on CPU) and gradient averaging.

Gradients are averaged explicitly (one flattened all-reduce per network and phase, as StyleGAN2-ADA does)
instead of wrapping modules in DistributedDataParallel: the G and D phases alternate with different parts
frozen, and R1 needs a double backward, both of which DDP's hooks handle poorly.
"""

import os

import torch
import torch.distributed as dist


def init_distributed():
    """Initialise from torchrun's environment; returns (rank, world_size, device)."""
    if 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1 and not dist.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        dist.init_process_group(backend=backend)
    rank, world = get_rank(), get_world_size()
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    else:
        device = torch.device('cpu')
    return rank, world, device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def average_gradients(params):
    """All-reduce-average the gradients of `params` across ranks (in place), flattening them into one buffer."""
    params = [p for p in params if p.grad is not None]
    if not params or not dist.is_initialized() or get_world_size() == 1:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def broadcast_module(module, src=0):
    """Give every rank rank-0's parameters and buffers (as DDP does at construction)."""
    if not dist.is_initialized() or get_world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def all_reduce_sum_(tensor):
    """Sum a device tensor over ranks, in place (nothing to do in a single process)."""
    if dist.is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj):
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_key(seed, step, stream):
    """Seed of one random stream (0-3) of one training step: distinct for every (seed, step, stream)."""
    return (seed * 1_000_003 + step) * 4 + stream


def global_randn(key, global_batch, shape_one, rank, per_rank, device):
    """This rank's slice of N(0, I) draws made for the whole global batch from a generator seeded by `key`,
    so every sample's noise is the same whatever the number of processes. On CUDA the draws go through pinned
    memory and are copied without blocking the host."""
    g = torch.Generator().manual_seed(int(key))
    pinned = torch.device(device).type == 'cuda'
    z = torch.randn([global_batch, *shape_one], generator=g, pin_memory=pinned)
    return z[rank * per_rank:(rank + 1) * per_rank].to(device, non_blocking=pinned)
