"""The training loop every task shares: build, resume, iterate in ticks, snapshot, checkpoint, stop cleanly.

    result = training_loop(cfg, build_d2o_task)     # D2O / D2O-F
    result = training_loop(cfg, build_edm_task)     # EDM pre-training
"""

import dataclasses
import os
import time

import torch

from d2o_fast import ops
from d2o_fast.checkpoint import CheckpointError, save_snapshot
from d2o_fast.data import check_compatible, make_loader, open_dataset
from d2o_fast.engine import distributed as dist
from d2o_fast.engine.profiling import Profiler, nvtx_range
from d2o_fast.engine.progress import Reporter, save_image_grid
from d2o_fast.engine.run import StopRequest, choose_run_dir, mark_finished, write_config
from d2o_fast.engine.state import capture_rng, load_state, restore_rng, save_state
from d2o_fast.engine.tasks import resolve_data_path
from d2o_fast.errors import D2OFastError
from d2o_fast.engine.telemetry import gpu_telemetry, peak_memory_gb
from d2o_fast.nets import labelled_batch


class TrainingError(D2OFastError, RuntimeError):
    """Training cannot continue (diverged); the message says why and what was kept."""


@dataclasses.dataclass
class LoopResult:
    run_dir: str
    images_seen: int
    snapshot: str
    stopped_by_signal: bool = False
    evaluations: list = dataclasses.field(default_factory=list)   # task.evaluate results of this process, with kimg


def architecture_record(net):
    return dict(class_name=type(net).__name__, init_kwargs=net.init_kwargs)


@torch.no_grad()
def sample_images(sample, net, z, labels, batch=64):
    out = []
    for i in range(0, z.shape[0], batch):
        out.append(sample(net, z[i:i + batch], None if labels is None else labels[i:i + batch]).cpu())
    return torch.cat(out)


class TickMeter:
    """Step statistics kept on the device over a tick and read once, at its end (one all-reduce, one transfer).

    Each statistic is averaged over the steps (and ranks) where it exists and is finite (R1 only on R1 steps).
    A step is non-finite when one of its losses is NaN/Inf; the meter counts consecutive non-finite steps across
    ticks and reports their longest run in the tick and whether the tick ended inside one (per process, then the
    maximum over processes).
    """

    def __init__(self, images_seen, device):
        self.device = device
        self.run = torch.zeros([], dtype=torch.float64, device=device)   # consecutive non-finite steps up to the last one
        self.loss_masks = {}                        # key tuple -> which of its statistics are losses (a device tensor)
        self.start(images_seen)

    def start(self, images_seen):
        self.sums, self.t0, self.images0 = {}, time.time(), images_seen
        self.longest = torch.zeros_like(self.run)   # longest run (counted from its start) that reached this tick

    def add(self, stats):
        """stats: {name: 0-d device tensor} of one step."""
        keys = tuple(stats)
        values = torch.stack([v.double() for v in stats.values()])   # float64 sums: as exact as summing Python floats
        finite = torch.isfinite(values)
        if keys not in self.loss_masks:
            self.loss_masks[keys] = torch.tensor([k.startswith('loss') for k in keys], device=self.device)
        if keys not in self.sums:
            self.sums[keys] = (torch.zeros_like(values), torch.zeros_like(values))
        total, count = self.sums[keys]
        total.add_(torch.where(finite, values, 0))
        count.add_(finite)
        bad = (~finite & self.loss_masks[keys]).any()
        self.run = (self.run + 1) * bad
        torch.maximum(self.longest, self.run, out=self.longest)

    def read(self):
        """(means {name: float}, longest non-finite run in the tick, non-finite run at its end), over all ranks."""
        rank, world = dist.get_rank(), dist.get_world_size()
        runs = torch.zeros([2 * world], dtype=torch.float64, device=self.device)   # a slot per rank: the sum gathers them
        runs[2 * rank:2 * rank + 2] = torch.stack([self.longest, self.run])
        groups = list(self.sums.items())
        flat = torch.cat([t for _, pair in groups for t in pair] + [runs])
        values = dist.all_reduce_sum_(flat).tolist()   # the tick's one read of device values
        totals, counts = {}, {}
        offset = 0
        for keys, _ in groups:
            for i, k in enumerate(keys):
                totals[k] = totals.get(k, 0.0) + values[offset + i]
                counts[k] = counts.get(k, 0.0) + values[offset + len(keys) + i]
            offset += 2 * len(keys)
        means = {k: totals[k] / counts[k] for k in totals if counts[k]}
        return means, int(max(values[offset::2])), int(max(values[offset + 1::2]))

    def summary(self, means, images_seen, total, device):
        rate = (images_seen - self.images0) / max(time.time() - self.t0, 1e-9)
        out = dict(means)
        out.update(kimg=images_seen / 1000, img_per_sec=rate, sec_per_kimg=1000 / max(rate, 1e-9),
                   peak_mem_gb=peak_memory_gb(device), eta_sec=(total - images_seen) / max(rate, 1e-9))
        out.update(gpu_telemetry(device))
        return out


