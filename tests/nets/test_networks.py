"""The U-Nets and preconditioners: every architecture variant, labels, state-dict transfer."""

import pytest
import torch

from d2o_fast.nets import D2OPrecond, EDMPrecond, architecture_kwargs, build_network

RES = 16


def tiny(arch, **overrides):
    kw = architecture_kwargs(arch, RES, 3, **overrides)
    if arch == 'adm':
        kw.update(model_channels=32, channel_mult=[1, 2], attn_resolutions=[8], num_blocks=1)
    else:
        kw.update(model_channels=16, channel_mult=[1, 2], attn_resolutions=[8], num_blocks=1)
    kw.update({k: v for k, v in overrides.items() if k in ('channel_mult', 'num_blocks')})
    kw.setdefault('dropout', 0.0)
    return kw


VARIANTS = {
    'ddpmpp-uncond': tiny('ddpmpp'),
    'ddpmpp-cond-aug': tiny('ddpmpp', label_dim=10, augment_dim=9),
    'ncsnpp-uncond-aug': tiny('ncsnpp', augment_dim=9),
    'ncsnpp-cond': tiny('ncsnpp', label_dim=10),
    'skip-encoder-skip-decoder': tiny('ddpmpp', encoder_type='skip', decoder_type='skip', label_dim=3),
    'residual-encoder-skip-decoder': tiny('ncsnpp', decoder_type='skip'),
    'adm-uncond': tiny('adm'),
    'adm-cond-aug': tiny('adm', label_dim=10, augment_dim=9),
}


def jitter(net, seed, scale=0.05):
    """EDM zero-initialises some output layers; random offsets make every path visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def inputs(kw, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, RES, RES, generator=g)
    sigma = torch.rand(n, generator=g) * 10 + 0.01
    labels = None
    if kw['label_dim']:
        labels = torch.nn.functional.one_hot(torch.randint(0, kw['label_dim'], (n,), generator=g), kw['label_dim']).float()
    extra = {}
    if kw.get('augment_dim'):
        extra['augment_labels'] = torch.randn(n, kw['augment_dim'], generator=g)
    return x, sigma, labels, extra


@pytest.mark.parametrize('name', sorted(VARIANTS))
@pytest.mark.parametrize('cls', ['EDMPrecond', 'D2OPrecond'])
def test_forward_shape_and_state_dict_transfer(name, cls):
    kw = VARIANTS[name]
    net = jitter(build_network(cls, **kw).eval(), seed=1)
    x, sigma, labels, extra = inputs(kw)
    y = net(x, sigma, labels, **extra)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()

    # A fresh net with other random weights differs until it takes the state dict.
    other = jitter(build_network(cls, **kw).eval(), seed=2)
    assert not torch.allclose(other(x, sigma, labels, **extra), y)
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other(x, sigma, labels, **extra), y, rtol=0, atol=0)


@pytest.mark.parametrize('name', ['ddpmpp-cond-aug', 'adm-cond-aug'])
def test_labels_and_augment_labels_change_output(name):
    kw = VARIANTS[name]
    net = jitter(build_network('EDMPrecond', **kw).eval(), seed=3)
    x, sigma, labels, extra = inputs(kw)
    base = net(x, sigma, labels, **extra)
    assert not torch.allclose(base, net(x, sigma, labels.roll(1, dims=1), **extra))
    assert not torch.allclose(base, net(x, sigma, labels, augment_labels=extra['augment_labels'] * 2))
    # No class labels on a conditional net means the all-zeros label, as in EDM.
    torch.testing.assert_close(net(x, sigma, None, **extra), net(x, sigma, torch.zeros_like(labels), **extra))


def test_edm_and_d2o_share_module_tree_and_differ_only_in_preconditioning():
    kw = VARIANTS['ncsnpp-cond']
    edm = build_network('EDMPrecond', **kw).eval()
    d2o = build_network('D2OPrecond', **kw).eval()
    d2o.load_state_dict(edm.state_dict())
    x, sigma, labels, _ = inputs(kw)
    big = torch.full_like(sigma, 80.0)
    # At sigma = 80 the eps = 2e-3 boundary changes the output only slightly ...
    a, b = edm(x * 80, big, labels), d2o(x * 80, big, labels)
    assert 0 < (a - b).abs().max() < 1e-2 * a.abs().max()
    # ... and at sigma = eps the generator is exactly the identity (c_skip = 1, c_out = 0).
    eps = torch.full_like(sigma, D2OPrecond.eps)
    torch.testing.assert_close(d2o(x, eps, labels), x, rtol=1e-6, atol=1e-6)


def test_preconditioning_coefficients_follow_the_formulas():
    net = build_network('D2OPrecond', **VARIANTS['ddpmpp-uncond'])
    s = torch.tensor([0.01, 0.5, 2.0, 80.0]).reshape(-1, 1, 1, 1)
    sd, eps = 0.5, 2e-3
    c_skip, c_out, c_in, c_noise = net._coefficients(s)
    torch.testing.assert_close(c_skip, sd ** 2 / ((s - eps) ** 2 + sd ** 2))
    torch.testing.assert_close(c_out, (s - eps) * sd / (s ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_in, 1 / (s ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)
    e_skip, e_out, _, _ = EDMPrecond._coefficients(net, s)
    torch.testing.assert_close(e_skip, sd ** 2 / (s ** 2 + sd ** 2))
    torch.testing.assert_close(e_out, s * sd / (s ** 2 + sd ** 2).sqrt())


def test_generate_is_denoiser_at_sigma_80():
    kw = VARIANTS['ddpmpp-cond-aug']
    net = build_network('D2OPrecond', **kw).eval()
    z = torch.randn(2, 3, RES, RES)
    labels = torch.eye(10)[:2]
    torch.testing.assert_close(net.generate(z, labels), net(80 * z, torch.full([2], 80.0), labels))


def test_backward_reaches_every_trainable_parameter():
    kw = VARIANTS['ncsnpp-cond']
    net = build_network('D2OPrecond', **kw).train()
    x, sigma, labels, _ = inputs(kw)
    net(x, sigma, labels).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_bad_architecture_arguments_are_refused():
    with pytest.raises(ValueError, match='encoder_type'):
        build_network('EDMPrecond', **tiny('ddpmpp', encoder_type='bogus'))
    with pytest.raises(ValueError, match='model_type'):
        build_network('EDMPrecond', **dict(tiny('ddpmpp'), model_type='Nope'))
    with pytest.raises(ValueError, match='unknown network class'):
        build_network('VPPrecond', **tiny('ddpmpp'))
