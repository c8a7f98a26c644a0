"""The paper's CIFAR-10 training iteration on this machine: this project's paths and, in the same run, the authors' code.

    python benchmarks/paper_config.py                                # our cases only; the report says no peer was measured
    python benchmarks/paper_config.py --authors-src DIR              # ours and the authors', interleaved
    python benchmarks/paper_config.py --authors-src DIR --repeats 2  # each case twice, the order reversed the second time
    python benchmarks/paper_config.py --variant d2o-f --path fastest # one case, printed only
    python benchmarks/paper_config.py --variants d2o-f --paths eager,eager-reuse --authors-src DIR  # a subset of cases
    python benchmarks/paper_config.py --variant d2o-f --side authors --path fp32 --authors-src DIR
    python benchmarks/paper_config.py --numerics                     # only the bf16 numerics check of our paths

Configuration: NCSN++ generator at full width (edm-cifar10-32x32-uncond-ve, 56.40M parameters), projected
discriminator with vgg16_bn + tf_efficientnet_lite0 at 224, batch 8, random weights (nothing is downloaded). One
iteration is a G step + D step + EMA, plus 1/16 of a separately timed R1 step (R1 runs every 16 steps). Each case
runs in a fresh interpreter (this one's), with the same thread count, so its peak RSS (ru_maxrss) is its own. The
first iteration and one R1 step are warm-up; their matmul/convolution FLOPs are counted (FlopCounterMode) per phase.

Our paths (`OUR_PATHS`, config overrides of the real D2OTrainer):
  eager    the project's default on CPU: fp32 everywhere, BatchNorm of the backbones folded, no compile, and the
           D step's fakes and reals in two discriminator calls.
  fastest  the same computation with the engine's speed options: bf16 autocast in the U-Net (as the authors ran
           it) and through the discriminator, channels_last discriminator, fakes and reals in one pass of the
           frozen backbones in the D step (heads per half, so the logits are those of two calls). bf16 is fast
           only where oneDNN runs bf16 convolutions (AVX512-BF16 / AMX CPUs); elsewhere PyTorch falls back to its
           reference im2col kernels, many times slower than fp32. The report says which this CPU is.
  reuse    fastest with --reuse-fakes: less computation, not the same. The D step trains on the G step's fakes and
           their frozen-backbone features (detached), so it runs neither the generator nor the backbones on fakes;
           only the heads run again on them. The report sets it against fastest (`REUSE_OF`): FLOPs, img/s, peak RSS.
  eager-reuse  eager with --reuse-fakes, set against eager: the reuse comparison in fp32, for CPUs without native
           bf16 (there, the fastest and reuse paths run bf16 in reference kernels and measure those).
The authors' paths (`authors_iteration.PATHS`; their code driven as their training loop does, see
benchmarks/authors_iteration.py for what is adapted at run time):
  fp32       their code as it runs on a CPU (their D2OPrecond takes bf16 only on CUDA). The default.
  bf16-unet  their U-Net in bf16 as on their GPUs (train.sh's --fp16=True); their discriminator stays fp32. Opt-in
             (--authors-paths fp32,bf16-unet): on a CPU, PyTorch runs their bf16 FIR resampling (grouped and
             transposed convolutions) in its slow im2col kernels, so this path is many times slower than their fp32
             one and says nothing about their code on a GPU.

The peer, --authors-src DIR: a checkout of https://github.com/Zyriix/D2O that the user fetches (nothing of it is in
this repository). Its pinned timm 0.5.4 needs torch 2.14.1 + torchvision 0.29.1, so the whole run (our cases and
theirs) goes in one environment set up for it:

    python3.11 -m venv venv-authors
    venv-authors/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.5.4 "setuptools>=77.0.3,<81" \
        ftfy regex tqdm ninja numpy scipy safetensors pillow scikit-learn matplotlib
    git clone https://github.com/Zyriix/D2O authors-src
    PYTHONPATH=. venv-authors/bin/python benchmarks/paper_config.py --authors-src authors-src

(setuptools < 81 provides the pkg_resources their torch_utils imports; ftfy / regex / tqdm are imported by their
feature_networks package; ninja lets d2o_fast JIT-build its C++ kernels for that torch, else they fall back to
plain PyTorch: the report names the kernel backend that ran.)

Wall-clock numbers depend on what else runs on the machine: the load average before and after each case is
recorded next to its numbers. Nothing here asserts a time.
"""

