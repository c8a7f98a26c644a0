"""Train a one-step generator with D2O / D2O-F.

    python -m d2o_fast.train                      # the CPU demo: shipped model + data, ~10 minutes
    python -m d2o_fast.train --compile            # the same, compiled
    python -m d2o_fast.train --preset cifar10-cond --init edm-cifar10-32x32-cond-ve.pkl --data cifar10-32x32.zip --freeze 1
    torchrun --nproc_per_node 8 -m d2o_fast.train --preset imagenet-64 ...

Every config field is a flag; --dry-run prints the resolved config and exits.
"""

import argparse

from d2o_fast.cli import add_dataclass_flags, overrides_from_args, run_main
from d2o_fast.engine.config import PRESETS, TrainConfig, resolve_config


def parse_config(argv):
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.train', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', default='demo', choices=sorted(PRESETS))
    parser.add_argument('--dry-run', action='store_true', help='print the resolved config and exit')
    add_dataclass_flags(parser, TrainConfig, skip=('preset',))
    args = parser.parse_args(argv)
    return resolve_config(args.preset, **overrides_from_args(args, TrainConfig, skip=('preset',))), args.dry_run


def main(argv):
    cfg, dry_run = parse_config(argv)
    if dry_run:
        print(cfg.to_json())
        return
    from d2o_fast.engine.loop import training_loop
    from d2o_fast.engine.setup import build_d2o_task
    result = training_loop(cfg, build_d2o_task)
    if cfg.eval_demo and not result.stopped_by_signal:
        from d2o_fast.engine.demo_eval import report_demo
        report_demo(cfg, result)


if __name__ == '__main__':
    run_main(main)
