"""One training run of a study: an arm on one seed, in its own run folder, resumable.

    run_arm(arm, seed, runs_dir, overrides)         # training_loop in this process
    run_demo_command(seed, runs_dir, extra_args)    # `python -m d2o_fast.train --compile --seed S` as a user runs it

Each returns a record {arm, seed, run_dir, curve, wall_s, ...}; curve is the run's metrics.jsonl (demo-FID and
class accuracy at every evaluation, by kimg).
"""

import json
import os
import shutil
import subprocess
import sys
import time

from d2o_fast.engine.run import FINISHED_MARKER
from d2o_fast.errors import D2OFastError
from d2o_fast.files import write_json, write_text

RECORD_FILE = 'study-run.json'


class ExperimentError(D2OFastError, RuntimeError):
    """A study cannot run as asked (a run folder from another configuration, a run that failed)."""


def read_curve(run_dir):
    """Evaluations of a run by kimg; an evaluation repeated after a resume keeps its last value."""
    by_kimg = {}
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        for line in f:
            if line.strip():
                point = json.loads(line)
                by_kimg[round(point['kimg'], 6)] = dict(kimg=point['kimg'], demo_fid=point['demo_fid'],
                                                       demo_accuracy=point['demo_accuracy'])
    return [by_kimg[k] for k in sorted(by_kimg)]


def _finished_record(run_dir):
    path = os.path.join(run_dir, RECORD_FILE)
    if os.path.exists(os.path.join(run_dir, FINISHED_MARKER)) and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _write_record(run_dir, record):
    write_json(os.path.join(run_dir, RECORD_FILE), record)
    return record


def study_config(arm, seed, run_dir, overrides):
    from d2o_fast.engine.config import resolve_config
    from d2o_fast.experiments.arms import STUDY_RUN_FIELDS
    return resolve_config('demo', **dict(overrides, **STUDY_RUN_FIELDS, **arm.overrides, seed=seed, run_dir=run_dir))


def run_arm(arm, seed, runs_dir, overrides, quiet=False):
    """Train `arm` on `seed` in runs_dir/<slug>-seed<seed> (skipped if finished, resumed if interrupted)."""
    from d2o_fast.engine.loop import training_loop
    from d2o_fast.engine.tasks import build_d2o_task
    run_dir = os.path.join(runs_dir, f'{arm.slug}-seed{seed}')
    record = _finished_record(run_dir)
    if record is not None:
        return record
    cfg = study_config(arm, seed, run_dir, overrides)
    config_path = os.path.join(run_dir, 'config.json')
    if os.path.exists(config_path):
        with open(config_path) as f:
            if json.load(f).get('identity') != cfg.identity():
                raise ExperimentError(f'{run_dir} holds a run of another configuration; use another --runs-dir')
    print(f'== {arm.name}, seed {seed}: {cfg.kimg:g} kimg -> {run_dir}', flush=True)
    t0 = time.perf_counter()
    result = training_loop(cfg, build_d2o_task, quiet=quiet)
    if result.stopped_by_signal:
        raise ExperimentError(f'{arm.name}, seed {seed} was stopped; re-run the same command to resume')
    return _write_record(run_dir, dict(arm=arm.name, seed=seed, run_dir=run_dir, wall_s=time.perf_counter() - t0,
                                       images_seen=result.images_seen, curve=read_curve(run_dir)))


def run_demo_command(seed, runs_dir, extra_args=()):
    """The README's demo command with --seed, in a subprocess, timed from start to its printed table."""
    outdir = os.path.join(runs_dir, f'demo-seed{seed}')
    runs = sorted(d for d in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, d))) if os.path.isdir(outdir) else []
    if len(runs) == 1:
        record = _finished_record(os.path.join(outdir, runs[0]))
        if record is not None:
            return record
    shutil.rmtree(outdir, ignore_errors=True)  # a partial run would give a partial time: start again
    cmd = [sys.executable, '-m', 'd2o_fast.train', '--compile', '--seed', str(seed), '--outdir', outdir, *extra_args]
    print(f'== demo, seed {seed}: {" ".join(cmd[1:])}', flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    os.makedirs(outdir, exist_ok=True)
    write_text(os.path.join(outdir, 'command-output.txt'), proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise ExperimentError(f'the demo command failed on seed {seed} (exit {proc.returncode}); its output is in '
                              f'{outdir}/command-output.txt:\n{proc.stderr[-2000:]}')
    (run_dir,) = [os.path.join(outdir, d) for d in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, d))]
    with open(os.path.join(run_dir, 'demo-eval.json')) as f:
        rows = json.load(f)
    return _write_record(run_dir, dict(arm='demo', seed=seed, run_dir=run_dir, wall_s=wall, command=' '.join(cmd[1:]),
                                       table=rows, curve=read_curve(run_dir)))
