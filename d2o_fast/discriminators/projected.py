"""Projected-GAN discriminator: frozen pretrained features, fixed random projections, trainable heads.

Per backbone: image in [-1, 1] -> per-backbone normalisation and bilinear resize to 224 (one
affine + one interpolate) -> frozen feature network (4 scales) -> fixed random
cross-channel mixing (1x1 convs, CCM) and cross-scale mixing (top-down add, x2 bilinear
upsample, 1x1 conv, CSM) -> one small trainable head per scale (spectral-norm 4x4 stride-2
convs, BatchNorm, LeakyReLU 0.2) giving a map of logits. Conditional heads project their
output onto a learned class embedding. The output is one logits tensor per backbone, [B, K_b]
(its heads' maps flattened and concatenated), so that the loss can weigh every backbone
equally whatever its number of logits, as the authors' loss does (engine/gan.py).

The heads' spectral norms are PyTorch's parametrization: 15 power iterations at construction,
then one per call in train mode. The authors' torch.nn.utils.spectral_norm starts from random
vectors without warm-up (one iteration per call, v before u). Both are the same power
iteration on the same weights and reach the same sigma once converged (within a few hundred
calls: benchmarks/results/authors_discriminator.md); the warm-up only spares the first calls
an underestimated sigma.

The random projections (and the ViT token readout of DeiT) are drawn from a generator
seeded by (projection_seed, backbone name) and stored as buffers, so they are in the state
dict and a resumed run continues with exactly the same features. Backbones are always in
eval mode and never require grad; gradients still flow through them to the input image
(the generator step and R1 need d logits / d image).
"""

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from d2o_fast.discriminators.backbones import BACKBONES, build_backbone
from d2o_fast.discriminators.errors import DiscriminatorConfigError

BACKBONE_INPUT_SIZE = 224

#----------------------------------------------------------------------------
# Input preparation: [-1, 1] image -> normalised 224x224 backbone input.

def input_affine(mean, std):
    """(scale, shift) with x * scale + shift == ((x + 1) / 2 - mean) / std, per channel, as float64 [1, C, 1, 1]
    (cast to the input's dtype at use, so that a float64 discriminator normalises exactly)."""
    mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    scale, shift = 0.5 / std, (0.5 - mean) / std
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def prepare_backbone_input(img, scale, shift, size=BACKBONE_INPUT_SIZE):
    """Fused path: one affine (at the input's own, usually small, resolution) and one resize.

    Bilinear interpolation is a convex combination per output pixel, so the per-channel affine
    commutes with it; applying it first touches 49x fewer pixels for 32x32 input.
    """
    x = torch.addcmul(shift.to(img.dtype), img, scale.to(img.dtype))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return x


