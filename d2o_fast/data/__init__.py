"""Data layer: datasets (EDM zip, image folder, uint8 array), the sample order, and loader backends.

Imports nothing else of d2o_fast but the bottom modules (errors.py, files.py). The training engine uses:

    dataset = open_dataset(path)
    check_compatible(dataset, img_resolution, img_channels, label_dim)
    loader = make_loader(dataset, batch_per_device=B, seed=s, rank=r, world_size=w, xflip=False,
                         label_dim=label_dim, device=device, backend='auto')
    images, labels = next(loader)
    state = loader.state_dict(); ...; loader.load_state_dict(state)
"""

import torch

from d2o_fast.data.datasets import (ArrayDataset, ImageDataset, ImageFileDataset, check_compatible, one_hot,
                                    open_dataset)
from d2o_fast.data.errors import DatasetError, LoaderError
from d2o_fast.data.loader import BatchLoader, NativeLoader
from d2o_fast.data.order import SampleOrder

BACKENDS = ('auto', 'native', 'dali')


def make_loader(dataset, *, batch_per_device, backend='auto', seed=0, rank=0, world_size=1, xflip=False,
                label_dim=None, device='cpu', num_workers=2, prefetch=2):
    """An endless, resumable batch iterator over a dataset (or a dataset path).

    label_dim: width of the one-hot labels; None = the dataset's, 0 = no labels (unconditional net).
    backend: 'native' (PIL + threads), 'dali' (NVIDIA DALI), or 'auto' = DALI on CUDA when it is
    installed and can read the dataset, else native. Both give the same batches for the same seed.
    """
    if backend not in BACKENDS:
        raise LoaderError(f'unknown loader backend {backend!r}; expected one of {BACKENDS}')
    if not isinstance(dataset, ImageDataset):
        dataset = open_dataset(dataset)
    cls = NativeLoader
    if backend == 'dali' or (backend == 'auto' and torch.device(device).type == 'cuda'):
        from d2o_fast.data.dali import DaliLoader, dali_available, dali_unsupported_reason   # importing DALI is slow
        if backend == 'dali' or (dali_available() and not dali_unsupported_reason(dataset)):
            cls = DaliLoader
    return cls(dataset, batch_per_device=batch_per_device, seed=seed, rank=rank, world_size=world_size, xflip=xflip,
               label_dim=label_dim, device=device, num_workers=num_workers, prefetch=prefetch)


__all__ = ['ImageDataset', 'ImageFileDataset', 'ArrayDataset', 'open_dataset', 'check_compatible', 'one_hot',
           'DatasetError', 'LoaderError', 'SampleOrder', 'BatchLoader', 'NativeLoader', 'make_loader', 'BACKENDS']
