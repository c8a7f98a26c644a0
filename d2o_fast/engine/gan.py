"""The D2O objective: a non-saturating GAN loss and lazy R1, nothing else (no teacher, no distillation).

    G:  softplus(-D(G(z)))
    D:  softplus(D(G(z))) + softplus(-D(x))
    R1: gamma / 2 * |grad_x sum D(x)|^2 on reals, every `interval` steps, scaled by `interval` (lazy).

The projected discriminator returns one logits tensor per feature network ([B, K_b]); a single tensor is one
part. The GAN losses take the mean over each part's logits and add the parts, so every feature network carries
the same weight whatever its number of logits (vgg16_bn's 484 and tf_efficientnet_lite0's 64 each carry half),
as the authors' loss does; the result is then averaged over images, where the authors sum over the images of one
GPU (the R1 weight accounts for that: r1_gamma in engine/config.py). R1 differentiates the sum of all logits.
"""

import torch
from torch.nn.functional import softplus

from d2o_fast.discriminators import logit_parts


def _fp32_or_wider(t):
    """Losses run in float32 at least (bf16 / fp16 logits are promoted; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_sample(logits, fn):
    """[B] loss per sample: sum over parts of the mean over each part's logits."""
    return sum(fn(_fp32_or_wider(p)).reshape(p.shape[0], -1).mean(dim=1) for p in logit_parts(logits))


def mean_logit(logits):
    """Mean over all logits of all parts (a statistic for the log, not a loss)."""
    return torch.cat([_fp32_or_wider(p.detach()).reshape(p.shape[0], -1) for p in logit_parts(logits)], dim=1).mean()


def generator_loss(fake_logits):
    return _per_sample(fake_logits, lambda t: softplus(-t)).mean()


def discriminator_loss(fake_logits, real_logits):
    return _per_sample(fake_logits, softplus).mean() + _per_sample(real_logits, lambda t: softplus(-t)).mean()


def r1_penalty(discriminator, real, labels):
    """Per-sample |grad_x sum D(x)|^2 at the real images (create_graph so it can be trained on)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real, labels)
    total = sum(_fp32_or_wider(p).sum() for p in logit_parts(logits))
    (grad,) = torch.autograd.grad(outputs=[total], inputs=[real], create_graph=True, only_inputs=True)
    return grad.square().sum(dim=[1, 2, 3])
