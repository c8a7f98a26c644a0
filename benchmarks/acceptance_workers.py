"""The stages of benchmarks/gpu_acceptance.py that run as Python workers, each in a process of its own.

    python benchmarks/acceptance_workers.py environment --result R.json [--cpu-smoke]
    python benchmarks/acceptance_workers.py bandwidth --result R.json [--cpu-smoke]
    python benchmarks/acceptance_workers.py train-step --path 'eager fp32' --result R.json [--cpu-smoke] [--build-only]

Each writes one JSON result: {status: passed | failed, summary, failed_checks: [...], details: {...}}. A worker never
decides on speed: failed_checks are correctness findings only (a missing GPU component, a kernel failing its
self-check, a non-finite loss).
"""

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent


def _result(failed_checks, summary, details):
    return dict(status='failed' if failed_checks else 'passed', summary=summary, failed_checks=failed_checks,
                details=details)


def _version(distribution, module=None):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module), '__version__', 'installed') if module else None
    except ImportError:
        return None

#----------------------------------------------------------------------------
# Environment: versions, the GPU, NVML, which kernels can run.

def _cache_size_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f)))
    return round(total / 2 ** 20, 1)


def _compile_caches():
    """Inductor's and Triton's on-disk caches: a warm cache makes the compiled paths' builds much shorter."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    triton_dir = os.environ.get('TRITON_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.triton', 'cache')
    return {name: dict(path=path, size_mb=_cache_size_mb(path) if os.path.isdir(path) else 0.0)
            for name, path in (('inductor', cache_dir()), ('triton', triton_dir))}


def environment(smoke):
    import torch
    from d2o_fast.ops import native
    checks, details = [], {}
    commit = subprocess.run(['git', '-C', str(ROOT), 'describe', '--always', '--dirty'], capture_output=True, text=True)
    details['versions'] = dict(
        python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        triton=_version('triton'), dali=_version('nvidia-dali-cuda130', 'nvidia.dali'),
        nvidia_ml_py=_version('nvidia-ml-py'), apex=_version('apex', 'apex'), numpy=_version('numpy'),
        d2o_fast=commit.stdout.strip() or 'not a git checkout')
    details['host'] = dict(platform=platform.platform(), cpus=os.cpu_count(),
                           cuda_visible_devices=os.environ.get('CUDA_VISIBLE_DEVICES'),
                           cuda_device_order=os.environ.get('CUDA_DEVICE_ORDER'))
    details['compile_caches'] = _compile_caches()
    module = native.extension()
    details['native_extension'] = dict(cpu=native.available('cpu'), cuda=native.available('cuda'),
                                       built_with_cuda=bool(getattr(module, 'with_cuda', False)),
                                       unavailable_reason=native.unavailable_reason())

    def check(name, ok, detail, required=True):
        checks.append(dict(name=name, ok=bool(ok), required=required, detail=detail))

    if smoke:
        check('native CPU kernels', native.available('cpu'), native.unavailable_reason() or 'loaded', required=False)
    else:
        check('CUDA device', torch.cuda.is_available(), f'{torch.cuda.device_count()} visible')
    if torch.cuda.is_available():
        from d2o_fast.engine import telemetry
        device = torch.device('cuda', torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        peak, source = telemetry.peak_memory_bandwidth(device)
        details['gpu'] = dict(name=props.name, capability=f'{props.major}.{props.minor}',
                              memory_gb=round(props.total_memory / 2 ** 30, 1), sms=props.multi_processor_count,
                              identity=telemetry.cuda_device_identity(device), peak_bandwidth_gbs=peak,
                              peak_bandwidth_source=source, nvml=telemetry.gpu_report(device))
        why = native.unavailable_reason() or 'the extension was built without CUDA (install with D2O_FAST_CUDA=1)'
        check('CUDA kernels of the fused op', native.available('cuda'), 'available' if native.available('cuda') else why)
        try:
            triton_ok = importlib.import_module('d2o_fast.ops.triton_group_norm').available('cuda')
        except ImportError:
            triton_ok = False
        check('Triton kernels on CUDA', triton_ok, 'available' if triton_ok else 'not importable or TRITON_INTERPRET set')
        check('NVML reads this GPU', details['gpu']['nvml'].get('nvml') == 'ok', details['gpu']['nvml'].get('nvml'))
        check('DALI installed', details['versions']['dali'], details['versions']['dali'] or 'not installed',
              required=False)
    failed = [c['name'] for c in checks if c['required'] and not c['ok']]
    details['checks'] = checks
    gpu = details.get('gpu', {}).get('name', 'no GPU')
    summary = (f'{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {details["versions"]["triton"]}, '
               f'DALI {details["versions"]["dali"]}; {sum(c["ok"] for c in checks)}/{len(checks)} checks ok')
    return _result(failed, summary, details)

#----------------------------------------------------------------------------
# Bandwidth of the fused kernels beside PyTorch's GroupNorm + SiLU (+ modulation) and apex's.

# Minimal DRAM traffic per element of x: forward reads x, writes y; backward reads x and dy, writes dx.
FORWARD_ACCESSES, BACKWARD_ACCESSES = 2, 3
NUM_GROUPS, EPS = 32, 1e-5


def _timer(device):
    """fn, reps -> median milliseconds (CUDA events on a GPU, perf_counter on CPU)."""
    import torch

    def measure(fn, reps, warmup):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == 'cuda':
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    return measure


def _implementations(device, smoke):
    """name -> (forward, backward) factories for one case's tensors; the fused ones are the backends' own
    contract functions (no autograd), PyTorch's is the unfused sequence the networks run without the op."""
    import torch
    sys.path.insert(0, str(BENCHMARKS))
    from test_group_norm_act_bench import unfused
    backends = {'cpu': 'd2o_fast.ops.native'} if device.type == 'cpu' else {
        'cuda': 'd2o_fast.ops.native', 'triton': 'd2o_fast.ops.triton_group_norm'}
    impls = {}
    for name, module_name in backends.items():
        module = importlib.import_module(module_name)
        if not module.available(device.type):
            continue

        def fused(x, w, b, add, scale, shift, dy, module=module):
            y, mean, rstd = module.forward(x, w, b, add, scale, shift, NUM_GROUPS, EPS, True)
            return (lambda: module.forward(x, w, b, add, scale, shift, NUM_GROUPS, EPS, True),
                    lambda: module.backward(dy, x, w, b, add, scale, shift, mean, rstd, NUM_GROUPS, True))
        impls[name] = fused

    def autograd(fn, x, w, b, add, scale, shift, dy):
        leaves = [t.detach().requires_grad_() for t in (x, w, b, add, scale, shift) if t is not None]
        inputs = iter(leaves)
        args = [next(inputs) if t is not None else None for t in (x, w, b, add, scale, shift)]
        y = fn(*args)

        def forward():
            with torch.no_grad():
                fn(*args)
        return forward, lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    impls['torch'] = lambda *case: autograd(unfused, *case)
    if device.type == 'cuda':
        try:
            from apex.contrib.group_norm import GroupNorm as ApexGroupNorm
        except ImportError:
            ApexGroupNorm = None
        if ApexGroupNorm is not None:
            def apex(x, w, b, add, scale, shift, dy):
                if scale is not None or not x.is_contiguous(memory_format=torch.channels_last):
                    return None  # apex: NHWC only, no per-sample scale / shift
                module = ApexGroupNorm(NUM_GROUPS, x.shape[1], eps=EPS, act='silu').to(x.device)
                module.weight.data.copy_(w)
                module.bias.data.copy_(b)
                return autograd(lambda x_, *_: module(x_ + add[:, :, None, None]), x, w, b, add, None, None, dy)
            impls['apex'] = apex
    return impls


