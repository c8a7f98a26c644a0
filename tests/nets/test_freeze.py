"""D2O-F freeze levels: the authors' rule, full-size counts from the paper, no frozen weight gradients."""

import pytest

from d2o_fast.nets import apply_freeze, build_network, build_on_meta, edm_checkpoint_kwargs, format_freeze_report, freeze_report, is_frozen
from tests.nets.test_networks import VARIANTS, inputs


@pytest.mark.parametrize('stem, total_m, frozen1, frozen3', [
    ('edm-cifar10-32x32-uncond-ve', 56.40, 84.4, 90.5),
    ('edm-cifar10-32x32-cond-ve', 56.40, 84.4, 90.5),
    ('edm-ffhq-64x64-uncond-ve', 62.76, 83.8, None),
    ('edm-afhqv2-64x64-uncond-ve', 62.76, 83.8, None),
    ('edm-imagenet-64x64-cond-adm', 295.90, 78.8, None),
])
def test_full_size_counts_match_the_paper(stem, total_m, frozen1, frozen3):
    net = build_on_meta('D2OPrecond', **edm_checkpoint_kwargs(stem))
    total = sum(p.numel() for p in net.parameters())
    assert round(total / 1e6, 2) == total_m
    r1 = freeze_report(net, 1)['total']
    assert r1['total'] == total and r1['trainable'] + r1['frozen'] == total
    assert round(100 * r1['frozen'] / total, 1) == frozen1
    if frozen3 is not None:
        assert round(100 * freeze_report(net, 3)['total']['frozen'] / total, 1) == frozen3


def test_rule_by_name():
    assert is_frozen('model.enc.16x16_block0.conv0.weight', 1)
    assert is_frozen('model.dec.4x4_in0.proj.weight', 1)
    assert is_frozen('model.enc.16x16_down.conv1.bias', 1)
    assert not is_frozen('model.enc.16x16_block0.qkv.weight', 1) and is_frozen('model.enc.16x16_block0.qkv.weight', 2)
    assert not is_frozen('model.enc.16x16_block0.skip.weight', 2) and is_frozen('model.enc.16x16_block0.skip.weight', 3)
    for name in ['model.enc.16x16_block0.norm0.weight', 'model.enc.16x16_block0.affine.weight', 'model.map_layer0.weight',
                 'model.enc.32x32_conv.weight', 'model.dec.32x32_aux_conv.weight', 'model.out_conv.weight']:
        assert not any(is_frozen(name, level) for level in range(4)), name
    with pytest.raises(ValueError, match='freeze_level'):
        is_frozen('x', 4)


@pytest.mark.parametrize('level', [0, 1, 2, 3])
@pytest.mark.parametrize('name', ['ncsnpp-cond', 'adm-cond-aug'])
def test_frozen_parameters_get_no_gradient(level, name):
    kw = VARIANTS[name]
    net = build_network('D2OPrecond', **kw).train()
    trainable = apply_freeze(net, level)
    x, sigma, labels, extra = inputs(kw)
    net(x, sigma, labels, **extra).square().mean().backward()
    for n, p in net.named_parameters():
        if is_frozen(n, level):
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.requires_grad and p.grad is not None, n
    assert {id(p) for p in trainable} == {id(p) for p in net.parameters() if p.requires_grad}
    report = freeze_report(net)
    assert report['total']['trainable'] == sum(p.numel() for p in trainable)
    if level:
        assert report['conv0']['frozen'] == report['conv0']['total'] > 0
        assert report['affine']['trainable'] == report['affine']['total'] > 0
    assert 'total' in format_freeze_report(report)
