"""Fused GroupNorm + modulation + SiLU: native kernels vs the unfused PyTorch sequence.

    pytest benchmarks/test_group_norm_act_bench.py                      # CPU (and GPU if present)
    D2O_FAST_BENCH_MIN_SPEEDUP=2 pytest benchmarks/test_group_norm_act_bench.py   # also assert the ratio

Times forward + backward on the U-Nets' real norm-site shapes, both memory layouts, for the
two modulation patterns the networks use (SongUNet: GN(x + emb); DhariwalUNet:
GN(x) * (1 + scale) + shift; both followed by SiLU). The last test prints and writes
benchmarks/results/group_norm_act_<device>.{md,json} with the ratio of medians measured in
this same run. On a GPU it also reports achieved GB/s against the device's peak and adds
torch.compile and apex.contrib.group_norm (when importable) to the comparison.
Nothing here asserts wall-clock time; the speedup assertion is opt-in via the env var.
"""

import json
import os
import pathlib
import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from d2o_fast.engine.telemetry import peak_memory_bandwidth
from d2o_fast.ops import native

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'
MIN_SPEEDUP_ENV = 'D2O_FAST_BENCH_MIN_SPEEDUP'
NUM_GROUPS, EPS = 32, 1e-5

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
# (N, C, H, W): the 32x32 / 16x16 / 8x8 levels of the CIFAR-10 / ImageNet-64 U-Nets.
SHAPES = {'cpu': [(16, 128, 32, 32), (16, 256, 16, 16), (64, 512, 8, 8)],
          'cuda': [(64, 128, 32, 32), (64, 256, 16, 16), (64, 512, 8, 8)]}
MODULATIONS = ('add', 'scale_shift')
LAYOUTS = ('nchw', 'nhwc')

_medians = {}  # (device, shape, layout, modulation, implementation) -> median seconds

#----------------------------------------------------------------------------
# Implementations under test: each returns a closure running forward + backward once.

def _inputs(device, shape, layout, modulation, dtype):
    g = torch.Generator(device='cpu').manual_seed(0)
    N, C = shape[:2]
    x = torch.randn(*shape, generator=g).to(device, dtype)
    if layout == 'nhwc':
        x = x.contiguous(memory_format=torch.channels_last)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device)
    b = (0.1 * torch.randn(C, generator=g)).to(device)
    add = torch.randn(N, C, generator=g).to(device, dtype) if modulation == 'add' else None
    scale = (0.1 * torch.randn(N, C, generator=g)).to(device, dtype) if modulation == 'scale_shift' else None
    shift = torch.randn(N, C, generator=g).to(device, dtype) if modulation == 'scale_shift' else None
    dy = torch.randn_like(x)
    return x, w, b, add, scale, shift, dy


def unfused(x, w, b, add, scale, shift):
    """The sequence the fused op replaces (what the networks run without it)."""
    h = x if add is None else x + add[:, :, None, None]
    h = F.group_norm(h, NUM_GROUPS, w, b, EPS)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def _autograd_step(fn, x, w, b, add, scale, shift, dy):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, add, scale, shift)]
    grads_of = [t for t in leaves if t is not None]

    def step():
        y = fn(*leaves)
        torch.autograd.grad(y, grads_of, dy)
    return step


def _native_step(x, w, b, add, scale, shift, dy):
    def step():
        y, mean, rstd = native.forward(x, w, b, add, scale, shift, NUM_GROUPS, EPS, True)
        native.backward(dy, x, w, b, add, scale, shift, mean, rstd, NUM_GROUPS, True)
    return step


def _apex_step(x, w, b, add, scale, shift, dy):
    """apex's NHWC GroupNorm + SiLU (no modulation support: it runs on x + add only)."""
    group_norm = pytest.importorskip('apex.contrib.group_norm', reason='apex is not installed')
    if scale is not None:
        pytest.skip('apex GroupNorm has no per-sample scale/shift')
    if not x.is_contiguous(memory_format=torch.channels_last):
        pytest.skip('apex GroupNorm is NHWC only')
    module = group_norm.GroupNorm(NUM_GROUPS, x.shape[1], eps=EPS, act='silu').to(x.device, torch.float32)
    module.weight.data.copy_(w)
    module.bias.data.copy_(b)
    return _autograd_step(lambda x_, *_: module(x_ + add[:, :, None, None]), x, w, b, add, None, None, dy)


def make_step(implementation, x, w, b, add, scale, shift, dy):
    if implementation == 'unfused':
        return _autograd_step(unfused, x, w, b, add, scale, shift, dy)
    if implementation == 'native':
        if not native.available(x.device.type):
            pytest.skip(f'native kernels unavailable on {x.device.type}: {native.unavailable_reason()}')
        return _native_step(x, w, b, add, scale, shift, dy)
    if implementation == 'compile':
        return _autograd_step(torch.compile(unfused, dynamic=False), x, w, b, add, scale, shift, dy)
    if implementation == 'apex':
        step = _apex_step(x, w, b, add, scale, shift, dy)
        try:
            step()
        except Exception as e:  # an apex build that does not support this dtype / GPU
            pytest.skip(f'apex GroupNorm failed here: {type(e).__name__}: {e}')
        return step
    raise ValueError(f'unknown implementation {implementation!r}')

#----------------------------------------------------------------------------
# Benchmarks.

ROUNDS = {'cpu': 60, 'cuda': 50}
WARMUP_ROUNDS = 10
# The unfused baseline's best case: glibc keeps freed blocks for reuse (benchmarks/conftest.py).
pytestmark = pytest.mark.usefixtures('warm_allocator')