def bandwidth(smoke):
    import torch
    from d2o_fast.engine import telemetry
    from d2o_fast.ops import group_norm_act, set_backend
    from d2o_fast.ops.dispatch import SelfCheck
    sys.path.insert(0, str(BENCHMARKS))
    from test_group_norm_act_bench import LAYOUTS, MODULATIONS, SHAPES, _inputs
    device = torch.device('cpu' if smoke else 'cuda')
    shapes = [(2, 64, 8, 8)] if smoke else SHAPES['cuda']
    dtype = torch.float32 if smoke else torch.bfloat16
    reps, warmup = (3, 1) if smoke else (30, 5)
    impls = _implementations(device, smoke)
    peak, peak_source = telemetry.peak_memory_bandwidth(device)
    measure = _timer(device)

    # The first call of each backend per configuration runs its self-check against the reference (dispatch).
    for backend in [name for name in impls if name not in ('torch', 'apex')]:
        set_backend(backend)
        for layout in LAYOUTS:
            for modulation in MODULATIONS:
                x, w, b, add, scale, shift, _ = _inputs(device, shapes[0], layout, modulation, dtype)
                group_norm_act(x, w, b, NUM_GROUPS, EPS, add=add, scale=scale, shift=shift, silu=True)
    set_backend(None)
    verdicts = [dict(backend=k[0], device=k[1], dtype=str(k[2]), layout=str(k[3]), configuration=', '.join(map(str, k[4:])),
                     trusted=v) for k, v in SelfCheck.verdicts().items()]

    rows, errors = [], []
    for shape in shapes:
        numel = math.prod(shape)
        for layout in LAYOUTS:
            for modulation in MODULATIONS:
                case = _inputs(device, shape, layout, modulation, dtype)
                tensor_bytes = numel * case[0].element_size()
                for name, make in impls.items():
                    try:  # one broken implementation must not hide the others' figures
                        steps = make(*case)
                        if steps is None:
                            continue
                        fwd_ms, bwd_ms = (measure(fn, reps, warmup) for fn in steps)
                    except Exception as e:
                        errors.append(dict(implementation=name, shape=list(shape), layout=layout, modulation=modulation,
                                           error=f'{type(e).__name__}: {str(e).strip()[:300]}'))
                        continue
                    gbs = lambda accesses, ms: accesses * tensor_bytes / (ms * 1e-3) / 1e9
                    row = dict(shape=list(shape), layout=layout, modulation=modulation, implementation=name,
                               dtype=str(dtype).replace('torch.', ''), forward_ms=fwd_ms, backward_ms=bwd_ms,
                               forward_gbs=gbs(FORWARD_ACCESSES, fwd_ms), backward_gbs=gbs(BACKWARD_ACCESSES, bwd_ms))
                    for d in ('forward', 'backward'):
                        row[f'{d}_share_of_peak'] = row[f'{d}_gbs'] / peak if peak else None
                    rows.append(row)
                del case
    failed = [f'{v["backend"]} self-check failed: {v["dtype"]} {v["layout"]} {v["configuration"]}'
              for v in verdicts if not v['trusted']]
    failed += [f'{e["implementation"]} crashed on {e["shape"]} {e["layout"]} {e["modulation"]}: {e["error"]}'
               for e in errors if e['implementation'] != 'apex']  # apex is optional: its errors are only reported
    fused = [r for r in rows if r['implementation'] not in ('torch', 'apex')]
    best = max(fused, key=lambda r: r['forward_gbs'], default=None)
    summary = (f'{len(rows)} timings of {", ".join(impls)}; self-check {sum(v["trusted"] for v in verdicts)}/'
               f'{len(verdicts)} trusted; peak {"unknown" if not peak else f"{peak:.0f} GB/s"}')
    if best and peak:
        summary += f'; best fused forward {best["forward_gbs"]:.0f} GB/s ({100 * best["forward_share_of_peak"]:.0f}% of peak)'
    return _result(failed, summary, dict(peak_gbs=peak, peak_source=peak_source, rows=rows, self_check=verdicts, errors=errors,
                                         implementations=list(impls), reps=reps, bytes_per_element=dict(
                                             forward=FORWARD_ACCESSES, backward=BACKWARD_ACCESSES)))

