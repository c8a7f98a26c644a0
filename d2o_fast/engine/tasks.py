"""What each training task builds from its config: networks, discriminator, trainer, and how to draw a grid.

    build_d2o_task  - D2O / D2O-F: a D2OPrecond generator from --init, a discriminator, the GAN trainer.
    build_edm_task  - EDM pre-training: an EDMPrecond denoiser from an architecture preset.
"""

import dataclasses
import os
from typing import Callable, Optional

from d2o_fast import assets
from d2o_fast.checkpoint import load_network
from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine.edm_trainer import EDMTrainer
from d2o_fast.engine.trainer import D2OTrainer
from d2o_fast.errors import D2OFastError
from d2o_fast.nets import architecture_kwargs, build_network, edm_sampler, format_freeze_report, freeze_report


class SetupError(D2OFastError, ValueError):
    """The config asks for something the given network or data cannot do."""


@dataclasses.dataclass
class Task:
    trainer: object                  # step(images, labels, step, images_seen, rank) -> dict; state_dict(); G; G_ema
    description: str                 # run folder suffix
    header: list                     # lines printed at the start of a run
    sample: Callable                 # sample(net, z, labels) -> images in [-1, 1] for the progress grid
    base_path: Optional[str] = None  # checkpoint the frozen weights come from (D2O-F partial snapshots)
    partial_snapshots: bool = False
    evaluate: Optional[Callable] = None  # evaluate(ema_net) -> dict of metrics, at every snapshot


def resolve_init_path(init):
    return assets.demo_checkpoint_path() if init == 'demo' else init


def resolve_data_path(data):
    return assets.demo_dataset_path() if data == 'demo' else data


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


#----------------------------------------------------------------------------

def build_generator(cfg, dataset):
    """The one-step generator: a D2OPrecond from --init (EDM / D2O pickle or snapshot) or random.
    Dropout is off, as in the authors' runs (--dropout=0)."""
    G, path = _load_or_build_generator(cfg, dataset)
    return G.set_dropout(0), path


def _load_or_build_generator(cfg, dataset):
    if cfg.init == 'random':
        label_dim = dataset.label_dim if cfg.cond in (None, True) else 0
        kwargs = architecture_kwargs(cfg.arch, dataset.resolution, dataset.channels, label_dim, dropout=0)
        return build_network('D2OPrecond', **kwargs), None
    path = resolve_init_path(cfg.init)
    G = load_network(path, as_class='D2OPrecond')
    if cfg.cond is True and G.label_dim == 0:
        raise SetupError(f'--cond requested but the network in {path} is unconditional')
    if cfg.reinit:  # the paper's negative control: the same architecture without generative pre-training
        return build_network('D2OPrecond', **G.init_kwargs), None
    return G, path


def one_step_sample(net, z, labels):
    return net.generate(z, labels)


def build_d2o_task(cfg, dataset, device, batch_gpu, rounds):
    G, base_path = build_generator(cfg, dataset)
    D = build_discriminator(cfg.disc, img_resolution=G.img_resolution, img_channels=G.img_channels, c_dim=G.label_dim,
                            **discriminator_kwargs(cfg))
    trainer = D2OTrainer(G, D, cfg, device, batch_gpu, rounds)
    header = [
        f'Generator: D2OPrecond/{G.init_kwargs.get("model_type")} from {base_path or "random init"}, freeze level {cfg.freeze}',
        format_freeze_report(freeze_report(trainer.G)),
        f'Discriminator: {cfg.disc}, {sum(p.numel() for p in trainer.d_params):,} trainable parameters',
        trainer.speed_summary(),
    ]
    desc = f'{cfg.preset}-{_stem(cfg.data)}-freeze{cfg.freeze}-{cfg.disc}-batch{cfg.batch}'
    evaluate = None
    if cfg.eval_demo:
        from d2o_fast.metrics.demo_report import one_step_demo_metrics
        evaluate = one_step_demo_metrics(cfg.eval_images)
    return Task(trainer, desc, header, one_step_sample, base_path, partial_snapshots=cfg.freeze > 0 and base_path is not None,
                evaluate=evaluate)


def discriminator_kwargs(cfg):
    """build_discriminator kwargs of the config (besides kind, resolution, channels and labels)."""
    if cfg.disc == 'projected':
        return dict(backbones=tuple(cfg.disc_backbones), weights_dir=cfg.disc_weights, pretrained=True,
                    channels_last=cfg.channels_last)
    return dict(channel_max=cfg.disc_channels)


#----------------------------------------------------------------------------

def build_edm_task(cfg, dataset, device, batch_gpu, rounds):
    label_dim = dataset.label_dim if cfg.cond else 0
    if cfg.cond and not label_dim:
        raise SetupError(f'--cond needs a labelled dataset; {cfg.data} has no labels')
    kwargs = architecture_kwargs(cfg.arch, dataset.resolution, dataset.channels, label_dim, model_channels=cfg.model_channels,
                                 channel_mult=list(cfg.channel_mult), num_blocks=cfg.num_blocks,
                                 attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout)
    net = build_network('EDMPrecond', **kwargs)
    trainer = EDMTrainer(net, cfg, device, batch_gpu, rounds)
    n = sum(p.numel() for p in net.parameters())
    header = [f'Denoiser: EDMPrecond/{kwargs["model_type"]} ({cfg.arch}), {n:,} parameters, label_dim {label_dim}']
    desc = f'pretrain-{_stem(cfg.data)}-{cfg.arch}-c{cfg.model_channels}-batch{cfg.batch}'

    def heun_sample(net, z, labels):
        return edm_sampler(net, z, labels, num_steps=cfg.grid_steps)
    return Task(trainer, desc, header, heun_sample)
