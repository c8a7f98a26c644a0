"""Train a one-step generator with D2O / D2O-F.

    python -m d2o_fast.train                      # the CPU demo: shipped model + data, ~10 minutes
    python -m d2o_fast.train --compile            # the same, compiled
    python -m d2o_fast.train --preset cifar10-cond --init edm-cifar10-32x32-cond-ve.pkl --data cifar10-32x32.zip --freeze 1
    torchrun --nproc_per_node 8 -m d2o_fast.train --preset imagenet-64 ...

Every config field is a flag; --help lists them with their values under --preset, --dry-run prints the resolved
config and exits.
"""

from d2o_fast.cli import parse_config, run_main
from d2o_fast.engine.config import PRESETS, TrainConfig
from d2o_fast.engine.distributed import is_main


def main(argv):
    cfg, dry_run = parse_config(argv, 'python -m d2o_fast.train', __doc__, TrainConfig, PRESETS)
    if dry_run:
        print(cfg.to_json())
        return
    from d2o_fast.engine.loop import training_loop
    from d2o_fast.engine.tasks import build_d2o_task
    result = training_loop(cfg, build_d2o_task)
    if cfg.eval_demo and not result.stopped_by_signal and is_main():
        report_demo(cfg, result)


def report_demo(cfg, result):
    """The closing table of the demo: raw one step vs Heun teacher vs the fine-tuned generator."""
    from d2o_fast.engine.distributed import init_distributed
    from d2o_fast.engine.tasks import resolve_init_path
    from d2o_fast.metrics.demo_report import compare_demo_generators, format_demo_table, write_demo_report
    print(f'Evaluating on {cfg.eval_images} samples (demo-FID: Frechet distance in the demo classifier\'s features) ...', flush=True)
    device = init_distributed()[2]  # the run's device (the process group, if any, already exists)
    rows = compare_demo_generators(resolve_init_path(cfg.init), result.snapshot, num_images=cfg.eval_images,
                                   known=measured_rows(cfg, result), device=device)
    write_demo_report(result.run_dir, rows)
    print(format_demo_table(rows), flush=True)


def measured_rows(cfg, result):
    """One-step rows the run already evaluated on the table's latents: its EMA at 0 kimg is the raw pre-trained
    generator (unless re-initialised), and the last evaluation is of the final snapshot."""
    known, evals = {}, result.evaluations
    if evals and evals[0]['kimg'] == 0 and not cfg.reinit and cfg.init != 'random':
        known['raw'] = evals[0]
    if evals and evals[-1]['kimg'] == result.images_seen / 1000:
        known['tuned'] = evals[-1]
    return known


if __name__ == '__main__':
    run_main(main)
