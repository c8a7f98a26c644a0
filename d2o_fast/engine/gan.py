"""The D2O objective: a non-saturating GAN loss and lazy R1, nothing else (no teacher, no distillation).

    G:  softplus(-D(G(z)))
    D:  softplus(D(G(z))) + softplus(-D(x))
    R1: gamma / 2 * |grad_x D(x)|^2 on reals, every `interval` steps, scaled by `interval` (lazy).

A discriminator may return one logit tensor [B, ...] or a list of them (one per feature network);
each part is averaged over its logits and the parts are summed, as in the authors' code.
"""

import torch
from torch.nn.functional import softplus


def _parts(logits):
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def _per_sample(logits, fn):
    """[B] loss per sample: sum over parts of the mean over each part's logits."""
    return sum(fn(p.float()).reshape(p.shape[0], -1).mean(dim=1) for p in _parts(logits))


def mean_logit(logits):
    return torch.cat([p.detach().float().reshape(p.shape[0], -1) for p in _parts(logits)], dim=1).mean()


def generator_loss(fake_logits):
    return _per_sample(fake_logits, lambda t: softplus(-t)).mean()


def discriminator_loss(fake_logits, real_logits):
    return _per_sample(fake_logits, softplus).mean() + _per_sample(real_logits, lambda t: softplus(-t)).mean()


def r1_penalty(discriminator, real, labels):
    """Per-sample |grad_x sum D(x)|^2 at the real images (create_graph so it can be trained on)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real, labels)
    total = sum(p.float().sum() for p in _parts(logits))
    (grad,) = torch.autograd.grad(outputs=[total], inputs=[real], create_graph=True, only_inputs=True)
    return grad.square().sum(dim=[1, 2, 3])