import argparse
import contextlib
import itertools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import authors_iteration

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = {'d2o': 0, 'd2o-f': 1}  # variant -> freeze level
OUR_PATHS = {
    'eager': dict(precision='fp32', disc_precision='fp32', channels_last=False, disc_pair_forward=False),
    'fastest': dict(precision='bf16', disc_precision='bf16', channels_last=True, disc_pair_forward=True),
    'reuse': dict(precision='bf16', disc_precision='bf16', channels_last=True, disc_pair_forward=True, reuse_fakes=True),
    'eager-reuse': dict(precision='fp32', disc_precision='fp32', channels_last=False, disc_pair_forward=False,
                        reuse_fakes=True),
}
REUSE_OF = {'reuse': 'fastest', 'eager-reuse': 'eager'}  # our path with --reuse-fakes -> the same path without it
PATHS = tuple(OUR_PATHS)
SIDES = {'ours': OUR_PATHS, 'authors': authors_iteration.PATHS}  # side -> its paths
GENERATOR_CHECKPOINT = 'edm-cifar10-32x32-uncond-ve'
BACKBONES = ('vgg16_bn', 'tf_efficientnet_lite0')
DEFAULT_AUTHORS_PATHS = 'fp32'
PHASES = {'G': 'generator_phase', 'D': 'discriminator_phase'}  # what each side's step() calls, timed separately

#----------------------------------------------------------------------------
# Our side (runs inside the child process).

def path_overrides(path):
    """Config fields of each of our paths: what the engine reads, nothing benchmark-specific."""
    return dict(OUR_PATHS[path])


def build_trainer(variant, path, batch, generator_kwargs=None, disc_overrides=None, seed=0, device='cpu',
                  config_overrides=None):
    """D2OTrainer for the paper's configuration (or smaller networks, for tests) with random weights.

    The discriminator is built from the config exactly as the training entry point does; only `pretrained`
    is off (random backbone weights: the timing does not depend on them). config_overrides: config fields
    set over the path's (the GPU acceptance's paths).
    """
    import torch
    from d2o_fast.discriminators import build_discriminator
    from d2o_fast.engine.config import resolve_config
    from d2o_fast.engine.tasks import discriminator_kwargs
    from d2o_fast.engine.trainer import D2OTrainer
    from d2o_fast.nets import build_network, edm_checkpoint_kwargs

    cfg = resolve_config('cifar10-uncond', init='random', arch='ncsnpp', batch=batch, freeze=VARIANTS[variant],
                         disc_backbones=BACKBONES, seed=seed, **{**path_overrides(path), **(config_overrides or {})})
    torch.manual_seed(seed)
    G = build_network('D2OPrecond', **(generator_kwargs or edm_checkpoint_kwargs(GENERATOR_CHECKPOINT)))
    G.set_dropout(0)  # as the training entry point (tasks.build_generator) and the authors' runs
    kwargs = dict(discriminator_kwargs(cfg), pretrained=False, **(disc_overrides or {}))
    D = build_discriminator(cfg.disc, G.img_resolution, G.img_channels, G.label_dim, **kwargs)
    return D2OTrainer(G, D, cfg, torch.device(device), batch_gpu=batch, rounds=1)


def kernel_backend():
    """Which backend ran d2o_fast's fused ops on CPU, and which build of the C++ extension (prebuilt or JIT)."""
    from d2o_fast.ops import dispatch, native
    backend = dispatch.resolve_backend('cpu')
    if backend != 'cpu':
        return f'{backend} ({native.unavailable_reason() or "chosen"})'
    module = native.extension()
    build = 'prebuilt d2o_fast._C' if module.__name__ == 'd2o_fast._C' else f'JIT build {module.__name__}'
    failed = [k for k, ok in dispatch.SelfCheck.verdicts().items() if not ok]
    checks = f'; {len(failed)} configuration(s) fell back to the reference' if failed else ''
    return f'cpu: C++ extension, {build} for torch {getattr(module, "torch_version", "?")}{checks}'


