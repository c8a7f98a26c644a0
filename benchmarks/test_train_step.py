"""The full D2O training iteration: eager fp32 (the baseline) vs compiled bf16 vs compiled bf16 + fused kernels,
D2O (freeze 0) vs D2O-F (freeze 1).

    OMP_NUM_THREADS=1 pytest benchmarks/test_train_step.py            # writes results/train_step_<device>.{md,json}
    D2O_FAST_BENCH_ASSERT_TARGETS=1 pytest benchmarks/test_train_step.py   # also assert the targets below

One iteration = the real D2OTrainer's G step + D step + EMA, plus 1/16 of a separately timed R1 step (R1 runs
every 16 steps). Compile + warm-up time (D2OTrainer.warm_up: every graph built, all state restored) is
recorded separately and is not part of the throughput (a path's D2O-F trainer is built after its D2O one and may
find graphs of the same shapes in Inductor's cache). The freeze levels of a path run side by side, their timed
iterations interleaved round by round, so that the D2O-F / D2O ratio compares like with like on this shared machine.

CPU configuration (small, so the whole suite runs in minutes on 2 cores):
    G: NCSN++ at 32x32, the CIFAR-10 architecture narrowed: model_channels 64 (CIFAR-10: 128), channel_mult
       (2, 2, 2) (CIFAR-10: (2, 2, 2)), 1 block per resolution (CIFAR-10: 4), attention at 16x16, 10 classes.
    D: the from-scratch StyleGAN2 discriminator at the demo's width, channel_max 64; batch 16.
       The generator is the larger network, as in every real configuration: with G and D equally costly (e.g.
       G at 32 channels, D at 128) the iteration would measure mostly D.
    Beside it: the projected discriminator (vgg16_bn + tf_efficientnet_lite0 at 224, random weights),
       batch 2, D2O-F, eager fp32 vs eager bf16 + fused kernels (compiled too with
       D2O_FAST_BENCH_COMPILE_PROJECTED=1: its backbones take many minutes to compile here).
Throughput is computed from the process's CPU time per iteration (one thread, so this is the cost on a core of
its own on this shared machine); wall-clock figures are reported beside it. On CUDA both are wall-clock time.
GPU (when present): the cifar10 preset's real shapes (NCSN++ full width, batch 64 per GPU, projected D), plus
CUDA graphs.

Targets (medians of one run, ratios against the eager baseline of the same run): compiled >= 1.5x eager img/s;
D2O-F >= 1.2x D2O img/s; D2O-F optimizer state <= 25% of D2O's; compiled peak memory <= eager's.
Timed iterations run with the allocator of a process in its steady state (heap reuse); peak memory is measured
before them, in an iteration + R1 step of its own (benchmarks/conftest.py: training-state tensors + resident-set
growth under a 64 KiB mmap threshold; CUDA: max_memory_allocated). Nothing asserts wall-clock time unless the env var asks for it.
"""

import dataclasses
import json
import os
import pathlib
import statistics
import time

import pytest
import torch

from conftest import probe_allocator, steady_allocator
from paper_config import flop_counter
from d2o_fast import ops
from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine.config import resolve_config
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import architecture_kwargs, build_network, labelled_batch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'
ASSERT_ENV = 'D2O_FAST_BENCH_ASSERT_TARGETS'
CUDA = torch.cuda.is_available()
DEVICE = torch.device('cuda' if CUDA else 'cpu')
CLASSES = 10
R1_INTERVAL = 16

if CUDA:
    G_ARCH = dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16])
    G_ARCH_NAME = 'NCSN++ 32x32 (cifar10, full width: 128 ch, mult 2-2-2, 4 blocks)'
    BATCH = {'stylegan2': 64, 'projected': 64}
else:
    G_ARCH = dict(model_channels=64, channel_mult=[2, 2, 2], num_blocks=1, attn_resolutions=[16])
    G_ARCH_NAME = 'NCSN++ 32x32 narrowed (cifar10 arch with 64 ch, mult 2-2-2, 1 block/res, attn 16)'
    BATCH = {'stylegan2': 16, 'projected': 2}
STYLEGAN2_CHANNELS = 128 if CUDA else 64
ROUNDS = 5 if not CUDA else 20  # timed rounds per path (each: one iteration of every freeze level)


