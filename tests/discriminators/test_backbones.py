"""Backbone re-implementations: shapes, timm key/shape compatibility, weight loading, TF padding, BN folding."""

import pytest
import torch
import torch.nn.functional as F

from d2o_fast.discriminators import BACKBONES, BackboneWeightsError, build_backbone, fold_batchnorm, load_backbone_weights
from d2o_fast.discriminators.backbones import Attention, Conv2dSame, attention_reference, tf_same_padding

VGG, EFFNET, DEIT = 'vgg16_bn', 'tf_efficientnet_lite0', 'deit_base_distilled_patch16_224'

# Keys of timm's models that we deliberately do not build (classifier parts the discriminator never runs),
# with their shapes as in timm's source (vgg.py ConvMlp + ClassifierHead, efficientnet.py, vision_transformer.py).
TIMM_UNUSED_KEYS = {
    VGG: {'pre_logits.fc1.weight': (4096, 512, 7, 7), 'pre_logits.fc1.bias': (4096,),
          'pre_logits.fc2.weight': (4096, 4096, 1, 1), 'pre_logits.fc2.bias': (4096,),
          'head.fc.weight': (1000, 4096), 'head.fc.bias': (1000,)},
    EFFNET: {'conv_head.weight': (1280, 320, 1, 1), 'bn2.weight': (1280,), 'bn2.bias': (1280,),
             'bn2.running_mean': (1280,), 'bn2.running_var': (1280,), 'bn2.num_batches_tracked': (),
             'classifier.weight': (1000, 1280), 'classifier.bias': (1000,)},
    DEIT: {'norm.weight': (768,), 'norm.bias': (768,), 'head.weight': (1000, 768), 'head.bias': (1000,),
           'head_dist.weight': (1000, 768), 'head_dist.bias': (1000,)},
}

# Well-known keys of timm's state dicts and their shapes.
TIMM_KNOWN_KEYS = {
    VGG: {'features.0.weight': (64, 3, 3, 3), 'features.0.bias': (64,), 'features.1.running_mean': (64,),
          'features.3.weight': (64, 64, 3, 3), 'features.7.weight': (128, 64, 3, 3), 'features.14.weight': (256, 128, 3, 3),
          'features.24.weight': (512, 256, 3, 3), 'features.40.weight': (512, 512, 3, 3), 'features.41.running_var': (512,)},
    EFFNET: {'conv_stem.weight': (32, 3, 3, 3), 'bn1.running_mean': (32,), 'blocks.0.0.conv_dw.weight': (32, 1, 3, 3),
             'blocks.0.0.conv_pw.weight': (16, 32, 1, 1), 'blocks.1.0.conv_pw.weight': (96, 16, 1, 1),
             'blocks.1.0.conv_dw.weight': (96, 1, 3, 3), 'blocks.1.0.conv_pwl.weight': (24, 96, 1, 1),
             'blocks.2.0.conv_dw.weight': (144, 1, 5, 5),
             'blocks.2.1.conv_dw.weight': (240, 1, 5, 5), 'blocks.5.3.bn3.running_var': (192,),
             'blocks.6.0.conv_pwl.weight': (320, 1152, 1, 1), 'blocks.6.0.bn3.num_batches_tracked': ()},
    DEIT: {'cls_token': (1, 1, 768), 'dist_token': (1, 1, 768), 'pos_embed': (1, 198, 768),
           'patch_embed.proj.weight': (768, 3, 16, 16), 'patch_embed.proj.bias': (768,),
           'blocks.0.norm1.weight': (768,), 'blocks.11.attn.qkv.weight': (2304, 768), 'blocks.11.attn.qkv.bias': (2304,),
           'blocks.11.attn.proj.weight': (768, 768), 'blocks.11.mlp.fc1.weight': (3072, 768),
           'blocks.11.mlp.fc2.weight': (768, 3072), 'blocks.11.norm2.bias': (768,)},
}

# Published parameter counts of the full timm models (torchvision docs: vgg16_bn 138,365,992 exactly; timm's
# results tables: tf_efficientnet_lite0 4.65M, deit_base_distilled_patch16_224 87.34M).
PUBLISHED_PARAMS = {VGG: (138_365_992, 0), EFFNET: (4.65e6, 0.005e6), DEIT: (87.34e6, 0.005e6)}


