"""The D2O / D2O-F training loop: build, resume, iterate in ticks, snapshot, checkpoint, stop cleanly."""

import dataclasses
import os
import time

import torch

from d2o_fast import assets, ops
from d2o_fast.checkpoint import load_network, save_snapshot
from d2o_fast.data import check_compatible, make_loader, open_dataset
from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine import distributed as dist
from d2o_fast.engine.config import TrainConfig
from d2o_fast.engine.progress import Reporter, save_image_grid
from d2o_fast.engine.run import StopRequest, choose_run_dir, mark_finished, write_config
from d2o_fast.engine.state import CheckpointError, capture_rng, load_state, restore_rng, save_state
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.nets import architecture_kwargs, build_network, format_freeze_report, freeze_report


class TrainingError(RuntimeError):
    """Training cannot continue (diverged, incompatible checkpoint); the message says why."""


@dataclasses.dataclass
class LoopResult:
    run_dir: str
    images_seen: int
    snapshot: str
    stopped_by_signal: bool = False


#----------------------------------------------------------------------------
# Building blocks.

def resolve_init_path(init):
    return assets.demo_checkpoint_path() if init == 'demo' else init


def resolve_data_path(data):
    return assets.demo_dataset_path() if data == 'demo' else data


def build_generator(cfg, dataset):
    """The one-step generator: a D2OPrecond from --init (EDM / D2O pickle or snapshot) or random."""
    if cfg.init == 'random':
        label_dim = dataset.label_dim if cfg.cond in (None, True) else 0
        G = build_network('D2OPrecond', **architecture_kwargs(cfg.arch, dataset.resolution, dataset.channels, label_dim, dropout=0))
        return G, None
    path = resolve_init_path(cfg.init)
    G = load_network(path, as_class='D2OPrecond')
    if cfg.cond is True and G.label_dim == 0:
        raise TrainingError(f'--cond requested but the network in {path} is unconditional')
    return G, path


def grid_inputs(G, n, seed, device):
    g = torch.Generator().manual_seed(seed + 7919)
    z = torch.randn([n, G.img_channels, G.img_resolution, G.img_resolution], generator=g)
    labels = None
    if G.label_dim:
        labels = torch.eye(G.label_dim)[torch.arange(n) % G.label_dim]
    return z.to(device), (labels.to(device) if labels is not None else None)


@torch.no_grad()
def generate_images(G, z, labels, batch=64):
    out = []
    for i in range(0, z.shape[0], batch):
        out.append(G.generate(z[i:i + batch], None if labels is None else labels[i:i + batch]).cpu())
    return torch.cat(out)


def describe_run(cfg, G):
    data = os.path.splitext(os.path.basename(cfg.data))[0]
    return f'{cfg.preset}-{data}-freeze{cfg.freeze}-{cfg.disc}-batch{cfg.batch}'


def architecture_record(G):
    return dict(class_name=type(G).__name__, init_kwargs=G.init_kwargs)


#----------------------------------------------------------------------------

