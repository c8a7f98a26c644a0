"""EDM diffusion pre-training: the generative pre-training that D2O starts from.

    python -m d2o_fast.pretrain                   # the demo digits model that ships in d2o_fast/assets
    python -m d2o_fast.pretrain --data my.zip --arch ncsnpp --model-channels 128 --channel-mult 2,2,2 --kimg 200000

Same run folders, resume, DDP (torchrun) and logging as d2o_fast.train; --dry-run prints the config.
"""

import argparse

from d2o_fast.cli import add_dataclass_flags, overrides_from_args, run_main
from d2o_fast.engine.config import PRETRAIN_PRESETS, PretrainConfig, resolve_config


def parse_config(argv):
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.pretrain', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', default='demo', choices=sorted(PRETRAIN_PRESETS))
    parser.add_argument('--dry-run', action='store_true', help='print the resolved config and exit')
    add_dataclass_flags(parser, PretrainConfig, skip=('preset',))
    args = parser.parse_args(argv)
    cfg = resolve_config(args.preset, cls=PretrainConfig, presets=PRETRAIN_PRESETS,
                         **overrides_from_args(args, PretrainConfig, skip=('preset',)))
    return cfg, args.dry_run


def main(argv):
    cfg, dry_run = parse_config(argv)
    if dry_run:
        print(cfg.to_json())
        return
    from d2o_fast.engine.loop import training_loop
    from d2o_fast.engine.setup import build_edm_task
    training_loop(cfg, build_edm_task)


if __name__ == '__main__':
    run_main(main)
