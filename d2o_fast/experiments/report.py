"""Statistics over seeds, the tables, the plot and the provenance of a study.

Per run: demo-FID and class accuracy at the end, the best demo-FID after the start, the mean of the last three
evaluations, and whether it diverged (an evaluation worse than its own start). Per arm: the mean and sample
standard deviation of each over seeds.
"""

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys

import torch

#----------------------------------------------------------------------------
# Per run and per arm.

def run_summary(record):
    curve = record['curve']
    start, end, last = curve[0], curve[-1], curve[-3:]
    later = curve[1:] or curve
    fids = [p['demo_fid'] for p in curve]
    return dict(seed=record['seed'], start_fid=start['demo_fid'], end_fid=end['demo_fid'], end_kimg=end['kimg'],
                best_fid=min(p['demo_fid'] for p in later), last3_fid=statistics.fmean(p['demo_fid'] for p in last),
                end_accuracy=end['demo_accuracy'], last3_accuracy=statistics.fmean(p['demo_accuracy'] for p in last),
                diverged=any(not math.isfinite(f) or f > fids[0] for f in fids[1:]), wall_s=record.get('wall_s'))


def mean_sd(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


ARM_STATS = ('end_fid', 'best_fid', 'last3_fid', 'end_accuracy', 'last3_accuracy')


def arm_summary(arm, records):
    runs = [run_summary(r) for r in records]
    out = dict(arm=arm.name, method=arm.method, overrides=arm.overrides, seeds=[r['seed'] for r in runs], runs=runs,
               start_fid=runs[0]['start_fid'], diverged=sum(r['diverged'] for r in runs))
    for key in ARM_STATS:
        out[key], out[key + '_sd'] = mean_sd(r[key] for r in runs)
    return out


def mean_curve(records):
    """kimg -> (mean, sd) of demo-FID over the runs, at the evaluations every run has."""
    common = set.intersection(*[{round(p['kimg'], 6) for p in r['curve']} for r in records])
    out = []
    for k in sorted(common):
        m, s = mean_sd(p['demo_fid'] for r in records for p in r['curve'] if round(p['kimg'], 6) == k)
        out.append((k, m, s))
    return out


def difference(a, b, key='end_fid'):
    """(mean_a - mean_b, standard error of that difference) of two arms' statistic `key` (one of ARM_STATS; end
    demo-FID by default) over independent seeds."""
    na, nb = len(a['runs']), len(b['runs'])
    return a[key] - b[key], math.sqrt(a[key + '_sd'] ** 2 / na + b[key + '_sd'] ** 2 / nb)


def standing(gap, se, lower_is_better=True):
    """Where a gap (demo-FID: lower is better; class accuracy: higher) stands against two standard errors of it."""
    if abs(gap) <= 2 * se:
        return 'within the seed spread'
    return 'better' if (gap < 0) == lower_is_better else 'worse'

#----------------------------------------------------------------------------
# Tables.

def _pm(mean, sd, pct=False):
    return f'{100 * mean:.1f} ± {100 * sd:.1f}%' if pct else f'{mean:.2f} ± {sd:.2f}'


def summary_table(arms):
    lines = ['| arm | seeds | demo-FID at start | at end | best | mean of last 3 | class accuracy at end | mean of last 3 '
             '| diverged runs |', '|---|---|---|---|---|---|---|---|---|']
    for a in arms:
        lines.append(f"| {a['arm']} | {len(a['runs'])} | {a['start_fid']:.2f} | {_pm(a['end_fid'], a['end_fid_sd'])} | "
                     f"{_pm(a['best_fid'], a['best_fid_sd'])} | {_pm(a['last3_fid'], a['last3_fid_sd'])} | "
                     f"{_pm(a['end_accuracy'], a['end_accuracy_sd'], True)} | "
                     f"{_pm(a['last3_accuracy'], a['last3_accuracy_sd'], True)} | {a['diverged']} / {len(a['runs'])} |")
    return '\n'.join(lines)


def runs_table(arms):
    lines = ['| arm | seed | demo-FID at end | best | mean of last 3 | class accuracy at end | diverged | wall time |',
             '|---|---|---|---|---|---|---|---|']
    for a in arms:
        for r in a['runs']:
            wall = f"{r['wall_s'] / 60:.1f} min" if r['wall_s'] else '-'
            lines.append(f"| {a['arm']} | {r['seed']} | {r['end_fid']:.2f} | {r['best_fid']:.2f} | {r['last3_fid']:.2f} | "
                         f"{100 * r['end_accuracy']:.1f}% | {'yes' if r['diverged'] else 'no'} | {wall} |")
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Plot: demo-FID against images seen, the mean over seeds with a band of one standard deviation per arm.

def plot_study(arms_records, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, records in arms_records:
        points = mean_curve(records)
        x = [p[0] for p in points]
        mean = [p[1] for p in points]
        line, = ax.plot(x, mean, marker='o', markersize=3, label=f'{name} (n={len(records)})')
        ax.fill_between(x, [max(m - s, 1e-3) for _, m, s in points], [m + s for _, m, s in points],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel('thousands of training images seen')
    ax.set_ylabel('demo-FID (lower is better), mean ± sd over seeds')
    ax.set_yscale('log')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

#----------------------------------------------------------------------------
# Provenance: what produced a results file.

def git_commit():
    """The commit of the checkout this package runs from ('+changes' when tracked files differ), or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ('+changes' if dirty else '')


def machine_description():
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{model}, {os.cpu_count()} logical cores'


def provenance(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return dict(command='python -m d2o_fast.experiments ' + ' '.join(argv), commit=git_commit(),
                machine=machine_description(), torch=torch.__version__, threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))


def provenance_lines(p):
    return [f"Command: `{p['command']}`", '',
            f"Commit {p['commit']}, {p['machine']}, torch {p['torch']} ({p['threads']} threads), {p['date']}."]
