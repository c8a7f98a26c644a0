"""The projected discriminator against the authors' own (Zyriix/D2O), stage by stage, on the same weights.

  python benchmarks/authors_discriminator.py --authors-src DIR [--batch 4] [--out benchmarks/results]

DIR is a checkout of github.com/Zyriix/D2O fetched by the user; nothing of it is copied here. Run this with a
Python that has their dependencies (timm 0.5.4, torchvision) and d2o_fast importable (PYTHONPATH, and
D2O_FAST_KERNELS=torch when the prebuilt extension does not match that torch). Their discriminator for CIFAR-10
(vgg16_bn + tf_efficientnet_lite0, 64 CCM channels, expand, 4 heads, input resized to 224) is built with random
weights: their timm / torchvision constructors run with pretrained=False, and their ImageNet class-embedding
pickle is not loaded (a random nn.Embedding(1000, 320) stands in). Its weights are copied into d2o_fast's, and
both run on the same images, unconditional and conditional, in float64 and float32:

  - backbone input, backbone features, projected (CCM + CSM) features, logits per backbone;
  - the input gradient of the sum of all logits;
  - the G loss, D loss and R1 penalty: theirs from their D2OLoss.accumulate_gradients (a stub generator that
    returns fixed images), ours from d2o_fast.engine.gan; the gradients they produce (w.r.t. the fakes for G,
    w.r.t. the heads for D and R1) and each backbone's share of d(loss)/d(logits).

The heads run in train mode (BatchNorm on batch statistics, as in training) with the spectral norms' vectors held
(the two implementations iterate differently; the last section measures that on its own): both divide by
u^T W v with the same u, v. "ours, training path" is what d2o_fast trains with (BatchNorm folded into the
backbone convs, fused input affine, CSM 1x1 conv before the x2 upsample); "ours, reference path" keeps the
authors' order of operations. Writes authors_discriminator.{md,json} to --out.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ('vgg16_bn', 'tf_efficientnet_lite0')
C_DIM = 10                    # CIFAR-10
AUTHORS_R1_GAMMA = 1e-4       # their train.sh
R1_GAIN = 16                  # their lazy-R1 interval, the gain of their R1 stage
SN_CALLS = (1, 3, 10, 30, 100, 300, 1000, 3000)

#----------------------------------------------------------------------------
# Their code, built offline with random weights.

def import_authors(src):
    """Their discriminator modules and loss, with pretrained loading switched off (no download, no pickle)."""
    sys.path.insert(0, os.path.abspath(src))
    import timm
    import torchvision

    vgg16_bn = torchvision.models.vgg16_bn
    torchvision.models.vgg16_bn = lambda *args, **kwargs: vgg16_bn(weights=None)
    create_model = timm.create_model
    timm.create_model = lambda name, pretrained=False, **kwargs: create_model(name, pretrained=False, **kwargs)

    from pg_modules import discriminator as pg_discriminator
    from training import loss as pg_loss

    class RandomEmbeddings:  # stands in for pickle: their class-embedding file is neither opened nor unpickled
        def __init__(self, file):
            pass

        def load(self):
            return {'embed': nn.Embedding(1000, 320)}

    pg_discriminator.pickle = type('NoPickle', (), {'Unpickler': RandomEmbeddings})
    pg_discriminator.open = lambda *args, **kwargs: contextlib.nullcontext()
    return pg_discriminator, pg_loss


def build_authors(pg, cond):
    from dnnlib import EasyDict
    kwargs = EasyDict(cout=64, expand=True, proj_type=2, num_discs=4, cond=int(bool(cond)), rand_embedding=False, im_res=256)
    feat = pg.ProjectedFeatureOnly(backbones=list(BACKBONES), diffaug=False, interp224=True, backbone_kwargs=kwargs)
    feat = feat.train().requires_grad_(False)
    nets = list(feat.feature_networks.values())
    disc = pg.ProjectedDiscriminatorOnly(backbones=list(BACKBONES), channels=[f.CHANNELS for f in nets],
                                         resolutions=[f.RESOLUTIONS for f in nets], diffaug=False, interp224=True,
                                         backbone_kwargs=kwargs).train()
    return feat, disc


def spectral_norm_convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and hasattr(m, 'weight_orig')]


def hold_spectral_norms(theirs_disc, ours):
    """Train mode without the power iteration: their hook iterates when the conv trains, ours when its
    parametrization trains."""
    for conv in spectral_norm_convs(theirs_disc):
        conv.eval()
    for conv in ours_spectral_norm_convs(ours):
        conv.parametrizations.weight.eval()

#----------------------------------------------------------------------------
# Their weights into d2o_fast's.

def ours_spectral_norm_convs(d):
    return [m for m in d.heads.modules() if isinstance(m, nn.Conv2d) and hasattr(m, 'parametrizations')]


@torch.no_grad()
def copy_in_order(src_state, dst_module, what):
    """Copy a state dict into a module whose state has the same entries in the same order (checked by the last
    name component and the shape)."""
    dst_state = dst_module.state_dict()
    if len(src_state) != len(dst_state):
        raise RuntimeError(f'{what}: {len(src_state)} tensors in theirs, {len(dst_state)} in ours')
    for (k_src, v_src), (k_dst, v_dst) in zip(src_state.items(), dst_state.items()):
        if k_src.split('.')[-1] != k_dst.split('.')[-1] or v_src.shape != v_dst.shape:
            raise RuntimeError(f'{what}: {k_src} {tuple(v_src.shape)} does not map to {k_dst} {tuple(v_dst.shape)}')
        v_dst.copy_(v_src)


@torch.no_grad()
def copy_spectral_norm_conv(src, dst):
    p = dst.parametrizations.weight
    p.original.copy_(src.weight_orig)
    p[0]._u.copy_(src.weight_u)
    p[0]._v.copy_(src.weight_v)
    if src.bias is not None:
        dst.bias.copy_(src.bias)


@torch.no_grad()
def copy_authors_into_ours(feat, disc, ours):
    for name in BACKBONES:
        theirs_net, ours_net = feat.feature_networks[name], ours.feature_networks[name]
        copy_in_order(theirs_net.pretrained.state_dict(), ours_net.backbone, f'{name} backbone')
        for i in range(4):
            ccm, csm = getattr(theirs_net.scratch, f'layer{i}_ccm'), getattr(theirs_net.scratch, f'layer{i}_csm').out_conv
            ours_net.projection.ccm[i].weight.copy_(ccm.weight)
            ours_net.projection.ccm[i].bias.copy_(ccm.bias)
            ours_net.projection.csm[i].weight.copy_(csm.weight)
            ours_net.projection.csm[i].bias.copy_(csm.bias)
        for i, head in enumerate(ours.heads[name]):
            mini = disc.discriminators[name].mini_discs[str(i)]
            down = list(mini.main)
            last = mini.cls if hasattr(mini, 'cls') else down.pop()
            if len(down) != len(head.blocks):
                raise RuntimeError(f'{name} head {i}: {len(down)} down blocks in theirs, {len(head.blocks)} in ours')
            for block_theirs, block_ours in zip(down, head.blocks):
                conv, bn = block_theirs.main[0], block_theirs.main[1]
                copy_spectral_norm_conv(conv, block_ours.conv)
                block_ours.bn.load_state_dict(bn.state_dict())
            copy_spectral_norm_conv(last, head.out)
            if head.class_embedding is not None:
                emb = head.class_embedding
                emb.embed.copy_(mini.embed.weight[:ours.c_dim])
                emb.proj_weight.copy_(mini.embed_proj.weight)
                emb.proj_bias.copy_(mini.embed_proj.bias)

#----------------------------------------------------------------------------
# The two discriminators on the same inputs.

def rel_err(ours, theirs):
    """max |ours - theirs| / max |theirs| over a tensor or a list of tensors taken together."""
    ours, theirs = flat(ours), flat(theirs)
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300)).item()


def rel_l2(ours, theirs):
    """|ours - theirs| / |theirs| (Euclidean norms) over a tensor or a list of tensors taken together."""
    ours, theirs = flat(ours), flat(theirs)
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-300)).item()


def flat(t):
    if isinstance(t, (list, tuple)):
        return torch.cat([flat(x) for x in t])
    return torch.as_tensor(t).double().flatten()


class FixedImages(nn.Module):
    """A stand-in generator for their loss: returns the given images whatever the noise."""

    def __init__(self, images):
        super().__init__()
        self.images = nn.Parameter(images.clone())

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.images


def rows_to_parts(rows, n):
    """Their list of rows (backbone-major: B rows of backbone 0, then B of backbone 1) as [B, K_b] per backbone."""
    return [torch.stack(rows[b * n:(b + 1) * n]) for b in range(len(rows) // n)]


def shares(parts):
    """Each part's share of sum |d loss / d logits| (from the parts' .grad)."""
    totals = [p.grad.abs().sum().item() for p in parts]
    return [t / sum(totals) for t in totals]


def their_stages(pg_loss, feat, disc, fake, real, labels):
    """Everything their code computes for the comparison, read from their modules by hooks: features and logits
    from their discriminator, the G, D and R1 gradients from their D2OLoss.accumulate_gradients."""
    out = {'input': {}, 'backbone': {}, 'projected': {}}
    hooks = []
    for name, net in feat.feature_networks.items():
        hooks.append(net.register_forward_pre_hook(lambda m, args, name=name: out['input'].__setitem__(name, args[0].detach())))
        hooks.append(net.register_forward_hook(
            lambda m, args, y, name=name: out['projected'].__setitem__(name, [y[str(i)].detach() for i in range(4)])))
        out['backbone'][name] = []
        for layer in (net.pretrained.layer0, net.pretrained.layer1, net.pretrained.layer2, net.pretrained.layer3):
            hooks.append(layer.register_forward_hook(lambda m, args, y, name=name: out['backbone'][name].append(y.detach())))
    x = real.clone().requires_grad_(True)
    disc.requires_grad_(False)
    rows = disc(feat(x), labels)
    for h in hooks:
        h.remove()
    n = real.shape[0]
    out['logits'] = {name: part.detach() for name, part in zip(BACKBONES, rows_to_parts(rows, n))}
    (out['input_grad'],) = torch.autograd.grad(sum(r.sum() for r in rows), [x])

    # Their accumulate_gradients: G stage (the gradient reaches the fixed images), D stage, R1 stage (gain 16).
    # Each backbone's [B, K_b] logits keep their gradient; the loss values are their formula (training/loss.py:
    # a mean per row, rows summed) on those logits.
    outputs = []

    def keep(module, args, y):
        if y.requires_grad:
            y.retain_grad()
        outputs.append(y)
    hooks = [m.register_forward_hook(keep) for m in disc.discriminators.values()]

    def head_grads():
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in disc.parameters()]

    def row_means(parts, sign):
        return sum(F.softplus(sign * row).mean() for part in parts for row in part).detach()

    reported = {}
    report = pg_loss.training_stats.report
    pg_loss.training_stats.report = lambda name, value: reported.__setitem__(name, value) or value
    try:
        g = FixedImages(fake)
        loss_fn = pg_loss.D2OLoss(g=g, d=disc, lpips_net=None, feature_net=feat, score_net=None, loss_type='ns',
                                  r1_type='r1', r1_gamma=AUTHORS_R1_GAMMA, teacher_type='none', use_gp=True)
        loss_fn.accumulate_gradients(images=real, class_labels=labels, stage=pg_loss.DO_GMAIN, gain=1)
        out['grad_fake'] = g.images.grad.clone()
        out['shares_g'], out['loss_g'] = shares(outputs), row_means(outputs, -1)
        outputs.clear()
        disc.zero_grad(set_to_none=True)
        loss_fn.accumulate_gradients(images=real, class_labels=labels, stage=pg_loss.DO_DMAIN, gain=1)
        out['grad_heads_d'] = head_grads()
        out['shares_d_fake'], out['shares_d_real'] = shares(outputs[:2]), shares(outputs[2:])
        out['loss_d'] = row_means(outputs[:2], 1) + row_means(outputs[2:], -1)
        outputs.clear()
        disc.zero_grad(set_to_none=True)
        loss_fn.accumulate_gradients(images=real, class_labels=labels, stage=pg_loss.DO_DR1, gain=R1_GAIN)
        out['grad_heads_r1'] = head_grads()
        disc.zero_grad(set_to_none=True)
        out['r1_penalty'] = reported['Loss/r1_penalty'].detach().clone()
    finally:
        pg_loss.training_stats.report = report
        for h in hooks:
            h.remove()
    return out


def our_stages(d, fake, real, labels, reference, r1_gamma):
    from d2o_fast.engine.gan import discriminator_loss, generator_loss, r1_penalty
    out = {'input': {}, 'backbone': {}, 'projected': {}}
    c = labels if d.c_dim else None
    hooks = []
    for name, net in d.feature_networks.items():
        hooks.append(net.backbone.register_forward_pre_hook(
            lambda m, args, name=name: out['input'].__setitem__(name, args[0].detach())))
        hooks.append(net.backbone.register_forward_hook(
            lambda m, args, y, name=name: out['backbone'].__setitem__(name, [t.detach() for t in y])))
        hooks.append(net.register_forward_hook(
            lambda m, args, y, name=name: out['projected'].__setitem__(name, [t.detach() for t in y])))
    x = real.clone().requires_grad_(True)
    d.requires_grad_(False)
    logits = d(x, c, reference=reference)
    for h in hooks:
        h.remove()
    out['logits'] = {name: part.detach() for name, part in zip(BACKBONES, logits)}
    (out['input_grad'],) = torch.autograd.grad(sum(p.sum() for p in logits), [x])

    # The trainer's three terms on the same images: G step, D step, lazy R1.
    f = fake.clone().requires_grad_(True)
    fake_logits = d(f, c, reference=reference)
    parts = [p.detach().requires_grad_(True) for p in fake_logits]
    loss_g = generator_loss(parts)
    loss_g.backward()
    out['shares_g'], out['loss_g'] = shares(parts), loss_g.detach()
    (out['grad_fake'],) = torch.autograd.grad(fake_logits, [f], [p.grad for p in parts])
    d.requires_grad_(True)
    params = d.trainable_parameters()
    if reference:
        fake_logits, real_logits = d(fake, c, reference=True), d(real, c, reference=True)
    else:
        fake_logits, real_logits = d.forward_pair(fake, real, c, c)
    parts_fake = [p.detach().requires_grad_(True) for p in fake_logits]
    parts_real = [p.detach().requires_grad_(True) for p in real_logits]
    loss_d = discriminator_loss(parts_fake, parts_real)
    loss_d.backward()
    out['shares_d_fake'], out['shares_d_real'], out['loss_d'] = shares(parts_fake), shares(parts_real), loss_d.detach()
    grads = torch.autograd.grad(list(fake_logits) + list(real_logits), params,
                                [p.grad for p in parts_fake + parts_real], allow_unused=True)
    out['grad_heads_d'] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    penalty = r1_penalty(lambda img, c: d(img, c, reference=reference), real, c)
    out['grad_heads_r1'] = grads_or_zeros(penalty.mean() * (r1_gamma / 2) * R1_GAIN, params)
    out['r1_penalty'] = penalty.detach()
    return out


def grads_or_zeros(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def head_parameter_order(disc, ours):
    """Our head parameters in the order their_param_order lists theirs (for comparing gradients). The biases of
    the convs before a train-mode BatchNorm are left out: their gradient is zero (the BatchNorm subtracts the
    batch mean), so both sides hold rounding noise there."""
    order = []
    for name in BACKBONES:
        for i, head in enumerate(ours.heads[name]):
            mini = disc.discriminators[name].mini_discs[str(i)]
            for block in head.blocks:
                order += [block.conv.parametrizations.weight.original, block.bn.weight, block.bn.bias]
            if head.class_embedding is None:
                order.append(head.out.parametrizations.weight.original)
            else:
                order += [head.out.parametrizations.weight.original, head.class_embedding.embed,
                          head.class_embedding.proj_weight, head.class_embedding.proj_bias]
            n_theirs = len(list(mini.parameters()))
            n_ours = len(list(head.parameters()))  # same count, biases included
            if n_theirs != n_ours:
                raise RuntimeError(f'{name} head {i}: {n_theirs} parameters in theirs, {n_ours} in ours')
    return order


def their_param_order(disc):
    """Their head parameters as head_parameter_order lists ours (without the biases before a BatchNorm)."""
    order = []
    for name in BACKBONES:
        for i in range(4):
            mini = disc.discriminators[name].mini_discs[str(i)]
            for m in mini.main:
                if hasattr(m, 'main'):
                    conv, bn = m.main[0], m.main[1]
                    order += [conv.weight_orig, bn.weight, bn.bias]
                else:
                    order.append(m.weight_orig)
            if hasattr(mini, 'cls'):
                order += [mini.cls.weight_orig, mini.embed.weight, mini.embed_proj.weight, mini.embed_proj.bias]
    return order


def compare(pg, pg_loss, cond, dtype, batch, seed):
    from d2o_fast.discriminators import ProjectedDiscriminator, fold_batchnorm
    torch.manual_seed(seed)
    feat, disc = build_authors(pg, cond)
    ours_ref = ProjectedDiscriminator(BACKBONES, c_dim=C_DIM if cond else 0, pretrained=False, fold_bn=False)
    copy_authors_into_ours(feat, disc, ours_ref)
    for m in (feat, disc, ours_ref):
        m.to(dtype)
    ours_fast = copy.deepcopy(ours_ref)
    for net in ours_fast.feature_networks.values():  # as build_backbone does after loading weights
        fold_batchnorm(net.backbone)
    ours_ref.train(), ours_fast.train(), disc.train()
    hold_spectral_norms(disc, ours_ref)
    hold_spectral_norms(disc, ours_fast)

    g = torch.Generator().manual_seed(seed + 1)
    real = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).to(dtype)
    fake = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).to(dtype)
    labels = F.one_hot(torch.randint(0, C_DIM, [batch], generator=g), C_DIM).to(dtype) if cond else None

    theirs_params = their_param_order(disc)
    theirs = their_stages(pg_loss, feat, disc, fake, real, labels)
    # Their losses are sums over the images of one GPU, R1 a mean (config.py); with gamma / n here, R1 : GAN is
    # theirs, and every gradient is theirs / n.
    rows = {}
    for path, ours_d in (('training path', ours_fast), ('reference path', ours_ref)):
        ours = our_stages(ours_d, fake, real, labels, reference=path == 'reference path', r1_gamma=AUTHORS_R1_GAMMA / batch)
        order = head_parameter_order(disc, ours_d)
        by_id = {id(p): g for p, g in zip(ours_d.trainable_parameters(), ours['grad_heads_d'])}
        by_id_r1 = {id(p): g for p, g in zip(ours_d.trainable_parameters(), ours['grad_heads_r1'])}
        grad_d = [by_id[id(p)] for p in order]
        grad_r1 = [by_id_r1[id(p)] for p in order]
        # Their full-table embedding: only the rows of the CIFAR-10 classes can have a gradient.
        their_grad_d = [t[:C_DIM] if t.shape[0] == 1000 else t for t in theirs['grad_heads_d']]
        their_grad_r1 = [t[:C_DIM] if t.shape[0] == 1000 else t for t in theirs['grad_heads_r1']]
        their_grad_d = reorder(theirs_params, list(disc.parameters()), their_grad_d)
        their_grad_r1 = reorder(theirs_params, list(disc.parameters()), their_grad_r1)
        r = {}

        def add(stage, a, b, per_tensor=False):
            worst = max(rel_err(x, y) for x, y in zip(a, b)) if per_tensor else rel_err(a, b)
            r[stage] = dict(max=worst, l2=rel_l2(a, b))
        for name in BACKBONES:
            add(f'backbone input ({name})', ours['input'][name], theirs['input'][name])
            add(f'backbone features, 4 scales ({name})', ours['backbone'][name], theirs['backbone'][name])
            add(f'projected features, CCM + CSM ({name})', ours['projected'][name], theirs['projected'][name])
            add(f'logits [B, {theirs["logits"][name].shape[1]}] ({name})', ours['logits'][name], theirs['logits'][name])
        add('input gradient of the sum of all logits', ours['input_grad'], theirs['input_grad'])
        add('G loss (ours x B)', ours['loss_g'] * batch, theirs['loss_g'])
        add('D loss (ours x B)', ours['loss_d'] * batch, theirs['loss_d'])
        add('R1 penalty per image', ours['r1_penalty'], theirs['r1_penalty'])
        add('G step: d loss / d fakes (ours x B)', ours['grad_fake'] * batch, theirs['grad_fake'])
        add('D step: head gradients, worst tensor (ours x B)', [t * batch for t in grad_d], their_grad_d, per_tensor=True)
        add('R1 step: head gradients, worst tensor, gamma / B here (ours x B)', [t * batch for t in grad_r1],
            their_grad_r1, per_tensor=True)
        rows[path] = r
    share_table = {k: {'theirs': theirs[k], 'ours': ours[k]} for k in ('shares_g', 'shares_d_fake', 'shares_d_real')}
    return rows, share_table, old_weighting_shares(theirs['logits'])


def reorder(order, params, grads):
    by_id = {id(p): g for p, g in zip(params, grads)}
    return [by_id[id(p)] for p in order]


def old_weighting_shares(logits):
    """Each backbone's share of d(G loss)/d(logits) under one mean over all concatenated logits."""
    parts = [l.detach().double().requires_grad_(True) for l in logits.values()]
    F.softplus(-torch.cat(parts, dim=1)).mean().backward()
    grads = [p.grad.abs().sum().item() for p in parts]
    return [g / sum(grads) for g in grads]