@dataclasses.dataclass(frozen=True)
class Case:
    disc: str
    path: str            # eager / compiled / compiled+fused (/ cudagraphs on CUDA)
    freeze: int

    @property
    def name(self):
        return f'{self.disc}-{self.path}-{"D2O-F" if self.freeze else "D2O"}'

    @property
    def reuse(self):
        return self.path.endswith(REUSE_SUFFIX)

    @property
    def base_path(self):
        """The path without --reuse-fakes."""
        return self.path[:-len(REUSE_SUFFIX)] if self.reuse else self.path

    @property
    def compiled(self):
        return self.base_path.startswith(('compiled', 'cudagraphs'))

    @property
    def options(self):
        """Config fields and kernel backend of the path (a '+reuse' path: its base path with --reuse-fakes)."""
        fused = 'cuda' if CUDA else 'cpu'
        config, kernels = {'eager': (dict(precision='fp32'), 'torch'),
                'bf16+fused': (dict(precision='bf16', disc_precision='bf16', channels_last=True), fused),
                'compiled': (dict(precision='bf16', disc_precision='bf16', compile=True), 'torch'),
                'compiled+fused': (dict(precision='bf16', disc_precision='bf16', compile=True), fused),
                'cudagraphs+fused': (dict(precision='bf16', disc_precision='bf16', compile=True, cudagraphs='networks'),
                                     fused)}[self.base_path]
        return (dict(config, reuse_fakes=True) if self.reuse else config), kernels


# A path with REUSE_SUFFIX is its base path with --reuse-fakes (the D step on the G step's fakes and features).
REUSE_SUFFIX = '+reuse'
PATHS = ['eager', 'compiled', 'compiled+fused'] + (['cudagraphs+fused'] if CUDA else []) + ['eager+reuse', 'compiled+fused+reuse']
CASES = [Case('stylegan2', path, freeze) for path in PATHS for freeze in (0, 1)]
# The projected discriminator's backbones (vgg16_bn + efficientnet at 224) take many minutes to compile on this
# CPU, so by default its figures are eager fp32 vs eager bf16 + fused kernels; set the env var to add compiled.
COMPILE_PROJECTED_ENV = 'D2O_FAST_BENCH_COMPILE_PROJECTED'
PROJECTED_PATHS = ['eager', 'bf16+fused'] + (['compiled+fused'] if CUDA or os.environ.get(COMPILE_PROJECTED_ENV) else [])
PROJECTED_PATHS += ['eager+reuse', 'bf16+fused+reuse']
CASES += [Case('projected', path, 1) for path in PROJECTED_PATHS]

_results = {}

#----------------------------------------------------------------------------

