"""Training configuration: one dataclass, one preset table, the resolved config written to the run folder.

Presets reproduce the authors' runs (Zyriix/D2O train.sh, see shared/reference/d2o.md); every field can be
overridden from the command line. `demo` is the default: it runs on a laptop CPU with data and a
pretrained model that ship with the package.
"""

import dataclasses
import hashlib
import json
from typing import Optional

from d2o_fast.data import BACKENDS as DATA_BACKENDS
from d2o_fast.discriminators import BACKBONES, DISCRIMINATOR_KINDS
from d2o_fast.engine.compile import CUDAGRAPH_MODES
from d2o_fast.engine.optim import DISC_PRECISIONS, PRECISIONS
from d2o_fast.errors import ConfigError
from d2o_fast.nets import ARCHITECTURES
from d2o_fast.nets.freeze import FREEZE_KEYS
from d2o_fast.ops import BACKENDS as KERNEL_BACKENDS

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


#----------------------------------------------------------------------------
# Fields: each declares its default, its help line, its --help group and (for choices) the registry it takes its
# allowed values from. d2o_fast/cli.py builds the flags from these; validate() checks against the same registries.

FLAG_GROUPS = {
    'data': 'the training images',
    'model': 'the networks: where the generator comes from, what is frozen, the discriminator',
    'optimisation': 'what is computed: batch, duration, learning rates, regularisation, EMA, seed',
    'speed': 'how it runs (results differ at most by rounding)',
    'run folder': 'where results go and how often: progress, snapshots, training states, evaluation',
}


def option(default, group, help, choices=None, bare=None):
    """A config field with its --help line and group; `choices`: the registry of allowed values (a tuple field's
    items each come from it; None stays allowed where it is the default); `bare`: the value of the flag given
    without one."""
    assert group in FLAG_GROUPS, group
    return dataclasses.field(default=default, metadata=dict(group=group, help=help, choices=choices, bare=bare))


@dataclasses.dataclass
class RunConfig:
    """What every training loop shares: data, batch, duration, run folder, progress and checkpoints."""
    preset: str = option('demo', 'run folder', 'preset the other fields start from')
    data: str = option('demo', 'data', "dataset zip, image folder, .npy/.npz, or 'demo'")
    xflip: bool = option(False, 'data', 'random horizontal flips')
    workers: int = option(2, 'data', 'data loader threads')
    data_backend: str = option('auto', 'data', 'loader: auto = DALI on CUDA when it can read the data, else native',
                               choices=DATA_BACKENDS)
    batch: int = option(256, 'optimisation', 'global batch = batch-gpu x processes x accumulation rounds')
    batch_gpu: Optional[int] = option(None, 'optimisation', 'per-device batch (unset: batch / processes)')
    kimg: float = option(5000, 'optimisation', 'training duration in thousands of images')
    seed: int = option(0, 'optimisation', 'seed of weights, data order and noise')
    # Steps never read their losses on the host: the check (and the refusal to save a snapshot or state when the
    # tick's last step was non-finite) runs at the end of each tick, at the first tick boundary after the limit.
    nan_patience: int = option(20, 'optimisation', 'stop after this many consecutive steps with non-finite losses '
                               '(checked at tick boundaries)')
    precision: str = option('auto', 'speed', 'autocast of the U-Net: auto = bf16 where the device runs it natively (CUDA, AVX512/AMX CPUs), else fp32',
                            choices=PRECISIONS)
    compile: bool = option(False, 'speed', 'torch.compile G and D forward (static shapes, fullgraph); R1 stays eager')
    channels_last: bool = option(False, 'speed', 'NHWC memory layout for the trained networks')
    cudagraphs: str = option('off', 'speed', "CUDA only (implies --compile): networks = CUDA graph trees per network "
                             "forward/backward; step = one graph of G step + D step + EMA, one process",
                             choices=CUDAGRAPH_MODES, bare='step')
    checkpointing: bool = option(False, 'speed', 'recompute U-Net block activations in backward (less memory)')
    kernels: str = option('auto', 'speed', 'fused GroupNorm backend: auto = the fastest that runs on the device',
                          choices=KERNEL_BACKENDS)
    outdir: str = option('training-runs', 'run folder', 'parent of the numbered run folders')
    run_dir: Optional[str] = option(None, 'run folder', 'explicit run folder (unset: outdir/NNNNN-preset-...)')
    resume: str = option('auto', 'run folder', "auto (this config's latest state), none, or a training-state path")
    tick_kimg: float = option(50, 'run folder', 'thousands of images per status line')
    snapshot_ticks: int = option(10, 'run folder', 'snapshot + image grid every N ticks')
    checkpoint_ticks: int = option(10, 'run folder', 'full training state every N ticks')
    keep_checkpoints: int = option(3, 'run folder', 'training states kept')
    grid_size: int = option(64, 'run folder', 'images in the progress grid')
    profile: bool = option(False, 'run folder', 'torch.profiler trace of a few steps into the run folder')

    # Fields that say where and how a run is executed, not what it computes.
    EXECUTION_FIELDS = ('outdir', 'run_dir', 'resume', 'workers', 'profile', 'tick_kimg', 'snapshot_ticks',
                        'checkpoint_ticks', 'keep_checkpoints', 'data_backend', 'kernels', 'compile', 'channels_last',
                        'cudagraphs', 'checkpointing', 'eval_demo',
                        'eval_images', 'disc_pair_forward', 'compile_fakes')

    def resolved_batch_gpu(self, world_size):
        per_rank = self.batch // world_size
        if self.batch % world_size:
            raise ConfigError(f'--batch {self.batch} is not divisible by the number of processes ({world_size})')
        batch_gpu = self.batch_gpu or per_rank
        if per_rank % batch_gpu:
            raise ConfigError(f'--batch {self.batch} / {world_size} processes = {per_rank} is not a multiple of --batch-gpu {batch_gpu}')
        return batch_gpu, per_rank // batch_gpu

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def identity(self):
        """Hash of what defines the run (not where it is written or how it resumes)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EXECUTION_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self):
        """Raise ConfigError for a value outside its field's registry or a failed check of `checks()`."""
        for field in dataclasses.fields(self):
            choices = field.metadata.get('choices')
            value = getattr(self, field.name)
            if choices is None or (value is None and field.default is None):
                continue
            for item in value if isinstance(value, tuple) else (value,):
                if item not in choices:
                    each = 'each name in ' if isinstance(value, tuple) else ''
                    raise ConfigError(f'{each}{flag_name(field.name)} must be {describe_choices(choices)}, got {item!r}')
        for ok, message in self.checks():
            if not ok:
                raise ConfigError(message)

    def checks(self):
        """(condition, message) pairs beyond the registries."""
        return [
            (self.batch > 0 and (self.batch_gpu is None or self.batch_gpu > 0), '--batch and --batch-gpu must be positive'),
            (self.kimg > 0, '--kimg must be positive'),
            (self.nan_patience >= 1, '--nan-patience must be at least 1'),
            (self.tick_kimg > 0 and self.snapshot_ticks >= 1 and self.checkpoint_ticks >= 1, 'tick and snapshot intervals must be positive'),
        ]


