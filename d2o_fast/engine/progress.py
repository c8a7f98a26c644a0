"""What a person sees: a status line per tick, stats.jsonl, TensorBoard (and wandb offline if installed),
image grids. Only rank 0 writes; other ranks get a no-op reporter."""

import json
import os
import time

import numpy as np
import PIL.Image
import torch

from d2o_fast.files import atomic_path


def save_image_grid(images, path, grid_w=None):
    """images: float [N, C, H, W] in [-1, 1] -> one PNG grid (written atomically)."""
    images = images.detach().float().cpu()
    n, c, h, w = images.shape
    grid_w = grid_w or int(np.ceil(np.sqrt(n)))
    grid_h = int(np.ceil(n / grid_w))
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
    canvas = np.zeros((grid_h * h, grid_w * w, c), dtype=np.uint8)
    for i in range(n):
        y, x = divmod(i, grid_w)
        canvas[y * h:(y + 1) * h, x * w:(x + 1) * w] = pixels[i].transpose(1, 2, 0)
    image = PIL.Image.fromarray(canvas[:, :, 0] if c == 1 else canvas, 'L' if c == 1 else 'RGB')
    with atomic_path(path) as tmp:
        image.save(tmp, format='PNG')
    return path


# Step statistics shown in the status line when a trainer reports them: (key, label, format).
STEP_FIELDS = [
    ('loss', 'loss', '<8.4f'), ('loss_g', 'G', '<7.4f'), ('loss_d', 'D', '<7.4f'), ('r1_penalty', 'R1', '<8.3g'),
    ('logit_real', 'D(real)', '<+7.3f'), ('logit_fake', 'D(fake)', '<+7.3f'),
]


def format_status(s):
    """One status line: kimg, throughput, the trainer's losses and logits, memory, ETA."""
    fields = [f"kimg {s['kimg']:<8.1f}", f"img/s {s['img_per_sec']:<7.2f}", f"sec/kimg {s['sec_per_kimg']:<7.2f}"]
    fields += [f'{label} {s[key]:{fmt}}' for key, label, fmt in STEP_FIELDS if key in s]
    fields += [f"mem {s['peak_mem_gb']:<5.2f}GB", f"eta {format_time(s['eta_sec'])}"]
    return '  '.join(fields)


def format_time(seconds):
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{(seconds // 60) % 60:02d}m'


class Reporter:
    """Writes log.txt, stats.jsonl and TensorBoard events in the run folder (rank 0)."""

    def __init__(self, run_dir, enabled=True, quiet=False):
        self.enabled = enabled
        self.quiet = quiet
        self.run_dir = run_dir
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._log = open(os.path.join(run_dir, 'log.txt'), 'a', buffering=1)
        self._stats = open(os.path.join(run_dir, 'stats.jsonl'), 'a', buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=run_dir)
        except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
            self.print('tensorboard not installed: no event files')
        try:
            import wandb
            self._wandb = wandb.init(dir=run_dir, mode='offline', project='d2o_fast', name=os.path.basename(run_dir))
        except Exception:
            self._wandb = None

    def print(self, message):
        if not self.enabled:
            return
        if not self.quiet:
            print(message, flush=True)
        self._log.write(message + '\n')

    def tick(self, stats):
        if not self.enabled:
            return
        self.print(format_status(stats))
        self._stats.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
        step = int(stats['kimg'] * 1000)
        if self._tb is not None:
            for k, v in stats.items():
                if isinstance(v, (int, float)) and k != 'kimg':
                    self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in stats.items() if isinstance(v, (int, float))}, step=step)

    def metrics(self, values):
        """Evaluation results (e.g. demo-FID at a snapshot): printed, appended to metrics.jsonl, TensorBoard."""
        if not self.enabled:
            return
        self.print('metrics: ' + '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in values.items()))
        with open(os.path.join(self.run_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(dict(values, timestamp=time.time())) + '\n')
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != 'kimg':
                    self._tb.add_scalar(f'metrics/{k}', v, global_step=int(values.get('kimg', 0) * 1000))

    def image(self, tag, path, kimg):
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, np.asarray(PIL.Image.open(path).convert('RGB')), global_step=int(kimg * 1000), dataformats='HWC')

    def close(self):
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._log.close()
        self._stats.close()
