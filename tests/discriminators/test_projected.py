"""Projected discriminator: shapes, frozen backbones, gradients to the input, fixed projections, conditioning,
each backbone's share of the GAN losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2o_fast.discriminators import DiscriminatorConfigError, ProjectedDiscriminator, build_discriminator, logit_parts
from d2o_fast.discriminators.projected import (ScaleHead, input_affine, prepare_backbone_input,
                                               prepare_backbone_input_reference)
from d2o_fast.engine.gan import discriminator_loss, generator_loss

EFFNET = ('tf_efficientnet_lite0',)  # the cheap backbone; VGG/DeiT at 224 are in the slow tests
SMALL = dict(pretrained=False, input_size=128)  # backbone input 128 instead of 224: 3x cheaper, 1x1 logit maps


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def one_hot(labels, c_dim):
    return F.one_hot(torch.tensor(labels), c_dim).float()


@pytest.fixture(scope='module')
def disc():
    torch.manual_seed(0)
    return ProjectedDiscriminator(EFFNET, **SMALL)


def test_logit_shape_and_gradient_to_input():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(EFFNET, pretrained=False)
    x = images().requires_grad_(True)
    logits = d(x)
    assert isinstance(logits, tuple) and len(logits) == 1  # one logits tensor per backbone
    assert logits[0].shape == (2, 4 * 16)  # at 224: 4 heads, 4x4 logit maps each
    logits[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.feature_networks.parameters())
    assert all(p.grad is not None for p in d.trainable_parameters())


def test_only_heads_are_trainable(disc):
    disc.requires_grad_(True)
    trainable = {id(p) for p in disc.trainable_parameters()}
    assert trainable == {id(p) for p in disc.heads.parameters()}
    assert {id(p) for p in disc.parameters() if p.requires_grad} == trainable
    assert not any(p.requires_grad for p in disc.feature_networks.parameters())
    disc.requires_grad_(False)
    assert not any(p.requires_grad for p in disc.parameters())
    disc.requires_grad_(True)


def test_backbones_stay_in_eval_mode_and_bn_stats_frozen():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(EFFNET, **SMALL, fold_bn=False).train()
    assert d.heads.training and not d.feature_networks.training
    assert not any(m.training for m in d.feature_networks.modules())
    backbone_bn = [m for m in d.feature_networks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head_bn = [m for m in d.heads.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in backbone_bn]
    head_before = [m.running_mean.clone() for m in head_bn]
    d(images())
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, backbone_bn))
    assert any(not torch.equal(a, m.running_mean) for a, m in zip(head_before, head_bn))  # heads do train
    d.eval()
    assert not any(m.training for m in d.modules())
    d.train()
    assert not any(m.training for m in d.feature_networks.modules())


def r1_penalty(d, x, c=None):
    """StyleGAN's R1: |d sum(logits) / d x|^2, differentiable w.r.t. the head parameters."""
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(sum(p.sum() for p in logit_parts(d(x, c))), x, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]).mean()


def test_r1_double_backward_reaches_heads(disc):
    for p in disc.trainable_parameters():
        p.grad = None
    r1_penalty(disc, images()).backward()
    assert all(p.grad is not None for p in disc.trainable_parameters() if p.ndim == 4)
    assert sum(p.grad.abs().sum() for p in disc.trainable_parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in disc.feature_networks.parameters())
    for p in disc.trainable_parameters():
        p.grad = None


def test_optimizer_step_changes_heads_only(disc):
    opt = torch.optim.Adam(disc.trainable_parameters(), lr=1e-2)
    frozen = {k: v.clone() for k, v in disc.feature_networks.state_dict().items()}
    heads = {k: v.clone() for k, v in disc.heads.state_dict().items()}
    F.softplus(-disc(images())[0]).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(v, disc.feature_networks.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, disc.heads.state_dict()[k]) for k, v in heads.items())


def test_fused_input_preparation_matches_reference():
    for mean, std in [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]:
        scale, shift = input_affine(mean, std)
        for size in (32, 64, 224):
            x = images(size=size)
            out = prepare_backbone_input(x, scale, shift)
            assert out.shape == (2, 3, 224, 224)
            torch.testing.assert_close(out, prepare_backbone_input_reference(x, mean, std), rtol=1e-5, atol=1e-5)


def test_fast_cross_scale_mixing_matches_reference(disc):
    disc.eval()
    with torch.no_grad():
        fnet = disc.feature_networks[EFFNET[0]]
        fast, ref = fnet(images()), fnet(images(), reference=True)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
        torch.testing.assert_close(disc(images()), disc(images(), reference=True), rtol=1e-4, atol=1e-6)
    disc.train()


