"""Fused Adam (the engine's optimizer) against foreach Adam on the demo's trainer, on CPU.

    python benchmarks/optimizer_step.py                 # writes results/optimizer_step_cpu.md and .json
    python benchmarks/optimizer_step.py --steps 6       # quicker, printed only

Two demo trainers (D2O-F, StyleGAN2 discriminator, batch 16) are built from the same seed; one keeps the engine's
fused Adam, the other gets foreach Adam for G and D with the same hyper-parameters. Their whole training steps (no R1
step) are interleaved, A B B A ..., and so are their G + D optimizer steps alone on fixed random gradients. Figures
are CPU seconds of this thread, medians; ratios are taken pair by pair. Also recorded: how far the two optimizers'
parameters are apart after 20 steps on the same gradients (rounding only). Nothing here asserts a time.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from d2o_fast.data import open_dataset                                    # noqa: E402
from d2o_fast.engine.config import resolve_config                         # noqa: E402
from d2o_fast.engine.optim import ADAM_EPS                                # noqa: E402
from d2o_fast.engine.tasks import build_d2o_task, resolve_data_path       # noqa: E402
from d2o_fast.nets import labelled_batch                                  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'


def demo_trainer(precision, foreach):
    cfg = resolve_config('demo', eval_demo=False, precision=precision)
    torch.manual_seed(0)
    trainer = build_d2o_task(cfg, open_dataset(resolve_data_path(cfg.data)), torch.device('cpu'), cfg.batch, 1).trainer
    if foreach:
        for name in ('opt_g', 'opt_d'):
            group = getattr(trainer, name).param_groups[0]
            setattr(trainer, name, torch.optim.Adam(group['params'], lr=group['lr'], betas=group['betas'], eps=ADAM_EPS,
                                                    foreach=True))
    return trainer


def interleaved(fns, rounds, skip):
    """{name: [CPU seconds]} of `rounds` calls of each fn, alternating which goes first."""
    times = {name: [] for name in fns}
    order = list(fns)
    for i in range(rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            t0 = time.thread_time()
            fns[name]()
            times[name].append(time.thread_time() - t0)
    return {name: t[skip:] for name, t in times.items()}


def measure(steps, precision):
    trainers = {'fused': demo_trainer(precision, False), 'foreach': demo_trainer(precision, True)}
    batch = trainers['fused'].cfg.batch
    images, labels = labelled_batch(batch, [3, 32, 32], 10, 1, values='uniform', labels='random')
    counters = {name: iter(range(1, 10 ** 6)) for name in trainers}

    def step(name):
        def run():
            i = next(counters[name])
            i += i // 15   # never a multiple of 16: no R1 step
            trainers[name].step(images, labels, i, batch * i)
        return run
    step_times = interleaved({name: step(name) for name in trainers}, steps + 2, skip=2)

    g = torch.Generator().manual_seed(2)
    for params in zip(trainers['fused'].g_params + trainers['fused'].d_params,
                      trainers['foreach'].g_params + trainers['foreach'].d_params):
        grad = torch.randn(params[0].shape, generator=g) * 1e-3
        for p in params:
            p.grad = grad.clone()
    opt_times = interleaved({name: (lambda t=t: (t.opt_g.step(), t.opt_d.step())) for name, t in trainers.items()}, 60, skip=5)

    # Rounding: the same 20 gradient sequences through both optimizers from the same start.
    torch.manual_seed(3)
    start = [torch.randn(1000, 100) * 0.05 for _ in range(3)]
    runs = {}
    for name, kw in (('fused', dict(fused=True)), ('foreach', dict(foreach=True))):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.99), eps=ADAM_EPS, **kw)
        gen = torch.Generator().manual_seed(4)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt.step()
        runs[name] = params
    rounding = max(((a - b).abs().max() / (a - s).abs().max()).item() for a, b, s in zip(runs['fused'], runs['foreach'], start))

    fused = trainers['fused']
    return dict(
        precision=precision, steps=len(step_times['fused']), batch=batch,
        step_ms=dict(fused=1000 * statistics.median(step_times['fused']), foreach=1000 * statistics.median(step_times['foreach'])),
        step_ratio=statistics.median(a / b for a, b in zip(step_times['fused'], step_times['foreach'])),
        optimizer_ms=dict(fused=1000 * statistics.median(opt_times['fused']), foreach=1000 * statistics.median(opt_times['foreach'])),
        optimizer_ratio=statistics.median(a / b for a, b in zip(opt_times['fused'], opt_times['foreach'])),
        trainable=dict(G=sum(p.numel() for p in fused.g_params), D=sum(p.numel() for p in fused.d_params)),
        rounding_after_20_steps=rounding)


def write(result, meta):
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / 'optimizer_step_cpu.json').write_text(json.dumps(dict(meta, result=result), indent=2))
    r = result
    lines = [
        '# Fused vs foreach Adam on the demo trainer (CPU)', '',
        f'{meta["cpu"]}, torch {meta["torch"]}, {meta["threads"]} thread(s), load average {meta["load_before"]:.1f} before '
        f'and {meta["load_after"]:.1f} after. `python benchmarks/optimizer_step.py --steps {r["steps"]}` '
        f'(precision {r["precision"]}). CPU time of the benchmark thread, medians; ratios pair by pair.', '',
        '| what | fused ms | foreach ms | fused / foreach |', '|---|---|---|---|',
        f'| whole demo step (G + D + EMA, batch {r["batch"]}, {r["steps"]} pairs) | {r["step_ms"]["fused"]:.0f} | '
        f'{r["step_ms"]["foreach"]:.0f} | {r["step_ratio"]:.3f} |',
        f'| G + D optimizer steps ({r["trainable"]["G"]:,} + {r["trainable"]["D"]:,} parameters) | '
        f'{r["optimizer_ms"]["fused"]:.2f} | {r["optimizer_ms"]["foreach"]:.2f} | {r["optimizer_ratio"]:.3f} |', '',
        f'Same start, same 20 gradients: the two optimizers\' parameters differ by at most '
        f'{r["rounding_after_20_steps"]:.2g} of the largest total update (rounding). A GAN run amplifies such '
        f'differences step by step, so training curves agree for the first few steps and then drift apart.', '']
    (RESULTS_DIR / 'optimizer_step_cpu.md').write_text('\n'.join(lines))


def cpu_name():
    try:
        return next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=16, help='interleaved demo steps per optimizer (default 16)')
    p.add_argument('--precision', default='fp32', help='the demo generator precision (default fp32)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--no-write', action='store_true', help='print only')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = dict(cpu=cpu_name(), torch=torch.__version__, threads=args.threads,
                load_before=os.getloadavg()[0])
    result = measure(args.steps, args.precision)
    meta['load_after'] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write(result, meta)


if __name__ == '__main__':
    main()