def build_trainer(case):
    """The case's D2OTrainer (compiled and warmed up when the path compiles) and the wall / CPU seconds that took."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    config, kernels = case.options
    ops.set_backend(kernels)
    torch.manual_seed(0)
    batch = BATCH[case.disc]
    G = build_network('D2OPrecond', **architecture_kwargs('ncsnpp', 32, 3, CLASSES, dropout=0, **G_ARCH))
    disc_kwargs = dict(pretrained=False) if case.disc == 'projected' else dict(channel_max=STYLEGAN2_CHANNELS)
    D = build_discriminator(case.disc, img_resolution=32, img_channels=3, c_dim=CLASSES, **disc_kwargs)
    cfg = resolve_config('demo', init='random', arch='ncsnpp', disc=case.disc, batch=batch, freeze=case.freeze,
                         r1_interval=R1_INTERVAL, **config)
    trainer = D2OTrainer(G, D, cfg, DEVICE, batch_gpu=batch, rounds=1)
    return trainer, time.perf_counter() - wall0, time.process_time() - cpu0


def tensor_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def training_state_bytes(trainer):
    tensors = []
    for module in (trainer.G, trainer.G_ema, trainer.D):
        tensors += list(module.parameters()) + [p.grad for p in module.parameters()] + list(module.buffers())
    for opt in (trainer.opt_g, trainer.opt_d):
        tensors += [t for state in opt.state.values() for t in state.values()]
    return tensor_bytes(tensors)


def optimizer_state_bytes(optimizer):
    return tensor_bytes(t for state in optimizer.state.values() for t in state.values())


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


class Run:
    """One case's trainer, its fixed batch and the CPU / wall seconds of each iteration it ran."""

    def __init__(self, case):
        self.case = case
        self.trainer, self.build_wall, self.build_cpu = build_trainer(case)
        batch = self.trainer.batch_gpu
        self.images, self.labels = labelled_batch(batch, [3, 32, 32], CLASSES, 1, values='uniform', labels='random',
                                                  device=DEVICE)
        self.steps = iter(range(1, 10 ** 9))
        self.cpu, self.wall, self.r1_cpu, self.r1_wall = [], [], [], []

    def iteration(self):  # step indices never a multiple of 16: no R1 inside the timed G + D steps
        step = next(self.steps)
        step += step // (R1_INTERVAL - 1)
        t0, c0 = time.perf_counter(), time.process_time()
        self.trainer.step(self.images, self.labels, step, step * self.trainer.batch_gpu)
        synchronize()
        self.cpu.append(time.process_time() - c0)
        self.wall.append(time.perf_counter() - t0)

    def r1(self):
        t0, c0 = time.perf_counter(), time.process_time()
        self.trainer.r1_phase(self.images.chunk(1), self.labels.chunk(1))
        synchronize()
        self.r1_cpu.append(time.process_time() - c0)
        self.r1_wall.append(time.perf_counter() - t0)

    def count_flops(self):
        """Matmul / convolution FLOPs of one iteration (G + D step) and of one R1 step (FlopCounterMode), on an eager
        trainer only: a compiled path computes the same as the eager path of its (disc, freeze, reuse)."""
        self.flops = None
        if self.case.compiled:
            return
        step = 2 * R1_INTERVAL - 1
        with flop_counter() as counter:
            self.trainer.step(self.images, self.labels, step, step * self.trainer.batch_gpu)
        iteration = counter.get_total_flops()
        with flop_counter() as counter:
            self.trainer.r1_phase(self.images.chunk(1), self.labels.chunk(1))
        self.flops = dict(iteration=iteration, r1=counter.get_total_flops(),
                          per_iteration=iteration + counter.get_total_flops() / R1_INTERVAL)

    def measure_memory(self, memory_probe):
        """Peak memory of an iteration + an R1 step, with the optimizer state and gradients of the steady state
        (call under probe_allocator())."""
        self.iteration()  # first steady step (optimizer state and gradients appear); not measured
        self.state = training_state_bytes(self.trainer)
        self.peak = memory_probe.measure(lambda: (self.iteration(), self.r1()), self.state)
        self.cpu.clear(), self.wall.clear(), self.r1_cpu.clear(), self.r1_wall.clear()

    def row(self):
        # CPU: throughput from the process's CPU time (1 thread: what the step costs on a core of its own, whatever
        # else runs on this shared machine) and, beside it, from wall-clock time. CUDA: the GPU's time is wall time
        # (the host thread's CPU time depends on how it waits for the device).
        case, trainer, batch = self.case, self.trainer, self.trainer.batch_gpu
        wall_seconds = statistics.median(self.wall) + statistics.median(self.r1_wall) / R1_INTERVAL
        seconds = wall_seconds if CUDA else statistics.median(self.cpu) + statistics.median(self.r1_cpu) / R1_INTERVAL
        return dict(case=case.name, disc=case.disc, path=case.path, freeze=case.freeze, batch=batch,
                    precision=str(trainer.g_dtype or torch.float32).replace('torch.', ''), kernels=ops.get_backend(),
                    iteration_ms=1000 * seconds, r1_ms=1000 * statistics.median(self.r1_cpu),
                    img_per_sec=batch / seconds, wall_iteration_ms=1000 * wall_seconds,
                    wall_img_per_sec=batch / wall_seconds, timed_iterations=len(self.cpu),
                    compile_warmup_s=trainer.warmup_seconds, build_wall_s=self.build_wall, build_cpu_s=self.build_cpu,
                    peak_mem_mb=self.peak / 2 ** 20, state_mb=self.state / 2 ** 20,
                    opt_g_state_mb=optimizer_state_bytes(trainer.opt_g) / 2 ** 20,
                    g_trainable=sum(p.numel() for p in trainer.g_params),
                    g_params=sum(p.numel() for p in trainer.G.parameters()), reuse_fakes=case.reuse,
                    base_path=case.base_path, flops=self.flops,
                    flops_from=None if self.flops is None else case.path)


PAIRS = list(dict.fromkeys((c.disc, c.path) for c in CASES))


