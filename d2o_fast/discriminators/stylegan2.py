"""Residual StyleGAN2-style discriminator, trained from scratch (no external weights).

img [B, C, R, R] -> fromRGB 1x1 at R -> residual blocks halving the resolution down to 4x4
-> minibatch standard deviation -> 3x3 conv -> FC -> output FC. Unconditional: one logit;
conditional (c_dim > 0): the output FC gives a cmap_dim vector that is projected onto a
mapped class embedding (StyleGAN2-ADA's projection discriminator). Equalised learning
rate everywhere (weights stored N(0, 1), scaled by 1/sqrt(fan_in) at run time) and
LeakyReLU(0.2) * sqrt(2); downsampling by the [1, 3, 3, 1] low-pass filter.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2o_fast.discriminators.errors import DiscriminatorConfigError
from d2o_fast.nets.layers import fir_resample

LRELU_GAIN = math.sqrt(2)


def lrelu(x):
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


class EqualizedConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, (self.weight * self.weight_gain).to(x.dtype), b, padding=self.padding)


class EqualizedLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_features)

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, (self.weight * self.weight_gain).to(x.dtype), b)


class Downsample2x(nn.Module):
    """Depthwise [1,3,3,1] x [1,3,3,1] / 64 low-pass filter, stride 2: [.., R, R] -> [.., R/2, R/2].

    Runs through the U-Nets' fir_resample, which keeps reduced-precision CPU inputs off oneDNN's slow
    depthwise path, where this filter's backward would be a large share of a bf16 training step.
    """

    def __init__(self):
        super().__init__()
        taps = torch.tensor([1., 3., 3., 1.])
        self.register_buffer('kernel', (taps[:, None] * taps[None, :] / taps.sum() ** 2)[None, None], persistent=False)

    def forward(self, x):
        return fir_resample(x, self.kernel, x.shape[1], up=False, padding=1)


class ResidualBlock(nn.Module):
    """conv3x3 -> conv3x3 -> downsample, plus a downsampled 1x1 skip; sum scaled by sqrt(1/2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3)
        self.skip = EqualizedConv2d(in_channels, out_channels, 1, bias=False)
        self.down = Downsample2x()

    def forward(self, x):
        y = self.skip(self.down(x))  # 1x1 conv after the filter: same result, 4x fewer pixels
        x = lrelu(self.conv0(x))
        x = lrelu(self.down(self.conv1(x)))  # bias+activation after the (linear) filter, as StyleGAN2
        return (x + y) * math.sqrt(0.5)


def minibatch_stddev(x, group_size=4, num_channels=1):
    """Append the per-group std of features (averaged over channels/pixels) as extra channels.

    Groups are runs of consecutive samples (StyleGAN2 strides them instead), so that splitting a batch
    over data-parallel ranks in multiples of the group size leaves every group, and the result, unchanged.
    """
    B, C, H, W = x.shape
    G = min(group_size, B)
    if B % G != 0:
        raise DiscriminatorConfigError(f'batch size {B} must be divisible by the minibatch-std group size {G}')
    F_ = num_channels
    y = x.reshape(-1, G, F_, C // F_, H, W).float()
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1).add(1e-8).sqrt()  # [B/G, F, C/F, H, W]
    y = y.mean(dim=[2, 3, 4]).reshape(-1, F_, 1, 1).repeat_interleave(G, dim=0).expand(B, F_, H, W).to(x.dtype)
    return torch.cat([x, y], dim=1)


class LabelMapping(nn.Module):
    """One-hot label -> embedding -> 2nd-moment normalisation -> MLP -> cmap (StyleGAN2-ADA's mapping, z-less)."""

    def __init__(self, c_dim, cmap_dim, num_layers=2):
        super().__init__()
        self.embed = EqualizedLinear(c_dim, cmap_dim)
        self.layers = nn.ModuleList([EqualizedLinear(cmap_dim, cmap_dim) for _ in range(num_layers)])

    def forward(self, c):
        x = self.embed(c)
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for layer in self.layers:
            x = lrelu(layer(x))
        return x


