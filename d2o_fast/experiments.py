"""The paper's claims in miniature, on the demo: the same image budget for

    D2O        (freeze 0)  - the whole pre-trained U-Net fine-tuned with the GAN loss
    D2O-F L1   (freeze 1)  - all 3x3 block convolutions and attention projections frozen
    D2O-F L3   (freeze 3)  - also qkv and 1x1 skips frozen
    random-init GAN        - the same architecture and recipe without generative pre-training

    python -m d2o_fast.experiments ablation [--kimg 5] [--outdir ablation-runs] [--eval-images 500]

Writes ablation.md (table), ablation.json and ablation.png (demo-FID against images seen) in --outdir.
"""

import argparse
import json
import os

from d2o_fast.cli import run_main

METHODS = [
    ('D2O', dict(freeze=0)),
    ('D2O-F (level 1)', dict(freeze=1)),
    ('D2O-F (level 3)', dict(freeze=3)),
    ('random-init GAN', dict(freeze=0, reinit=True)),
]


def read_metrics(run_dir):
    path = os.path.join(run_dir, 'metrics.jsonl')
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_ablation(kimg, outdir, seed=0, eval_images=500, quiet=False):
    from d2o_fast.engine.config import resolve_config
    from d2o_fast.engine.loop import training_loop
    from d2o_fast.engine.tasks import build_d2o_task
    results = []
    for name, overrides in METHODS:
        cfg = resolve_config('demo', kimg=kimg, outdir=os.path.join(outdir, 'runs'), seed=seed, snapshot_ticks=1,
                             checkpoint_ticks=1000, eval_demo=True, eval_images=eval_images, **overrides)
        print(f'== {name}: {cfg.kimg} kimg, freeze {cfg.freeze}{", re-initialised" if cfg.reinit else ""}', flush=True)
        result = training_loop(cfg, build_d2o_task, quiet=quiet)
        curve = read_metrics(result.run_dir)
        results.append(dict(method=name, run_dir=result.run_dir, curve=curve, final=curve[-1]))
    return results


def format_ablation_table(results):
    """End point, best and the mean of the last three evaluations: single GAN evaluations are noisy."""
    lines = ['| method | images seen | demo-FID at start | demo-FID at end | best | mean of last 3 | class accuracy at end '
             '| mean of last 3 |', '|---|---|---|---|---|---|---|---|']
    for r in results:
        curve, start, end = r['curve'], r['curve'][0], r['final']
        last = curve[-3:]
        best = min(p['demo_fid'] for p in curve[1:] or curve)
        mean_fid = sum(p['demo_fid'] for p in last) / len(last)
        mean_acc = sum(p['demo_accuracy'] for p in last) / len(last)
        lines.append(f"| {r['method']} | {end['kimg']:.1f}k | {start['demo_fid']:.2f} | {end['demo_fid']:.2f} | {best:.2f} | "
                     f"{mean_fid:.2f} | {100 * end['demo_accuracy']:.1f}% | {100 * mean_acc:.1f}% |")
    return '\n'.join(lines)


def plot_ablation(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ax.plot([p['kimg'] for p in r['curve']], [p['demo_fid'] for p in r['curve']], marker='o', label=r['method'])
    ax.set_xlabel('thousands of training images seen')
    ax.set_ylabel('demo-FID (lower is better)')
    ax.set_yscale('log')
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title('D2O on the demo digits: pre-training vs random init')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.experiments', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('experiment', choices=['ablation'])
    parser.add_argument('--kimg', type=float, default=5, help='training images per method, in thousands (the demo\'s budget)')
    parser.add_argument('--outdir', default='ablation-runs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--eval-images', type=int, default=500, help='samples per demo-FID evaluation')
    args = parser.parse_args(argv)
    if args.kimg <= 0 or args.eval_images < 2:
        parser.error('--kimg must be positive and --eval-images at least 2')
    os.makedirs(args.outdir, exist_ok=True)
    results = run_ablation(args.kimg, args.outdir, seed=args.seed, eval_images=args.eval_images)
    table = format_ablation_table(results)
    with open(os.path.join(args.outdir, 'ablation.md'), 'w') as f:
        f.write(f'Command: python -m d2o_fast.experiments ablation --kimg {args.kimg:g} --seed {args.seed} '
                f'--eval-images {args.eval_images}\n\n{table}\n')
    with open(os.path.join(args.outdir, 'ablation.json'), 'w') as f:
        json.dump(results, f, indent=2)
    plot_ablation(results, os.path.join(args.outdir, 'ablation.png'))
    print(table)
    print(f'plot: {os.path.join(args.outdir, "ablation.png")}')


if __name__ == '__main__':
    run_main(main)
