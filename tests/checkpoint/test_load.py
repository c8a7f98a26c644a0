"""load_network on EDM / D2O persistence pickles: every architecture, exact outputs, strict errors."""

import hashlib
import zipfile

import pytest
import torch

import d2o_fast
from d2o_fast.checkpoint import CheckpointError, load_network
from d2o_fast.nets import D2OPrecond, EDMPrecond
from tests.checkpoint.checkpoint_fixtures import VARIANTS, assert_same_weights, make_net, outputs, write_pickle

PROTOCOLS = {'ddpmpp-cond-aug': 4, 'ncsnpp-uncond': 2, 'skip-encoder-skip-decoder': 5, 'adm-cond': 0}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_edm_pickle_loads_with_identical_outputs(variant, tmp_path):
    net = make_net(variant)
    path = write_pickle(tmp_path / 'edm.pkl', dict(ema=net), protocol=PROTOCOLS[variant])
    loaded = d2o_fast.load_network(path)
    assert type(loaded) is EDMPrecond and not loaded.training
    assert loaded.init_kwargs == net.init_kwargs
    assert_same_weights(loaded, net)
    assert torch.equal(outputs(loaded, variant), outputs(net, variant))
    info = loaded.checkpoint_info
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info.format, info.key) == ('pickle', 'ema')
    assert (info.source_class_name, info.class_name) == ('EDMPrecond', 'EDMPrecond')


def test_edm_pickle_loads_into_the_one_step_generator(tmp_path):
    edm = make_net('ncsnpp-uncond')
    gen = load_network(write_pickle(tmp_path / 'edm.pkl', dict(ema=edm)), as_class='D2OPrecond')
    assert type(gen) is D2OPrecond and gen.init_kwargs == edm.init_kwargs
    assert (gen.checkpoint_info.source_class_name, gen.checkpoint_info.class_name) == ('EDMPrecond', 'D2OPrecond')
    assert_same_weights(gen, edm)  # same module tree; the preconditioning is D2OPrecond's (tests/nets)


@pytest.mark.parametrize('pickled_name', ['D2OPrecond', 'GDDPrecond'])
def test_d2o_authors_pickles_pick_ema_or_the_named_entry(pickled_name, tmp_path):
    variant = 'skip-encoder-skip-decoder'
    ema, raw = make_net(variant, 'D2OPrecond', seed=1), make_net(variant, 'D2OPrecond', seed=2)
    path = write_pickle(tmp_path / 'snapshot.pkl', dict(net=raw, ema=ema), class_names={'D2OPrecond': pickled_name})
    loaded = load_network(path)
    assert type(loaded) is D2OPrecond and loaded.checkpoint_info.source_class_name == pickled_name
    assert loaded.checkpoint_info.key == 'ema'
    assert torch.equal(outputs(loaded, variant), outputs(ema, variant))
    assert torch.equal(outputs(load_network(path, key='net'), variant), outputs(raw, variant))
    with pytest.raises(CheckpointError, match="no entry 'G_ema'"):
        load_network(path, key='G_ema')


def test_bare_network_pickle(tmp_path):
    net = make_net('ncsnpp-uncond')
    loaded = load_network(write_pickle(tmp_path / 'bare.pkl', net))
    assert loaded.checkpoint_info.key is None
    assert torch.equal(outputs(loaded, 'ncsnpp-uncond'), outputs(net, 'ncsnpp-uncond'))


def test_d2o_layer_kwargs_accepted_at_defaults_refused_otherwise(tmp_path):
    variant = 'ncsnpp-uncond'
    net = make_net(variant, 'D2OPrecond')
    conv = net.model.enc['16x16_conv']
    norm = net.model.dec['16x16_aux_norm']
    conv.groups = 1                                   # the authors' Conv2d stores `groups`
    norm._init_kwargs = dict(norm._init_kwargs, elementwise_affine=True)
    ok = load_network(write_pickle(tmp_path / 'ok.pkl', dict(ema=net)))
    assert torch.equal(outputs(ok, variant), outputs(net, variant))

    conv.groups = 2
    with pytest.raises(CheckpointError, match=r'model\.enc\.16x16_conv \(Conv2d\) has groups=2; only groups=1'):
        load_network(write_pickle(tmp_path / 'groups.pkl', dict(ema=net)))
    conv.groups = 1
    norm._init_kwargs['elementwise_affine'] = False
    with pytest.raises(CheckpointError, match='elementwise_affine=False; only elementwise_affine=True'):
        load_network(write_pickle(tmp_path / 'affine.pkl', dict(ema=net)))


def test_submodule_configuration_must_match_the_recorded_arguments(tmp_path):
    net = make_net('ncsnpp-uncond')
    net.model.enc['8x8_block0'].num_heads = 2  # shapes unchanged, attention math different
    with pytest.raises(CheckpointError, match=r'model\.enc\.8x8_block0 \(UNetBlock\) has num_heads=2'):
        load_network(write_pickle(tmp_path / 'heads.pkl', dict(ema=net)))


def _tamper(net, how):
    layer = net.model.map_layer1
    if how == 'missing':
        del layer._parameters['bias']
        layer.bias = None
    elif how == 'unexpected':
        layer.register_buffer('stray', torch.ones(2))
    elif how == 'shape':
        layer.weight = torch.nn.Parameter(torch.randn(3, 3))
    return net


@pytest.mark.parametrize('how, message', [
    ('missing', r'1 missing: model\.map_layer1\.bias'),
    ('unexpected', r'1 unexpected: model\.map_layer1\.stray'),
    ('shape', r'1 with another shape: model\.map_layer1\.weight \(file \[3, 3\], net \[64, 64\]\)'),
])
def test_tensor_mismatches_are_named(how, message, tmp_path):
    net = _tamper(make_net('ncsnpp-uncond'), how)
    with pytest.raises(CheckpointError, match=message):
        load_network(write_pickle(tmp_path / f'{how}.pkl', dict(ema=net)))


def test_unknown_network_class_is_refused(tmp_path):
    net = make_net('ncsnpp-uncond')
    path = write_pickle(tmp_path / 'vp.pkl', dict(ema=net), class_names={'EDMPrecond': 'VPPrecond'})
    with pytest.raises(CheckpointError, match="unsupported network class 'VPPrecond'"):
        load_network(path)
    with pytest.raises(CheckpointError, match="unknown target class 'SongUNet'"):
        load_network(path, as_class='SongUNet')


def test_files_that_are_not_network_pickles(tmp_path):
    with pytest.raises(CheckpointError, match='no such file'):
        load_network(tmp_path / 'absent.pkl')
    with zipfile.ZipFile(tmp_path / 'archive.pt', 'w') as z:
        z.writestr('data.pkl', b'')
    with pytest.raises(CheckpointError, match='zip archive'):
        load_network(tmp_path / 'archive.pt')
    (tmp_path / 'text.pkl').write_text('hello')
    with pytest.raises(CheckpointError, match='malformed pickle'):
        load_network(tmp_path / 'text.pkl')
    path = write_pickle(tmp_path / 'loss_only.pkl', dict(other=1))
    with pytest.raises(CheckpointError, match='cannot tell which entry is the network'):
        load_network(path)
