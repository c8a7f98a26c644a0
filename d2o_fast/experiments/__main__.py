"""Studies on the demo, over several seeds (see d2o_fast/experiments/__init__.py).

    python -m d2o_fast.experiments ablation --seeds 3 --outdir docs/results/ablation
    python -m d2o_fast.experiments sweep --lrs 1e-4,3e-4,1e-3 --seeds 2 --outdir docs/results/lr-sweep
    python -m d2o_fast.experiments demo-seeds --seeds 3 --outdir docs/results/demo-seeds
    python -m d2o_fast.experiments reuse --seeds 3 --outdir docs/results/reuse

Any training flag (`python -m d2o_fast.train --help`) may follow and applies to every run, e.g. --kimg 5,
--eval-images 500, --compile, --init PATH. Run folders go to --runs-dir (default OUTDIR/runs); re-running the
same command skips finished runs and resumes an interrupted one.
"""

import argparse
import os

from d2o_fast.cli import add_config_flags, overrides_from_args, run_main
from d2o_fast.errors import ConfigError

STUDIES = ('ablation', 'sweep', 'demo-seeds', 'reuse')


class StudyArgumentError(ConfigError):
    """A study's own arguments are out of range."""


def _floats(text):
    try:
        return tuple(float(v) for v in text.split(',') if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def parse(argv):
    from d2o_fast.engine.config import PRESETS, TrainConfig, preset_values, resolve_config
    from d2o_fast.experiments.arms import SWEEP_METHODS
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.experiments', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('study', choices=STUDIES)
    parser.add_argument('--seeds', type=int, default=3, help='seeds 0..N-1 for every arm (default: 3)')
    parser.add_argument('--outdir', default=None, help='where <study>.json/.md/.png go (default: experiments/<study>)')
    parser.add_argument('--runs-dir', default=None, help='where the run folders go (default: OUTDIR/runs)')
    parser.add_argument('--lrs', type=_floats, default=(1e-4, 3e-4, 1e-3), help='sweep: generator learning rates')
    parser.add_argument('--methods', default='d2o,d2o-f', help=f'sweep: methods, of {", ".join(SWEEP_METHODS)}')
    args, rest = parser.parse_known_args(argv)
    config_parser = argparse.ArgumentParser(prog='python -m d2o_fast.experiments STUDY ... [training flags]')
    add_config_flags(config_parser, TrainConfig, preset_values('demo', TrainConfig, PRESETS), 'demo',
                     skip=('preset', 'seed', 'run_dir', 'outdir', 'resume'))
    overrides = overrides_from_args(config_parser.parse_args(rest), TrainConfig)
    if args.seeds < 1:
        raise StudyArgumentError(f'--seeds must be at least 1, got {args.seeds}')
    methods = tuple(m for m in args.methods.split(',') if m)
    if not methods or any(m not in SWEEP_METHODS for m in methods):
        raise StudyArgumentError(f'--methods must be a comma-separated subset of {", ".join(SWEEP_METHODS)}, got {args.methods!r}')
    if not args.lrs or min(args.lrs) <= 0:
        raise StudyArgumentError('--lrs must be positive learning rates')
    resolve_config('demo', **overrides)  # bad training flags fail here, before any run starts
    outdir = args.outdir or os.path.join('experiments', args.study)
    return args, methods, outdir, args.runs_dir or os.path.join(outdir, 'runs'), overrides, rest


def main(argv):
    from d2o_fast.experiments import studies
    args, methods, outdir, runs_dir, overrides, rest = parse(argv)
    seeds = range(args.seeds)
    if args.study == 'ablation':
        studies.ablation(seeds, outdir, runs_dir, overrides, argv)
    elif args.study == 'sweep':
        studies.sweep(args.lrs, methods, seeds, outdir, runs_dir, overrides, argv)
    elif args.study == 'reuse':
        studies.reuse(seeds, outdir, runs_dir, overrides, argv)
    else:
        studies.demo_seeds(seeds, outdir, runs_dir, rest, argv)


if __name__ == '__main__':
    run_main(main)
