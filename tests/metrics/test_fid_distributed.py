"""Two gloo ranks: every rank takes its share of the images and all_reduce gives the one-process statistics."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from d2o_fast.metrics import image_stats, load_detector
from tests.metrics.conftest import random_images, write_folder


def _rank_main(rank, world_size, init_file, folder, detector_path, out_prefix):
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        stats = image_stats(folder, load_detector(detector_path), batch_size=4)
        np.savez(f'{out_prefix}{rank}.npz', mu=stats['mu'], sigma=stats['sigma'], n=stats['num_images'])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, detector_path):
    folder = write_folder(tmp_path / 'images', random_images(23, seed=3))
    out_prefix = str(tmp_path / 'rank')
    mp.spawn(_rank_main, args=(2, str(tmp_path / 'init'), folder, detector_path, out_prefix), nprocs=2, join=True)
    single = image_stats(folder, load_detector(detector_path), batch_size=64)
    for rank in range(2):
        with np.load(f'{out_prefix}{rank}.npz') as got:
            assert int(got['n']) == 23
            np.testing.assert_allclose(got['mu'], single['mu'], rtol=1e-6)  # float32 features, other batches
            np.testing.assert_allclose(got['sigma'], single['sigma'], rtol=1e-5, atol=1e-9)
