"""The studies: each trains its arms over seeds, then writes <study>.json, .md and .png with a verdict.

    ablation    the paper's claims: pre-training matters, freezing costs little, one step reaches the teacher
    sweep       generator learning rates for D2O and D2O-F, so both can share one recipe
    demo_seeds  the README's demo command on several seeds, against its two bars
    reuse       D2O-F with and without --reuse-fakes (the D step on the G step's fakes): does it cost quality?
"""

import os

from d2o_fast.experiments import arms as arm_table
from d2o_fast.experiments.report import (arm_summary, difference, mean_sd, plot_study, provenance, provenance_lines,
                                         runs_table, standing, summary_table)
from d2o_fast.experiments.runs import run_arm, run_demo_command
from d2o_fast.files import write_json, write_text

# The demo's bars (README): row (c) at most half of row (a)'s demo-FID, class accuracy at least 90%.
DEMO_FID_FRACTION = 0.5
DEMO_MIN_ACCURACY = 0.9


def _train_all(arms, seeds, runs_dir, overrides):
    return [(arm, [run_arm(arm, seed, runs_dir, overrides) for seed in seeds]) for arm in arms]


def _write(outdir, name, payload, markdown):
    os.makedirs(outdir, exist_ok=True)
    write_json(os.path.join(outdir, f'{name}.json'), payload)
    write_text(os.path.join(outdir, f'{name}.md'), markdown + '\n')
    print(markdown, flush=True)

#----------------------------------------------------------------------------
# Ablation.

def teacher_reference(init, eval_images):
    """Row (b) of the demo table, the 35-NFE Heun teacher on the evaluation's seeds, in the precision the demo's
    generator trains in (--precision auto). Computed once per checkpoint and code (teacher_demo_metrics' cache)."""
    from d2o_fast.engine.tasks import resolve_init_path
    from d2o_fast.metrics.demo_report import teacher_demo_metrics
    from d2o_fast.ops import native_bf16
    bf16 = native_bf16('cpu')
    return dict(teacher_demo_metrics(resolve_init_path(init), eval_images, bf16=bf16), bf16=bf16)


def ablation_verdicts(summaries, teacher):
    """One sentence per claim of the paper, with the numbers that support or contradict it."""
    by_name = {s['arm']: s for s in summaries}
    pretrained = [s for s in summaries if s['arm'] in {a.name for a in arm_table.PRETRAINED}]
    random_init = by_name[arm_table.RANDOM_INIT.name]
    d2o, d2o_f1 = by_name[arm_table.D2O.name], by_name[arm_table.D2O_F1.name]
    worst_pre = max(r['end_fid'] for s in pretrained for r in s['runs'])
    best_random = min(r['end_fid'] for r in random_init['runs'])
    verdicts = [dict(claim='(i) pre-training matters: every pre-trained run ends below every random-init run',
                     supported=worst_pre < best_random,
                     evidence=f'worst pre-trained end demo-FID {worst_pre:.2f} vs best random-init {best_random:.2f}')]
    for frozen in (d2o_f1, by_name[arm_table.D2O_F3.name]):
        gap, se = difference(frozen, d2o)
        verdicts.append(dict(
            claim=f'(ii) freezing costs little: {frozen["arm"]} is not worse than D2O beyond the seed spread',
            supported=gap <= 2 * se,
            evidence=f'{frozen["arm"]} {frozen["end_fid"]:.2f} ± {frozen["end_fid_sd"]:.2f} vs D2O {d2o["end_fid"]:.2f} ± '
                     f'{d2o["end_fid_sd"]:.2f} (end demo-FID, mean ± sd): gap {gap:+.2f}, two standard errors of the gap '
                     f'{2 * se:.2f}, so {standing(gap, se)}'))
    for s in (d2o, d2o_f1):
        beats_raw = all(r['end_fid'] < r['start_fid'] for r in s['runs'])
        reaches = s['end_fid'] <= teacher['demo_fid']
        verdicts.append(dict(
            claim=f'(iii) {s["arm"]}: the one-step generator beats the raw one step and reaches the 35-step teacher',
            supported=beats_raw and reaches,
            evidence=f'end demo-FID {s["end_fid"]:.2f} ± {s["end_fid_sd"]:.2f} (every run below the raw one step '
                     f'{s["start_fid"]:.2f}: {"yes" if beats_raw else "no"}); teacher {teacher["demo_fid"]:.2f}'))
    return verdicts


