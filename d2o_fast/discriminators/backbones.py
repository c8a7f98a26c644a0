"""Frozen pretrained feature networks of the Projected-GAN discriminator, in plain PyTorch.

Each class rebuilds the part of a timm model that the discriminator taps, with the same
module names, parameter names and shapes as timm's model of the same name, so that timm's
pretrained state dict loads unchanged (its classifier keys, which we never run, are
skipped: see `unused_pretrained_prefixes`). Each `forward(x)` takes an already normalised
224x224 image batch and returns the 4 tapped feature maps, finest first. The tap points
follow the authors' Projected-GAN feature splits:

  vgg16_bn                         features[:13] | [13:23] | [23:33] | [33:43] -> 128/256/512/512 ch at 1/2..1/16
  tf_efficientnet_lite0            stem+blocks[0:2] | [2] | [3:5] | [5:7]       -> 24/40/112/320 ch at 1/4..1/32
  deit_base_distilled_patch16_224  outputs of blocks 2, 5, 8, 11 as 14x14 maps  -> 768 ch each at 1/16

Folding a frozen BatchNorm into its conv (`fold_batchnorm`) is exact in eval mode and
removes a memory-bound pass per conv; every module that owns conv->BN pairs lists them
in `conv_bn_pairs()` so the folding needs no guessing about execution order.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2o_fast.discriminators.errors import DiscriminatorConfigError
from d2o_fast.discriminators.weights import load_backbone_weights

#----------------------------------------------------------------------------
# TensorFlow 'same' padding (tf_* EfficientNets were trained with it).

def tf_same_padding(size, kernel, stride, dilation=1):
    """(before, after) zero padding that TF 'same' adds along one spatial axis: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with TF 'same' padding computed from the input size (asymmetric for strided convs)."""

    def forward(self, x):
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def tf_same_conv2d(in_channels, out_channels, kernel, stride=1, groups=1):
    """A bias-free conv with TF 'same' padding; static symmetric padding when it is input-size independent."""
    if stride == 1 and kernel % 2 == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return Conv2dSame(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)

#----------------------------------------------------------------------------
# BatchNorm folding.

@torch.no_grad()
def fold_batchnorm_into_conv(conv, bn):
    """Rewrite `conv` so that conv'(x) == bn(conv(x)) with `bn` in eval mode."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = bn.bias.double() + (bias - bn.running_mean.double()) * scale
    # nn.Conv2d weights are [out, in/groups, kh, kw]; BN scales output channels.
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def fold_batchnorm(module):
    """Fold every declared conv->BN pair below `module` into the conv; the BN becomes Identity.

    Only valid for frozen networks evaluated with running statistics. Returns the number of
    folded pairs. Changes the state dict keys (BN entries vanish, conv biases appear), so fold
    after loading pretrained weights.
    """
    folded = 0
    for owner in list(module.modules()):
        if not hasattr(owner, 'conv_bn_pairs'):
            continue
        for conv_name, bn_name in owner.conv_bn_pairs():
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if isinstance(bn, nn.Identity):
                continue  # already folded
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                raise DiscriminatorConfigError(f'{type(owner).__name__}.{conv_name}/{bn_name} is not a Conv2d/BatchNorm2d pair')
            fold_batchnorm_into_conv(conv, bn)
            setattr(owner, bn_name, nn.Identity())
            folded += 1
    return folded

#----------------------------------------------------------------------------
# VGG-16 with BatchNorm (timm `vgg16_bn`; its features.* weights are torchvision's).

VGG16_LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
VGG16_TAP_ENDS = (13, 23, 33, 43)  # feature slices end here (exclusive); the final max-pool (43) is not run


class VGGFeatures(nn.Sequential):
    """timm's `features` Sequential (conv, bn, relu / maxpool), up to and excluding the last max-pool."""

    def __init__(self, layout=VGG16_LAYOUT):
        layers, channels = [], 3
        for item in layout:
            if item == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        super().__init__(*layers)

    def conv_bn_pairs(self):
        names = list(self._modules)
        return [(names[i], names[i + 1]) for i in range(len(names) - 1)
                if isinstance(self[i], nn.Conv2d) and isinstance(self[i + 1], (nn.BatchNorm2d, nn.Identity))]


