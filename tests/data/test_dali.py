"""The DALI backend (CPU pipeline, device_id=None) gives exactly the native loader's batches and resumes alike.

On the CPU both decode PNG and JPEG bit-identically (libjpeg-turbo underneath); on the GPU
(device 'mixed', nvJPEG) JPEG pixels may differ by a few levels; PNG is lossless and should stay
exact (not tested here: this machine has no GPU).
"""

import pytest
import torch

from d2o_fast.data import LoaderError, NativeLoader, make_loader, open_dataset
from d2o_fast.data.convert import write_edm_zip
from tests.data.conftest import random_images, random_labels, write_folder, write_npz

pytest.importorskip('nvidia.dali')
from d2o_fast.data.dali import DaliLoader  # noqa: E402

N = 11


def take(loader, count):
    return [next(loader) for _ in range(count)]


def assert_same_batches(a, b):
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb), (xa - xb).abs().max()
        assert torch.equal(ya, yb)


def build(kind, tmp_path, channels=3):
    images, labels = random_images(N, 8, channels, seed=channels), random_labels(N, 4)
    array = write_npz(tmp_path / 'a.npz', images, labels, channels_last=channels == 3)
    if kind == 'array':
        return open_dataset(array)
    if kind in ('folder', 'jpeg'):
        return open_dataset(write_folder(tmp_path / 'f', images, labels, fmt='jpg' if kind == 'jpeg' else 'png'))
    write_edm_zip(open_dataset(array), tmp_path / 'a.zip')
    return open_dataset(tmp_path / 'a.zip')


@pytest.mark.parametrize('kind, channels', [('zip', 3), ('zip', 1), ('folder', 3), ('jpeg', 3), ('array', 3),
                                            ('array', 1)])
def test_dali_equals_native(tmp_path, kind, channels):
    dataset = build(kind, tmp_path, channels)
    config = dict(batch_per_device=3, seed=4, xflip=True, rank=1, world_size=2)
    native = take(NativeLoader(dataset, **config), 5)          # 30 positions: crosses two epoch boundaries
    dali = take(make_loader(dataset, backend='dali', num_workers=1, **config), 5)
    assert_same_batches(dali, native)


def test_dali_resumes_like_native(tmp_path):
    dataset = build('zip', tmp_path)
    config = dict(batch_per_device=4, seed=8, xflip=True)
    uninterrupted = take(NativeLoader(dataset, **config), 7)
    loader = DaliLoader(dataset, prefetch=3, **config)
    assert_same_batches(take(loader, 3), uninterrupted[:3])
    state = loader.state_dict()                              # DALI has already pulled batches ahead
    assert state == NativeLoader(dataset, **config).state_dict() | dict(epoch=1, offset=1)
    resumed = DaliLoader(dataset, **config)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), uninterrupted[3:])
    native_resumed = NativeLoader(dataset, **config)
    native_resumed.load_state_dict(resumed.state_dict())     # states are interchangeable between backends
    loader.load_state_dict(resumed.state_dict())
    assert_same_batches(take(loader, 2), take(native_resumed, 2))


def test_dali_labels_off_and_unsupported_datasets(tmp_path):
    dataset = build('zip', tmp_path)
    images, labels = next(DaliLoader(dataset, batch_per_device=2, label_dim=0))
    assert images.shape == (2, 3, 8, 8) and labels.shape == (2, 0)
    resized = open_dataset(tmp_path / 'a.zip', resize_to=4)
    with pytest.raises(LoaderError, match='resized on load'):
        DaliLoader(resized, batch_per_device=2)
    assert type(make_loader(resized, batch_per_device=2, backend='auto')).__name__ == 'NativeLoader'
