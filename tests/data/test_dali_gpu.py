"""DALI on the GPU (marked gpu): decoding with device 'mixed' (nvJPEG / nvImageCodec) and normalising on the GPU
gives the native loader's batches, on the GPU, and resumes alike.

PNG and raw arrays are lossless, so the only possible difference is float rounding of (x - 127.5) / 127.5 (an
FMA on the GPU): a few float32 ulps of values in [-1, 1]. nvJPEG's IDCT and chroma upsampling differ from
libjpeg-turbo's, so JPEG pixels may differ by a few levels; a wrong channel order, flip or label would differ by
far more.
"""

import pytest
import torch

from d2o_fast.data import NativeLoader, make_loader
from tests.data.test_dali import build, take

pytestmark = pytest.mark.gpu
dali = pytest.importorskip('nvidia.dali')

DEVICE = 'cuda'
LEVEL = 1 / 127.5       # one uint8 level after normalisation
ROUNDING = 4 * 2.0 ** -23  # a few float32 ulps at 1


def assert_batches_match(got, expected, max_diff, mean_diff=None):
    for (xa, ya), (xb, yb) in zip(got, expected, strict=True):
        assert xa.device.type == xb.device.type == 'cuda' and xa.dtype == xb.dtype == torch.float32
        assert xa.shape == xb.shape and torch.equal(ya, yb)
        diff = (xa - xb).abs()
        assert diff.max().item() <= max_diff, diff.max().item()
        if mean_diff is not None:
            assert diff.mean().item() <= mean_diff, diff.mean().item()


@pytest.mark.parametrize('kind, channels', [('zip', 3), ('zip', 1), ('folder', 3), ('array', 3), ('array', 1)])
def test_lossless_formats_equal_the_native_loader(tmp_path, kind, channels):
    dataset = build(kind, tmp_path, channels)
    config = dict(batch_per_device=3, seed=4, xflip=True, rank=1, world_size=2, device=DEVICE)
    native = take(NativeLoader(dataset, **config), 5)
    loader = make_loader(dataset, backend='auto', num_workers=1, **config)
    assert type(loader).__name__ == 'DaliLoader'  # 'auto' picks DALI on CUDA
    assert_batches_match(take(loader, 5), native, max_diff=ROUNDING)


def test_jpeg_within_a_few_levels(tmp_path):
    dataset = build('jpeg', tmp_path)
    config = dict(batch_per_device=4, seed=1, xflip=True, device=DEVICE)
    native = take(NativeLoader(dataset, **config), 3)
    dali_batches = take(make_loader(dataset, backend='dali', **config), 3)
    assert_batches_match(dali_batches, native, max_diff=8 * LEVEL, mean_diff=1.5 * LEVEL)


def test_resumes_like_native_on_the_gpu(tmp_path):
    dataset = build('zip', tmp_path)
    config = dict(batch_per_device=4, seed=8, xflip=True, device=DEVICE)
    uninterrupted = take(NativeLoader(dataset, **config), 6)
    loader = make_loader(dataset, backend='dali', **config)
    take(loader, 2)
    resumed = make_loader(dataset, backend='dali', **config)
    resumed.load_state_dict(loader.state_dict())
    assert_batches_match(take(resumed, 4), uninterrupted[2:], max_diff=ROUNDING)
