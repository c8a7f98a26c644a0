"""forward_pair (the D step's fakes and reals in one pass) against two forward() calls: logits, the head
gradients of the D loss, and the state the calls leave behind (BatchNorm running statistics, spectral-norm
power-iteration vectors), for both discriminators, in train mode, unconditional and conditional."""

import copy

import pytest
import torch
import torch.nn.functional as F

from d2o_fast.discriminators import DiscriminatorConfigError, ProjectedDiscriminator, StyleGAN2Discriminator, logit_parts
from d2o_fast.engine.gan import discriminator_loss

EFFNET = ('tf_efficientnet_lite0',)


def images(batch, size, seed):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def labels(batch, c_dim, seed):
    if not c_dim:
        return None
    return F.one_hot(torch.randint(0, c_dim, [batch], generator=torch.Generator().manual_seed(seed)), c_dim).float()


def check_pair_equals_two_calls(d, size, batch, c_dim, atol=1e-5):
    fake, real = images(batch, size, 1), images(batch, size, 2)
    c_fake, c_real = labels(batch, c_dim, 3), labels(batch, c_dim, 4)
    reference = copy.deepcopy(d)

    ref_fake, ref_real = reference(fake, c_fake), reference(real, c_real)
    discriminator_loss(ref_fake, ref_real).backward()
    pair_fake, pair_real = d.forward_pair(fake, real, c_fake, c_real)
    discriminator_loss(pair_fake, pair_real).backward()

    torch.testing.assert_close(pair_fake, ref_fake, rtol=1e-5, atol=atol)
    torch.testing.assert_close(pair_real, ref_real, rtol=1e-5, atol=atol)
    assert not any(torch.allclose(a, b) for a, b in zip(logit_parts(pair_fake), logit_parts(pair_real)))  # different images
    for (name, p), q in zip(d.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=name)
    for (name, b), b_ref in zip(d.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize('c_dim', [0, 3])
def test_projected_forward_pair_equals_two_calls(c_dim):
    torch.manual_seed(0)
    d = ProjectedDiscriminator(EFFNET, c_dim=c_dim, pretrained=False, input_size=128).train()
    # Heads hold BatchNorms (batch statistics in train mode) and spectral norms (a power iteration per call).
    assert any(isinstance(m, torch.nn.BatchNorm2d) and m.training for m in d.heads.modules())
    check_pair_equals_two_calls(d, size=32, batch=3, c_dim=c_dim)


def test_projected_forward_pair_channels_last_bf16_equals_two_calls():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(EFFNET, pretrained=False, input_size=128, channels_last=True).train()
    fake, real = images(2, 32, 1), images(2, 32, 2)
    reference = copy.deepcopy(d)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = reference(fake), reference(real)
        pair = d.forward_pair(fake, real)
    for a, b in zip(pair, ref):  # same bf16 ops on the same values; only the conv batch size differs
        for part_a, part_b in zip(a, b):
            torch.testing.assert_close(part_a.float(), part_b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('c_dim', [0, 3])
@pytest.mark.parametrize('batch', [2, 4, 8])  # below, at and above the minibatch-std group size 4
def test_stylegan2_forward_pair_equals_two_calls(c_dim, batch):
    torch.manual_seed(0)
    d = StyleGAN2Discriminator(16, 3, c_dim, channel_base=256, channel_max=32).train()
    check_pair_equals_two_calls(d, size=16, batch=batch, c_dim=c_dim)


def test_stylegan2_forward_pair_refuses_straddling_groups():
    d = StyleGAN2Discriminator(16, 3, 0, channel_base=256, channel_max=32)
    with pytest.raises(DiscriminatorConfigError, match='divisible by the minibatch-std group size'):
        d.forward_pair(images(6, 16, 1), images(6, 16, 2))  # 6 + 6 = 12 would split into groups of 4 silently


def test_forward_pair_checks_each_half():
    d = StyleGAN2Discriminator(16, 3, 2, channel_base=256, channel_max=32)
    with pytest.raises(DiscriminatorConfigError, match='needs labels'):
        d.forward_pair(images(2, 16, 1), images(2, 16, 2), labels(2, 2, 0), None)
    p = ProjectedDiscriminator(EFFNET, pretrained=False, input_size=128)
    with pytest.raises(DiscriminatorConfigError, match='expects images'):
        p.forward_pair(images(2, 32, 1), images(2, 32, 2)[:, :1])
