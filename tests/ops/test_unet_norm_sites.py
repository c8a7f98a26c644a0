"""The U-Nets' GroupNorm sites (the GPU tests' shapes) are current, and every kernel launch on them stays inside
CUDA's grid limits and the kernels' 32-bit index arithmetic at the largest per-GPU batch of any preset."""

import pathlib
import re

import pytest
import torch

from tests.ops.unet_norm_sites import NUM_GROUPS, UNET_NORM_SITES, all_sites, norm_sites

# imagenet-64's batch on a single GPU: the largest batch_gpu any preset gives.
LARGEST_BATCH = 512
INT32_MAX = 2 ** 31 - 1
GRID_X_MAX, GRID_YZ_MAX = 2 ** 31 - 1, 65535
CUDA_SOURCE = pathlib.Path(__file__).resolve().parents[2] / 'kernels' / 'group_norm_act_cuda.cu'


@pytest.mark.parametrize('stem', sorted(UNET_NORM_SITES))
def test_table_lists_every_site(stem):
    assert norm_sites(stem) == UNET_NORM_SITES[stem]


def cuda_constant(name):
    found = re.search(rf'constexpr int(?:64_t)? {name} = (\d+)(?: << (\d+))?;', CUDA_SOURCE.read_text())
    assert found, f'{name} not found in {CUDA_SOURCE}'
    return int(found.group(1)) << int(found.group(2) or 0)


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_cuda_launch_geometry(channels_last):
    """The grids of kernels/group_norm_act_cuda.cu (its launch_partial_reduce and per-group launches)."""
    row_chunk, rows_per_chunk = cuda_constant('kRowChunk'), cuda_constant('kRowsPerChunk')
    channels_per_block = cuda_constant('kChannelsPerBlock')
    for C, H, W, *_ in all_sites():
        N, HW = LARGEST_BATCH, H * W
        if channels_last:
            grid = (N, ceil_div(HW, rows_per_chunk), ceil_div(C, channels_per_block))
        else:
            grid = (N * C, ceil_div(HW, row_chunk), 1)
        assert grid[0] <= GRID_X_MAX and max(grid[1:]) <= GRID_YZ_MAX, (C, H, W, grid)
        assert N * NUM_GROUPS <= GRID_X_MAX  # finalize_statistics / finalize_gradients: one block per (n, group)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_triton_launch_geometry(channels_last):
    """One program per (sample, group); in-kernel int32 indices: the program id and n * C + channel."""
    triton_group_norm = pytest.importorskip('d2o_fast.ops.triton_group_norm')
    for C, H, W, *_ in all_sites():
        x = torch.empty(LARGEST_BATCH, C, H, W, device='meta')
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        N, C_, HW, cpg, strides, block_c, block_hw = triton_group_norm._geometry(x, NUM_GROUPS)
        assert (C_, HW, cpg) == (C, H * W, C // NUM_GROUPS)
        assert N * NUM_GROUPS <= GRID_X_MAX and N * C <= INT32_MAX
        assert block_c >= min(cpg, 64) and block_c * block_hw <= triton_group_norm._TILE_ELEMENTS
        assert strides == ((C * H * W, 1, C) if channels_last else (C * H * W, H * W, 1))
