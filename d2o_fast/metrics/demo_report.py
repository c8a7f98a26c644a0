"""The demo's closing table: demo-FID and class accuracy of
    (a) the pre-trained model's raw one-step output  G(z) = D(80 z; 80),
    (b) the pre-trained model with EDM's Heun sampler (the multi-step teacher, 35 NFE at 32x32),
    (c) the fine-tuned one-step generator (the D2O / D2O-F EMA snapshot).
All three on the same seeds and class labels."""

import hashlib
import json
import os

import torch

from d2o_fast.assets import cache_dir
from d2o_fast.checkpoint import load_network
from d2o_fast.files import file_sha256, sources_sha256, write_json, write_text
from d2o_fast.metrics.demo_classifier import demo_metrics, demo_reference_stats
from d2o_fast.nets import edm_sampler, labelled_batch
from d2o_fast.ops import native_bf16


def demo_latents(num_images, resolution=32, channels=3, label_dim=10, seed=0):
    return labelled_batch(num_images, [channels, resolution, resolution], label_dim, seed)


@torch.no_grad()
def _batched(fn, z, labels, batch):
    return torch.cat([fn(z[i:i + batch], None if labels is None else labels[i:i + batch]) for i in range(0, len(z), batch)])


def _demo_fid_and_accuracy(images, labels):
    m = demo_metrics(images.clamp(-1, 1), labels, ref_stats=demo_reference_stats())
    return dict(demo_fid=float(m['fid']), demo_accuracy=m['accuracy'])


def compare_demo_generators(init_path, snapshot_path, num_images=500, batch=100, heun_steps=18, heun_bf16=None, known=None,
                            device='cpu'):
    """Rows of {name, nfe, fid, accuracy, num_images} for (a), (b), (c), generated on `device`.

    known: {'raw': metrics, 'tuned': metrics} (the {'demo_fid', 'demo_accuracy'} of `one_step_demo_metrics`) for
    one-step rows the training run already measured on the same latents: the EMA at 0 kimg is the raw pre-trained
    generator and the last snapshot is the fine-tuned one, so those rows are not generated twice.
    heun_bf16: whether the teacher's 35 network evaluations per image run under bf16 autocast; None = where the
    device runs bf16 natively, as the demo's generator trains (--precision auto). The ODE state stays float64.
    """
    known = known or {}
    device = torch.device(device)
    heun_bf16 = native_bf16(device.type) if heun_bf16 is None else heun_bf16
    one_step = one_step_demo_metrics(num_images, batch)  # the same evaluation the training run makes

    rows = []
    for key, name, nfe, measure in [
        ('raw', '(a) pre-trained, raw one step', 1, lambda: one_step(load_network(init_path, device, as_class='D2OPrecond'))),
        ('heun', f'(b) pre-trained + Heun sampler ({heun_steps} steps{", bf16" if heun_bf16 else ""})', 2 * heun_steps - 1,
         lambda: teacher_demo_metrics(init_path, num_images, batch, heun_steps, heun_bf16, device)),
        ('tuned', '(c) fine-tuned one-step generator', 1, lambda: one_step(load_network(snapshot_path, device))),
    ]:
        m = known[key] if key in known else measure()
        rows.append(dict(name=name, nfe=nfe, fid=float(m['demo_fid']), accuracy=m['demo_accuracy'], num_images=num_images))
    return rows


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the teacher row is computed with: the network, sampler, checkpoint and kernel code, the demo data's builder,
# the demo classifier and its weights.
TEACHER_CODE = ('assets', 'checkpoint', 'data', 'metrics', 'nets', 'ops')
TEACHER_FILES = ('.py', '.safetensors')


def teacher_cache_path(init_path, num_images, batch, heun_steps, bf16, device):
    """Where the teacher row for these inputs is kept (D2O_FAST_CACHE/teacher-rows/). The row depends only on the
    checkpoint's bytes, the evaluation's settings, the device type, torch and the code of TEACHER_CODE, and all of
    them are in the key: a change to any of them computes it again."""
    key = json.dumps(dict(checkpoint=file_sha256(init_path), num_images=num_images, batch=batch, heun_steps=heun_steps,
                          bf16=bool(bf16), device=torch.device(device).type, torch=torch.__version__,
                          code={name: sources_sha256(os.path.join(PACKAGE_DIR, name), TEACHER_FILES) for name in TEACHER_CODE}),
                     sort_keys=True)
    return os.path.join(cache_dir(), 'teacher-rows', hashlib.sha256(key.encode()).hexdigest()[:32] + '.json')


def teacher_demo_metrics(init_path, num_images=500, batch=100, heun_steps=18, bf16=None, device='cpu'):
    """{'demo_fid', 'demo_accuracy'} of the pre-trained denoiser with EDM's Heun sampler on `device`, on the
    evaluation's seeds (under bf16 autocast where the device runs bf16 natively, unless `bf16` says otherwise).

    Its 35 network evaluations per image cost minutes on a CPU, and the result is the same for every run from the
    same checkpoint, so it is computed once per key (teacher_cache_path) and read back afterwards."""
    device = torch.device(device)
    bf16 = native_bf16(device.type) if bf16 is None else bf16
    path = teacher_cache_path(init_path, num_images, batch, heun_steps, bf16, device)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)['metrics']
    metrics = _teacher_metrics(init_path, num_images, batch, heun_steps, bf16, device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, dict(metrics=metrics, checkpoint=os.path.abspath(init_path), num_images=num_images,
                          heun_steps=heun_steps, bf16=bool(bf16), device=device.type, torch=torch.__version__))
    return metrics


def _teacher_metrics(init_path, num_images, batch, heun_steps, bf16, device):
    teacher = load_network(init_path, device)
    z, labels = demo_latents(num_images, teacher.img_resolution, teacher.img_channels, teacher.label_dim)
    sample = lambda zz, c: edm_sampler(teacher, zz.to(device), None if c is None else c.to(device),
                                       num_steps=heun_steps).cpu()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        images = _batched(sample, z, labels, batch)
    return _demo_fid_and_accuracy(images, labels)


def one_step_demo_metrics(num_images=500, batch=250):
    """A callable net -> {'demo_fid', 'demo_accuracy'} for a one-step generator, on fixed seeds (progress tracking)."""
    def evaluate(net):
        z, labels = demo_latents(num_images, net.img_resolution, net.img_channels, net.label_dim)
        device = next(net.parameters()).device
        images = _batched(lambda zz, c: net.generate(zz.to(device), None if c is None else c.to(device)).cpu(), z, labels, batch)
        return _demo_fid_and_accuracy(images, labels)
    return evaluate


def format_demo_table(rows):
    lines = ['| generator | NFE | demo-FID | class accuracy |', '|---|---|---|---|']
    for r in rows:
        acc = '-' if r['accuracy'] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {r['name']} | {r['nfe']} | {r['fid']:.2f} | {acc} |")
    return '\n'.join(lines)


def write_demo_report(run_dir, rows):
    write_json(os.path.join(run_dir, 'demo-eval.json'), rows)
    write_text(os.path.join(run_dir, 'demo-eval.md'), format_demo_table(rows) + '\n')
