"""The training data stream: endless, deterministic, resumable batches of (images, one-hot labels).

    loader = NativeLoader(dataset, batch_per_device=64, seed=0, rank=r, world_size=w, xflip=False)
    images, labels = next(loader)     # float32 [B, C, R, R] in [-1, 1], float32 [B, label_dim]
    state = loader.state_dict()       # {'epoch', 'offset', ...}: the position of the next batch
    loader.load_state_dict(state)     # resume exactly there (any world size)

The order comes from SampleOrder (order.py); BatchLoader holds what every backend shares
(configuration, this rank's slice of a global batch, position, state); NativeLoader decodes
with Python worker threads (PIL releases the GIL while decoding) and prefetches a few batches.
Prefetching never moves the position: state_dict() is always the next batch handed out.
"""

import collections
from concurrent.futures import ThreadPoolExecutor

import torch

from d2o_fast.data.errors import LoaderError
from d2o_fast.data.order import SampleOrder

# uint8 -> [-1, 1] as (x - 127.5) * (1 / 127.5): bitwise what DALI's crop_mirror_normalize computes.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 1 / 127.5
STATE_VERSION = 1


def normalize_pixels(images_u8, device):
    """uint8 NCHW (CPU, ideally pinned) -> float32 in [-1, 1] on device; converted after the copy (4x fewer bytes)."""
    images = images_u8.to(device, non_blocking=True).to(torch.float32)
    return images.sub_(PIXEL_MEAN).mul_(PIXEL_SCALE)


class BatchLoader:
    """Backend-independent part of a loader. Subclasses implement __next__ and _restart()."""

    def __init__(self, dataset, *, batch_per_device, seed=0, rank=0, world_size=1, xflip=False, label_dim=None,
                 device='cpu'):
        if batch_per_device < 1:
            raise LoaderError(f'batch_per_device must be >= 1, got {batch_per_device}')
        if world_size < 1 or not 0 <= rank < world_size:
            raise LoaderError(f'rank {rank} is not in [0, world_size={world_size})')
        if seed < 0:
            raise LoaderError(f'seed must be >= 0, got {seed}')
        self.dataset = dataset
        self.batch_per_device = int(batch_per_device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.label_dim = dataset.label_dim if label_dim is None else int(label_dim)
        dataset.one_hot([], self.label_dim)          # fails now if the dataset cannot give these labels
        self.device = torch.device(device)
        self.order = SampleOrder(len(dataset), seed, xflip)
        self.position = 0                            # stream position of the next global batch handed out

    @property
    def global_batch(self):
        return self.batch_per_device * self.world_size

    @property
    def images_seen(self):
        """Images handed out so far by all ranks together."""
        return self.position

    def rank_slice(self, position):
        """(item indices, flips) of this rank's share of the global batch starting at position."""
        return self.order.take(position + self.rank * self.batch_per_device, self.batch_per_device)

    def state_dict(self):
        epoch, offset = divmod(self.position, self.order.num_items)
        return dict(version=STATE_VERSION, epoch=epoch, offset=offset, seed=self.order.seed,
                    num_items=self.order.num_items, xflip=self.order.xflip)

    def load_state_dict(self, state):
        expected = dict(version=STATE_VERSION, seed=self.order.seed, num_items=self.order.num_items,
                        xflip=self.order.xflip)
        for key, value in expected.items():
            if state.get(key) != value:
                raise LoaderError(f'loader state was saved with {key}={state.get(key)!r} but this loader has '
                                  f'{key}={value!r}; the saved position does not apply to this stream')
        epoch, offset = int(state['epoch']), int(state['offset'])
        if epoch < 0 or not 0 <= offset < self.order.num_items:
            raise LoaderError(f'loader state has an invalid position (epoch={epoch}, offset={offset})')
        self.position = epoch * self.order.num_items + offset
        self._restart()

    def __iter__(self):
        return self

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _restart(self):
        raise NotImplementedError


class NativeLoader(BatchLoader):
    """Decodes with PIL / numpy in num_workers threads (0: inline), one batch per thread at a time, keeping
    max(prefetch, num_workers) batches in flight so every worker stays busy."""

    def __init__(self, dataset, *, num_workers=2, prefetch=2, **kwargs):
        super().__init__(dataset, **kwargs)
        self.prefetch = max(1, int(prefetch), int(num_workers))
        self._pin = self.device.type == 'cuda'
        self._executor = ThreadPoolExecutor(num_workers, thread_name_prefix='d2o-data') if num_workers > 0 else None
        self._pending = collections.deque()          # futures of batches at positions position, position+G, ...

    def assemble(self, position):
        """This rank's batch at a stream position, as CPU tensors: uint8 images NCHW, float32 one-hot labels."""
        indices, flips = self.rank_slice(position)
        images = self.dataset.images(indices)
        if flips.any():
            images[flips] = images[flips][..., ::-1]
        images = torch.from_numpy(images)
        labels = torch.from_numpy(self.dataset.one_hot(indices, self.label_dim))
        if self._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels

    def __next__(self):
        if self._executor is None:
            images, labels = self.assemble(self.position)
        else:
            while len(self._pending) < self.prefetch:
                ahead = self.position + len(self._pending) * self.global_batch
                self._pending.append(self._executor.submit(self.assemble, ahead))
            images, labels = self._pending.popleft().result()
        self.position += self.global_batch
        return normalize_pixels(images, self.device), labels.to(self.device, non_blocking=True)

    def _restart(self):
        for future in self._pending:
            future.cancel()
        self._pending.clear()

    def close(self):
        self._restart()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __del__(self):
        if hasattr(self, '_executor'):
            self.close()