def ablation(seeds, outdir, runs_dir, overrides, argv):
    trained = _train_all(arm_table.ABLATION, seeds, runs_dir, overrides)
    summaries = [arm_summary(arm, records) for arm, records in trained]
    teacher = teacher_reference(overrides.get('init', 'demo'), overrides.get('eval_images', 500))
    verdicts = ablation_verdicts(summaries, teacher)
    prov = provenance(argv)
    lines = ['# The paper\'s claims in miniature: D2O, D2O-F and a random-init GAN on the demo', '', *provenance_lines(prov), '',
             summary_table(summaries), '',
             f'Teacher (pre-trained + Heun, 18 steps, 35 NFE{", bf16" if teacher["bf16"] else ""}) on the same evaluation seeds: demo-FID '
             f'{teacher["demo_fid"]:.2f}, class accuracy {100 * teacher["demo_accuracy"]:.1f}%. Mean ± sample standard '
             'deviation over seeds; a run "diverged" when an evaluation was worse than its own start.', '',
             '## Verdicts', '']
    lines += [f'- {"supported" if v["supported"] else "NOT supported"}: {v["claim"]}. {v["evidence"]}.' for v in verdicts]
    lines += ['', '## Runs', '', runs_table(summaries), '', '![demo-FID against images seen](ablation.png)']
    _mkdir(outdir)
    plot_study([(a.name, r) for a, r in trained], os.path.join(outdir, 'ablation.png'),
               'The demo: pre-trained vs random init, mean ± sd over seeds')
    _write(outdir, 'ablation', dict(provenance=prov, arms=summaries, teacher=teacher, verdicts=verdicts,
                                    curves={a.name: [r['curve'] for r in recs] for a, recs in trained}), '\n'.join(lines))
    return summaries, verdicts

#----------------------------------------------------------------------------
# Reusing the G step's fakes in the D step.

REUSE_CHECKS = (  # statistic, how the verdict names it, whether lower is better
    ('end_fid', 'end demo-FID', True),
    ('last3_fid', 'mean of the last three demo-FIDs', True),
    ('end_accuracy', 'class accuracy at the end', False),
    ('last3_accuracy', 'mean of the last three class accuracies', False),
)


def reuse_verdicts(summaries):
    """Reuse against the default on demo-FID and class accuracy (at the end, and the mean of the last three
    evaluations): not worse when it is better or within the seed spread (|gap| <= 2 standard errors of the gap)."""
    by_name = {s['arm']: s for s in summaries}
    base, reuse = by_name[arm_table.D2O_F1.name], by_name[arm_table.D2O_F1_REUSE.name]
    verdicts = []
    for key, what, lower_is_better in REUSE_CHECKS:
        gap, se = difference(reuse, base, key)
        verdict = standing(gap, se, lower_is_better)
        show = (lambda v: f'{100 * v:.1f}%') if key.endswith('accuracy') else (lambda v: f'{v:.2f}')
        signed = f'{100 * gap:+.1f} points' if key.endswith('accuracy') else f'{gap:+.2f}'
        verdicts.append(dict(
            claim=f'reusing the G step\'s fakes is not worse than fresh fakes beyond the seed spread ({what})',
            supported=verdict != 'worse', within_spread=verdict == 'within the seed spread', gap=gap, two_se=2 * se,
            evidence=f'reuse {show(reuse[key])} ± {show(reuse[key + "_sd"])} vs fresh fakes {show(base[key])} ± '
                     f'{show(base[key + "_sd"])} (mean ± sd over {len(reuse["runs"])} and {len(base["runs"])} seeds): '
                     f'gap {signed}, two standard errors of the gap {show(2 * se)}, so {verdict}'))
    return verdicts


def reuse(seeds, outdir, runs_dir, overrides, argv):
    trained = _train_all(arm_table.REUSE, seeds, runs_dir, overrides)
    summaries = [arm_summary(arm, records) for arm, records in trained]
    verdicts = reuse_verdicts(summaries)
    walls = {arm.name: mean_sd(r['wall_s'] for r in records) for arm, records in trained}
    prov = provenance(argv)
    lines = ['# Reusing the G step\'s fakes in the D step (--reuse-fakes) on the demo', '', *provenance_lines(prov), '',
             summary_table(summaries), '',
             'Both arms are the demo preset (D2O-F level 1); the second adds --reuse-fakes: the D step trains on the '
             'G step\'s fakes (generated before G\'s update) instead of fresh ones from the updated G, skipping its '
             'generator forward. Mean ± sample standard deviation over seeds; a run "diverged" when an evaluation was '
             'worse than its own start.', '',
             '## Verdict', '']
    lines += [f'- {"supported" if v["supported"] else "NOT supported"}: {v["claim"]}. {v["evidence"]}.' for v in verdicts]
    lines += ['', 'Wall time per run (training and its evaluation at every tick, on a shared machine): '
              + '; '.join(f'{name} {m / 60:.1f} ± {sd / 60:.1f} min' for name, (m, sd) in walls.items()) + '.',
              '', '## Runs', '', runs_table(summaries), '', '![demo-FID against images seen](reuse.png)']
    _mkdir(outdir)
    plot_study([(a.name, r) for a, r in trained], os.path.join(outdir, 'reuse.png'),
               'D2O-F with fresh and reused fakes in the D step, mean ± sd over seeds')
    _write(outdir, 'reuse', dict(provenance=prov, arms=summaries, verdicts=verdicts,
                                 wall_s={name: dict(mean=m, sd=sd) for name, (m, sd) in walls.items()},
                                 curves={a.name: [r['curve'] for r in recs] for a, recs in trained}), '\n'.join(lines))
    return summaries, verdicts