#----------------------------------------------------------------------------

def training_loop(cfg, build_task, quiet=False):
    rank, world, device = dist.init_distributed()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank ...
    ops.set_backend(cfg.kernels)
    batch_gpu, rounds = cfg.resolved_batch_gpu(world)

    dataset = open_dataset(resolve_data_path(cfg.data))
    if cfg.compile and dist.is_main() and not quiet:  # the run folder's log starts after this: say why it takes a while
        print('Building networks; with --compile, building the graphs takes minutes on a cold Inductor cache ...', flush=True)
    task = build_task(cfg, dataset, device, batch_gpu, rounds)
    trainer, net = task.trainer, task.trainer.G
    for module in (trainer.G, trainer.G_ema, getattr(trainer, 'D', None)):
        if module is not None:
            dist.broadcast_module(module)
    torch.manual_seed(cfg.seed + rank)  # ... and independent randomness per rank from here on
    check_compatible(dataset, net.img_resolution, net.img_channels, net.label_dim)
    loader = make_loader(dataset, backend=cfg.data_backend, batch_per_device=batch_gpu * rounds, seed=cfg.seed, rank=rank,
                         world_size=world, xflip=cfg.xflip, label_dim=net.label_dim, device=device, num_workers=cfg.workers)

    # Run folder and resume.
    identity = cfg.identity()
    run_dir, state_path = None, None
    if dist.is_main():
        run_dir, state_path = choose_run_dir(cfg, task.description, identity)
        write_config(run_dir, dataclasses.asdict(cfg), identity)
    run_dir, state_path = dist.broadcast_object((run_dir, state_path))
    reporter = Reporter(run_dir, enabled=dist.is_main(), quiet=quiet)
    reporter.print(f'Run folder: {run_dir}')
    for line in task.header:
        reporter.print(line)
    reporter.print(f'Data: {dataset.describe()}; {world} process(es) x {batch_gpu} images x {rounds} round(s) = '
                   f'batch {cfg.batch}; device {device}; loader {type(loader).__name__}; kernels {ops.get_backend()}')

    images_seen, step = 0, 0
    if state_path:
        state = load_state(state_path)
        if state.get('architecture') != architecture_record(net):
            raise CheckpointError(f'{state_path} holds a network of another architecture than this config builds; '
                                  f'use --resume none or a matching --init')
        trainer.load_state_dict(state['trainer'])
        loader.load_state_dict(state['loader'])
        images_seen, step = state['images_seen'], state['step']
        if rank < len(state['rng']):
            restore_rng(state['rng'][rank])
        reporter.print(f'Resumed from {state_path} at {images_seen / 1000:.1f} kimg')

    grid_z, grid_labels = labelled_batch(cfg.grid_size, [net.img_channels, net.img_resolution, net.img_resolution],
                                         net.label_dim, cfg.seed + 7919, device=device)
    evaluations = []

    def evaluate():
        values = dict(task.evaluate(trainer.G_ema), kimg=images_seen / 1000)
        evaluations.append(values)
        reporter.metrics(values)

    def snapshot(tag):
        path = os.path.join(run_dir, f'network-snapshot-{images_seen // 1000:06d}.safetensors')
        if dist.is_main():
            meta = dict(images_seen=images_seen, preset=cfg.preset, freeze_level=getattr(cfg, 'freeze', 0))
            save_snapshot(trainer.G_ema, path, metadata=meta, base=task.base_path if task.partial_snapshots else None,
                          trainable_only=task.partial_snapshots)
            grid = save_image_grid(sample_images(task.sample, trainer.G_ema, grid_z, grid_labels), os.path.join(run_dir, f'fakes-{tag}.png'))
            reporter.image('fakes', grid, images_seen / 1000)
            if task.evaluate is not None:
                evaluate()
        dist.barrier()
        return path

    def checkpoint():
        rngs = dist.gather_objects(capture_rng())
        loader_state = loader.state_dict()
        if dist.is_main():
            state = dict(trainer=trainer.state_dict(), loader=loader_state, images_seen=images_seen, step=step, rng=rngs,
                         architecture=architecture_record(net), identity=identity)
            path = save_state(run_dir, state, images_seen, cfg.keep_checkpoints)
            reporter.print(f'Saved training state {os.path.basename(path)}')
        dist.barrier()

    if images_seen == 0 and dist.is_main():
        save_image_grid(sample_images(task.sample, trainer.G_ema, grid_z, grid_labels), os.path.join(run_dir, 'fakes-init.png'))
        if task.evaluate is not None:
            evaluate()

    total = int(cfg.kimg * 1000)
    tick_images = max(int(cfg.tick_kimg * 1000), 1)
    tick, last_snapshot = 0, None
    meter = TickMeter(images_seen, device)
    profiler = Profiler(run_dir, enabled=cfg.profile and dist.is_main(), device=device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    with StopRequest() as stop:
        while images_seen < total:
            with nvtx_range('data'):
                images, labels = next(loader)
            meter.add(trainer.step(images, labels, step, images_seen, rank))
            profiler.step()
            step += 1
            images_seen += cfg.batch

            done = images_seen >= total
            if done or stop or images_seen >= meter.images0 + tick_images:
                tick += 1
                means, longest_bad, bad_steps = meter.read()
                reporter.tick(dict(meter.summary(means, images_seen, total, device), tick=tick, step=step))
                if longest_bad >= cfg.nan_patience:
                    raise TrainingError(f'losses were NaN/Inf for {longest_bad} consecutive steps by {images_seen / 1000:.1f} '
                                        f'kimg (--nan-patience {cfg.nan_patience}); stopped without saving; the last good '
                                        f'training state in {run_dir} is kept')
                if bad_steps:  # never overwrite good states with weights from a diverging stretch
                    reporter.print(f'Not saving at {images_seen / 1000:.1f} kimg: the last {bad_steps} step(s) had non-finite losses')
                else:
                    if done or stop or tick % cfg.snapshot_ticks == 0:
                        last_snapshot = snapshot(f'{images_seen // 1000:06d}')
                    if done or stop or tick % cfg.checkpoint_ticks == 0:
                        checkpoint()
                meter.start(images_seen)
            if stop:
                reporter.print(f'Stopped by signal {stop.signum} at {images_seen / 1000:.1f} kimg; state saved, '
                               f're-run the same command to resume')
                break
    profiler.close()
    loader.close()
    if not stop:
        if dist.is_main():
            mark_finished(run_dir)
        reporter.print(f'Finished: {images_seen / 1000:.1f} kimg, snapshot {last_snapshot}')
    reporter.close()
    return LoopResult(run_dir, images_seen, last_snapshot, stopped_by_signal=bool(stop), evaluations=evaluations)