#----------------------------------------------------------------------------
# The paper's CIFAR-10 training iteration, D2O and D2O-F interleaved, on one path.

VARIANTS = ('d2o', 'd2o-f')
R1_INTERVAL = 16
# GPU: the paper's configuration (full NCSN++, projected D on vgg16_bn + tf_efficientnet_lite0 at 224, the authors'
# 64 images per GPU). CPU smoke: a tiny NCSN++ and the StyleGAN2 discriminator (seconds, not minutes, per step).
SIZES = {'gpu': dict(batch=64, generator=None, config={}, warmup_rounds=2, rounds=8, r1_steps=2),
         'smoke': dict(batch=2, generator=dict(arch='ncsnpp', img_resolution=32, img_channels=3, label_dim=0,
                                               model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                                               dropout=0),
                       config=dict(disc='stylegan2', disc_channels=16), warmup_rounds=1, rounds=2, r1_steps=1)}


def train_step(path_config, kernels, smoke, build_only):
    """Build the D2O and D2O-F trainers of one path (compile + warm-up when it compiles), measure each one's peak
    memory in an iteration + R1 step, then time their iterations interleaved round by round."""
    import torch
    sys.path.insert(0, str(BENCHMARKS))
    from conftest import MemoryProbe
    from paper_config import build_trainer
    from test_train_step import training_state_bytes
    from d2o_fast import ops
    from d2o_fast.nets import architecture_kwargs
    mode = path_config.get('cudagraphs')
    if mode is not None:
        from d2o_fast.engine import compile as engine_compile
        modes = getattr(engine_compile, 'CUDAGRAPH_MODES', None)
        if modes is None or mode not in modes:
            return dict(status='skipped', summary=f'this engine has no --cudagraphs {mode} (CUDAGRAPH_MODES: {modes})',
                        failed_checks=[], details={})
    size = SIZES['smoke' if smoke else 'gpu']
    device = torch.device('cpu' if smoke else 'cuda')
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    ops.set_backend(kernels)
    generator = architecture_kwargs(**size['generator']) if size['generator'] else None
    runs = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        trainer = build_trainer(variant, 'eager', size['batch'], generator, device=device,
                                config_overrides={**size['config'], **path_config})
        sync()
        runs[variant] = dict(trainer=trainer, build_s=time.perf_counter() - t0, step_ms=[], r1_ms=[], losses=[])
    details = dict(batch=size['batch'], kernels=ops.get_backend(), config=path_config,
                   build_s={v: r['build_s'] for v, r in runs.items()})
    if build_only:
        return _result([], f'built D2O and D2O-F in {sum(details["build_s"].values()):.0f} s', details)

    G = runs['d2o']['trainer'].G
    g = torch.Generator().manual_seed(1)
    images = (torch.rand([size['batch'], G.img_channels, G.img_resolution, G.img_resolution], generator=g) * 2 - 1)
    images, labels = images.to(device), torch.zeros(size['batch'], G.label_dim, device=device)
    steps = iter(i for i in range(1, 10 ** 6) if i % R1_INTERVAL)  # no R1 inside the timed G + D steps

    def iteration(run, timed=True):
        t0 = time.perf_counter()
        stats = run['trainer'].step(images, labels, next(steps), 0)
        sync()
        run['losses'] += [float(v) for k, v in stats.items() if k.startswith('loss')]
        if timed:
            run['step_ms'].append(1e3 * (time.perf_counter() - t0))

    def r1(run):
        t0 = time.perf_counter()
        run['trainer'].r1_phase([images], [None])
        sync()
        run['r1_ms'].append(1e3 * (time.perf_counter() - t0))

    # Peak memory (CUDA: training-state tensors + max_memory_allocated growth over an iteration + R1 step; the CPU
    # smoke runs the same steps unmeasured: its resident-set probe needs an allocator set-up of its own).
    probe = MemoryProbe() if device.type == 'cuda' else None
    for run in runs.values():
        iteration(run, timed=False)  # the first steady step: optimizer state and gradients appear
        work = lambda: (iteration(run, timed=False), r1(run))
        if probe:
            run['peak_bytes'] = probe.measure(work, training_state_bytes(run['trainer']))
        else:
            work()
            run['peak_bytes'] = None
        run['r1_ms'].clear()
    order = list(runs.values())
    for round_index in range(size['warmup_rounds'] + size['rounds']):
        for run in order:
            iteration(run, timed=round_index >= size['warmup_rounds'])
        order.reverse()
    for _ in range(size['r1_steps']):
        for run in runs.values():
            r1(run)

    variants, failed = {}, []
    for name, run in runs.items():
        step_ms, r1_ms = statistics.median(run['step_ms']), statistics.median(run['r1_ms'])
        iteration_ms = step_ms + r1_ms / R1_INTERVAL
        peak = run['peak_bytes'] / 2 ** 30 if run['peak_bytes'] is not None else None
        variants[name] = dict(step_ms=step_ms, r1_ms=r1_ms, iteration_ms=iteration_ms,
                              img_per_s=size['batch'] / (iteration_ms / 1e3), peak_mem_gb=peak,
                              build_s=run['build_s'], timed_iterations=len(run['step_ms']),
                              g_trainable=sum(p.numel() for p in run['trainer'].g_params))
        if not all(math.isfinite(v) for v in run['losses']):
            failed.append(f'{name}: non-finite loss')
    details.update(variants=variants, d2o_f_over_d2o=variants['d2o-f']['img_per_s'] / variants['d2o']['img_per_s'])
    peaks = ' / '.join('-' if variants[v]['peak_mem_gb'] is None else f'{variants[v]["peak_mem_gb"]:.2f}' for v in VARIANTS)
    summary = (f'D2O {variants["d2o"]["img_per_s"]:.1f} img/s, D2O-F {variants["d2o-f"]["img_per_s"]:.1f} img/s '
               f'({details["d2o_f_over_d2o"]:.2f}x), peak memory {peaks} GB')
    return _result(failed, summary, details)

#----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('stage', choices=['environment', 'bandwidth', 'train-step'])
    p.add_argument('--result', required=True, help='JSON file to write the result to')
    p.add_argument('--cpu-smoke', action='store_true', help='tiny CPU stand-ins instead of the GPU sizes')
    p.add_argument('--path-config', default='{}', help='train-step: JSON of the path\'s config fields')
    p.add_argument('--kernels', default='auto', help='train-step: the fused GroupNorm backend of the path')
    p.add_argument('--build-only', action='store_true', help='train-step: build (compile + warm up) and stop')
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if a.stage == 'environment':
        result = environment(a.cpu_smoke)
    elif a.stage == 'bandwidth':
        result = bandwidth(a.cpu_smoke)
    else:
        result = train_step(json.loads(a.path_config), a.kernels, a.cpu_smoke, a.build_only)
    pathlib.Path(a.result).write_text(json.dumps(result, indent=2, default=str))


if __name__ == '__main__':
    main()