#----------------------------------------------------------------------------
# Learning-rate sweep.

def sweep(lrs, methods, seeds, outdir, runs_dir, overrides, argv):
    arms = arm_table.sweep_arms(lrs, methods)
    trained = _train_all(arms, seeds, runs_dir, overrides)
    summaries = [arm_summary(arm, records) for arm, records in trained]
    stable = [lr for lr in lrs if all(s['diverged'] == 0 for s in summaries if s['overrides']['lr'] == lr)]
    prov = provenance(argv)
    lines = ['# Generator learning rate for D2O and D2O-F on the demo', '', *provenance_lines(prov), '',
             summary_table(summaries), '',
             'Everything but the generator learning rate is the demo preset. Mean ± sample standard deviation over '
             'seeds; a run "diverged" when an evaluation was worse than its own start.', '',
             f'Learning rates where no run of any method diverged: {", ".join(f"{lr:g}" for lr in stable) or "none"}.',
             '', '## Runs', '', runs_table(summaries), '', '![demo-FID against images seen](sweep.png)']
    _mkdir(outdir)
    plot_study([(a.name, r) for a, r in trained], os.path.join(outdir, 'sweep.png'),
               'Generator learning rate, mean ± sd over seeds')
    _write(outdir, 'sweep', dict(provenance=prov, arms=summaries, stable_lrs=stable,
                                 curves={a.name: [r['curve'] for r in recs] for a, recs in trained}), '\n'.join(lines))
    return summaries

#----------------------------------------------------------------------------
# The demo command on several seeds.

def demo_passes(table):
    raw, _teacher, tuned = table
    return tuned['fid'] <= DEMO_FID_FRACTION * raw['fid'] and tuned['accuracy'] >= DEMO_MIN_ACCURACY


def demo_seeds(seeds, outdir, runs_dir, extra_args, argv):
    records = [run_demo_command(seed, runs_dir, extra_args) for seed in seeds]
    prov = provenance(argv)
    rows = ['| seed | (a) raw one step | (b) Heun teacher, 35 NFE | (c) fine-tuned one step | class accuracy (c) | bars met '
            '| wall time |', '|---|---|---|---|---|---|---|']
    for r in records:
        a, b, c = r['table']
        rows.append(f"| {r['seed']} | {a['fid']:.2f} | {b['fid']:.2f} | {c['fid']:.2f} | {100 * c['accuracy']:.1f}% | "
                    f"{'yes' if demo_passes(r['table']) else 'NO'} | {r['wall_s'] / 60:.1f} min |")
    fid, fid_sd = mean_sd(r['table'][2]['fid'] for r in records)
    acc, acc_sd = mean_sd(r['table'][2]['accuracy'] for r in records)
    wall, wall_sd = mean_sd(r['wall_s'] for r in records)
    rows.append(f"| mean ± sd | | | {fid:.2f} ± {fid_sd:.2f} | {100 * acc:.1f} ± {100 * acc_sd:.1f}% | "
                f"{sum(demo_passes(r['table']) for r in records)} / {len(records)} | {wall / 60:.1f} ± {wall_sd / 60:.1f} min |")
    lines = ['# The demo command on several seeds', '', *provenance_lines(prov), '',
             f"Each seed runs `{_any_seed(records[0])}` in its own "
             'process; wall time from start to the printed table. Bars: (c) demo-FID at most half of (a), class accuracy '
             'at least 90%.', '', *rows]
    _mkdir(outdir)
    plot_study([('D2O-F (demo preset, --compile)', records)], os.path.join(outdir, 'demo-seeds.png'),
               'The demo command, mean ± sd over seeds')
    _write(outdir, 'demo-seeds', dict(provenance=prov, runs=records), '\n'.join(lines))
    return records


def _any_seed(record):
    """A demo run's command with its seed, in the flag and the output folder, written as S."""
    seed = record['seed']
    return record['command'].replace(f'--seed {seed}', '--seed S').replace(f'demo-seed{seed}', 'demo-seedS')


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return True
