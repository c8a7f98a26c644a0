"""The native loader: global order, world-size independence, flips, resume, configuration errors."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from d2o_fast.data import LoaderError, NativeLoader, SampleOrder, make_loader, open_dataset
from d2o_fast.data import dali as dali_backend
from tests.data.conftest import random_images, random_labels, write_npz

N = 13          # not a multiple of any batch size used: global batches straddle epoch boundaries


@pytest.fixture
def dataset(tmp_path):
    return open_dataset(write_npz(tmp_path / 'a.npz', random_images(N, 8, 3, seed=7), random_labels(N, 5, seed=7)))


def take(loader, count):
    return [next(loader) for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_each_epoch_is_a_seeded_permutation():
    order = SampleOrder(N, seed=3, xflip=True)
    indices, _ = order.take(0, 3 * N)
    epochs = indices.reshape(3, N)
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    again, _ = SampleOrder(N, seed=3, xflip=True).take(N + 5, 2 * N - 5)      # random access == sequential
    np.testing.assert_array_equal(again, indices[N + 5:])
    other, _ = SampleOrder(N, seed=4, xflip=True).take(0, N)
    assert not np.array_equal(other, epochs[0])


def test_order_is_safe_to_share_between_threads():
    positions = [p * 7 for p in range(60)]                     # 60 batches over ~32 epochs: the cache churns
    expected = [SampleOrder(N, seed=1, xflip=True).take(p, 7) for p in positions]
    shared = SampleOrder(N, seed=1, xflip=True)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: shared.take(p, 7), positions[::-1]))[::-1]
    for (i0, f0), (i1, f1) in zip(expected, got):
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(f0, f1)


def test_batches_hold_the_dataset_images_flipped_by_their_coins(dataset):
    loader = NativeLoader(dataset, batch_per_device=4, seed=1, xflip=True, num_workers=0)
    flips_seen = []
    for step in range(8):
        images, labels = next(loader)
        assert images.dtype == torch.float32 and images.shape == (4, 3, 8, 8)
        assert labels.dtype == torch.float32 and labels.shape == (4, 5)
        indices, flips = loader.order.take(step * 4, 4)
        expected = dataset.images(indices).astype(np.float32)
        expected[flips] = expected[flips][..., ::-1]
        np.testing.assert_allclose(images.numpy(), expected / 127.5 - 1, atol=1e-6)
        np.testing.assert_array_equal(labels.argmax(1).numpy(), dataset.labels[indices])
        assert labels.sum() == 4
        flips_seen += flips.tolist()
    assert 0 < sum(flips_seen) < len(flips_seen)
    assert images.min() >= -1 and images.max() <= 1


def test_world_size_independence(dataset):
    """One process with batch 2B sees exactly rank 0's then rank 1's batch of two processes with batch B."""
    single = take(NativeLoader(dataset, batch_per_device=6, seed=5, xflip=True), 7)
    ranks = [take(NativeLoader(dataset, batch_per_device=3, seed=5, xflip=True, rank=r, world_size=2), 7)
             for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_workers_and_prefetch_do_not_change_the_stream(dataset):
    reference = take(NativeLoader(dataset, batch_per_device=5, seed=2, xflip=True, num_workers=0), 6)
    for workers, prefetch in [(1, 1), (2, 4)]:
        with NativeLoader(dataset, batch_per_device=5, seed=2, xflip=True, num_workers=workers,
                          prefetch=prefetch) as loader:
            assert_same_batches(take(loader, 6), reference)
    other = take(NativeLoader(dataset, batch_per_device=5, seed=3, xflip=True, num_workers=0), 6)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(other, reference))


def test_xflip_off_never_flips(dataset):
    loader = NativeLoader(dataset, batch_per_device=N, seed=0, xflip=False, num_workers=0)
    images, _ = next(loader)
    indices, flips = loader.order.take(0, N)
    assert not flips.any()
    np.testing.assert_allclose(images.numpy(), dataset.images(indices) / 127.5 - 1, atol=1e-6)


def test_resume_mid_epoch_continues_on_the_exact_next_batch(dataset):
    uninterrupted = take(NativeLoader(dataset, batch_per_device=4, seed=9, xflip=True), 9)
    first = NativeLoader(dataset, batch_per_device=4, seed=9, xflip=True, prefetch=3)
    take(first, 4)                                    # workers have prefetched further; the state must not see it
    state = first.state_dict()
    assert (state['epoch'], state['offset']) == divmod(16, N) and first.images_seen == 16
    first.close()
    resumed = NativeLoader(dataset, batch_per_device=4, seed=9, xflip=True)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 5), uninterrupted[4:])
    # The same loader can also be rewound.
    resumed.load_state_dict({**state, 'epoch': 0, 'offset': 0})
    assert_same_batches(take(resumed, 2), uninterrupted[:2])


def test_resume_with_another_world_size_continues_the_global_stream(dataset):
    uninterrupted = take(NativeLoader(dataset, batch_per_device=4, seed=9), 6)
    state = NativeLoader(dataset, batch_per_device=2, seed=9, world_size=2)
    take(state, 3)
    saved = state.state_dict()
    halves = []
    for rank in range(2):
        loader = NativeLoader(dataset, batch_per_device=2, seed=9, rank=rank, world_size=2)
        loader.load_state_dict(saved)
        halves.append(take(loader, 3))
    for (x, y), (x0, y0), (x1, y1) in zip(uninterrupted[3:], *halves):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_label_width(dataset):
    _, labels = next(NativeLoader(dataset, batch_per_device=3, label_dim=0))
    assert labels.shape == (3, 0)
    _, labels = next(NativeLoader(dataset, batch_per_device=3, label_dim=12))
    assert labels.shape == (3, 12) and labels.sum() == 3


@pytest.mark.parametrize('kwargs, message', [
    (dict(batch_per_device=0), 'batch_per_device'),
    (dict(batch_per_device=2, rank=2, world_size=2), 'rank 2'),
    (dict(batch_per_device=2, seed=-1), 'seed'),
    (dict(batch_per_device=2, backend='torch'), 'unknown loader backend'),
])
def test_bad_configuration(dataset, kwargs, message):
    with pytest.raises(LoaderError, match=message):
        make_loader(dataset, **kwargs)


@pytest.mark.parametrize('change', [dict(seed=1), dict(num_items=N + 1), dict(xflip=True), dict(version=99),
                                    dict(offset=N), dict(epoch=-1)])
def test_state_for_another_stream_is_rejected(dataset, change):
    loader = NativeLoader(dataset, batch_per_device=2, seed=0, num_workers=0)
    with pytest.raises(LoaderError):
        loader.load_state_dict({**loader.state_dict(), **change})


def test_make_loader_backend_choice(dataset, tmp_path, monkeypatch):
    assert type(make_loader(dataset, batch_per_device=2)).__name__ == 'NativeLoader'       # auto on CPU
    assert type(make_loader(str(tmp_path / 'a.npz'), batch_per_device=2, backend='native')).__name__ == 'NativeLoader'
    monkeypatch.setattr(dali_backend, 'DALI_IMPORT_ERROR', ImportError('No module named nvidia.dali'))
    with pytest.raises(LoaderError, match='needs NVIDIA DALI'):
        make_loader(dataset, batch_per_device=2, backend='dali')
    assert type(make_loader(dataset, batch_per_device=2, device='cpu')).__name__ == 'NativeLoader'


def test_order_is_endless_across_many_epochs(dataset):
    loader = NativeLoader(dataset, batch_per_device=N + 4, seed=0, num_workers=0)    # batch larger than an epoch
    for _ in itertools.repeat(None, 5):
        images, labels = next(loader)
        assert images.shape[0] == N + 4 and labels.shape == (N + 4, 5)
    assert loader.state_dict()['epoch'] == 5 * (N + 4) // N
