"""The paper's CIFAR-10 training iteration on this machine: eager fp32 vs the fastest path, D2O vs D2O-F.

    python benchmarks/paper_config.py                                # all four cases, writes results/paper_config.*
    python benchmarks/paper_config.py --variant d2o-f --path fastest # one case, printed only
    python benchmarks/paper_config.py --threads 2 --iters 3

Configuration (issue 7): NCSN++ generator at full width (edm-cifar10-32x32-uncond-ve, 56.40M parameters),
projected discriminator with vgg16_bn + tf_efficientnet_lite0 at 224, batch 8, random weights (nothing is
downloaded). One iteration is the real D2OTrainer's G step + D step + EMA, plus 1/16 of a separately timed
R1 step (R1 runs every 16 steps). Each case runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.

Paths:
  eager    the project's default on CPU: fp32 everywhere, BatchNorm of the backbones folded, no compile, and the
           D step's fakes and reals in two discriminator calls.
  fastest  the same computation with the engine's speed options: bf16 autocast in the U-Net (as the authors ran
           it) and through the discriminator, channels_last discriminator, fakes and reals in one pass of the
           frozen backbones in the D step (heads per half, so the logits are those of two calls).

Wall-clock numbers depend on what else runs on the machine: the load average before and after each case is
recorded next to its numbers. Nothing here asserts a time.
"""

import argparse
import contextlib
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'
VARIANTS = {'d2o': 0, 'd2o-f': 1}  # variant -> freeze level
PATHS = ('eager', 'fastest')
GENERATOR_CHECKPOINT = 'edm-cifar10-32x32-uncond-ve'
BACKBONES = ('vgg16_bn', 'tf_efficientnet_lite0')
# The authors' code on this machine kind (issue 7): fp32, random weights, batch 8.
AUTHORS = {'d2o': dict(s_per_it=21.4, img_per_s=0.37, peak_rss_gb=7.0),
           'd2o-f': dict(s_per_it=20.2, img_per_s=0.40, peak_rss_gb=6.4)}

#----------------------------------------------------------------------------
# One case (runs inside the child process).

def path_overrides(path):
    """Config fields of each path: what the engine reads, nothing benchmark-specific."""
    if path == 'eager':
        return dict(precision='fp32', disc_precision='fp32', channels_last=False, disc_pair_forward=False)
    return dict(precision='bf16', disc_precision='bf16', channels_last=True, disc_pair_forward=True)


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
    G.set_dropout(0)  # as the training entry point (setup.build_generator) and the authors' runs
    kwargs = dict(discriminator_kwargs(cfg), pretrained=False, **(disc_overrides or {}))
    D = build_discriminator(cfg.disc, G.img_resolution, G.img_channels, G.label_dim, **kwargs)
    return D2OTrainer(G, D, cfg, torch.device(device), batch_gpu=batch, rounds=1)


@contextlib.contextmanager
def phase_timer(times):
    """Seconds of the trainer's G and D phases inside step() (wraps the methods for the duration)."""
    from d2o_fast.engine.trainer import D2OTrainer
    originals = {'G': D2OTrainer.generator_phase, 'D': D2OTrainer.discriminator_phase}

    def timed(name, fn):
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(self, *args, **kwargs)
            times[name].append(time.perf_counter() - t0)
            return out
        return run
    D2OTrainer.generator_phase, D2OTrainer.discriminator_phase = timed('G', originals['G']), timed('D', originals['D'])
    try:
        yield
    finally:
        D2OTrainer.generator_phase, D2OTrainer.discriminator_phase = originals['G'], originals['D']