@pytest.mark.parametrize('disc,path', PAIRS, ids=[f'{d}-{p}' for d, p in PAIRS])
def test_train_step(disc, path, benchmark, memory_probe):
    """The freeze levels of one path side by side: each one's peak memory first, right after its build, then their
    timed iterations interleaved round by round (order alternating), so that a slow spell of this shared machine
    lands on D2O and D2O-F alike and their ratio compares like with like. pytest-benchmark times whole rounds; each
    case's figures come from its own iterations."""
    cases = [c for c in CASES if (c.disc, c.path) == (disc, path)]
    torch._dynamo.reset()  # each path compiles its own graphs; no cache-size limit carried over
    runs = []
    for case in cases:
        # The build (compile + warm-up) runs under the process's own allocator: under the probe's 64 KiB mmap
        # threshold Inductor's Python side took ~1.5x the CPU time. probe_allocator() then hands the build's freed
        # heap back to the system, so the probed step's tensors still show up in the resident set.
        run = Run(case)
        run.count_flops()
        with probe_allocator():
            run.measure_memory(memory_probe)
        runs.append(run)
    slow = disc == 'projected' and not CUDA  # ~10 s per CPU iteration: fewer rounds keep the suite within 10 minutes
    order = list(runs)

    def interleaved_round():
        for run in order:
            run.iteration()
        order.reverse()

    with steady_allocator(reserve_bytes=max(run.peak - run.state for run in runs)):
        benchmark.pedantic(interleaved_round, rounds=2 if slow else ROUNDS, iterations=1, warmup_rounds=0)
        for _ in range(1 if slow else 2):
            for run in runs:
                run.r1()
    for run in runs:
        row = run.row()
        benchmark.extra_info[run.case.name] = row
        _results[run.case] = row
        assert row['img_per_sec'] > 0 and row['opt_g_state_mb'] > 0

#----------------------------------------------------------------------------

def ratios(rows):
    """Each row against the eager baseline of the same discriminator and freeze level, D2O-F against D2O, and a reuse
    path against its base path. A compiled row's FLOPs are those counted on the eager row of the same computation."""
    by = {(r['disc'], r['path'], r['freeze']): r for r in rows}
    for r in rows:
        if r['flops'] is None:
            eager = by.get((r['disc'], 'eager' + (REUSE_SUFFIX if r['reuse_fakes'] else ''), r['freeze']))
            if eager and eager['flops']:
                r['flops'], r['flops_from'] = eager['flops'], eager['path']
        plain = by.get((r['disc'], r['base_path'], r['freeze'])) if r['reuse_fakes'] else None
        r['reuse_speedup'] = r['img_per_sec'] / plain['img_per_sec'] if plain else None
        r['reuse_mem'] = r['peak_mem_mb'] / plain['peak_mem_mb'] if plain else None
        r['reuse_flops'] = (r['flops']['per_iteration'] / plain['flops']['per_iteration']
                            if plain and r['flops'] and plain['flops'] else None)
        base = by.get((r['disc'], 'eager', r['freeze']))
        d2o = by.get((r['disc'], r['path'], 0))
        r['speedup_vs_eager'] = r['img_per_sec'] / base['img_per_sec'] if base else None
        r['wall_speedup_vs_eager'] = r['wall_img_per_sec'] / base['wall_img_per_sec'] if base else None
        r['mem_vs_eager'] = r['peak_mem_mb'] / base['peak_mem_mb'] if base else None
        r['speedup_vs_d2o'] = r['img_per_sec'] / d2o['img_per_sec'] if d2o and r['freeze'] else None
        r['opt_state_vs_d2o'] = r['opt_g_state_mb'] / d2o['opt_g_state_mb'] if d2o and r['freeze'] else None
    return rows


def targets(rows):
    """The issue's targets, on the StyleGAN2-discriminator configuration: (description, value, met)."""
    by = {(r['disc'], r['path'], r['freeze']): r for r in rows}
    out = []
    for freeze in (0, 1):
        best = max((by[('stylegan2', p, freeze)] for p in PATHS
                    if p != 'eager' and not p.endswith(REUSE_SUFFIX) and ('stylegan2', p, freeze) in by),
                   key=lambda r: r['img_per_sec'], default=None)
        if best and best['speedup_vs_eager'] is not None:  # a run without the eager baseline (pytest -k) has no ratios
            out.append((f'compiled ({best["path"]}) / eager img/s, freeze {freeze} (>= 1.5)', best['speedup_vs_eager'],
                        best['speedup_vs_eager'] >= 1.5))
            out.append((f'compiled ({best["path"]}) / eager peak memory, freeze {freeze} (<= 1)', best['mem_vs_eager'],
                        best['mem_vs_eager'] <= 1))
    for path in (p for p in PATHS if not p.endswith(REUSE_SUFFIX)):
        r = by.get(('stylegan2', path, 1))
        if r and r['speedup_vs_d2o'] is not None:
            out.append((f'D2O-F / D2O img/s, {path} (>= 1.2)', r['speedup_vs_d2o'], r['speedup_vs_d2o'] >= 1.2))
    r = by.get(('stylegan2', 'eager', 1))
    if r and r['opt_state_vs_d2o'] is not None:
        out.append(('D2O-F / D2O G optimizer state (<= 0.25)', r['opt_state_vs_d2o'], r['opt_state_vs_d2o'] <= 0.25))
    return out