class OurCase:
    """The project's D2OTrainer on a fixed random batch."""

    side = 'ours'

    def __init__(self, variant, path, batch, generator_kwargs=None, disc_overrides=None):
        import torch
        self.trainer = self.target = build_trainer(variant, path, batch, generator_kwargs, disc_overrides)
        G = self.trainer.G
        self.images = torch.rand(batch, G.img_channels, G.img_resolution, G.img_resolution) * 2 - 1
        self.labels = torch.zeros(batch, G.label_dim)

    def step(self, index, images_seen):
        stats = self.trainer.step(self.images, self.labels, step=index, images_seen=images_seen)
        return {k: float(v) for k, v in stats.items()}

    def r1(self):
        self.trainer.r1_phase([self.images], [None])

    def describe(self):
        t = self.trainer
        return dict(freeze=t.cfg.freeze, r1_interval=t.cfg.r1_interval, trainable_g=sum(p.numel() for p in t.g_params),
                    params_g=sum(p.numel() for p in t.G.parameters()), kernels=kernel_backend())


class AuthorsCase:
    """The authors' iteration (benchmarks/authors_iteration.py) from their checkout at `authors_src`."""

    side = 'authors'

    def __init__(self, variant, path, batch, authors_src, network=None, backbones=None):
        code = authors_iteration.load_authors_code(authors_src)
        self.target = authors_iteration.AuthorsIteration(code, VARIANTS[variant], batch, network=network,
                                                         backbones=backbones, **authors_iteration.PATHS[path])

    def step(self, index, images_seen):
        self.target.step(index, images_seen)
        return {}

    def r1(self):
        self.target.r1_phase()

    def describe(self):
        t = self.target
        return dict(freeze=t.freeze, r1_interval=t.recipe['r1_interval'], trainable_g=sum(p.numel() for p in t.g_params),
                    params_g=sum(p.numel() for p in t.net.parameters()), kernels='their code: torch ops only')

#----------------------------------------------------------------------------
# Timing one case (either side).

@contextlib.contextmanager
def wrapped_phases(target, wrap):
    """target's G and D phase methods replaced by wrap(phase, method) for the duration (instance attributes)."""
    for phase, name in PHASES.items():
        setattr(target, name, wrap(phase, getattr(target, name)))
    try:
        yield
    finally:
        for name in PHASES.values():
            delattr(target, name)


