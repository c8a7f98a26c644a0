"""The restricted unpickler: reads what torch/numpy/EDM emit, refuses and never runs anything else."""

import builtins
import collections
import importlib
import inspect
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from d2o_fast.checkpoint import CheckpointError, ModuleRecord, UnsafePickleError, load_network, safe_load
from d2o_fast.nets import EDMPrecond
from d2o_fast.nets import precond as precond_module
from tests.checkpoint import persistence_imitation as persistence
from tests.checkpoint.checkpoint_fixtures import make_net, write_pickle


def _plain_data():
    g = torch.Generator().manual_seed(0)
    tagged = torch.randn(3, generator=g)
    tagged.note = 'python attribute'                        # pickled via _rebuild_from_type_v2
    param_with_state = torch.nn.Parameter(torch.randn(2, generator=g))
    param_with_state.tag = 1                                # pickled via _rebuild_parameter_with_state
    return dict(
        view=torch.randn(4, 5, generator=g)[1:3, ::2],        # offset and strides into a larger storage
        bf16=torch.randn(3, generator=g).to(torch.bfloat16), f16=torch.randn(3, generator=g).half(),
        long=torch.arange(5), conj=torch.randn(2, dtype=torch.complex64, generator=g).conj(),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)), param_with_state=param_with_state, tagged=tagged,
        dtype=torch.float16, size=torch.Size([2, 3]), od=collections.OrderedDict(a=1, b=[2.5, None]),
        set={1, 2}, frozenset=frozenset({'x'}), complex=1 + 2j, slice=slice(1, 5, 2), bytes=b'\x00\xff', tuple=(1, 'a'),
        inf=float('inf'), np_float=np.sqrt(0.5), np_int=np.int64(7), np_array=np.arange(6.0).reshape(2, 3),
        module_dict=torch.nn.ModuleDict(),
    )


@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_reads_tensors_and_plain_data_of_every_protocol(protocol):
    data = _plain_data()
    out = safe_load(io.BytesIO(pickle.dumps(data, protocol=protocol)))
    assert set(out) == set(data)
    for key, value in data.items():
        got = out[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.shape == value.shape and got.stride() == value.stride(), key
            assert torch.equal(got.resolve_conj(), value.detach().resolve_conj()), key
        elif isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and np.array_equal(got, value)
        elif isinstance(value, torch.nn.Module):
            assert isinstance(got, ModuleRecord) and got.class_name == 'ModuleDict'
        else:
            assert type(got) is type(value) and got == value, key


def test_persistent_objects_become_inert_records(tmp_path):
    net = make_net('ncsnpp-uncond')
    path = write_pickle(tmp_path / 'edm.pkl', dict(ema=net))
    with open(path, 'rb') as f:
        data = safe_load(f)
    assert isinstance(data['dataset_kwargs'], dict) and data['dataset_kwargs']['path'] == 'cifar10.zip'
    assert data['loss_fn'].class_name == 'EDMLoss' and data['loss_fn'].attributes['P_std'] == 1.2
    ema = data['ema']
    assert ema.persistent and ema.class_name == 'EDMPrecond' and ema.init_kwargs == net._init_kwargs
    enc = ema.children['model'].children['enc']
    assert not enc.persistent and enc.class_name == 'ModuleDict'
    block = enc.children['8x8_block0']
    assert block.class_name == 'UNetBlock' and isinstance(block.init_kwargs['skip_scale'], float)
    records = dict(ema.named_records())
    assert set(records) == {name for name, _ in net.named_modules()}
    tensors = ema.state_tensors()
    assert list(tensors) == list(net.state_dict())


class _Reduce:
    """An object that pickles as an arbitrary call (the shape of every pickle exploit)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {
        'os.system': (_Reduce(os.system, f'touch {marker}'), f'refused global {os.system.__module__}.system'),
        'builtins.eval': (_Reduce(builtins.eval, f'open({str(marker)!r}, "w")'), 'refused global builtins.eval'),
        'subprocess.Popen': (_Reduce(subprocess.Popen, ['touch', str(marker)]), 'refused global subprocess.Popen'),
        'builtins.getattr': (_Reduce(getattr, _Reduce(importlib.import_module, 'os'), 'system'),
                             'refused global builtins.getattr'),
    }


@pytest.mark.parametrize('name', ['os.system', 'builtins.eval', 'subprocess.Popen', 'builtins.getattr'])
@pytest.mark.parametrize('where', ['top level', 'inside a network'])
def test_refuses_foreign_globals_without_running_them(name, where, tmp_path):
    marker = tmp_path / 'pwned'
    payload, message = _payloads(marker)[name]
    if where == 'top level':
        path = tmp_path / 'evil.pkl'
        path.write_bytes(pickle.dumps(dict(ema=payload), protocol=2))
    else:  # hidden in the constructor arguments of a submodule
        net = make_net('ncsnpp-uncond')
        net.model.map_layer0._init_kwargs = dict(net.model.map_layer0._init_kwargs, init_mode=payload)
        path = write_pickle(tmp_path / 'evil.pkl', dict(ema=net))
    with pytest.raises(UnsafePickleError, match=message):
        load_network(path)
    assert not marker.exists()


def test_module_source_is_never_executed(tmp_path):
    marker = tmp_path / 'pwned'
    net = make_net('ncsnpp-uncond')
    evil_src = f'open({str(marker)!r}, "w").write("ran")\n' + inspect.getsource(precond_module)
    path = write_pickle(tmp_path / 'edm.pkl', dict(ema=net), module_src={EDMPrecond: evil_src})
    loaded = load_network(path)  # the source is data: the network loads, nothing runs
    assert not marker.exists()
    assert type(loaded) is EDMPrecond
    # Control: an unrestricted pickle.load of the same file does run it.
    with open(path, 'rb') as f:
        persistence.plain_load(f)
    assert marker.read_text() == 'ran'


def test_refuses_attribute_injection_and_persistent_ids():
    # GLOBAL of an allowed function, then BUILD on it: would set attributes on our function.
    build_on_allowed = b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb.'
    with pytest.raises(UnsafePickleError, match='refused BUILD on torch._utils._rebuild_tensor_v2'):
        safe_load(io.BytesIO(build_on_allowed))
    persistent_id = b'\x80\x02X\x03\x00\x00\x00keyQ.'
    with pytest.raises(UnsafePickleError, match='refused persistent id'):
        safe_load(io.BytesIO(persistent_id))
    bad_codec = pickle.dumps(b'abc', protocol=2).replace(b'latin1', b'rot_13')
    with pytest.raises(UnsafePickleError, match="refused _codecs.encode with encoding 'rot_13'"):
        safe_load(io.BytesIO(bad_codec))


def test_malformed_input_is_a_checkpoint_error():
    data = pickle.dumps(dict(t=torch.randn(3)), protocol=4)
    with pytest.raises(CheckpointError, match='malformed pickle'):
        safe_load(io.BytesIO(data[: len(data) // 2]))
    oversized = pickle.dumps(torch.randn(3)[1:], protocol=2).replace(b'K\x02\x85', b'K\x09\x85')  # size 2 -> 9
    with pytest.raises(CheckpointError, match='malformed tensor'):
        safe_load(io.BytesIO(oversized))
