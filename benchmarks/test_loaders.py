"""Data loader throughput: the native loader (PIL decode + threads) vs NVIDIA DALI, on a generated dataset.

    OMP_NUM_THREADS=1 pytest benchmarks/test_loaders.py          # writes results/loaders_<device>.{md,json}

The dataset is generated here: 2048 random 32x32 RGB images with 10 classes, stored both as an EDM zip of PNGs
(decoding included in the timing) and as a uint8 .npz array (no decoding). Each case draws batches of 64 with
x-flips through `make_loader` on the training device (DALI without a GPU: CPU pipeline, device_id=None) and
reports images/sec of steady-state batches after two warm-up batches. Without DALI installed its cases skip.
"""

import json
import pathlib

import numpy as np
import pytest
import torch

from d2o_fast.data import make_loader, open_dataset
from d2o_fast.data.convert import write_edm_zip

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'
NUM_IMAGES, RESOLUTION, CLASSES = 2048, 32, 10
BATCH, WARMUP_BATCHES, BATCHES = 64, 2, 16
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
CASES = [(fmt, backend) for fmt in ('zip', 'npz') for backend in ('native', 'dali')]

_results = {}


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp('loader-bench')
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(NUM_IMAGES, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    # Smooth the noise a little so the PNGs compress like photographs rather than like static.
    images = ((images.astype(np.uint16) + np.roll(images, 1, axis=1) + np.roll(images, 1, axis=2)) // 3).astype(np.uint8)
    npz = root / 'bench.npz'
    np.savez(npz, images=images, labels=rng.integers(0, CLASSES, size=NUM_IMAGES))
    zip_path = root / 'bench.zip'
    write_edm_zip(open_dataset(str(npz)), zip_path)
    return {'npz': str(npz), 'zip': str(zip_path)}


@pytest.mark.parametrize('fmt, backend', CASES, ids=[f'{f}-{b}' for f, b in CASES])
def test_loader_throughput(fmt, backend, datasets, benchmark):
    if backend == 'dali':
        from d2o_fast.data.dali import dali_available
        if not dali_available():
            pytest.skip('NVIDIA DALI is not installed')
    loader = make_loader(datasets[fmt], backend=backend, batch_per_device=BATCH, seed=0, xflip=True, device=DEVICE,
                         num_workers=2)
    try:
        for _ in range(WARMUP_BATCHES):
            next(loader)

        def draw():
            images, labels = next(loader)
            assert images.shape == (BATCH, 3, RESOLUTION, RESOLUTION) and labels.shape == (BATCH, CLASSES)
        benchmark.pedantic(draw, rounds=BATCHES, iterations=1, warmup_rounds=0)
    finally:
        loader.close()
    median = benchmark.stats.stats.median
    row = dict(format=fmt, backend=backend, loader=type(loader).__name__, batch=BATCH, median_ms=1000 * median,
               img_per_sec=BATCH / median)
    benchmark.extra_info.update(row)
    _results[(fmt, backend)] = row


def test_report(machine):
    if not _results:
        pytest.skip('no loader case ran in this session')
    rows = [_results[c] for c in CASES if c in _results]
    for r in rows:
        native = _results.get((r['format'], 'native'))
        r['vs_native'] = r['img_per_sec'] / native['img_per_sec'] if native else None
    lines = [f'# Loader throughput ({machine["device"]}, device {DEVICE}, {machine["threads"]} torch thread(s))', '',
             f'torch {machine["torch"]}; {NUM_IMAGES} random {RESOLUTION}x{RESOLUTION} RGB images, batch {BATCH}, '
             f'x-flips, 2 loader workers; median of {BATCHES} batches after {WARMUP_BATCHES} warm-up batches; '
             f'load average {machine["load_average"]:.1f} at the start (shared machine).', '',
             '| dataset | backend | loader | ms / batch | img/s | vs native |', '|---|---|---|---|---|---|']
    for r in rows:
        vs = '' if r['vs_native'] is None else f'{r["vs_native"]:.2f}x'
        lines.append(f'| {r["format"]} | {r["backend"]} | {r["loader"]} | {r["median_ms"]:.1f} | {r["img_per_sec"]:.0f} | {vs} |')
    table = '\n'.join(lines) + '\n'
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f'loaders_{machine["device_type"]}'
    json.dump(dict(machine=machine, rows=rows), open(f'{stem}.json', 'w'), indent=2)
    stem.with_suffix('.md').write_text(table)
    print('\n' + table)