def markdown(rows, machine, checks):
    f = lambda v, fmt: '' if v is None else format(v, fmt)
    lines = [f'# Full D2O training iteration ({machine["device"]}, {machine["threads"]} thread(s))', '',
             f'torch {machine["torch"]}, Python {machine["python"]}; {machine["cores"]} cores shared with other jobs '
             f'(load average {machine["load_average"]:.1f} at the start). img/s and "vs" ratios use the process\'s CPU '
             f'time per iteration (one thread: the cost on a core of its own); the wall-clock figures beside them '
             f'depend on the load. All ratios are against the eager baseline measured in this same run.', '',
             f'Generator: {G_ARCH_NAME}; D2O = freeze 0, D2O-F = freeze 1. Discriminators: stylegan2 (channel_max '
             f'{STYLEGAN2_CHANNELS}) and projected (vgg16_bn + tf_efficientnet_lite0 at 224, random weights). One iteration = '
             f'G step + D step + EMA + 1/{R1_INTERVAL} of an R1 step. Paths: eager = fp32, PyTorch GroupNorm; '
             f'bf16+fused = eager with bf16 autocast of G and D, channels_last and the fused GroupNorm extension; compiled = torch.compile '
             f'(fullgraph, static shapes) + bf16 autocast of G and D; compiled+fused = the same with the fused GroupNorm '
             f'extension (ops backend cpu/cuda); PATH+reuse = PATH with --reuse-fakes (the D step on the G step\'s fakes '
             f'and their frozen discriminator features: no generator forward and no backbone pass on fakes in it), '
             f'its "reuse vs" ratios against PATH. Compile + warm-up is timed apart and not in img/s. Peak memory = '
             f'training-state tensors + resident-set growth in an iteration + R1 step of their own, before the timed ones '
             f'(benchmarks/conftest.py). GFLOP/iter: matmul and convolution FLOPs (forward and backward) of one G + D '
             f'step + 1/{R1_INTERVAL} of an R1 step, counted by torch.utils.flop_counter.FlopCounterMode on the eager '
             f'trainer of the same computation (a compiled row shows its eager row\'s count).',
             '', '| case | batch | G prec | kernels | CPU ms/iter | img/s | vs eager | vs D2O | wall ms/iter | wall vs eager '
             '| peak MB | vs eager mem | GFLOP/iter | reuse vs: img/s | FLOPs | peak mem | G opt state MB '
             '| G trainable / total | compile+warm-up wall s (CPU s) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        compile_s = f'{r["build_wall_s"]:.0f} ({r["build_cpu_s"]:.0f})' if r['compile_warmup_s'] is not None else ''
        gflop = f'{r["flops"]["per_iteration"] / 1e9:.2f}' if r['flops'] else ''
        lines.append(f'| {r["case"]} | {r["batch"]} | {r["precision"]} | {r["kernels"]} | {r["iteration_ms"]:.0f} | '
                     f'{r["img_per_sec"]:.2f} | {f(r["speedup_vs_eager"], ".2f")}x | {f(r["speedup_vs_d2o"], ".2f")} | '
                     f'{r["wall_iteration_ms"]:.0f} | {f(r["wall_speedup_vs_eager"], ".2f")}x | '
                     f'{r["peak_mem_mb"]:.0f} | {f(r["mem_vs_eager"], ".2f")} | {gflop} | {f(r["reuse_speedup"], ".2f")} | '
                     f'{f(r["reuse_flops"], ".3f")} | {f(r["reuse_mem"], ".2f")} | {r["opt_g_state_mb"]:.2f} | '
                     f'{r["g_trainable"] / 1e6:.2f}M / {r["g_params"] / 1e6:.2f}M | {compile_s} |')
    lines += ['', '## Targets (stylegan2 configuration)', '', '| target | value | met |', '|---|---|---|']
    lines += [f'| {name} | {value:.2f} | {"yes" if ok else "NO"} |' for name, value, ok in checks]
    return '\n'.join(lines) + '\n'


def test_report(machine):
    """Write results/train_step_<device>.{md,json} from the cases above (run in this same session)."""
    if not _results:
        pytest.skip('no train-step case ran in this session')
    rows = ratios([_results[c] for c in CASES if c in _results])
    checks = targets(rows)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f'train_step_{machine["device_type"]}'
    json.dump(dict(machine=machine, generator=G_ARCH_NAME, rows=rows,
                   targets=[dict(target=n, value=v, met=ok) for n, v, ok in checks]),
              open(f'{stem}.json', 'w'), indent=2)
    table = markdown(rows, machine, checks)
    stem.with_suffix('.md').write_text(table)
    print('\n' + table)
    if os.environ.get(ASSERT_ENV):
        assert all(ok for _, _, ok in checks), [c for c in checks if not c[2]]