class StyleGAN2Discriminator(nn.Module):
    def __init__(self, img_resolution=32, img_channels=3, c_dim=0, channel_base=32768, channel_max=512,
                 cmap_dim=None, mbstd_group_size=4, mbstd_channels=1, mapping_layers=2):
        super().__init__()
        log2 = math.log2(img_resolution) if img_resolution > 0 else 0
        if not (8 <= img_resolution <= 256 and log2 == int(log2)):
            raise DiscriminatorConfigError(f'img_resolution must be a power of two in [8, 256], got {img_resolution}')
        if img_channels < 1 or c_dim < 0:
            raise DiscriminatorConfigError(f'need img_channels >= 1 and c_dim >= 0, got {img_channels}, {c_dim}')
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, c_dim=c_dim,
                                channel_base=channel_base, channel_max=channel_max, cmap_dim=cmap_dim,
                                mbstd_group_size=mbstd_group_size, mbstd_channels=mbstd_channels,
                                mapping_layers=mapping_layers)
        self.img_resolution, self.img_channels, self.c_dim = img_resolution, img_channels, c_dim
        self.mbstd_group_size, self.mbstd_channels = mbstd_group_size, mbstd_channels

        def channels_at(res):
            return min(channel_base // res, channel_max)

        self.from_rgb = EqualizedConv2d(img_channels, channels_at(img_resolution), 1)
        blocks, res = [], img_resolution
        while res > 4:
            blocks.append(ResidualBlock(channels_at(res), channels_at(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = channels_at(4)
        self.conv = EqualizedConv2d(c4 + mbstd_channels, c4, 3)
        self.fc = EqualizedLinear(c4 * 16, c4)
        self.cmap_dim = (cmap_dim or c4) if c_dim else 0
        self.out = EqualizedLinear(c4, self.cmap_dim if c_dim else 1)
        self.mapping = LabelMapping(c_dim, self.cmap_dim, mapping_layers) if c_dim else None

    def trainable_parameters(self):
        return list(self.parameters())

    def check_inputs(self, img, c):
        if img.ndim != 4 or img.shape[1:] != (self.img_channels, self.img_resolution, self.img_resolution):
            raise DiscriminatorConfigError(
                f'expected images [B, {self.img_channels}, {self.img_resolution}, {self.img_resolution}], got {tuple(img.shape)}')
        if self.c_dim and (c is None or c.shape != (img.shape[0], self.c_dim)):
            raise DiscriminatorConfigError(f'conditional discriminator needs labels [B, {self.c_dim}], got {None if c is None else tuple(c.shape)}')
        if not self.c_dim and c is not None and c.numel() != 0:
            raise DiscriminatorConfigError(f'unconditional discriminator (c_dim=0) got labels of shape {tuple(c.shape)}')

    def forward(self, img, c=None):
        """img [B, C, R, R] in [-1, 1], c one-hot [B, c_dim] or None -> logits [B, 1]."""
        self.check_inputs(img, c)
        return self._logits(img, c, min(self.mbstd_group_size, img.shape[0]))

    def features(self, img, c=None):
        """The frozen part, as the projected discriminator's: nothing is frozen here, so it is the image itself.
        forward() is heads_forward(features(img, c), c)."""
        self.check_inputs(img, c)
        return img

    def heads_forward(self, features, c=None):
        return self._logits(features, c, min(self.mbstd_group_size, features.shape[0]))

    def forward_pair(self, img_a, img_b, c_a=None, c_b=None):
        """(forward(img_a, c_a), forward(img_b, c_b)) in one pass over both batches, with the same result.

        The only cross-sample operation is the minibatch std, over runs of consecutive samples; with equal
        halves and the group size each half would use on its own, no group straddles the two halves.
        """
        self.check_inputs(img_a, c_a)
        self.check_inputs(img_b, c_b)
        if img_a.shape != img_b.shape:  # unequal halves would group differently: two passes
            return self.forward(img_a, c_a), self.forward(img_b, c_b)
        n = img_a.shape[0]
        group = min(self.mbstd_group_size, n)
        if n % group:  # as forward() on each half would refuse; the joined batch would let groups straddle
            raise DiscriminatorConfigError(f'batch size {n} must be divisible by the minibatch-std group size {group}')
        c = torch.cat([c_a, c_b]) if self.c_dim else None
        logits = self._logits(torch.cat([img_a, img_b.to(img_a.dtype)]), c, group)
        return logits[:n], logits[n:]

    def _logits(self, img, c, mbstd_group_size):
        x = lrelu(self.from_rgb(img))
        x = self.blocks(x)
        x = minibatch_stddev(x, mbstd_group_size, self.mbstd_channels)
        x = lrelu(self.conv(x))
        x = lrelu(self.fc(x.flatten(1)))
        x = self.out(x)
        if self.c_dim:
            cmap = self.mapping(c.to(x.dtype))
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x