#----------------------------------------------------------------------------
# Spectral norm: their start (random u, v; one step per call) against ours (15 warm-up steps, then one per call).

@torch.no_grad()
def spectral_norm_convergence(pg, seed):
    from torch.nn.utils.parametrizations import spectral_norm
    torch.manual_seed(seed)
    _, disc = build_authors(pg, cond=False)
    disc.double().train()
    theirs = spectral_norm_convs(disc)
    ours = []
    for conv in theirs:
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=conv.bias is not None).double()
        plain.weight.copy_(conv.weight_orig)
        ours.append(spectral_norm(plain).train())
    true_sigma = [torch.linalg.matrix_norm(c.weight_orig.flatten(1), ord=2).item() for c in theirs]

    def sigma_theirs(c):
        return torch.dot(c.weight_u, c.weight_orig.flatten(1) @ c.weight_v).item()

    def sigma_ours(c):
        p = c.parametrizations.weight
        return torch.dot(p[0]._u, p.original.flatten(1) @ p[0]._v).item()

    rows, calls = [], 0
    for n in (0,) + SN_CALLS:
        for _ in range(n - calls):  # one training-mode call = one power-iteration step
            for a, b in zip(theirs, ours):
                a(torch.zeros(1, a.in_channels, 4, 4, dtype=torch.float64))
                b.parametrizations.weight()
        calls = n
        err_t = [abs(1 - sigma_theirs(c) / s) for c, s in zip(theirs, true_sigma)]
        err_o = [abs(1 - sigma_ours(c) / s) for c, s in zip(ours, true_sigma)]
        apart = [abs(1 - sigma_ours(b) / sigma_theirs(a)) for a, b in zip(theirs, ours)]
        rows.append(dict(calls=n, theirs_max_rel_err=max(err_t), ours_max_rel_err=max(err_o), apart_max=max(apart)))
    shapes = sorted({tuple(c.weight_orig.flatten(1).shape) for c in theirs})
    return dict(layers=len(theirs), shapes=shapes, rows=rows)