def test_projections_are_deterministic_buffers_and_resume_exactly():
    torch.manual_seed(1)
    a = ProjectedDiscriminator(EFFNET, **SMALL, projection_seed=7)
    torch.manual_seed(2)
    b = ProjectedDiscriminator(EFFNET, **SMALL, projection_seed=7)
    c = ProjectedDiscriminator(EFFNET, **SMALL, projection_seed=8)
    pa, pb, pc = (dict(m.feature_networks[EFFNET[0]].projection.named_buffers()) for m in (a, b, c))
    assert pa.keys() == pb.keys() and len(pa) == 16  # 4 CCM + 4 CSM convs, weight + bias
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(not torch.equal(pa[k], pc[k]) for k in pa)
    assert all(f'feature_networks.{EFFNET[0]}.projection.{k}' in a.state_dict() for k in pa)
    # Resume: a differently seeded discriminator loaded from a's state dict computes exactly what a computes.
    c.load_state_dict(a.state_dict())
    a.eval(), c.eval()
    with torch.no_grad():
        assert all(torch.equal(la, lc) for la, lc in zip(a(images()), c(images())))


def test_rebuild_from_build_kwargs_without_weight_files():
    torch.manual_seed(0)
    a = build_discriminator('projected', 32, 3, 3, backbones=EFFNET, **SMALL)
    assert a.build_kwargs == dict(kind='projected', img_resolution=32, img_channels=3, c_dim=3, backbones=EFFNET,
                                  input_size=128)
    torch.manual_seed(1)
    b = build_discriminator(**a.build_kwargs, pretrained=False)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    c = one_hot([0, 2], 3)
    with torch.no_grad():
        assert all(torch.equal(la, lb) for la, lb in zip(a(images(), c), b(images(), c)))


def test_projection_seed_is_per_backbone():
    # Adding a backbone must not change another backbone's projections.
    d1 = ProjectedDiscriminator(EFFNET, **SMALL, projection_seed=3)
    d2 = ProjectedDiscriminator(('vgg16_bn',) + EFFNET, **SMALL, projection_seed=3)
    b1 = dict(d1.feature_networks[EFFNET[0]].projection.named_buffers())
    b2 = dict(d2.feature_networks[EFFNET[0]].projection.named_buffers())
    assert all(torch.equal(b1[k], b2[k]) for k in b1)


def test_conditional_projection():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(EFFNET, c_dim=5, **SMALL).eval()
    x = images()
    with torch.no_grad():
        (l1,) = d(x, one_hot([0, 1], 5))
        (l2,) = d(x, one_hot([3, 1], 5))
    assert l1.shape == (2, 4)
    assert not torch.allclose(l1[0], l2[0]) and torch.allclose(l1[1], l2[1])
    assert len(d.heads[EFFNET[0]][0].class_embedding.embed) == 5
    with pytest.raises(DiscriminatorConfigError, match='labels'):
        d(x)
    with pytest.raises(DiscriminatorConfigError, match='labels'):
        d(x, one_hot([0, 1], 4))


def test_unconditional_rejects_labels_but_accepts_empty(disc):
    with pytest.raises(DiscriminatorConfigError, match='c_dim=0'):
        disc(images(), one_hot([0, 1], 3))
    assert disc(images(), torch.zeros(2, 0))[0].shape == (2, 4)


def test_bad_configuration_errors():
    with pytest.raises(DiscriminatorConfigError, match='backbones'):
        ProjectedDiscriminator(('resnet50',), pretrained=False)
    with pytest.raises(DiscriminatorConfigError, match='RGB'):
        build_discriminator('projected', 32, 1, 0, pretrained=False)
    with pytest.raises(DiscriminatorConfigError, match='unknown discriminator kind'):
        build_discriminator('patchgan', 32, 3, 0)
    with pytest.raises(DiscriminatorConfigError, match='input_size'):
        ProjectedDiscriminator(('deit_base_distilled_patch16_224',), **SMALL)
    with pytest.raises(DiscriminatorConfigError, match=r'\[B, 3, H, W\]'):
        ProjectedDiscriminator(EFFNET, **SMALL)(torch.zeros(2, 1, 32, 32))