def prepare_backbone_input_reference(img, mean, std, size=BACKBONE_INPUT_SIZE):
    """Reference: the step-by-step order of the authors' code (map to [0,1], normalise, resize)."""
    x = (img + 1) / 2
    mean, std = (torch.tensor(v, dtype=img.dtype, device=img.device).view(1, -1, 1, 1) for v in (mean, std))
    x = (x - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return x

#----------------------------------------------------------------------------
# Fixed random layers (buffers, never trained).

def projection_generator(seed, backbone_name):
    """Generator for one backbone's random layers: independent of which other backbones are used."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(backbone_name.encode()))


class FixedConv2d(nn.Module):
    """A conv (or transposed conv) with frozen random weights held as buffers.

    Initialised like PyTorch's default Conv2d / ConvTranspose2d (weight and bias uniform in
    +-1/sqrt(fan_in), fan_in = weight.shape[1] * k * k), which is what the authors' frozen
    random layers were.
    """

    def __init__(self, in_channels, out_channels, kernel=1, stride=1, padding=0, transposed=False, generator=None):
        super().__init__()
        self.stride, self.padding, self.transposed = stride, padding, transposed
        shape = [in_channels, out_channels, kernel, kernel] if transposed else [out_channels, in_channels, kernel, kernel]
        bound = 1 / math.sqrt(shape[1] * kernel * kernel)
        self.register_buffer('weight', (torch.rand(shape, generator=generator) * 2 - 1) * bound)
        self.register_buffer('bias', (torch.rand([out_channels], generator=generator) * 2 - 1) * bound)

    def forward(self, x):
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.transposed:
            return F.conv_transpose2d(x, w, b, self.stride, self.padding)
        return F.conv2d(x, w, b, self.stride, self.padding)


class ViTReadout(nn.Module):
    """Turns 4 same-size ViT token maps (1/16) into a pyramid at 1/4, 1/8, 1/16, 1/32 (DPT-style, random, frozen)."""

    def __init__(self, in_channels, out_channels=(96, 192, 384, 768), generator=None):
        super().__init__()
        self.out_channels = tuple(out_channels)
        self.reduce = nn.ModuleList([FixedConv2d(in_channels, c, 1, generator=generator) for c in out_channels])
        c0, c1, _, c3 = out_channels
        self.resample = nn.ModuleList([
            FixedConv2d(c0, c0, 4, stride=4, transposed=True, generator=generator),  # x4 up
            FixedConv2d(c1, c1, 2, stride=2, transposed=True, generator=generator),  # x2 up
            nn.Identity(),
            FixedConv2d(c3, c3, 3, stride=2, padding=1, generator=generator),        # x2 down
        ])

    def forward(self, feats):
        return [resample(reduce(f)) for f, reduce, resample in zip(feats, self.reduce, self.resample)]


def upsample2x(x):
    return F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)


class RandomProjection(nn.Module):
    """Fixed cross-channel (CCM) then cross-scale (CSM) mixing of 4 feature scales, as in Projected GAN."""

    def __init__(self, in_channels, width=64, expand=True, generator=None):
        super().__init__()
        ccm_channels = [width * 2 ** i for i in range(4)] if expand else [width] * 4
        # CSM fusion i maps the sum at scale i to the channels of scale i-1 (expand halves them); scale 0 keeps width.
        csm_out = [ccm_channels[0]] + [c // 2 if expand else c for c in ccm_channels[1:]]
        self.ccm = nn.ModuleList([FixedConv2d(cin, cout, 1, generator=generator) for cin, cout in zip(in_channels, ccm_channels)])
        self.csm = nn.ModuleList([FixedConv2d(cin, cout, 1, generator=generator) for cin, cout in zip(ccm_channels, csm_out)])
        self.out_channels = tuple(csm_out)

    def forward(self, feats, reference=False):
        mixed = [ccm(f) for ccm, f in zip(self.ccm, feats)]
        out, carry = [None] * 4, None
        for i in reversed(range(4)):  # coarse to fine
            x = mixed[i] if carry is None else mixed[i] + carry
            if reference:  # authors' order: upsample, then 1x1 conv at the 2x resolution
                carry = self.csm[i](upsample2x(x))
            else:  # 1x1 conv and bilinear resize commute (weights sum to 1): convolve at 1/4 the pixels
                carry = upsample2x(self.csm[i](x))
            out[i] = carry
        return out


class FeatureNetwork(nn.Module):
    """One frozen backbone with its input normalisation and fixed random projection."""

    def __init__(self, name, pretrained=True, weights_dir=None, fold_bn=True, width=64, expand=True, projection_seed=0,
                 input_size=BACKBONE_INPUT_SIZE):
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.backbone = build_backbone(name, pretrained=pretrained, weights_dir=weights_dir, fold_bn=fold_bn)
        scale, shift = input_affine(self.backbone.mean, self.backbone.std)
        self.register_buffer('input_scale', scale, persistent=False)
        self.register_buffer('input_shift', shift, persistent=False)
        generator = projection_generator(projection_seed, name)
        channels = self.backbone.channels
        if self.backbone.is_vit:
            if input_size != BACKBONE_INPUT_SIZE:
                raise DiscriminatorConfigError(f'{name} needs input_size {BACKBONE_INPUT_SIZE}, got {input_size}')
            self.readout = ViTReadout(channels[0], generator=generator)
            channels = self.readout.out_channels
        else:
            self.readout = None
        self.projection = RandomProjection(channels, width=width, expand=expand, generator=generator)
        self.out_channels = self.projection.out_channels
        self.requires_grad_(False)

    def forward(self, img, channels_last=False, reference=False):
        if reference:
            x = prepare_backbone_input_reference(img, self.backbone.mean, self.backbone.std, self.input_size)
        else:
            x = prepare_backbone_input(img, self.input_scale, self.input_shift, self.input_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)
        if self.readout is not None:
            feats = self.readout(feats)
        return self.projection(feats, reference=reference)

#----------------------------------------------------------------------------
# Trainable heads.

# Projected GAN's head widths by feature-map size.
HEAD_CHANNELS = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32}
# The authors size head i for a feature map of 256/4/2^i * 2 (their nominal 256 input with CSM's x2
# upsampling), whatever the backbone's real map size; heads are fully convolutional, so larger maps
# (VGG's are 2x) just give more logits.
HEAD_START_SIZES = (128, 64, 32, 16)
HEAD_END_SIZE = 8


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=True))
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return F.leaky_relu(self.bn(self.conv(x)), 0.2)


class ClassEmbedding(nn.Module):
    """One-hot label -> learned embedding -> equalised-lr linear + LeakyReLU (StyleGAN2 FC) -> cmap."""

    def __init__(self, c_dim, embed_dim, cmap_dim):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(c_dim, embed_dim))  # as nn.Embedding's N(0, 1) init
        self.proj_weight = nn.Parameter(torch.randn(cmap_dim, embed_dim))
        self.proj_bias = nn.Parameter(torch.zeros(cmap_dim))

    def forward(self, c):
        e = c.to(self.embed.dtype) @ self.embed  # == embedding lookup for one-hot c
        y = F.linear(e, self.proj_weight / math.sqrt(self.proj_weight.shape[1]), self.proj_bias)
        return F.leaky_relu(y, 0.2) * math.sqrt(2)


class ScaleHead(nn.Module):
    """Discriminator head on one feature scale: [B, C, H, W] -> [B, h*w] logits."""

    def __init__(self, in_channels, start_size, end_size=HEAD_END_SIZE, c_dim=0, cmap_dim=64, embed_dim=320):
        super().__init__()
        blocks, channels, size = [], in_channels, start_size
        while size > end_size:
            blocks.append(DownBlock(channels, HEAD_CHANNELS[size // 2]))
            channels, size = HEAD_CHANNELS[size // 2], size // 2
        self.blocks = nn.Sequential(*blocks)
        self.c_dim, self.cmap_dim = c_dim, cmap_dim
        self.out = spectral_norm(nn.Conv2d(channels, cmap_dim if c_dim else 1, 4, 1, 0, bias=False))
        self.class_embedding = ClassEmbedding(c_dim, embed_dim, cmap_dim) if c_dim else None

    def forward(self, x, c=None):
        h = self.out(self.blocks(x))
        if self.class_embedding is not None:
            cmap = self.class_embedding(c).to(h.dtype)
            h = (h * cmap[:, :, None, None]).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return h.flatten(1)

#----------------------------------------------------------------------------
# The discriminator.

class ProjectedDiscriminator(nn.Module):
    """The paper's discriminator. `input_size` is the backbone input resolution: 224 as in the paper
    (DeiT needs it); the convolutional backbones also run at a smaller size (tests, experiments)."""

    def __init__(self, backbones=('vgg16_bn', 'tf_efficientnet_lite0'), c_dim=0, pretrained=True, weights_dir=None,
                 projection_width=64, expand=True, projection_seed=0, head_start_sizes=HEAD_START_SIZES,
                 cmap_dim=64, embed_dim=320, fold_bn=True, channels_last=False, input_size=BACKBONE_INPUT_SIZE):
        super().__init__()
        if isinstance(backbones, str):
            backbones = tuple(b for b in backbones.split(',') if b)
        unknown = [b for b in backbones if b not in BACKBONES]
        if not backbones or unknown:
            raise DiscriminatorConfigError(f'backbones must be a non-empty subset of {sorted(BACKBONES)}, got {list(backbones)}')
        if len(set(backbones)) != len(backbones):
            raise DiscriminatorConfigError(f'backbones must not repeat, got {list(backbones)}')
        if len(head_start_sizes) != 4 or any(s not in HEAD_CHANNELS or s < HEAD_END_SIZE for s in head_start_sizes):
            raise DiscriminatorConfigError(f'head_start_sizes must be 4 powers of two in [8, 256], got {head_start_sizes}')
        if input_size < 128:
            raise DiscriminatorConfigError(f'input_size must be >= 128 (the coarsest head needs an 8x8 map), got {input_size}')
        if c_dim < 0:
            raise DiscriminatorConfigError(f'c_dim must be >= 0, got {c_dim}')
        self.init_kwargs = dict(backbones=tuple(backbones), c_dim=c_dim, projection_width=projection_width, expand=expand,
                                projection_seed=projection_seed, head_start_sizes=tuple(head_start_sizes),
                                cmap_dim=cmap_dim, embed_dim=embed_dim, fold_bn=fold_bn, channels_last=channels_last,
                                input_size=input_size)
        self.c_dim = c_dim
        self.channels_last = channels_last
        self.feature_networks = nn.ModuleDict({
            name: FeatureNetwork(name, pretrained, weights_dir, fold_bn, projection_width, expand, projection_seed, input_size)
            for name in backbones})
        self.heads = nn.ModuleDict({
            name: nn.ModuleList([ScaleHead(cin, size, c_dim=c_dim, cmap_dim=cmap_dim, embed_dim=embed_dim)
                                 for cin, size in zip(fnet.out_channels, head_start_sizes)])
            for name, fnet in self.feature_networks.items()})
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train()

    def trainable_parameters(self):
        return list(self.heads.parameters())

    def train(self, mode=True):
        """Heads follow `mode`; feature networks stay in eval mode (their BN statistics never update)."""
        super().train(mode)
        self.feature_networks.eval()
        return self

    def requires_grad_(self, requires_grad=True):
        """Toggle the heads only; the frozen feature networks never require grad."""
        for p in self.trainable_parameters():
            p.requires_grad_(requires_grad)
        return self

    def check_inputs(self, img, c):
        if img.ndim != 4 or img.shape[1] != 3:
            raise DiscriminatorConfigError(f'ProjectedDiscriminator expects images [B, 3, H, W], got {tuple(img.shape)}')
        if self.c_dim:
            if c is None or c.ndim != 2 or c.shape != (img.shape[0], self.c_dim):
                got = None if c is None else tuple(c.shape)
                raise DiscriminatorConfigError(f'conditional discriminator needs labels [B={img.shape[0]}, {self.c_dim}], got {got}')
        elif c is not None and c.numel() != 0:
            raise DiscriminatorConfigError(f'unconditional discriminator (c_dim=0) got labels of shape {tuple(c.shape)}')

    def forward(self, img, c=None, reference=False):
        """img [B, 3, H, W] in [-1, 1], c one-hot [B, c_dim] or None -> tuple of logits [B, K_b], one per backbone."""
        return self.heads_forward(self.features(img, c, reference), c)

    def features(self, img, c=None, reference=False):
        """The frozen part: per backbone, its 4 projected feature maps (what heads_forward takes). forward() is
        heads_forward(features(img, c), c); the D step may reuse the G step's features of the same fakes."""
        self.check_inputs(img, c)
        return tuple(tuple(fnet(img, channels_last=self.channels_last, reference=reference))
                     for fnet in self.feature_networks.values())

    def heads_forward(self, features, c=None):
        """The trainable part: features() of a batch -> tuple of logits [B, K_b], one per backbone."""
        c = c if self.c_dim else None
        return tuple(torch.cat([head(f, c) for head, f in zip(self.heads[name], feats)], dim=1)
                     for name, feats in zip(self.feature_networks, features))

    def forward_pair(self, img_a, img_b, c_a=None, c_b=None):
        """(forward(img_a, c_a), forward(img_b, c_b)), identical to the two calls in this order, with the frozen
        feature networks run once on both batches (the D step's fakes and reals: one backbone pass instead of two).

        Backbones are in eval mode and act on each sample alone, so batching the halves changes nothing. The
        heads do not: in train mode their BatchNorms normalise with the statistics of the batch they see and
        their spectral norms do one power iteration per call. So the heads still run once per half, half a
        before half b, exactly as the two separate calls would.
        """
        self.check_inputs(img_a, c_a)
        self.check_inputs(img_b, c_b)
        c_a, c_b = (c_a, c_b) if self.c_dim else (None, None)
        n = img_a.shape[0]
        logits_a, logits_b = [], []
        for name, fnet in self.feature_networks.items():
            feats = fnet(torch.cat([img_a, img_b.to(img_a.dtype)]), channels_last=self.channels_last)
            heads_a, heads_b = [], []
            for head, f in zip(self.heads[name], feats):
                heads_a.append(head(f[:n], c_a))
                heads_b.append(head(f[n:], c_b))
            logits_a.append(torch.cat(heads_a, dim=1))
            logits_b.append(torch.cat(heads_b, dim=1))
        return tuple(logits_a), tuple(logits_b)