#----------------------------------------------------------------------------

def fmt(x):
    return f'{x:.1e}'


def write_report(results, out_dir, args):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'authors_discriminator.json'), 'w') as f:
        json.dump(results, f, indent=1)
    lines = ['# The projected discriminator against the authors\' code', '',
             f'Command: `{results["command"]}` ({results["host"]}; torch {results["torch"]}, timm {results["timm"]}). '
             f'Their CIFAR-10 discriminator (vgg16_bn + tf_efficientnet_lite0) with random weights, copied into '
             f'd2o_fast\'s; {args.batch} images of 32x32; heads in train mode with the spectral-norm vectors held. '
             '"max": max |ours - theirs| / max |theirs| over the stage (for head gradients, the worst tensor; the '
             'conv biases before a train-mode BatchNorm, whose gradient is zero, left out); "norm": |ours - theirs| / '
             '|theirs|. Their losses are sums over the images of a GPU, ours '
             'image means: ours is multiplied by B before comparing, and our R1 uses gamma / B, which gives their '
             'R1 : GAN balance (engine/config.py; B = 64 in their runs).', '']
    for cond in ('unconditional', 'conditional (10 classes)'):
        for path in ('training path', 'reference path'):
            r64 = results['stages'][cond]['float64'][path]
            r32 = results['stages'][cond]['float32'][path]
            lines += [f'## {cond}, ours = {path}', '',
                      '| stage | float64, max | float64, norm | float32, max | float32, norm |', '|---|---|---|---|---|']
            lines += [f'| {k} | {fmt(r64[k]["max"])} | {fmt(r64[k]["l2"])} | {fmt(r32[k]["max"])} | {fmt(r32[k]["l2"])} |'
                      for k in r64]
            lines.append('')
    lines += ['## Each backbone\'s share of d(loss)/d(logits) (vgg16_bn / tf_efficientnet_lite0, float64)', '',
              '| loss | theirs | d2o_fast | one mean over all logits |', '|---|---|---|---|']
    for cond in ('unconditional', 'conditional (10 classes)'):
        s = results['shares'][cond]
        old = results['old_weighting_g_shares'][cond]
        for key, label in (('shares_g', 'G loss'), ('shares_d_fake', 'D loss, fakes'), ('shares_d_real', 'D loss, reals')):
            oldcell = ' / '.join(f'{v:.3f}' for v in old) if key == 'shares_g' else ''
            lines.append(f'| {label}, {cond} | {" / ".join(f"{v:.3f}" for v in s[key]["theirs"])} | '
                         f'{" / ".join(f"{v:.3f}" for v in s[key]["ours"])} | {oldcell} |')
    sn = results['spectral_norm']
    lines += ['', '## Spectral norm: their start against ours, same weights (float64)', '',
              f'{sn["layers"]} spectral-norm convs of the heads; true sigma from an SVD. Theirs: '
              'torch.nn.utils.spectral_norm (random u, v; per call v then u). Ours: the parametrization (15 steps '
              'at construction; per call u then v). One call = one training-mode forward (about 3 per iteration: '
              'G step, D step on fakes and on reals).', '',
              '| calls | theirs: max rel. error of sigma | ours: max rel. error of sigma | max |sigma_ours / sigma_theirs - 1| |',
              '|---|---|---|---|']
    lines += [f'| {r["calls"]} | {fmt(r["theirs_max_rel_err"])} | {fmt(r["ours_max_rel_err"])} | {fmt(r["apart_max"])} |'
              for r in sn['rows']]
    lines.append('')
    with open(os.path.join(out_dir, 'authors_discriminator.md'), 'w') as f:
        f.write('\n'.join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--authors-src', required=True, help='a checkout of github.com/Zyriix/D2O')
    p.add_argument('--batch', type=int, default=3, help='images per comparison (their per-GPU batch)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.authors_src, 'pg_modules', 'discriminator.py')):
        sys.exit(f'error: {args.authors_src} is not a checkout of Zyriix/D2O (no pg_modules/discriminator.py)')
    pg, pg_loss = import_authors(args.authors_src)
    import timm
    t0 = time.time()
    results = dict(command='python benchmarks/authors_discriminator.py --authors-src DIR' +
                   (f' --batch {args.batch}' if args.batch != 3 else ''),
                   host=f'{platform.machine()}, {torch.get_num_threads()} threads', torch=torch.__version__,
                   timm=timm.__version__, batch=args.batch, stages={}, shares={}, old_weighting_g_shares={})
    for cond, label in ((False, 'unconditional'), (True, 'conditional (10 classes)')):
        results['stages'][label] = {}
        for dtype in (torch.float64, torch.float32):
            rows, shares, old = compare(pg, pg_loss, cond, dtype, args.batch, args.seed)
            results['stages'][label][str(dtype).replace('torch.', '')] = rows
            if dtype == torch.float64:
                results['shares'][label], results['old_weighting_g_shares'][label] = shares, old
            print(f'{label} {dtype}: done ({time.time() - t0:.0f} s)', flush=True)
    results['spectral_norm'] = spectral_norm_convergence(pg, args.seed)
    results['seconds'] = time.time() - t0
    write_report(results, args.out, args)
    print(open(os.path.join(args.out, 'authors_discriminator.md')).read())


if __name__ == '__main__':
    main()
