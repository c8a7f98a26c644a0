"""Training configuration: one dataclass, one preset table, the resolved config written to the run folder.

Presets reproduce the authors' runs (Zyriix/D2O train.sh, see shared/reference/d2o.md); every field can be
overridden from the command line. `demo` is the default: it runs on a laptop CPU with data and a
pretrained model that ship with the package.
"""

import dataclasses
import hashlib
import json
from typing import Optional

# R1's weight relative to the GAN loss, as in the authors' runs (n = 64 images per GPU: batch 256 on 4 GPUs).
# Their loss on one GPU, with logits l[b, i, k] of feature network b, image i, position k (K_b per network):
#   GAN = sum_i sum_b mean_k softplus(+-l[b, i, k])                  summed over the GPU's n images
#   R1  = 16 * gamma / 2 * mean_i |d(sum_{b,k} l[b, i, k]) / dx_i|^2   averaged over the images, gamma = 1e-4
# and DDP averages the GPUs' gradients, so over the global batch their gradient is n x that of the image mean
# for the GAN term and that of the image mean for R1. Here both terms are image means (a run does not depend on
# the number of GPUs): GAN = mean_i sum_b mean_k softplus(+-l), R1 = 16 * gamma / 2 * mean_i |...|^2. The ratio
# R1 : GAN is theirs when gamma = 1e-4 / n = 1e-4 / 64. The common 1/n of both terms leaves Adam's steps
# unchanged (Adam is invariant to a gradient scale, up to its eps of 1e-8).
AUTHORS_R1_GAMMA = 1e-4
AUTHORS_IMAGES_PER_GPU = 64


