"""Snapshots: exact round trips, atomic writes, trainable-only snapshots on a hash-checked base."""

import os
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

from d2o_fast.checkpoint import CheckpointError, load_network, read_snapshot, save_snapshot
from d2o_fast.nets import apply_freeze
from tests.checkpoint.checkpoint_fixtures import assert_same_weights, make_net, outputs, write_pickle


@pytest.mark.parametrize('variant, class_name', [('ddpmpp-cond-aug', 'D2OPrecond'),
                                                 ('skip-encoder-skip-decoder', 'EDMPrecond')])
def test_full_snapshot_round_trips_exactly(variant, class_name, tmp_path):
    net = make_net(variant, class_name)
    path = tmp_path / 'snap.safetensors'
    save_snapshot(net, path, metadata=dict(images_seen=123456, freeze_level=0, note='from test'))
    loaded = load_network(path)
    assert type(loaded) is type(net) and not loaded.training
    assert loaded.init_kwargs == {k: list(v) if isinstance(v, tuple) else v for k, v in net.init_kwargs.items()}
    assert_same_weights(loaded, net)
    assert torch.equal(outputs(loaded, variant), outputs(net, variant))
    info = loaded.checkpoint_info
    assert (info.format, info.class_name, info.base) == ('snapshot', class_name, None)
    assert info.metadata == dict(images_seen=123456, freeze_level=0, note='from test')
    with safetensors.safe_open(str(path), framework='pt') as f:  # a standard safetensors file
        assert set(f.keys()) == set(net.state_dict()) and f.metadata()['format'] == 'd2o_fast.snapshot'


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / 'snap.safetensors'
    first, second = make_net('ncsnpp-uncond', seed=1), make_net('ncsnpp-uncond', seed=2)
    save_snapshot(first, path)
    save_snapshot(second, path, metadata=dict(step=2))
    assert_same_weights(load_network(path), second)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match='not JSON data'):
        save_snapshot(first, path, metadata=dict(bad=object()))
    with pytest.raises(CheckpointError, match='cannot snapshot a SongUNet'):
        save_snapshot(first.model, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['snap.safetensors']  # no temporary files left behind


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.jit, imported by torch.compile
def test_compiled_network_is_unwrapped(tmp_path):
    net = make_net('ncsnpp-uncond', 'D2OPrecond')
    save_snapshot(torch.compile(net), tmp_path / 'snap.safetensors')
    assert_same_weights(load_network(tmp_path / 'snap.safetensors'), net)


def _d2o_f_run(tmp_path):
    """An EDM pickle, a D2O-F generator fine-tuned from it, and its trainable-only snapshot."""
    base = write_pickle(tmp_path / 'edm.pkl', dict(ema=make_net('ncsnpp-uncond')))
    gen = load_network(base, as_class='D2OPrecond')
    apply_freeze(gen, freeze_level=1)
    with torch.no_grad():  # a training step's worth of change, trainable parameters and buffers only
        for p in gen.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
        gen.model.map_noise.freqs.mul_(1.5)
    snap = tmp_path / 'run' / 'g.safetensors'
    snap.parent.mkdir()
    save_snapshot(gen, snap, metadata=dict(freeze_level=1), trainable_only=True)  # base from checkpoint_info
    return base, gen, snap


def test_trainable_only_snapshot_overlays_its_base(tmp_path):
    base, gen, snap = _d2o_f_run(tmp_path)
    record, tensors = read_snapshot(snap)
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable | {n for n, _ in gen.named_buffers()}
    assert 0 < len(trainable) < len(list(gen.parameters()))
    assert record['base'] == dict(path=str(base), sha256=gen.checkpoint_info.sha256)
    loaded = load_network(snap)
    assert type(loaded).__name__ == 'D2OPrecond' and loaded.checkpoint_info.metadata == dict(freeze_level=1)
    assert_same_weights(loaded, gen)
    assert torch.equal(outputs(loaded, 'ncsnpp-uncond'), outputs(gen, 'ncsnpp-uncond'))

    # Moved together to another folder: the base is found next to the snapshot.
    moved = tmp_path / 'moved'
    moved.mkdir()
    shutil.move(base, moved / base.name)
    shutil.move(snap, moved / snap.name)
    assert_same_weights(load_network(moved / snap.name), gen)


def test_trainable_only_snapshot_refuses_a_changed_or_missing_base(tmp_path):
    base, gen, snap = _d2o_f_run(tmp_path)
    expected = gen.checkpoint_info.sha256
    write_pickle(base, dict(ema=make_net('ncsnpp-uncond', seed=7)))  # same name, other weights
    with pytest.raises(CheckpointError) as err:
        load_network(snap)
    message = str(err.value)
    assert str(base) in message and expected in message and load_network(base).checkpoint_info.sha256 in message
    os.remove(base)
    with pytest.raises(CheckpointError, match=f'base checkpoint {base} not found'):
        load_network(snap)


def test_trainable_only_snapshot_needs_a_base(tmp_path):
    net = make_net('ncsnpp-uncond', 'D2OPrecond')
    with pytest.raises(CheckpointError, match='needs base='):
        save_snapshot(net, tmp_path / 's.safetensors', trainable_only=True)
    with pytest.raises(CheckpointError, match='only used with trainable_only'):
        save_snapshot(net, tmp_path / 's.safetensors', base=str(tmp_path / 'x.pkl'))
    with pytest.raises(CheckpointError, match='not found'):
        save_snapshot(net, tmp_path / 's.safetensors', base=str(tmp_path / 'x.pkl'), trainable_only=True)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / 'plain.safetensors'
    safetensors.torch.save_file({'w': torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match='without d2o_fast snapshot metadata'):
        load_network(path)


def _rewrite(path, header=None, dtype=None):
    """Rewrite a snapshot file with other header fields or its tensors in another dtype."""
    with safetensors.safe_open(str(path), framework='pt') as f:
        metadata = dict(f.metadata(), **(header or {}))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_snapshot_of_another_format_version_is_refused(tmp_path):
    path = tmp_path / 'snap.safetensors'
    save_snapshot(make_net('ncsnpp-uncond'), path)
    _rewrite(path, header={'format_version': '2'})
    with pytest.raises(CheckpointError, match="format version '2', this d2o_fast reads version 1"):
        load_network(path)


def test_half_precision_tensors_load_as_the_networks_float32(tmp_path):
    """A snapshot stored in float16 loads into float32 parameters holding the float16 values."""
    net = make_net('ncsnpp-uncond')
    path = tmp_path / 'snap.safetensors'
    save_snapshot(net, path)
    _rewrite(path, dtype=torch.float16)
    loaded = load_network(path)
    for name, value in loaded.state_dict().items():
        expected = net.state_dict()[name]
        assert value.dtype == expected.dtype, name
        if expected.is_floating_point():
            assert torch.equal(value, expected.half().to(expected.dtype)), name