def flag_name(field_name):
    return '--' + field_name.replace('_', '-')


def describe_choices(choices):
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f'{", ".join(names[:-1])} or {names[-1]}'


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """D2O / D2O-F fine-tuning of a pretrained EDM U-Net into a one-step generator."""
    init: str = option('demo', 'model', "EDM .pkl, D2O .pkl, project snapshot, 'random', or 'demo'")
    arch: Optional[str] = option(None, 'model', 'architecture for --init random', choices=tuple(ARCHITECTURES))
    reinit: bool = option(False, 'model', "keep --init's architecture, re-initialise its weights (no pre-training)")
    cond: Optional[bool] = option(None, 'model', "class-conditional (unset: follow the network's label_dim)")
    freeze: int = option(1, 'model', 'D2O-F freeze level (0 = D2O: train every weight)', choices=tuple(FREEZE_KEYS))

    # Discriminator.
    disc: str = option('stylegan2', 'model', "'projected' (the paper's) or 'stylegan2' (needs no weights)",
                       choices=DISCRIMINATOR_KINDS)
    disc_backbones: tuple = option(('vgg16_bn', 'tf_efficientnet_lite0'), 'model', 'projected: feature networks',
                                   choices=tuple(BACKBONES))
    disc_weights: Optional[str] = option(None, 'model', 'projected: folder of timm-format backbone weights (offline)')
    disc_channels: int = option(64, 'model', 'stylegan2: channel width (max)')
    disc_precision: str = option('fp32', 'speed', "autocast of the discriminator (fp32 is the authors')",
                                 choices=DISC_PRECISIONS)
    disc_pair_forward: bool = option(True, 'speed', 'D step: fakes and reals in one discriminator pass (same result)')
    # On a CPU the compiled no-grad forward saves little of the demo step and adds its own graph's compile time.
    compile_fakes: Optional[bool] = option(None, 'speed', "with --compile, also compile the D step's generator "
                                           'forward (unset: on CUDA only)')

    # Optimisation (Adam betas (0, 0.99), eps 1e-8 for both networks).
    lr: float = option(1e-4, 'optimisation', 'generator learning rate')
    dlr: float = option(1e-4, 'optimisation', 'discriminator learning rate')
    r1_gamma: float = option(AUTHORS_R1_GAMMA / AUTHORS_IMAGES_PER_GPU, 'optimisation', 'R1 weight (batch mean)')
    r1_interval: int = option(16, 'optimisation', 'lazy R1: one R1 step every N steps')
    reuse_fakes: bool = option(False, 'optimisation', "D step on the G step's fakes (detached) and their frozen "
                               "discriminator features: no second G forward or backbone pass, fakes one G update old")
    ema_mimg: float = option(0.5, 'optimisation', 'EMA half-life in millions of images ...')
    ema_rampup: float = option(0.05, 'optimisation', '... capped at this fraction of the images seen')
    eval_demo: bool = option(False, 'run folder', 'demo: evaluate before/after and print the table')
    eval_images: int = option(500, 'run folder', 'samples per generator in that table')

    def checks(self):
        return super().checks() + [
            (self.lr > 0 and self.dlr > 0, '--lr and --dlr must be positive'),
            (self.r1_interval >= 1 and self.r1_gamma >= 0, '--r1-interval must be >= 1 and --r1-gamma >= 0'),
            (self.init != 'random' or self.arch is not None,
             f'--init random needs --arch {describe_choices(tuple(ARCHITECTURES))}'),
            (not (self.reinit and self.freeze), '--reinit trains from random weights: freezing them (--freeze > 0) makes no sense'),
        ]