def training_loop(cfg: TrainConfig, quiet=False):
    rank, world, device = dist.init_distributed()
    torch.manual_seed(cfg.seed + rank)
    ops.set_backend(cfg.kernels)
    batch_gpu, rounds = cfg.resolved_batch_gpu(world)

    # Data and networks.
    dataset = open_dataset(resolve_data_path(cfg.data))
    G, base_path = build_generator(cfg, dataset)
    check_compatible(dataset, G.img_resolution, G.img_channels, G.label_dim)
    D = build_discriminator(cfg.disc, img_resolution=G.img_resolution, img_channels=G.img_channels, c_dim=G.label_dim,
                            backbones=cfg.disc_backbones, weights_dir=cfg.disc_weights, channels=cfg.disc_channels)
    trainer = D2OTrainer(G, D, cfg, device, batch_gpu, rounds)
    loader = make_loader(cfg.data_backend, dataset, batch_per_device=batch_gpu * rounds, seed=cfg.seed, rank=rank,
                         world_size=world, xflip=cfg.xflip, label_dim=G.label_dim, device=device, num_workers=cfg.workers)

    # Run folder and resume.
    identity = cfg.identity()
    run_dir, state_path = None, None
    if dist.is_main():
        run_dir, state_path = choose_run_dir(cfg, describe_run(cfg, G), identity)
        write_config(run_dir, dataclasses.asdict(cfg), identity)
    run_dir, state_path = dist.broadcast_object((run_dir, state_path))
    reporter = Reporter(run_dir, enabled=dist.is_main(), quiet=quiet)
    reporter.print(f'Run folder: {run_dir}')
    reporter.print(f'Generator: {type(G).__name__} {G.init_kwargs.get("model_type")} from {base_path or "random init"}, '
                   f'freeze level {cfg.freeze}')
    reporter.print(format_freeze_report(freeze_report(G)))
    reporter.print(f'Discriminator: {cfg.disc}, {sum(p.numel() for p in trainer.d_params):,} trainable parameters')
    reporter.print(f'Data: {dataset.describe()}; {world} process(es) x {batch_gpu} images x {rounds} round(s) = batch {cfg.batch}; '
                   f'device {device}')

    images_seen, step = 0, 0
    if state_path:
        state = load_state(state_path)
        if state.get('architecture') != architecture_record(G):
            raise CheckpointError(f'{state_path} holds a {state.get("architecture", {}).get("class_name")} of another '
                                  f'architecture than --init gives; use --resume none or a matching --init')
        trainer.load_state_dict(state['trainer'])
        loader.load_state_dict(state['loader'])
        images_seen, step = state['images_seen'], state['step']
        if rank < len(state['rng']):
            restore_rng(state['rng'][rank])
        reporter.print(f'Resumed from {state_path} at {images_seen / 1000:.1f} kimg')

    def snapshot(tag):
        path = os.path.join(run_dir, f'network-snapshot-{images_seen // 1000:06d}.safetensors')
        if dist.is_main():
            meta = dict(images_seen=images_seen, freeze_level=cfg.freeze, preset=cfg.preset)
            partial = cfg.freeze > 0 and base_path is not None
            save_snapshot(trainer.G_ema, path, metadata=meta, base=base_path if partial else None, trainable_only=partial)
            z, labels = grid_inputs(G, cfg.grid_size, cfg.seed, device)
            grid = save_image_grid(generate_images(trainer.G_ema, z, labels), os.path.join(run_dir, f'fakes-{tag}.png'))
            reporter.image('fakes', grid, images_seen / 1000)
        dist.barrier()
        return path

    def checkpoint():
        rngs = dist.gather_objects(capture_rng())
        loader_state = loader.state_dict()
        if dist.is_main():
            path = save_state(run_dir, dict(trainer=trainer.state_dict(), loader=loader_state, images_seen=images_seen, step=step,
                                            rng=rngs, architecture=architecture_record(G), identity=identity),
                              images_seen, cfg.keep_checkpoints)
            reporter.print(f'Saved training state {os.path.basename(path)}')
        dist.barrier()

    if images_seen == 0 and dist.is_main():
        z, labels = grid_inputs(G, cfg.grid_size, cfg.seed, device)
        save_image_grid(generate_images(trainer.G_ema, z, labels), os.path.join(run_dir, 'fakes-init.png'))

    total = int(cfg.kimg * 1000)
    tick_images = max(int(cfg.tick_kimg * 1000), 1)
    tick, bad_steps, last_snapshot = 0, 0, None
    tick_start_time, tick_start_images, run_start = time.time(), images_seen, time.time()
    sums, count = {}, 0
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    with StopRequest() as stop:
        while images_seen < total:
            images, labels = next(loader)
            stats = trainer.step(images, labels, step, images_seen, rank)
            if not stats.finite():
                bad_steps += 1
                if bad_steps >= cfg.nan_patience:
                    raise TrainingError(f'losses were NaN/Inf for {bad_steps} consecutive steps at {images_seen / 1000:.1f} kimg; '
                                        f'stopped without saving; the last good training state in {run_dir} is kept')
            else:
                bad_steps = 0
            step += 1
            images_seen += cfg.batch
            for k, v in dataclasses.asdict(stats).items():
                if v == v:  # skip NaN placeholders (R1 runs every r1_interval steps)
                    sums.setdefault(k, [0.0, 0])
                    sums[k][0] += v
                    sums[k][1] += 1
            count += 1

            done = images_seen >= total
            if done or stop or images_seen >= tick_start_images + tick_images:
                tick += 1
                elapsed = time.time() - tick_start_time
                rate = (images_seen - tick_start_images) / max(elapsed, 1e-9)
                tick_stats = {k: s / max(n, 1) for k, (s, n) in sums.items()}
                tick_stats.setdefault('r1_penalty', float('nan'))
                tick_stats.update(kimg=images_seen / 1000, img_per_sec=rate, sec_per_kimg=1000 / max(rate, 1e-9),
                                  peak_mem_gb=peak_memory_gb(device), eta_sec=(total - images_seen) / max(rate, 1e-9),
                                  tick=tick, step=step, elapsed_sec=time.time() - run_start)
                tick_stats.update(gpu_telemetry(device))
                reporter.tick(tick_stats)
                sums, count = {}, 0
                if done or stop or tick % cfg.snapshot_ticks == 0:
                    last_snapshot = snapshot(f'{images_seen // 1000:06d}')
                if done or stop or tick % cfg.checkpoint_ticks == 0:
                    checkpoint()
                tick_start_time, tick_start_images = time.time(), images_seen
            if stop:
                reporter.print(f'Stopped by signal {stop.signum} at {images_seen / 1000:.1f} kimg; state saved, re-run the same command to resume')
                reporter.close()
                loader.close()
                return LoopResult(run_dir, images_seen, last_snapshot, stopped_by_signal=True)

    if last_snapshot is None:
        last_snapshot = snapshot('final')
        checkpoint()
    if dist.is_main():
        mark_finished(run_dir)
    reporter.print(f'Finished: {images_seen / 1000:.1f} kimg, snapshot {last_snapshot}')
    reporter.close()
    loader.close()
    return LoopResult(run_dir, images_seen, last_snapshot)


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    except ImportError:
        return float('nan')


def gpu_telemetry(device):
    """Utilisation, memory and power from NVML when a GPU is present; nothing otherwise."""
    if device.type != 'cuda':
        return {}
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return dict(gpu_util=float(util.gpu), gpu_mem_gb=mem.used / 2 ** 30, gpu_power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000)
    except Exception:
        return {}