def run_case(variant, path, batch, iters, threads, generator_kwargs=None, disc_overrides=None):
    """Time `iters` iterations after one warm-up, plus one R1 step; returns a dict of results."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer = build_trainer(variant, path, batch, generator_kwargs, disc_overrides)
    build_s = time.perf_counter() - t0
    G = trainer.G
    images = torch.rand(batch, G.img_channels, G.img_resolution, G.img_resolution) * 2 - 1
    labels = torch.zeros(batch, G.label_dim)
    reals, conds = [images], [None]
    stats = trainer.step(images, labels, step=1, images_seen=0)  # warm-up (not an R1 step)
    step_times, phase_times = [], {'G': [], 'D': []}
    for i in range(iters):
        t0 = time.perf_counter()
        with phase_timer(phase_times):
            trainer.step(images, labels, step=2 + i, images_seen=batch * (1 + i))
        step_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    trainer.r1_phase(reals, conds)
    r1_s = time.perf_counter() - t0
    step_s = statistics.median(step_times)
    s_per_it = step_s + r1_s / trainer.cfg.r1_interval
    return dict(variant=variant, path=path, batch=batch, threads=threads, freeze=trainer.cfg.freeze,
                trainable_g=sum(p.numel() for p in trainer.g_params), params_g=sum(p.numel() for p in G.parameters()),
                step_s=step_s, step_times=step_times, g_phase_s=statistics.median(phase_times['G']),
                d_phase_s=statistics.median(phase_times['D']),
                r1_s=r1_s, s_per_it=s_per_it, img_per_s=batch / s_per_it,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, build_s=build_s,
                loss_g=stats['loss_g'].item(), loss_d=stats['loss_d'].item(),
                load_before=load_before, load_after=os.getloadavg()[0])

#----------------------------------------------------------------------------
# bf16 numerics: loss trajectories of a short run, fp32 eager vs the fastest path, over several seeds.

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
    runs = {(path, seed): loss_trajectories(path, seed, steps, batch, threads) for path in PATHS for seed in seeds}
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
    r1 = {path: [runs[path, s]['r1_penalty'][16] for s in seeds] for path in PATHS} if steps > 16 else None
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

def run_in_subprocess(variant, path, batch, iters, threads):
    cmd = [sys.executable, __file__, '--variant', variant, '--path', path, '--batch', str(batch), '--iters', str(iters),
           '--threads', str(threads), '--json']
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def device_description():
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{model}, {os.cpu_count()} logical cores'


def format_case(r):
    return (f'{r["variant"]:6s} {r["path"]:8s} {r["s_per_it"]:6.2f} s/it  {r["img_per_s"]:5.2f} img/s  '
            f'peak RSS {r["peak_rss_gb"]:.2f} GB  (G {r["g_phase_s"]:.2f} s, D {r["d_phase_s"]:.2f} s, '
            f'R1 {r["r1_s"]:.2f} s /16; load {r["load_before"]:.1f}->{r["load_after"]:.1f})')


def write_results(results, meta, numerics=None):
    import torch
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / 'paper_config.json').write_text(json.dumps(dict(meta, results=results, numerics=numerics), indent=2))
    lines = [f'# The paper\'s CIFAR-10 iteration: eager fp32 vs fastest path ({meta["device"]})', '',
             f'torch {torch.__version__}, {meta["threads"]} threads. Command: `{meta["command"]}`', '',
             f'Config: {meta["config"]}', '',
             '| variant | path | s / iteration | images / s | peak RSS | G step | D step | R1 (1/16 counted) | load avg |',
             '|---|---|---|---|---|---|---|---|---|']
    for v, a in AUTHORS.items():
        lines.append(f'| {v} | authors\' code (issue 7) | {a["s_per_it"]:.1f} | {a["img_per_s"]:.2f} | {a["peak_rss_gb"]:.1f} GB '
                     '| | | | |')
    for r in results:
        lines.append(f'| {r["variant"]} | {r["path"]} | {r["s_per_it"]:.2f} | {r["img_per_s"]:.2f} | {r["peak_rss_gb"]:.2f} GB '
                     f'| {r["g_phase_s"]:.2f} s | {r["d_phase_s"]:.2f} s | {r["r1_s"]:.2f} s '
                     f'| {r["load_before"]:.1f} -> {r["load_after"]:.1f} |')
    lines += ['', 's / iteration = median of the timed G+D+EMA steps + 1/16 of one R1 step. Peak RSS = ru_maxrss of '
              'the case\'s own process (build, warm-up, timed steps, R1).']
    if numerics:
        lines += ['', numerics['markdown']]
    (RESULTS_DIR / 'paper_config.md').write_text('\n'.join(lines) + '\n')


def load_previous():
    path = RESULTS_DIR / 'paper_config.json'
    return json.loads(path.read_text()) if path.exists() else {}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variant', choices=sorted(VARIANTS), help='one case only (default: all four, in subprocesses)')
    p.add_argument('--path', choices=PATHS)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=2, help='timed iterations per case (after one warm-up)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', action='store_true', help='print the case as one JSON line (used by the parent)')
    p.add_argument('--numerics', action='store_true', help='only the bf16 numerics check (updates the results files)')
    a = p.parse_args()
    if a.variant or a.path:
        if not (a.variant and a.path):
            p.error('--variant and --path go together')
        r = run_case(a.variant, a.path, a.batch, a.iters, a.threads)
        print(json.dumps(r) if a.json else format_case(r))
        return
    previous = load_previous()
    if a.numerics:
        numerics = numerics_check(threads=a.threads)
        print(numerics['markdown'])
        meta = {k: v for k, v in previous.items() if k not in ('results', 'numerics')} or dict(
            device=device_description(), threads=a.threads, command='(no table yet)', config='')
        write_results(previous.get('results', []), meta, numerics)
        return
    results = []
    for variant in VARIANTS:
        for path in PATHS:
            r = run_in_subprocess(variant, path, a.batch, a.iters, a.threads)
            print(format_case(r), flush=True)
            results.append(r)
    meta = dict(device=device_description(), threads=a.threads, command='python ' + ' '.join(sys.argv),
                config=f'NCSN++ {GENERATOR_CHECKPOINT} (random weights), projected D {"+".join(BACKBONES)} at 224, '
                       f'batch {a.batch}, R1 every 16 steps, {a.iters} timed iterations after 1 warm-up')
    write_results(results, meta, previous.get('numerics'))


if __name__ == '__main__':
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    main()