class VGG16BNFeatures(nn.Module):
    is_vit = False
    name = 'vgg16_bn'
    channels = (128, 256, 512, 512)
    reductions = (2, 4, 8, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # timm's ConvMlp + classifier, and torchvision's classifier (same features.* weights).
    unused_pretrained_prefixes = ('pre_logits.', 'head.', 'classifier.')

    def __init__(self):
        super().__init__()
        self.features = VGGFeatures()

    def forward(self, x):
        out, start = [], 0
        for end in VGG16_TAP_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            out.append(x)
            start = end
        return out

#----------------------------------------------------------------------------
# EfficientNet-Lite0, TF port (timm `tf_efficientnet_lite0`): ReLU6, BN eps 1e-3, TF 'same' padding, no SE.

TF_BN_EPS = 1e-3

# (block kind, repeats, kernel, first stride, expansion, out channels) per stage, as timm's arch_def.
EFFICIENTNET_LITE0_STAGES = (
    ('ds', 1, 3, 1, 1, 16),
    ('ir', 2, 3, 2, 6, 24),
    ('ir', 2, 5, 2, 6, 40),
    ('ir', 3, 3, 2, 6, 80),
    ('ir', 3, 5, 1, 6, 112),
    ('ir', 4, 5, 2, 6, 192),
    ('ir', 1, 3, 1, 6, 320),
)
EFFICIENTNET_TAP_STAGES = (1, 2, 4, 6)  # outputs of blocks[1], blocks[2], blocks[4], blocks[6]


class DepthwiseSeparable(nn.Module):
    """timm DepthwiseSeparableConv without SE: dw conv, BN+ReLU6, pw conv, BN (no activation)."""

    def __init__(self, in_channels, out_channels, kernel, stride):
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_dw = tf_same_conv2d(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = nn.BatchNorm2d(in_channels, eps=TF_BN_EPS)
        self.conv_pw = tf_same_conv2d(in_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=TF_BN_EPS)

    def conv_bn_pairs(self):
        return [('conv_dw', 'bn1'), ('conv_pw', 'bn2')]

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return y + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """timm InvertedResidual without SE: pw expand, BN+ReLU6, dw conv, BN+ReLU6, pw project, BN."""

    def __init__(self, in_channels, out_channels, kernel, stride, expansion):
        super().__init__()
        mid = in_channels * expansion
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_pw = tf_same_conv2d(in_channels, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid, eps=TF_BN_EPS)
        self.conv_dw = tf_same_conv2d(mid, mid, kernel, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid, eps=TF_BN_EPS)
        self.conv_pwl = tf_same_conv2d(mid, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=TF_BN_EPS)

    def conv_bn_pairs(self):
        return [('conv_pw', 'bn1'), ('conv_dw', 'bn2'), ('conv_pwl', 'bn3')]

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_skip else y


class EfficientNetLite0Features(nn.Module):
    is_vit = False
    name = 'tf_efficientnet_lite0'
    channels = (24, 40, 112, 320)
    reductions = (4, 8, 16, 32)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm's tf_ EfficientNet-Lite use Inception normalisation
    unused_pretrained_prefixes = ('conv_head.', 'bn2.', 'classifier.')

    def __init__(self, stem_channels=32):
        super().__init__()
        self.conv_stem = tf_same_conv2d(3, stem_channels, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(stem_channels, eps=TF_BN_EPS)
        stages, channels = [], stem_channels
        for kind, repeats, kernel, stride, expansion, out_channels in EFFICIENTNET_LITE0_STAGES:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if kind == 'ds':
                    blocks.append(DepthwiseSeparable(channels, out_channels, kernel, s))
                else:
                    blocks.append(InvertedResidual(channels, out_channels, kernel, s, expansion))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)

    def conv_bn_pairs(self):
        return [('conv_stem', 'bn1')]

    def forward(self, x):
        x = F.relu6(self.bn1(self.conv_stem(x)))
        out = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in EFFICIENTNET_TAP_STAGES:
                out.append(x)
        return out

#----------------------------------------------------------------------------
# DeiT-Base distilled, patch 16, 224 (timm `deit_base_distilled_patch16_224`).

class PatchEmbed(nn.Module):
    def __init__(self, patch_size=16, in_channels=3, dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if torch.is_grad_enabled() and x.requires_grad:
            # A graph through the backbone is being built (G step, R1): R1 differentiates the input gradient
            # again, and the fused CPU/flash SDPA kernels have no double backward.
            x = attention_reference(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as timm
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v from differentiable primitives (supports double backward)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1).to(v.dtype) @ v


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeiTBaseDistilledFeatures(nn.Module):
    is_vit = True  # token maps need the projection's ViT readout
    name = 'deit_base_distilled_patch16_224'
    channels = (768, 768, 768, 768)
    reductions = (16, 16, 16, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    unused_pretrained_prefixes = ('norm.', 'head.', 'head_dist.', 'fc_norm.')
    tap_blocks = (2, 5, 8, 11)
    num_prefix_tokens = 2  # class token and distillation token

    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, num_heads=12):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + self.num_prefix_tokens, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads) for _ in range(depth)])
        # Random init for tests and benchmarks (timm uses trunc_normal std 0.02 for these).
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x):
        B, _, H, W = x.shape
        if H != self.grid * self.patch_size or W != self.grid * self.patch_size:
            raise DiscriminatorConfigError(f'{self.name} expects {self.grid * self.patch_size}x{self.grid * self.patch_size} input, got {H}x{W}')
        x = self.patch_embed(x)
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(B, -1, -1).to(x.dtype)
        x = torch.cat([prefix, x], dim=1) + self.pos_embed.to(x.dtype)
        out = []
        last = self.tap_blocks[-1]
        for i in range(last + 1):
            x = self.blocks[i](x)
            if i in self.tap_blocks:
                # Drop the prefix tokens and lay the patch tokens out as a [B, C, h, w] map.
                tokens = x[:, self.num_prefix_tokens:]
                out.append(tokens.transpose(1, 2).reshape(B, -1, self.grid, self.grid))
        return out

#----------------------------------------------------------------------------
# Registry.

BACKBONES = {cls.name: cls for cls in (VGG16BNFeatures, EfficientNetLite0Features, DeiTBaseDistilledFeatures)}


def build_backbone(name, pretrained=True, weights_dir=None, fold_bn=False):
    """A frozen, eval-mode feature network by timm name; pretrained weights via `load_backbone_weights`."""
    if name not in BACKBONES:
        raise DiscriminatorConfigError(f'unknown backbone {name!r}; expected one of {sorted(BACKBONES)}')
    backbone = BACKBONES[name]()
    if pretrained:
        load_backbone_weights(backbone, weights_dir)
    if fold_bn:
        fold_batchnorm(backbone)
    return backbone.eval().requires_grad_(False)
