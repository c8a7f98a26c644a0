"""The runner of the authors' iteration (benchmarks/authors_iteration.py), without their code: a stand-in checkout
with their modules' interfaces (tiny networks of our own) checks what the runner itself does: the stages, gains and
R1 schedule of their training loop, nan_to_num of the gradients, the Adam settings and freeze rule, the EMA, the bf16
casts of their CUDA path, the random-weight backbones and the checks of --authors-src. With D2O_AUTHORS_SRC set to a
real checkout (and their dependencies installed), the last test runs their code on small networks.

    pytest benchmarks/test_authors_iteration.py
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import authors_iteration
import paper_config

STAND_IN = {
    'dnnlib/__init__.py': 'from . import util\n',
    'dnnlib/util.py': '''
        import importlib

        def construct_class_by_name(class_name, **kwargs):
            module, name = class_name.rsplit('.', 1)
            return getattr(importlib.import_module(module), name)(**kwargs)
        ''',
    'torch_utils/__init__.py': '',
    'torch_utils/persistence.py': '',
    'training/__init__.py': '',
    'training/networks.py': '''
        import torch

        class Conv(torch.nn.Module):  # casts its weight to the input's dtype, as their layers do
            def __init__(self, channels):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.randn(channels, channels, 1, 1) * 0.5)

            def forward(self, x):
                return torch.nn.functional.conv2d(x, self.weight.to(x.dtype))

        class Model(torch.nn.Module):
            def __init__(self, channels):
                super().__init__()
                self.block0_conv = Conv(channels)   # frozen at level 1 (block + conv)
                self.out_layer = Conv(channels)     # trainable at every level
                self.input_dtypes = []

            def forward(self, x, noise_labels, class_labels, augment_labels=None):
                self.input_dtypes.append(x.dtype)
                return self.out_layer(torch.relu(self.block0_conv(x)))

        class D2OPrecond(torch.nn.Module):
            def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, **model_kwargs):
                super().__init__()
                self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
                self.model = Model(img_channels)

            def forward(self, x, sigma, class_labels=None, augment_labels=None):
                F_x = self.model(x / 80, sigma.log().flatten() / 4, class_labels)
                assert F_x.dtype == torch.float32  # their CPU path: fp32 out of the U-Net
                return 0.5 * x / 80 + F_x
        ''',
    'training/loss.py': '''
        import torch
        import torch.nn.functional as F

        class D2OLoss:
            calls = []

            def __init__(self, g, d, feature_net, freeze_layer, r1_gamma, **kwargs):
                self.g, self.d, self.feature_net, self.r1_gamma = g, d, feature_net, r1_gamma
                print('stand-in loss built')  # their loss prints to stdout

            def accumulate_gradients(self, images, class_labels, augment_pipe=None, stage=0, gain=1, cur_nimg=0):
                D2OLoss.calls.append((stage, gain, cur_nimg))
                z = torch.randn_like(images) * 80
                if stage == 0:
                    loss = F.softplus(-self.d(self.feature_net(self.g(z, torch.full([len(z)], 80.0))), None)).mean()
                    loss.mul(gain).backward()
                    weight = self.g.model.out_layer.weight
                    weight.grad[0, 0] = float('nan')
                    weight.grad[0, 1] = float('inf')
                elif stage == 1:
                    with torch.no_grad():
                        fakes = self.g(z, torch.full([len(z)], 80.0))
                    logits = self.d(self.feature_net(fakes), None) - self.d(self.feature_net(images), None)
                    F.softplus(logits).mean().mul(gain).backward()
                else:
                    reals = images.detach().requires_grad_(True)
                    grad, = torch.autograd.grad(self.d(self.feature_net(reals), None).sum(), reals, create_graph=True)
                    (grad.square().sum([1, 2, 3]) * self.r1_gamma / 2).mean().mul(gain).backward()
        ''',
    'pg_modules/__init__.py': '',
    'pg_modules/discriminator.py': '''
        import torch
        from feature_networks.pretrained_builder import _make_pretrained

        class ProjectedFeatureOnly(torch.nn.Module):
            def __init__(self, backbones, diffaug, interp224, backbone_kwargs, c_dim, img_resolution, img_channels):
                super().__init__()
                self.feature_networks = torch.nn.ModuleDict({name: _make_pretrained(name) for name in backbones})

            def forward(self, x):
                return [net(x) for net in self.feature_networks.values()]

        class ProjectedDiscriminatorOnly(torch.nn.Module):
            def __init__(self, backbones, channels, resolutions, diffaug, interp224, backbone_kwargs, c_dim,
                         img_resolution, img_channels):
                super().__init__()
                self.heads = torch.nn.ModuleList([torch.nn.Conv2d(c, 1, 1) for c in channels])

            def forward(self, features, c):
                return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features)], 1)
        ''',
    'feature_networks/__init__.py': '',
    'feature_networks/pretrained_builder.py': '''
        import types
        import torch

        def tiny_net(pretrained=False, *, weights='DEFAULT'):  # torchvision's signature: weights by default
            if weights is not None:
                raise RuntimeError('pretrained weights would be downloaded')
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())

        def create_model(name, pretrained=False):  # timm's
            if pretrained:
                raise RuntimeError('pretrained weights would be downloaded')
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU())

        zoomodels = types.SimpleNamespace(tiny_net=tiny_net)
        timm = types.SimpleNamespace(create_model=create_model)

        def _make_pretrained(backbone):
            if backbone == 'tiny_net':
                model = zoomodels.__dict__[backbone](True)  # as their builder: pretrained weights
            else:
                model = timm.create_model(backbone, pretrained=True)
            features = torch.nn.Sequential(torch.nn.Upsample(size=32), model)
            features.CHANNELS = model[0].out_channels
            features.RESOLUTIONS = 16
            return features.eval().requires_grad_(False)
        ''',
}
BACKBONES = ['tiny_net', 'timm_net']  # one from each stand-in zoo


@pytest.fixture
def stand_in(tmp_path):
    """The stand-in checkout; its modules are unloaded afterwards."""
    for name, text in STAND_IN.items():
        path = tmp_path / 'authors' / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    yield tmp_path / 'authors'
    for name in list(sys.modules):
        if name.split('.')[0] in authors_iteration.THEIR_PACKAGES:
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p != str(tmp_path / 'authors')]


def build(stand_in, freeze=1, unet_bf16=False, batch=2):
    code = authors_iteration.load_authors_code(stand_in)
    code.loss.D2OLoss.calls.clear()
    return code, authors_iteration.AuthorsIteration(code, freeze, batch, unet_bf16=unet_bf16, backbones=BACKBONES)


def test_their_loop_stages_gains_and_r1_schedule(stand_in, capsys):
    code, it = build(stand_in)
    for index in range(15, 18):
        it.step(index, images_seen=2 * index)
    assert code.loss.D2OLoss.calls == [(0, 1, 30), (1, 1, 30), (0, 1, 32), (1, 1, 32), (2, 16, 32), (0, 1, 34),
                                       (1, 1, 34)]
    out = capsys.readouterr()
    assert 'stand-in loss built' in out.err and 'stand-in loss built' not in out.out  # their prints: stderr


def test_gradients_pass_through_nan_to_num_before_the_step(stand_in):
    _, it = build(stand_in)
    it.generator_phase()
    grad = it.net.model.out_layer.weight.grad
    assert grad[0, 0].item() == 0 and grad[0, 1].item() == 1e5 and torch.isfinite(it.net.model.out_layer.weight).all()


def test_optimizers_and_freeze_rule_follow_the_recipe(stand_in):
    _, it = build(stand_in, freeze=1)
    assert it.g_params == [it.net.model.out_layer.weight]
    assert not it.net.model.block0_conv.weight.requires_grad
    g, d = it.opt_g.param_groups[0], it.opt_d.param_groups[0]
    assert (g['lr'], g['betas'], g['eps']) == (1e-4, (0.0, 0.99), 1e-8)
    assert d['lr'] == pytest.approx(1e-4 * 16 / 17) and d['betas'][1] == pytest.approx(0.99 ** (16 / 17))
    assert d['params'] == list(it.discriminator.parameters())
    _, it = build(stand_in, freeze=0)
    assert len(it.g_params) == 2


def test_ema_half_life_ramps_up_with_the_images_seen(stand_in):
    _, it = build(stand_in, freeze=0)
    before = it.ema.model.out_layer.weight.clone()
    it.step(1, images_seen=1000)
    beta = 0.5 ** (2 / 50)  # half-life min(500k, 0.05 * 1000) = 50 images, batch 2
    net = it.net.model.out_layer.weight.detach()
    assert beta == pytest.approx(math.exp(-2 * math.log(2) / 50))
    torch.testing.assert_close(it.ema.model.out_layer.weight, net + beta * (before - net))


@pytest.mark.parametrize('unet_bf16', [False, True])
def test_bf16_unet_path_casts_as_their_cuda_path(stand_in, unet_bf16):
    _, it = build(stand_in, unet_bf16=unet_bf16)
    it.generator_phase()
    assert it.net.model.input_dtypes == [torch.bfloat16 if unet_bf16 else torch.float32]
    assert it.net.model.out_layer.weight.dtype == torch.float32


def test_backbones_are_built_with_random_weights(stand_in):
    """Their builder asks torchvision and timm for pretrained weights, which the stand-in zoos refuse (a download);
    the runner has the same constructors build random weights: the build succeeds, and two seeds differ."""
    spec = importlib.util.spec_from_file_location('unpatched_builder', stand_in / 'feature_networks' / 'pretrained_builder.py')
    unpatched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unpatched)
    for name in BACKBONES:
        with pytest.raises(RuntimeError, match='would be downloaded'):
            unpatched._make_pretrained(name)
    code = authors_iteration.load_authors_code(stand_in)
    a, b = (authors_iteration.AuthorsIteration(code, 1, 2, backbones=BACKBONES, seed=seed) for seed in (0, 1))
    for name in BACKBONES:
        wa = a.feature_net.feature_networks[name][1][0].weight
        wb = b.feature_net.feature_networks[name][1][0].weight
        assert wa.shape == wb.shape and not torch.equal(wa, wb)
    authors_iteration.load_authors_code(stand_in)  # a second load keeps one layer of stand-ins
    assert authors_iteration.AuthorsIteration(code, 1, 2, backbones=BACKBONES).feature_net is not None


def test_the_benchmark_harness_runs_their_case(stand_in):
    r = paper_config.run_case('d2o-f', 'bf16-unet', batch=2, iters=2, threads=1, side='authors', authors_src=stand_in,
                              authors_backbones=BACKBONES)
    assert (r['side'], r['path'], r['freeze'], r['trainable_g']) == ('authors', 'bf16-unet', 1, 9)
    assert r['flops']['G'] > 0 and r['flops']['D'] > 0 and r['flops']['R1'] > 0
    assert r['s_per_it'] == pytest.approx(r['step_s'] + r['r1_s'] / 16) and len(r['step_times']) == 2


def test_source_checks(tmp_path, stand_in):
    with pytest.raises(authors_iteration.AuthorsSourceError, match='no such directory'):
        authors_iteration.check_source(tmp_path / 'missing')
    (stand_in / 'training' / 'loss.py').unlink()
    with pytest.raises(authors_iteration.AuthorsSourceError, match='missing training/loss.py'):
        authors_iteration.check_source(stand_in)


def test_a_module_of_the_same_name_from_elsewhere_is_refused(tmp_path, stand_in, monkeypatch):
    other = tmp_path / 'other' / 'training'
    other.mkdir(parents=True)
    (other / '__init__.py').write_text('')
    monkeypatch.syspath_prepend(str(tmp_path / 'other'))
    import training  # noqa: F401  (a different package named like theirs)
    with pytest.raises(authors_iteration.AuthorsSourceError, match="'training' is already imported"):
        authors_iteration.load_authors_code(stand_in)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('D2O_AUTHORS_SRC'), reason='D2O_AUTHORS_SRC (a checkout of their code) not set')
def test_their_real_code_on_small_networks():
    """In a process of its own (their packages must not meet the stand-in's)."""
    here = pathlib.Path(__file__).resolve().parent
    script = textwrap.dedent(f'''
        import json, sys
        sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]
        import paper_config
        r = paper_config.run_case('d2o-f', 'bf16-unet', batch=2, iters=1, threads=1, side='authors',
                                  authors_src={os.environ['D2O_AUTHORS_SRC']!r},
                                  authors_network=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1),
                                  authors_backbones=['tf_efficientnet_lite0'])
        print(json.dumps(r))
        ''')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < r['trainable_g'] < r['params_g'] and r['flops']['R1'] > 0 and r['s_per_it'] > 0