@dataclasses.dataclass
class PretrainConfig(RunConfig):
    """EDM diffusion pre-training (the generative pre-training D2O starts from)."""
    arch: str = option('ddpmpp', 'model', 'U-Net architecture', choices=tuple(ARCHITECTURES))
    model_channels: int = option(32, 'model', 'channels at the highest resolution')
    channel_mult: tuple = option((1, 2, 2), 'model', 'channel multiplier per resolution')
    num_blocks: int = option(2, 'model', 'residual blocks per resolution')
    attn_resolutions: tuple = option((16,), 'model', 'resolutions with self-attention')
    dropout: float = option(0.1, 'model', 'dropout probability')
    cond: bool = option(True, 'model', 'class-conditional (needs a labelled dataset)')
    lr: float = option(1e-3, 'optimisation', 'learning rate')
    lr_rampup_kimg: float = option(10, 'optimisation', 'linear learning-rate warm-up, thousands of images')
    ema_mimg: float = option(0.05, 'optimisation', 'EMA half-life in millions of images ...')
    ema_rampup: float = option(0.05, 'optimisation', '... capped at this fraction of the images seen')
    p_mean: float = option(-1.2, 'optimisation', "mean of EDM's log-normal noise levels")
    p_std: float = option(1.2, 'optimisation', "standard deviation of EDM's log-normal noise levels")
    sigma_data: float = option(0.5, 'optimisation', 'standard deviation of the data')
    grid_steps: int = option(18, 'run folder', 'Heun steps for the progress grid')

    def checks(self):
        return super().checks() + [
            (self.lr > 0, '--lr must be positive'),
            (self.cudagraphs == 'off', '--cudagraphs is not implemented for EDM pre-training (the CUDA graphs capture '
                                  "D2O's G and D steps); drop the flag"),
            (self.precision != 'fp16', '--precision fp16 needs loss scaling, which EDM pre-training does not do; '
                                       'use bf16 or fp32'),
        ]


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
    # about 16 steps, and the end point would follow the raw generator's oscillation. G's learning rate is one
    # recipe for D2O and D2O-F, as in the paper: at 3e-4 no D2O-F run rose above its start and D2O only in its first
    # 0.5k images (47.6 and 74.3 on 2 of 3 seeds, from 44.1), recovering by 1k (docs/results/ablation); at 1e-3
    # D2O rose to 212.6 (docs/results/lr-sweep).
    'demo':           dict(init='demo', data='demo', cond=True, freeze=1, disc='stylegan2', disc_channels=64,
                           batch=16, lr=3e-4, dlr=2e-3, ema_mimg=0.01, ema_rampup=0.25, kimg=5, tick_kimg=0.5,
                           snapshot_ticks=4, checkpoint_ticks=4, eval_demo=True, precision='auto'),
}


def _build(preset, cls, presets, overrides):
    presets = PRESETS if presets is None else presets
    if preset not in presets:
        raise ConfigError(f'unknown preset {preset!r}; expected one of {", ".join(sorted(presets))}')
    values = dict(presets[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f'unknown config fields: {", ".join(unknown)}')
    return cls(**values)


def resolve_config(preset='demo', cls=TrainConfig, presets=None, **overrides):
    """Preset values, then explicit overrides (None means 'not given'); validated."""
    cfg = _build(preset, cls, presets, overrides)
    cfg.validate()
    return cfg


def preset_values(preset, cls=TrainConfig, presets=None):
    """{field: value} of a preset (the class defaults where it says nothing), as --help shows them."""
    return dataclasses.asdict(_build(preset, cls, presets, {}))


# EDM pre-training presets: the small digits model that ships as the demo's starting point.
PRETRAIN_PRESETS = {
    'demo': dict(data='demo', arch='ddpmpp', model_channels=32, channel_mult=(1, 2, 2), num_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, cond=True, batch=32, lr=1e-3, kimg=24, ema_mimg=0.05,
                 precision='auto', tick_kimg=2, snapshot_ticks=5, checkpoint_ticks=1, grid_size=40),
}