def test_channels_last_bf16_autocast_close_to_fp32(disc):
    torch.manual_seed(0)
    cl = ProjectedDiscriminator(EFFNET, **SMALL, channels_last=True)
    cl.load_state_dict(disc.state_dict())
    disc.eval(), cl.eval()
    x = images()
    with torch.no_grad():
        (ref,) = disc(x)
        torch.testing.assert_close(cl(x)[0], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            (low,) = cl(x)
    assert (low.float() - ref).norm() <= 0.1 * ref.norm()
    disc.train()

@pytest.mark.parametrize('shape', [(512, 64, 4, 4), (1, 512, 4, 4)])  # a head's down block and its output conv
def test_spectral_norm_reaches_the_authors_sigma(shape):
    """The heads' spectral norm (15 power steps at construction, one per train-mode call) and the authors'
    torch.nn.utils.spectral_norm (random start, one step per call) on the same weights: theirs starts low, and
    after 300 calls both divide by the largest singular value."""
    torch.manual_seed(0)
    head = ScaleHead(64, 16).double()
    ours = next(m for m in head.modules() if isinstance(m, torch.nn.Conv2d) and tuple(m.weight.shape) == shape)
    theirs = torch.nn.Conv2d(shape[1], shape[0], 4).double()
    with torch.no_grad():
        theirs.weight.copy_(ours.parametrizations.weight.original)
    theirs = torch.nn.utils.spectral_norm(theirs)
    w = theirs.weight_orig.detach()
    sigma = torch.linalg.matrix_norm(w.flatten(1), ord=2).item()
    x = torch.zeros(1, shape[1], 4, 4, dtype=torch.float64)

    def estimates():
        with torch.no_grad():
            ours_w = ours.weight  # a train-mode call: one power step
            theirs(x)
        return (w / ours_w).flatten()[0].item(), (w / theirs.weight).flatten()[0].item()
    first = estimates()
    if shape[0] > 1:
        assert abs(first[0] / sigma - 1) < 0.05 < abs(first[1] / sigma - 1)
    for _ in range(299):
        last = estimates()
    assert last == pytest.approx((sigma, sigma), rel=1e-5)

#----------------------------------------------------------------------------
# Each backbone's share of the GAN losses.

def hand_shares(parts, sign):
    """Each part's share of sum |d loss / d logits| for mean_i sum_b mean_k softplus(sign * l), in float64:
    |d loss / d l[b][i][k]| = sigmoid(sign * l) / (B * K_b)."""
    totals = []
    for part in parts:
        batch, width = part.shape
        totals.append(sum(1 / (1 + math.exp(-sign * v)) for v in part.double().flatten().tolist()) / (batch * width))
    return [t / sum(totals) for t in totals]


def loss_shares(loss_fn, parts):
    parts = [p.detach().requires_grad_(True) for p in parts]
    loss_fn(parts).backward()
    totals = [p.grad.abs().sum().item() for p in parts]
    return [t / sum(totals) for t in totals]


def check_backbone_shares(d, size, widths, c_dim):
    g = torch.Generator().manual_seed(4)
    fake, real = (torch.rand(2, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
    c = F.one_hot(torch.tensor([0, c_dim - 1]), c_dim).float() if c_dim else None
    with torch.no_grad():
        fake_logits, real_logits = d(fake, c), d(real, c)
    assert [tuple(p.shape) for p in fake_logits] == [(2, k) for k in widths]  # one [B, K_b] part per backbone
    cases = [(generator_loss, fake_logits, -1),
             (lambda p: discriminator_loss(p, real_logits), fake_logits, +1),
             (lambda p: discriminator_loss(fake_logits, p), real_logits, -1)]
    for loss_fn, parts, sign in cases:
        expected = hand_shares(parts, sign)
        assert loss_shares(loss_fn, parts) == pytest.approx(expected, rel=1e-5)
        if len(widths) > 1:  # each backbone carries about 1 / n (logits near 0), far from its share of the logits
            assert all(abs(s - 1 / len(widths)) < 0.2 / len(widths) for s in expected)


@pytest.mark.parametrize('c_dim', [0, 3])
@pytest.mark.parametrize('backbones,widths', [(EFFNET, (4,)), (('vgg16_bn',) + EFFNET, (100, 4))])
def test_loss_gradient_shares_per_backbone(backbones, widths, c_dim):
    """At input 128: tf_efficientnet_lite0 gives 4 heads of 1x1 logits, vgg16_bn 4 heads of 5x5."""
    torch.manual_seed(0)
    d = ProjectedDiscriminator(backbones, c_dim=c_dim, **SMALL).train()
    check_backbone_shares(d, 32, widths, c_dim)


@pytest.mark.slow
@pytest.mark.parametrize('c_dim', [0, 3])
def test_loss_gradient_shares_three_backbones(c_dim):
    torch.manual_seed(0)
    d = ProjectedDiscriminator(('vgg16_bn', 'deit_base_distilled_patch16_224') + EFFNET, c_dim=c_dim,
                               pretrained=False).train()
    check_backbone_shares(d, 32, (484, 64, 64), c_dim)

#----------------------------------------------------------------------------
# Full-size configurations of the paper (slow on 2 CPU cores).

@pytest.mark.slow
def test_paper_cifar_discriminator():
    d = build_discriminator('projected', 32, 3, 10, pretrained=False)
    assert tuple(d.feature_networks) == ('vgg16_bn', 'tf_efficientnet_lite0')
    x = images(batch=1).requires_grad_(True)
    vgg, effnet = d(x, one_hot([4], 10))
    assert vgg.shape == (1, 4 * 121) and effnet.shape == (1, 4 * 16)  # VGG's maps are 2x larger: 11x11 logits per head
    (vgg.sum() + effnet.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.slow
def test_paper_64x64_discriminator():
    d = build_discriminator('projected', 64, 3, 0, pretrained=False)
    assert tuple(d.feature_networks) == ('deit_base_distilled_patch16_224', 'tf_efficientnet_lite0')
    x = images(batch=1, size=64).requires_grad_(True)
    deit, effnet = d(x)
    assert deit.shape == effnet.shape == (1, 4 * 16)
    (deit.sum() + effnet.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    r1_penalty(d, x).backward()  # double backward through DeiT's attention
    assert torch.isfinite(d.heads['deit_base_distilled_patch16_224'][0].out.parametrizations.weight.original.grad).all()
    assert not any(p.requires_grad for p in d.feature_networks.parameters())
