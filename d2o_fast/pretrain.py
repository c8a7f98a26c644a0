"""EDM diffusion pre-training: the generative pre-training that D2O starts from.

    python -m d2o_fast.pretrain                   # the demo digits model that ships in d2o_fast/assets
    python -m d2o_fast.pretrain --data my.zip --arch ncsnpp --model-channels 128 --channel-mult 2,2,2 --kimg 200000

Same run folders, resume, DDP (torchrun) and logging as d2o_fast.train; --help lists the flags with their values
under --preset, --dry-run prints the resolved config.
"""

from d2o_fast.cli import parse_config, run_main
from d2o_fast.engine.config import PRETRAIN_PRESETS, PretrainConfig


def main(argv):
    cfg, dry_run = parse_config(argv, 'python -m d2o_fast.pretrain', __doc__, PretrainConfig, PRETRAIN_PRESETS)
    if dry_run:
        print(cfg.to_json())
        return
    from d2o_fast.engine.loop import training_loop
    from d2o_fast.engine.tasks import build_edm_task
    training_loop(cfg, build_edm_task)


if __name__ == '__main__':
    run_main(main)