def timing(times):
    def wrap(phase, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times[phase].append(time.perf_counter() - t0)
            return out
        return run
    return wrap


class _GlobalOnly:
    """FlopCounterMode's module tracker, reduced to the total: the tracker's backward hooks cannot run under
    torch.autograd.grad on a leaf (the R1 step's input gradient)."""
    parents = ('Global',)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode (matmul / convolution / attention FLOPs), totals only."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def flop_counting(flops):
    def wrap(phase, fn):
        def run(*args, **kwargs):
            with flop_counter() as counter:
                out = fn(*args, **kwargs)
            flops[phase] = counter.get_total_flops()
            return out
        return run
    return wrap


def step_indices(r1_interval):
    """Iteration numbers that are never an R1 step (R1 is timed on its own)."""
    return (i for i in itertools.count(1) if i % r1_interval)


def time_case(case, batch, iters):
    """Warm-up iteration and R1 step (FLOPs counted), then `iters` timed iterations and one timed R1 step."""
    import torch
    info = case.describe()
    indices = step_indices(info['r1_interval'])
    flops = {}
    with wrapped_phases(case.target, flop_counting(flops)):
        stats = case.step(next(indices), images_seen=0)
    with flop_counter() as counter:
        case.r1()
    flops['R1'] = counter.get_total_flops()
    flops['per_iteration'] = flops['G'] + flops['D'] + flops['R1'] / info['r1_interval']
    step_times, cpu_times, phase_times = [], [], {phase: [] for phase in PHASES}
    for i in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        with wrapped_phases(case.target, timing(phase_times)):
            stats = case.step(next(indices), images_seen=batch * (1 + i))
        step_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    t0 = time.perf_counter()
    case.r1()
    r1_s = time.perf_counter() - t0
    step_s = statistics.median(step_times)
    s_per_it = step_s + r1_s / info['r1_interval']
    return dict(info, threads=torch.get_num_threads(), torch=torch.__version__, step_s=step_s, step_times=step_times,
                step_cpu_s=statistics.median(cpu_times), g_phase_s=statistics.median(phase_times['G']),
                d_phase_s=statistics.median(phase_times['D']), r1_s=r1_s, s_per_it=s_per_it, img_per_s=batch / s_per_it,
                flops=flops, gflop_per_s=flops['per_iteration'] / s_per_it / 1e9,
                loss_g=stats.get('loss_g'), loss_d=stats.get('loss_d'))


def run_case(variant, path, batch, iters, threads, side='ours', authors_src=None, generator_kwargs=None,
             disc_overrides=None, authors_network=None, authors_backbones=None):
    """Build one case, time it (time_case) and return a dict of results, with its peak RSS and the load average."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    if side == 'ours':
        case = OurCase(variant, path, batch, generator_kwargs, disc_overrides)
    else:
        case = AuthorsCase(variant, path, batch, authors_src, authors_network, authors_backbones)
    build_s = time.perf_counter() - t0
    r = time_case(case, batch, iters)
    return dict(side=side, variant=variant, path=path, batch=batch, **r, build_s=build_s,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                load_before=load_before, load_after=os.getloadavg()[0])

#----------------------------------------------------------------------------
# bf16 numerics: loss trajectories of a short run, fp32 eager vs the fastest path, over several seeds.

NUMERICS_PATHS = ('eager', 'fastest')
NUMERICS_GENERATOR = dict(arch='ncsnpp', img_resolution=32, img_channels=3, label_dim=0, model_channels=16,
                          channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0)


def loss_trajectories(path, seed, steps, batch, threads):
    """Losses of `steps` real training iterations (R1 at step 16) of a small generator and a projected
    discriminator on one backbone at 128 (the paper's losses and phases, sized for a CPU minute)."""
    import torch
    from d2o_fast.nets import architecture_kwargs
    torch.set_num_threads(threads)
    gen_kwargs = architecture_kwargs(**NUMERICS_GENERATOR)
    trainer = build_trainer('d2o-f', path, batch, gen_kwargs, dict(backbones=('tf_efficientnet_lite0',), input_size=128),
                            seed=seed)
    data = torch.rand(steps, batch, 3, 32, 32, generator=torch.Generator().manual_seed(1234)) * 2 - 1
    out = {k: [] for k in ('loss_g', 'loss_d', 'r1_penalty')}
    for step in range(steps):
        stats = trainer.step(data[step], torch.zeros(batch, 0), step=step, images_seen=step * batch)
        for k in out:
            out[k].append(stats[k].item() if k in stats else None)
    return out


def numerics_check(seeds=(0, 1, 2), steps=20, batch=4, threads=2):
    """Per step: the fp32 runs' range over seeds, and how far each seed's fastest-path run is from its fp32 run."""
    runs = {(path, seed): loss_trajectories(path, seed, steps, batch, threads) for path in NUMERICS_PATHS
            for seed in seeds}
    table, summary = [], {}
    for key in ('loss_g', 'loss_d'):
        same_seed_gap, seed_spread, inside = [], [], 0
        for step in range(steps):
            fp32 = [runs['eager', s][key][step] for s in seeds]
            fast = [runs['fastest', s][key][step] for s in seeds]
            lo, hi = min(fp32), max(fp32)
            same_seed_gap.append(max(abs(a - b) for a, b in zip(fast, fp32)))
            seed_spread.append(hi - lo)
            inside += lo <= statistics.mean(fast) <= hi
            table.append((key, step, lo, hi, statistics.mean(fp32), statistics.mean(fast), same_seed_gap[-1]))
        summary[key] = dict(mean_same_seed_gap=statistics.mean(same_seed_gap), mean_fp32_seed_spread=statistics.mean(seed_spread),
                            steps_mean_inside_fp32_range=inside, steps=steps)
    r1 = {path: [runs[path, s]['r1_penalty'][16] for s in seeds] for path in NUMERICS_PATHS} if steps > 16 else None
    lines = [f'## bf16 numerics: {steps} iterations, fp32 eager vs fastest, seeds {list(seeds)}', '',
             f'D2O-F on a small NCSN++ (16 channels) and the projected discriminator on tf_efficientnet_lite0 at 128, '
             f'batch {batch}, the same data for every run; a seed sets the initial weights and the z of every step. '
             'Per step: the range and mean of the fp32 runs over seeds, the mean of the fastest-path runs, and the '
             'largest difference between a seed\'s fastest-path run and its own fp32 run (same weights, same z).', '',
             '| loss | mean same-seed gap (fastest vs fp32) | mean fp32 spread over seeds | steps with the fastest-path mean inside the fp32 range |',
             '|---|---|---|---|']
    for key, v in summary.items():
        lines.append(f'| {key} | {v["mean_same_seed_gap"]:.4f} | {v["mean_fp32_seed_spread"]:.4f} | '
                     f'{v["steps_mean_inside_fp32_range"]} / {v["steps"]} |')
    if r1:
        lines += ['', f'R1 penalty at step 16: fp32 {", ".join(f"{x:.4g}" for x in r1["eager"])}; '
                      f'fastest {", ".join(f"{x:.4g}" for x in r1["fastest"])}']
    lines += ['', '| loss | step | fp32 min | fp32 max | fp32 mean | fastest mean | same-seed gap |', '|---|---|---|---|---|---|---|']
    lines += [f'| {k} | {i} | {lo:.4f} | {hi:.4f} | {m32:.4f} | {mf:.4f} | {gap:.4f} |' for k, i, lo, hi, m32, mf, gap in table]
    raw = {f'{path}/seed{seed}': run for (path, seed), run in runs.items()}
    return dict(summary=summary, r1_step16=r1, per_step=table, runs=raw, markdown='\n'.join(lines))

#----------------------------------------------------------------------------
# The table (parent process): each case in its own interpreter.

def path_list(parser, option, text, known):
    paths = [path for path in text.split(',') if path]
    if not paths or any(path not in known for path in paths):
        parser.error(f'{option} {text}: expected a comma-separated list of {", ".join(known)}')
    return paths


def schedule(variants, our_paths, authors_paths, repeat):
    """Cases of one repeat, ours and theirs alternating within each variant; odd repeats run in reverse order."""
    order = []
    for variant in variants:
        sides = [[('ours', variant, p) for p in our_paths], [('authors', variant, p) for p in authors_paths]]
        order += [case for pair in itertools.zip_longest(*sides) for case in pair if case]
    return order[::-1] if repeat % 2 else order


class CaseFailed(RuntimeError):
    """A case's child process exited with an error (its stderr's end is in the message)."""


def run_in_subprocess(side, variant, path, batch, iters, threads, authors_src=None):
    cmd = [sys.executable, __file__, '--side', side, '--variant', variant, '--path', path, '--batch', str(batch),
           '--iters', str(iters), '--threads', str(threads), '--json']
    if authors_src:
        cmd += ['--authors-src', str(authors_src)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = '\n'.join(done.stderr.strip().splitlines()[-15:])
        raise CaseFailed(f'case {side}/{variant}/{path} failed (exit {done.returncode}):\n{tail}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_description():
    from d2o_fast.experiments.report import machine_description  # imports torch: not at this module's start
    return machine_description()


def git_commit(directory):
    """HEAD of the git checkout at `directory` (+ ' (modified)' if its tracked files differ), or None."""
    def git(*args):
        return subprocess.run(['git', '-C', str(directory), *args], capture_output=True, text=True)
    top, head = git('rev-parse', '--show-toplevel'), git('rev-parse', 'HEAD')
    if top.returncode or head.returncode or pathlib.Path(top.stdout.strip()).resolve() != pathlib.Path(directory).resolve():
        return None  # not a checkout of its own (an unpacked archive, or a folder inside another repository)
    dirty = git('status', '--porcelain', '--untracked-files=no').stdout.strip()
    return head.stdout.strip() + (' (modified)' if dirty else '')


def format_case(r):
    return (f'{r["side"]:7s} {r["variant"]:6s} {r["path"]:9s} {r["s_per_it"]:6.2f} s/it  {r["img_per_s"]:5.2f} img/s  '
            f'peak RSS {r["peak_rss_gb"]:.2f} GB  (G {r["g_phase_s"]:.2f} s, D {r["d_phase_s"]:.2f} s, '
            f'R1 {r["r1_s"]:.2f} s /16; {r["flops"]["per_iteration"] / 1e12:.2f} TFLOP/it; '
            f'load {r["load_before"]:.1f}->{r["load_after"]:.1f})')


def summarize(results):
    """One row per (side, variant, path): medians over repeats (s / iteration, phases), the largest peak RSS."""
    rows = {}
    for r in results:
        rows.setdefault((r['side'], r['variant'], r['path']), []).append(r)
    table = []
    for (side, variant, path), runs in rows.items():
        s_per_it = statistics.median(r['s_per_it'] for r in runs)
        table.append(dict(side=side, variant=variant, path=path, repeats=len(runs), s_per_it=s_per_it,
                          img_per_s=runs[0]['batch'] / s_per_it, s_per_it_range=[min(r['s_per_it'] for r in runs),
                                                                                max(r['s_per_it'] for r in runs)],
                          peak_rss_gb=max(r['peak_rss_gb'] for r in runs),
                          **{k: statistics.median(r[k] for r in runs) for k in ('g_phase_s', 'd_phase_s', 'r1_s')},
                          flops=runs[0]['flops'], trainable_g=runs[0]['trainable_g'], params_g=runs[0]['params_g'],
                          kernels=runs[0]['kernels'],
                          load=[min(r['load_before'] for r in runs), max(r['load_after'] for r in runs)]))
    return table


def ratios(table):
    """ours / theirs per variant, for every pair of our path and their path."""
    rows = {(t['side'], t['variant'], t['path']): t for t in table}
    out = []
    for (side, variant, path), ours in rows.items():
        if side != 'ours':
            continue
        for (other, v, their_path), theirs in rows.items():
            if other == 'authors' and v == variant:
                out.append(dict(variant=variant, ours=path, theirs=their_path,
                                img_per_s=ours['img_per_s'] / theirs['img_per_s'],
                                peak_rss=ours['peak_rss_gb'] / theirs['peak_rss_gb'],
                                flops=ours['flops']['per_iteration'] / theirs['flops']['per_iteration']))
    return out


def reuse_ratios(table):
    """Each reuse path against the same path without reuse (REUSE_OF), per variant: what reusing the fakes saves."""
    rows = {(t['side'], t['variant'], t['path']): t for t in table}
    out = []
    for (side, variant, path), reuse in rows.items():
        base = rows.get((side, variant, REUSE_OF.get(path)))
        if side == 'ours' and base:
            out.append(dict(variant=variant, reuse=path, base=base['path'], img_per_s=reuse['img_per_s'] / base['img_per_s'],
                            peak_rss=reuse['peak_rss_gb'] / base['peak_rss_gb'],
                            flops=reuse['flops']['per_iteration'] / base['flops']['per_iteration'],
                            d_flops=reuse['flops']['D'] / base['flops']['D']))
    return out


def write_results(results, meta, numerics=None):
    RESULTS_DIR.mkdir(exist_ok=True)
    table = summarize(results)
    peer = ratios(table)
    reuse = reuse_ratios(table)
    (RESULTS_DIR / 'paper_config.json').write_text(json.dumps(dict(meta, results=results, table=table, ratios=peer,
                                                                   reuse_ratios=reuse, numerics=numerics), indent=2))
    kernels = sorted({t['kernels'] for t in table if t['side'] == 'ours'})
    lines = [f'# The paper\'s CIFAR-10 iteration: this project and the authors\' code ({meta["device"]})', '',
             f'torch {meta.get("torch", "?")}, {meta["threads"]} threads, commit {meta.get("commit")}. '
             f'Command: `{meta["command"]}`', '',
             f'Config: {meta["config"]}', '', f'd2o_fast kernels: {"; ".join(kernels) or "-"}', '']
    if 'onednn_bf16' in meta:
        lines += [f'CPU kernels: {meta["cpu_capability"]}, oneDNN bf16 '
                  + ('supported.' if meta['onednn_bf16'] else '**not supported**: every bf16 convolution (our fastest '
                     'path, their bf16-unet path) runs in PyTorch\'s reference im2col kernels on this CPU.'), '']
    if meta.get('authors_src'):
        lines += [f'Peer: the authors\' code from `{meta["authors_src"]}` (commit {meta.get("authors_commit") or "unknown: not a git checkout"}), '
                  'run by benchmarks/authors_iteration.py in the same interpreter, threads and batch, cases interleaved.', '']
    else:
        lines += ['**No peer was measured in this run**: the authors\' code was not given (`--authors-src DIR`, see '
                  'the docstring of benchmarks/paper_config.py), so there is nothing to compare with.', '']
    lines += ['| side | variant | path | s / iteration | images / s | peak RSS | G step | D step | R1 (1/16 counted) '
              '| TFLOP / iteration | GFLOP/s | trainable G | load avg |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for t in table:
        spread = f' ({t["s_per_it_range"][0]:.2f}-{t["s_per_it_range"][1]:.2f})' if t['repeats'] > 1 else ''
        lines.append(f'| {t["side"]} | {t["variant"]} | {t["path"]} | {t["s_per_it"]:.2f}{spread} | {t["img_per_s"]:.3f} '
                     f'| {t["peak_rss_gb"]:.2f} GB | {t["g_phase_s"]:.2f} s | {t["d_phase_s"]:.2f} s | {t["r1_s"]:.2f} s '
                     f'| {t["flops"]["per_iteration"] / 1e12:.2f} | {t["flops"]["per_iteration"] / t["s_per_it"] / 1e9:.0f} '
                     f'| {t["trainable_g"] / 1e6:.2f}M / {t["params_g"] / 1e6:.2f}M '
                     f'| {t["load"][0]:.1f} -> {t["load"][1]:.1f} |')
    lines += ['', 's / iteration = median of the timed G+D+EMA steps + 1/16 of one R1 step (median over repeats; range in '
              'brackets). Peak RSS = ru_maxrss of the case\'s own process (build, warm-up, timed steps, R1). FLOPs: '
              'matmuls and convolutions (forward and backward) of the warm-up iteration and R1 step, counted by '
              'torch.utils.flop_counter.FlopCounterMode; per iteration = G + D + R1 / 16.']
    if reuse:
        lines += ['', '## Reusing the G step\'s fakes (--reuse-fakes) / the same path without, same run', '',
                  '| variant | path | against | FLOP ratio (iteration) | FLOP ratio (D step) | images / s ratio | peak RSS ratio |',
                  '|---|---|---|---|---|---|---|']
        lines += [f'| {r["variant"]} | {r["reuse"]} | {r["base"]} | {r["flops"]:.3f} | {r["d_flops"]:.3f} '
                  f'| {r["img_per_s"]:.2f}x | {r["peak_rss"]:.2f} |' for r in reuse]
    if peer:
        lines += ['', '## Ours / theirs, same run', '',
                  '| variant | our path | their path | images / s ratio | peak RSS ratio | FLOP ratio |', '|---|---|---|---|---|---|']
        lines += [f'| {p["variant"]} | {p["ours"]} | {p["theirs"]} | {p["img_per_s"]:.2f}x | {p["peak_rss"]:.2f} '
                  f'| {p["flops"]:.2f} |' for p in peer]
    if numerics:
        lines += ['', numerics['markdown']]
    (RESULTS_DIR / 'paper_config.md').write_text('\n'.join(lines) + '\n')


def load_previous():
    path = RESULTS_DIR / 'paper_config.json'
    return json.loads(path.read_text()) if path.exists() else {}


def cpu_facts():
    """The CPU kernels torch picks here: its vector ISA, and whether oneDNN runs bf16 (else bf16 convolutions run
    in PyTorch's reference im2col kernels, many times slower than fp32)."""
    import torch
    from d2o_fast.ops.dispatch import native_bf16
    return dict(cpu_capability=torch.backends.cpu.get_cpu_capability(), onednn_bf16=native_bf16('cpu'))


def run_meta(args, authors_src):
    import torch
    meta = dict(device=device_description(), machine=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, **cpu_facts(), threads=args.threads, command='python ' + ' '.join(sys.argv),
                commit=git_commit(REPO_DIR), iters=args.iters, repeats=args.repeats,
                config=f'NCSN++ {GENERATOR_CHECKPOINT} (random weights), projected D {"+".join(BACKBONES)} at 224, '
                       f'batch {args.batch}, R1 every 16 steps, {args.iters} timed iterations after 1 warm-up, '
                       f'{args.repeats} repeat(s)')
    if authors_src:
        meta.update(authors_src=str(authors_src), authors_commit=git_commit(authors_src))
    return meta


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variant', choices=sorted(VARIANTS), help='one case only (default: every case, in subprocesses)')
    p.add_argument('--path', choices=sorted({path for paths in SIDES.values() for path in paths}))
    p.add_argument('--side', choices=sorted(SIDES), default='ours', help='with --variant/--path: whose code runs')
    p.add_argument('--authors-src', metavar='DIR', help='a checkout of github.com/Zyriix/D2O: measure it in the same run')
    p.add_argument('--variants', default=','.join(VARIANTS), metavar='LIST',
                   help=f'variants to run, comma-separated, of {", ".join(VARIANTS)} (default: all)')
    p.add_argument('--paths', default=','.join(OUR_PATHS), metavar='LIST',
                   help=f'our paths to run, comma-separated, of {", ".join(OUR_PATHS)} (default: all)')
    p.add_argument('--authors-paths', default=DEFAULT_AUTHORS_PATHS, metavar='LIST',
                   help=f'their paths to run, comma-separated, of {", ".join(authors_iteration.PATHS)} '
                        f'(default: {DEFAULT_AUTHORS_PATHS})')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=2, help='timed iterations per case (after one warm-up)')
    p.add_argument('--repeats', type=int, default=1, help='run every case this many times, alternating the order')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', action='store_true', help='print the case as one JSON line (used by the parent)')
    p.add_argument('--numerics', action='store_true', help='only the bf16 numerics check (updates the results files)')
    a = p.parse_args()
    for name in ('batch', 'iters', 'repeats', 'threads'):
        if getattr(a, name) < 1:
            p.error(f'--{name} must be at least 1')
    variants = path_list(p, '--variants', a.variants, VARIANTS)
    our_paths = path_list(p, '--paths', a.paths, OUR_PATHS)
    authors_paths = path_list(p, '--authors-paths', a.authors_paths, authors_iteration.PATHS)
    authors_src = None
    if a.authors_src:
        try:
            authors_src = authors_iteration.check_source(a.authors_src)
        except authors_iteration.AuthorsSourceError as e:
            p.error(str(e))
    if a.variant or a.path:
        if not (a.variant and a.path):
            p.error('--variant and --path go together')
        if a.path not in SIDES[a.side]:
            p.error(f'--path {a.path} is not a path of side {a.side!r} (its paths: {", ".join(SIDES[a.side])})')
        if a.side == 'authors' and not authors_src:
            p.error('--side authors needs --authors-src DIR')
        try:
            r = run_case(a.variant, a.path, a.batch, a.iters, a.threads, side=a.side, authors_src=authors_src)
        except authors_iteration.AuthorsSourceError as e:
            p.error(str(e))
        print(json.dumps(r) if a.json else format_case(r))
        return
    previous = load_previous()
    if a.numerics:
        numerics = numerics_check(threads=a.threads)
        print(numerics['markdown'])
        meta = {k: v for k, v in previous.items() if k not in ('results', 'table', 'ratios', 'reuse_ratios', 'numerics')} or dict(
            device=device_description(), threads=a.threads, command='(no table yet)', config='')
        write_results(previous.get('results', []), meta, numerics)
        return
    meta = run_meta(a, authors_src)
    results = []
    load_start = os.getloadavg()
    for repeat in range(a.repeats):
        for side, variant, path in schedule(variants, our_paths, authors_paths if authors_src else [], repeat):
            try:
                r = run_in_subprocess(side, variant, path, a.batch, a.iters, a.threads, authors_src)
            except CaseFailed as e:
                sys.exit(f'paper_config: {e}')
            r['repeat'] = repeat
            print(format_case(r), flush=True)
            results.append(r)
    meta.update(load_average_start=load_start, load_average_end=os.getloadavg())
    write_results(results, meta, previous.get('numerics'))
    for row in reuse_ratios(summarize(results)):
        print(f'{row["variant"]:6s} ours {row["reuse"]} / {row["base"]}: FLOPs {row["flops"]:.3f}x (D step '
              f'{row["d_flops"]:.3f}x), images/s {row["img_per_s"]:.2f}x, peak RSS {row["peak_rss"]:.2f}x')
    for row in ratios(summarize(results)):
        print(f'{row["variant"]:6s} ours {row["ours"]:8s} / theirs {row["theirs"]:9s}: images/s {row["img_per_s"]:.2f}x, '
              f'peak RSS {row["peak_rss"]:.2f}x, FLOPs {row["flops"]:.2f}x')


if __name__ == '__main__':
    sys.path.insert(0, str(REPO_DIR))
    main()
