"""FIR resampling of the U-Nets' up/down blocks: the reduced-precision CPU path is the same convolution."""

import pytest
import torch
import torch.nn.functional as F

from d2o_fast.nets.layers import Conv2d, fir_resample


def _filter(taps):
    f = torch.tensor(taps, dtype=torch.float32)
    return (f.ger(f) / f.sum().square())[None, None]


def _reference(x, f, channels, up, padding):
    """The depthwise convolution in float64."""
    x, f = x.double(), f.double()
    if up:
        return F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)
    return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize('up', [True, False])
@pytest.mark.parametrize('shape', [(2, 8, 8, 8), (1, 5, 16, 12), (3, 16, 4, 4)])
@pytest.mark.parametrize('mode', ['fp32', 'bf16-input', 'fp16-input', 'autocast', 'autocast-channels-last'])
def test_fir_resample_matches_the_convolution(taps, up, shape, mode):
    g = torch.Generator().manual_seed(hash((taps, up, shape, mode)) % 2 ** 31)
    x = torch.randn(*shape, generator=g) * 3 + 1
    f = _filter(taps)
    padding = (f.shape[-1] - 1) // 2
    expected = _reference(x, f, shape[1], up, padding)
    if mode == 'autocast-channels-last':
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {'bf16-input': torch.bfloat16, 'fp16-input': torch.float16}.get(mode, torch.float32)
    xin = x.to(dtype)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode.startswith('autocast')):
        y = fir_resample(xin, f, shape[1], up=up, padding=padding)
    assert y.dtype == dtype and y.shape == expected.shape
    # One rounding of the input to `dtype` and one of the output: relative to the output's scale.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 * 2 ** -8, torch.float16: 2 * 2 ** -11}[dtype]
    err = (y.double() - _reference(xin.float(), f, shape[1], up, padding)).abs().max() / expected.abs().max()
    assert err <= tol, (mode, float(err))


def test_conv2d_block_output_dtype_follows_its_input_under_autocast():
    torch.manual_seed(0)
    for kwargs in [dict(up=True), dict(down=True), dict(up=True, fused_resample=True), dict(down=True, fused_resample=True)]:
        conv = Conv2d(8, 8, kernel=3, resample_filter=(1, 3, 3, 1), **kwargs)
        x = torch.randn(2, 8, 8, 8)
        ref = conv(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.bfloat16 and y.shape == ref.shape
        assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max(), kwargs