@dataclasses.dataclass
class RunConfig:
    """What every training loop shares: data, batch, duration, run folder, progress and checkpoints."""
    preset: str = 'demo'
    data: str = 'demo'                      # dataset zip, image folder, .npy/.npz, or 'demo'
    xflip: bool = False
    batch: int = 256                        # global batch = batch_gpu x ranks x accumulation rounds
    batch_gpu: Optional[int] = None         # per-device batch; None = batch / ranks
    kimg: float = 5000                      # training duration in thousands of images
    precision: str = 'auto'                 # the U-Net: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32
    compile: bool = False                   # torch.compile G and D forward (static shapes, fullgraph); R1 stays eager
    channels_last: bool = False             # NHWC memory layout for G and D
    cudagraphs: bool = False                # CUDA only: compile mode='reduce-overhead' (implies --compile)
    checkpointing: bool = False             # recompute U-Net block activations in backward (less memory, more compute)
    kernels: str = 'auto'                   # fused GroupNorm backend: auto, triton, cuda, cpu, torch
    data_backend: str = 'auto'              # auto, native, dali
    workers: int = 2
    outdir: str = 'training-runs'
    run_dir: Optional[str] = None           # explicit run folder (otherwise outdir/NNNNN-preset-...)
    resume: str = 'auto'                    # auto, none, or a training-state path
    seed: int = 0
    tick_kimg: float = 50
    snapshot_ticks: int = 10                # snapshot + image grid every N ticks
    checkpoint_ticks: int = 10              # full training state every N ticks
    keep_checkpoints: int = 3
    nan_patience: int = 20                  # stop after this many consecutive non-finite steps
    grid_size: int = 64                     # images in the progress grid
    profile: bool = False

    # Fields that say where and how a run is executed, not what it computes.
    EXECUTION_FIELDS = ('outdir', 'run_dir', 'resume', 'workers', 'profile', 'tick_kimg', 'snapshot_ticks',
                        'checkpoint_ticks', 'keep_checkpoints', 'data_backend', 'kernels', 'compile', 'channels_last',
                        'cudagraphs', 'checkpointing', 'eval_demo',
                        'eval_images', 'disc_pair_forward', 'compile_fakes')

    def resolved_batch_gpu(self, world_size):
        per_rank = self.batch // world_size
        if self.batch % world_size:
            raise ValueError(f'--batch {self.batch} is not divisible by the number of processes ({world_size})')
        batch_gpu = self.batch_gpu or per_rank
        if per_rank % batch_gpu:
            raise ValueError(f'--batch {self.batch} / {world_size} processes = {per_rank} is not a multiple of --batch-gpu {batch_gpu}')
        return batch_gpu, per_rank // batch_gpu

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def identity(self):
        """Hash of what defines the run (not where it is written or how it resumes)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EXECUTION_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self):
        checks = [
            (self.precision in ('auto', 'bf16', 'fp16', 'fp32'), f'--precision must be auto, bf16, fp16 or fp32, got {self.precision!r}'),
            (self.batch > 0 and (self.batch_gpu is None or self.batch_gpu > 0), '--batch and --batch-gpu must be positive'),
            (self.kimg > 0, '--kimg must be positive'),
            (self.kernels in ('auto', 'triton', 'cuda', 'cpu', 'torch'), f'--kernels must be auto, triton, cuda, cpu or torch, got {self.kernels!r}'),
            (self.data_backend in ('auto', 'native', 'dali'), f'--data-backend must be auto, native or dali, got {self.data_backend!r}'),
            (self.tick_kimg > 0 and self.snapshot_ticks >= 1 and self.checkpoint_ticks >= 1, 'tick and snapshot intervals must be positive'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """D2O / D2O-F fine-tuning of a pretrained EDM U-Net into a one-step generator."""
    init: str = 'demo'                      # EDM .pkl, D2O .pkl, project snapshot, 'random', or 'demo'
    arch: Optional[str] = None              # architecture for --init random: ddpmpp, ncsnpp, adm
    reinit: bool = False                    # keep --init's architecture, re-initialise its weights (no pre-training)
    cond: Optional[bool] = None             # None: follow the network's label_dim
    freeze: int = 1                         # D2O-F freeze level 0-3 (0 = D2O)

    # Discriminator.
    disc: str = 'stylegan2'                 # 'projected' (the paper's) or 'stylegan2' (needs no weights)
    disc_backbones: tuple = ('vgg16_bn', 'tf_efficientnet_lite0')
    disc_weights: Optional[str] = None      # folder with timm-format backbone weights (offline clusters)
    disc_channels: int = 64                 # stylegan2: channel width (max)
    disc_precision: str = 'fp32'            # fp32 (the authors'), bf16
    disc_pair_forward: bool = True          # D step: fakes and reals in one discriminator pass (same result)
    # With --compile: also compile the D step's no-grad generator forward. None = on CUDA only: on this 2-core CPU
    # it saved 0.014 s of a 0.69 s demo step (eager 0.138 s, compiled 0.124 s) but its own graph added 59 s of
    # cold-cache compile to the demo's 208 s (probe in the issue 4 note).
    compile_fakes: Optional[bool] = None

    # Optimisation (Adam betas (0, 0.99), eps 1e-8 for both networks).
    lr: float = 1e-4
    dlr: float = 1e-4
    r1_gamma: float = AUTHORS_R1_GAMMA / AUTHORS_IMAGES_PER_GPU
    r1_interval: int = 16
    ema_mimg: float = 0.5                   # EMA half-life in millions of images ...
    ema_rampup: float = 0.05                # ... capped at this fraction of the images seen
    eval_demo: bool = False                 # demo: evaluate before/after and print the table
    eval_images: int = 500                  # samples per generator in that table

    def validate(self):
        super().validate()
        checks = [
            (self.freeze in (0, 1, 2, 3), f'--freeze must be 0-3, got {self.freeze}'),
            (self.disc in ('projected', 'stylegan2'), f'--disc must be projected or stylegan2, got {self.disc!r}'),
            (self.disc_precision in ('bf16', 'fp32'), f'--disc-precision must be bf16 or fp32, got {self.disc_precision!r}'),
            (self.lr > 0 and self.dlr > 0, '--lr and --dlr must be positive'),
            (self.r1_interval >= 1 and self.r1_gamma >= 0, '--r1-interval must be >= 1 and --r1-gamma >= 0'),
            (self.init != 'random' or self.arch in ('ddpmpp', 'ncsnpp', 'adm'), '--init random needs --arch ddpmpp, ncsnpp or adm'),
            (not (self.reinit and self.freeze), '--reinit trains from random weights: freezing them (--freeze > 0) makes no sense'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass
class PretrainConfig(RunConfig):
    """EDM diffusion pre-training (the generative pre-training D2O starts from)."""
    arch: str = 'ddpmpp'                    # ddpmpp, ncsnpp, adm
    model_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    cond: bool = True
    lr: float = 1e-3
    lr_rampup_kimg: float = 10
    ema_mimg: float = 0.05
    ema_rampup: float = 0.05
    p_mean: float = -1.2                    # EDM's log-normal noise level distribution
    p_std: float = 1.2
    sigma_data: float = 0.5
    grid_steps: int = 18                    # Heun steps for the progress grid

    def validate(self):
        super().validate()
        if self.arch not in ('ddpmpp', 'ncsnpp', 'adm'):
            raise ValueError(f'--arch must be ddpmpp, ncsnpp or adm, got {self.arch!r}')
        if self.lr <= 0:
            raise ValueError('--lr must be positive')


#----------------------------------------------------------------------------
# Presets: the authors' runs, and the CPU demo.

def _projected(backbones):
    return dict(disc='projected', disc_backbones=backbones)


CIFAR_DISC = _projected(('vgg16_bn', 'tf_efficientnet_lite0'))
FACES_DISC = _projected(('deit_base_distilled_patch16_224', 'tf_efficientnet_lite0'))

PRESETS = {
    'cifar10-uncond': dict(init='pretrained/edm-cifar10-32x32-uncond-ve.pkl', data='datasets/cifar10-32x32.zip', cond=False,
                           batch=256, lr=1e-4, dlr=1e-4, ema_mimg=0.5, kimg=5000, freeze=0, **CIFAR_DISC),
    'cifar10-cond':   dict(init='pretrained/edm-cifar10-32x32-cond-ve.pkl', data='datasets/cifar10-32x32.zip', cond=True,
                           batch=256, lr=1e-4, dlr=1e-4, ema_mimg=0.5, kimg=5000, freeze=0, **CIFAR_DISC),
    'afhqv2-64':      dict(init='pretrained/edm-afhqv2-64x64-uncond-ve.pkl', data='datasets/afhqv2-64x64.zip', cond=False,
                           batch=256, lr=2e-5, dlr=4e-5, ema_mimg=0.5, kimg=10000, freeze=0, **FACES_DISC),
    'ffhq-64':        dict(init='pretrained/edm-ffhq-64x64-uncond-ve.pkl', data='datasets/ffhq-64x64.zip', cond=False,
                           batch=256, lr=2e-5, dlr=4e-5, ema_mimg=0.5, kimg=10000, freeze=0, **FACES_DISC),
    'imagenet-64':    dict(init='pretrained/edm-imagenet-64x64-cond-adm.pkl', data='datasets/imagenet-64x64.zip', cond=True,
                           batch=512, lr=8e-6, dlr=4e-5, ema_mimg=50, kimg=10000, freeze=0, **FACES_DISC),
    # The CPU demo: the shipped pre-trained digits model, D2O-F, a small from-scratch discriminator.
    # The discriminator is StyleGAN2-style with equalised learning rate, hence its larger lr. The EMA's half-life
    # ramps up to a quarter of the images seen (1250 at the end): with the authors' 5% it would be 250 images,
    # about 16 steps, and the end point would follow the raw generator's oscillation at this learning rate.
    'demo':           dict(init='demo', data='demo', cond=True, freeze=1, disc='stylegan2', disc_channels=64,
                           batch=16, lr=1e-3, dlr=2e-3, ema_mimg=0.01, ema_rampup=0.25, kimg=5, tick_kimg=0.5,
                           snapshot_ticks=4, checkpoint_ticks=4, eval_demo=True, precision='bf16'),
}


def resolve_config(preset='demo', cls=TrainConfig, presets=None, **overrides):
    """Preset values, then explicit overrides (None means 'not given')."""
    presets = PRESETS if presets is None else presets
    if preset not in presets:
        raise ValueError(f'unknown preset {preset!r}; expected one of {", ".join(sorted(presets))}')
    values = dict(presets[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f'unknown config fields: {", ".join(unknown)}')
    cfg = cls(**values)
    cfg.validate()
    return cfg


# EDM pre-training presets: the small digits model that ships as the demo's starting point.
PRETRAIN_PRESETS = {
    'demo': dict(data='demo', arch='ddpmpp', model_channels=32, channel_mult=(1, 2, 2), num_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, cond=True, batch=32, lr=1e-3, kimg=24, ema_mimg=0.05,
                 precision='bf16', tick_kimg=2, snapshot_ticks=5, checkpoint_ticks=1, grid_size=40),
}