def _cases():
    for device in DEVICES:
        for shape in SHAPES[device]:
            for layout in LAYOUTS:
                for modulation in MODULATIONS:
                    yield pytest.param(device, shape, layout, modulation,
                                       id=f'{device}-{"x".join(map(str, shape))}-{layout}-{modulation}')


def _implementations(device):
    return ('unfused', 'native') + (('compile', 'apex') if device == 'cuda' else ())


@pytest.mark.parametrize('device,shape,layout,modulation', list(_cases()))
def test_forward_backward(benchmark, device, shape, layout, modulation):
    """All implementations of one case, interleaved round by round (order alternating), so that a slow spell of
    this shared machine lands on all of them alike; pytest-benchmark times the whole round, and each
    implementation's median comes from its own per-round times."""
    dtype = torch.bfloat16 if device == 'cuda' else torch.float32
    x, w, b, add, scale, shift, dy = _inputs(device, shape, layout, modulation, dtype)
    steps = {}
    for implementation in _implementations(device):
        try:
            steps[implementation] = make_step(implementation, x, w, b, add, scale, shift, dy)
        except pytest.skip.Exception:
            if implementation in ('unfused', 'native'):
                raise
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    times = {name: [] for name in steps}
    order = list(steps)

    def timed():
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        order.reverse()

    for _ in range(WARMUP_ROUNDS):
        timed()
    for name in times:
        times[name].clear()
    benchmark.group = f'{device} {"x".join(map(str, shape))} {layout} {modulation}'
    benchmark.pedantic(timed, rounds=ROUNDS[device], iterations=1, warmup_rounds=0)
    for name, values in times.items():
        _medians[(device, shape, layout, modulation, name)] = statistics.median(values)
    benchmark.extra_info.update({f'{name}_median_ms': 1e3 * statistics.median(v) for name, v in times.items()})

#----------------------------------------------------------------------------
# Report (runs last: defined last in the module).

def _device_name(device):
    if device == 'cuda':
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    capability = native.extension().active_cpu_capability() if native.available('cpu') else 'n/a'
    return f'{model}, {torch.get_num_threads()} threads, native ISA {capability}'


def _peak_bandwidth_gbs():
    """Theoretical DRAM bandwidth of the current GPU (None if unknown)."""
    return peak_memory_bandwidth(torch.device('cuda', torch.cuda.current_device()))[0]


def _bytes_moved(shape, dtype_bytes):
    """Minimum DRAM traffic of forward + backward: read x, write y; read x and dy, write dx."""
    numel = 1
    for s in shape:
        numel *= s
    return 5 * numel * dtype_bytes


def test_zz_speedup_report():
    rows = []
    for (device, shape, layout, modulation, implementation), median in sorted(_medians.items()):
        if implementation == 'unfused':
            continue
        baseline = _medians.get((device, shape, layout, modulation, 'unfused'))
        if baseline is None:
            continue
        row = {'device': device, 'device_name': _device_name(device), 'shape': list(shape), 'layout': layout,
               'modulation': modulation, 'implementation': implementation, 'median_ms': median * 1e3,
               'unfused_median_ms': baseline * 1e3, 'speedup_vs_unfused': baseline / median}
        if device == 'cuda':
            row['achieved_GBps'] = _bytes_moved(shape, 2) / median / 1e9
            row['peak_GBps'] = _peak_bandwidth_gbs()
        rows.append(row)
    if not rows:
        pytest.skip('no benchmark pairs were measured in this run')

    RESULTS_DIR.mkdir(exist_ok=True)
    for device in sorted({r['device'] for r in rows}):
        device_rows = [r for r in rows if r['device'] == device]
        stem = RESULTS_DIR / f'group_norm_act_{device}'
        stem.with_suffix('.json').write_text(json.dumps(device_rows, indent=2) + '\n')
        lines = [f'# Fused GroupNorm+modulation+SiLU, forward+backward ({device_rows[0]["device_name"]})', '',
                 f'torch {torch.__version__}; ratio = median(unfused PyTorch) / median(implementation), same run.', '',
                 '| shape | layout | modulation | implementation | median ms | unfused ms | speedup |'
                 + (' GB/s | peak GB/s |' if device == 'cuda' else ''),
                 '|---|---|---|---|---|---|---|' + ('---|---|' if device == 'cuda' else '')]
        for r in device_rows:
            line = (f'| {"x".join(map(str, r["shape"]))} | {r["layout"]} | {r["modulation"]} | {r["implementation"]} '
                    f'| {r["median_ms"]:.3f} | {r["unfused_median_ms"]:.3f} | {r["speedup_vs_unfused"]:.2f}x |')
            if device == 'cuda':
                peak = r['peak_GBps']
                line += f' {r["achieved_GBps"]:.0f} | {"?" if peak is None else f"{peak:.0f}"} |'
            lines.append(line)
        stem.with_suffix('.md').write_text('\n'.join(lines) + '\n')
        print('\n' + '\n'.join(lines))

    min_speedup = os.environ.get(MIN_SPEEDUP_ENV)
    if min_speedup:
        slow = [r for r in rows if r['implementation'] == 'native' and r['speedup_vs_unfused'] < float(min_speedup)]
        assert not slow, f'native below {min_speedup}x the unfused sequence: ' + ', '.join(
            f'{r["device"]} {r["shape"]} {r["layout"]} {r["modulation"]} {r["speedup_vs_unfused"]:.2f}x' for r in slow)
