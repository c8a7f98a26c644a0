"""Discriminators: the Projected-GAN discriminator on frozen pretrained backbones, and a from-scratch
residual StyleGAN2 discriminator. `build_discriminator` is the one constructor other layers use.

Same layer as d2o_fast.nets: imports only torch (and optionally timm / safetensors for weights).
"""

from d2o_fast.discriminators.backbones import BACKBONES, build_backbone, fold_batchnorm
from d2o_fast.discriminators.errors import BackboneWeightsError, DiscriminatorConfigError
from d2o_fast.discriminators.projected import ProjectedDiscriminator
from d2o_fast.discriminators.stylegan2 import StyleGAN2Discriminator
from d2o_fast.discriminators.weights import load_backbone_weights

# The authors' backbone pairs by dataset resolution (CIFAR-10 / 64x64 datasets).
DEFAULT_BACKBONES = {
    32: ('vgg16_bn', 'tf_efficientnet_lite0'),
    64: ('deit_base_distilled_patch16_224', 'tf_efficientnet_lite0'),
}

DISCRIMINATOR_KINDS = ('projected', 'stylegan2')


def logit_parts(logits):
    """A discriminator's output as a list of logit tensors [B, ...]: one per feature network of the projected
    discriminator (it returns a tuple), or the single tensor of the StyleGAN2 discriminator."""
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def build_discriminator(kind, img_resolution, img_channels=3, c_dim=0, **kwargs):
    """A discriminator by kind: 'projected' (kwargs of ProjectedDiscriminator) or 'stylegan2'.

    For 'projected' without `backbones`, the authors' pair for the resolution is used
    (vgg16_bn + tf_efficientnet_lite0 up to 32x32, deit_base_distilled + tf_efficientnet_lite0 above).
    The result carries `build_kwargs`: the arguments that rebuild the same architecture. Its
    state dict holds everything else (backbone weights, fixed projections, heads), so a resume
    can rebuild with `build_discriminator(**d.build_kwargs, pretrained=False)` and load the state
    dict without the pretrained weight files.
    """
    if kind == 'projected':
        if img_channels != 3:
            raise DiscriminatorConfigError(f'the projected discriminator needs RGB images (img_channels=3), got {img_channels}')
        kwargs.setdefault('backbones', DEFAULT_BACKBONES[32] if img_resolution <= 32 else DEFAULT_BACKBONES[64])
        d = ProjectedDiscriminator(c_dim=c_dim, **kwargs)
    elif kind == 'stylegan2':
        kwargs.pop('pretrained', None)  # nothing pretrained in a from-scratch discriminator
        kwargs.pop('weights_dir', None)
        d = StyleGAN2Discriminator(img_resolution=img_resolution, img_channels=img_channels, c_dim=c_dim, **kwargs)
    else:
        raise DiscriminatorConfigError(f'unknown discriminator kind {kind!r}; expected one of {list(DISCRIMINATOR_KINDS)}')
    d.build_kwargs = dict(kind=kind, img_resolution=img_resolution, img_channels=img_channels, c_dim=c_dim,
                          **{k: v for k, v in kwargs.items() if k not in ('pretrained', 'weights_dir')})
    return d


__all__ = ['build_discriminator', 'logit_parts', 'DISCRIMINATOR_KINDS', 'DEFAULT_BACKBONES', 'ProjectedDiscriminator',
           'StyleGAN2Discriminator', 'BACKBONES', 'build_backbone', 'fold_batchnorm', 'load_backbone_weights',
           'DiscriminatorConfigError', 'BackboneWeightsError']