@pytest.fixture(scope='module')
def backbones():
    torch.manual_seed(0)
    return {name: build_backbone(name, pretrained=False) for name in BACKBONES}


def timm_style_state_dict(backbone):
    """Our keys plus timm's extra classifier keys: what a real timm state dict file holds."""
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for k, shape in TIMM_UNUSED_KEYS[backbone.name].items():
        state[k] = torch.zeros(shape, dtype=torch.long if k.endswith('num_batches_tracked') else torch.float32)
    return state


def randomize_batchnorm(module, generator):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)

#----------------------------------------------------------------------------
# Shapes.

@pytest.mark.parametrize('name,size,expected', [
    (VGG, 64, [(128, 32), (256, 16), (512, 8), (512, 4)]),
    (EFFNET, 64, [(24, 16), (40, 8), (112, 4), (320, 2)]),
    (EFFNET, 224, [(24, 56), (40, 28), (112, 14), (320, 7)]),
    (DEIT, 224, [(768, 14)] * 4),
])
def test_feature_shapes(backbones, name, size, expected):
    net = backbones[name]
    with torch.no_grad():
        feats = net(torch.randn(1, 3, size, size))
    assert [(f.shape[1], f.shape[2]) for f in feats] == expected
    assert all(f.shape[2] == f.shape[3] and torch.isfinite(f).all() for f in feats)
    assert tuple(net.channels) == tuple(c for c, _ in expected)
    assert [size // r for r in net.reductions] == [s for _, s in expected]


def test_deit_rejects_other_sizes(backbones):
    with pytest.raises(Exception, match='224x224'):
        backbones[DEIT](torch.randn(1, 3, 112, 112))

#----------------------------------------------------------------------------
# timm compatibility of the state dict.

@pytest.mark.parametrize('name', [VGG, EFFNET, DEIT])
def test_known_timm_keys_and_shapes(backbones, name):
    state = backbones[name].state_dict()
    for key, shape in TIMM_KNOWN_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # No key of ours collides with the classifier keys we skip.
    assert not any(k.startswith(backbones[name].unused_pretrained_prefixes) for k in state)


@pytest.mark.parametrize('name', [VGG, EFFNET, DEIT])
def test_parameter_count_matches_published_model(backbones, name):
    ours = sum(p.numel() for p in backbones[name].parameters())
    extra = sum(torch.Size(s).numel() for k, s in TIMM_UNUSED_KEYS[name].items()
                if not k.split('.')[-1] in ('running_mean', 'running_var', 'num_batches_tracked'))
    expected, tol = PUBLISHED_PARAMS[name]
    assert abs(ours + extra - expected) <= tol


def test_key_structure(backbones):
    vgg = backbones[VGG].state_dict()
    conv_idx = sorted({int(k.split('.')[1]) for k in vgg if k.endswith('.weight') and vgg[k].ndim == 4})
    assert conv_idx == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # torchvision/timm features indices
    eff = backbones[EFFNET].state_dict()
    blocks_per_stage = [len({k.split('.')[2] for k in eff if k.startswith(f'blocks.{s}.')}) for s in range(7)]
    assert blocks_per_stage == [1, 2, 2, 3, 3, 4, 1]
    assert not any('.se.' in k or 'bias' in k and 'conv' in k for k in eff)  # Lite: no SE, bias-free convs
    deit = backbones[DEIT].state_dict()
    assert len({k.split('.')[1] for k in deit if k.startswith('blocks.')}) == 12

#----------------------------------------------------------------------------
# Loading weights.

@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_load_timm_state_dict_from_dir(tmp_path, suffix):
    torch.manual_seed(1)
    source = BACKBONES[EFFNET]()
    randomize_batchnorm(source, torch.Generator().manual_seed(1))
    state = timm_style_state_dict(source)
    path = tmp_path / f'{EFFNET}{suffix}'
    if suffix == '.safetensors':
        import safetensors.torch
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(2)
    loaded = build_backbone(EFFNET, pretrained=True, weights_dir=str(tmp_path))
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_torchvision_style_vgg(backbones, tmp_path):
    # torchvision's vgg16_bn (what the authors loaded) shares timm's features.* keys; its classifier is skipped.
    state = {k: v.clone() for k, v in backbones[VGG].state_dict().items()}
    state['classifier.0.weight'] = torch.zeros(4096, 25088)
    target = BACKBONES[VGG]()
    load_backbone_weights(target, state_dict=state)
    assert torch.equal(target.features[40].weight, backbones[VGG].features[40].weight)


def test_mismatching_weights_fail_loudly(backbones):
    state = timm_style_state_dict(backbones[EFFNET])
    state['blocks.1.0.conv_dw.weight'] = torch.zeros(96, 1, 5, 5)
    with pytest.raises(BackboneWeightsError, match='wrong shape'):
        load_backbone_weights(BACKBONES[EFFNET](), state_dict=state)
    state = timm_style_state_dict(backbones[EFFNET])
    del state['bn1.running_var']
    state['blocks.0.0.se.conv_reduce.weight'] = torch.zeros(8, 32, 1, 1)
    with pytest.raises(BackboneWeightsError, match='missing.*unexpected'):
        load_backbone_weights(BACKBONES[EFFNET](), state_dict=state)


def test_missing_weights_error_says_how_to_provide_them(tmp_path):
    try:
        import timm  # noqa: F401
        pytest.skip('timm importable: it would download the weights')
    except Exception:
        pass
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone(VGG, pretrained=True, weights_dir=str(tmp_path))
    message = str(info.value)
    assert f'{tmp_path}/{VGG}.safetensors' in message and 'timm.create_model' in message and '--disc-weights' in message
    with pytest.raises(BackboneWeightsError, match='does not exist'):
        build_backbone(VGG, pretrained=True, weights_dir=str(tmp_path / 'nope'))
    with pytest.raises(BackboneWeightsError, match='not found'):
        build_backbone(EFFNET, pretrained=True)

#----------------------------------------------------------------------------
# TF 'same' padding.

@pytest.mark.parametrize('size,kernel,stride,expected', [
    (224, 3, 2, (0, 1)), (112, 3, 2, (0, 1)), (56, 5, 2, (1, 2)), (28, 5, 2, (1, 2)), (7, 3, 2, (1, 1)),
    (14, 5, 1, (2, 2)), (32, 3, 2, (0, 1)),
])
def test_tf_same_padding(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize('size', [15, 16, 33])
def test_conv2d_same_matches_explicit_padding(size):
    conv = Conv2dSame(4, 6, 5, stride=2, bias=False)
    x = torch.randn(2, 4, size, size)
    total = max((-(-size // 2) - 1) * 2 + 5 - size, 0)
    ref = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, None, 2)
    out = conv(x)
    assert out.shape[-1] == -(-size // 2)  # TF 'same': ceil(size / stride)
    torch.testing.assert_close(out, ref)

#----------------------------------------------------------------------------
# BatchNorm folding, channels_last, bf16.

@pytest.mark.parametrize('name,size,pairs', [(VGG, 32, 13), (EFFNET, 64, 48)])
def test_fold_batchnorm_is_exact_in_eval(name, size, pairs):
    torch.manual_seed(3)
    net = BACKBONES[name]().eval()
    randomize_batchnorm(net, torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = net(x)
        assert fold_batchnorm(net) == pairs
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        out = net(x)
        assert fold_batchnorm(net) == 0  # idempotent
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_channels_last_and_bf16_autocast(backbones):
    net = backbones[EFFNET]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        net_cl = BACKBONES[EFFNET]().eval()
        net_cl.load_state_dict(net.state_dict())
        net_cl = net_cl.to(memory_format=torch.channels_last)
        out = net_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = net_cl(x.contiguous(memory_format=torch.channels_last))
    for a, b, c in zip(out, ref, low):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
        assert c.dtype == torch.bfloat16
        assert (c.float() - b).norm() <= 0.05 * b.norm()


def test_attention_fast_path_matches_reference_and_double_backward_works():
    attn = Attention(64, 4)
    x = torch.randn(2, 10, 64)
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fast = attn(x)  # fused SDPA
    xg = x.clone().requires_grad_(True)
    slow = attn(xg)  # graph through the input: double-backward-capable path
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(slow.square().sum(), xg, create_graph=True)
    grad.square().sum().backward()  # R1-style: differentiate the input gradient
    assert attn.qkv.weight.grad.abs().sum() > 0
