"""load_network: any supported checkpoint file -> a ready network, without running its code.

Formats, told apart by content:
    EDM / D2O / GDD pickles (.pkl): NVIDIA's persistence pickles; read with the restricted
        unpickler, the network is the dict entry 'ema' (EDM, D2O), else 'net', or the pickle
        is the network itself.
    d2o_fast snapshots (.safetensors): see snapshot.py; trainable-only snapshots load their
        base checkpoint first.
The returned network carries `checkpoint_info` (path, sha256, format, classes, metadata).
"""

import dataclasses
import os

from d2o_fast.checkpoint.errors import CheckpointError
from d2o_fast.checkpoint.safe_pickle import ModuleRecord, safe_load
from d2o_fast.checkpoint.snapshot import is_snapshot_file, normalized_kwargs, read_snapshot
from d2o_fast.checkpoint.transfer import (assign_tensors, build_meta_network, check_target_class, network_from_record,
                                          overlay_tensors)
from d2o_fast.files import file_sha256
from d2o_fast.nets import PRECOND_CLASSES

NETWORK_KEYS = ('ema', 'net')  # EDM saves 'ema'; D2O saves 'net' and 'ema' (generate.py reads 'ema')
_MAX_BASE_DEPTH = 8


@dataclasses.dataclass
class CheckpointInfo:
    path: str                 # the file loaded
    sha256: str               # hex sha256 of its bytes
    format: str               # 'pickle' or 'snapshot'
    source_class_name: str    # the network class in the file ('EDMPrecond', 'GDDPrecond', ...)
    class_name: str           # the class of the returned network
    init_kwargs: dict         # its constructor kwargs
    metadata: dict = dataclasses.field(default_factory=dict)  # free-form snapshot fields
    base: dict = None         # {path, sha256} of a trainable-only snapshot's base
    key: str = None           # the pickle's dict entry the network came from


def load_network(path, device='cpu', as_class=None, key=None):
    """Load an EDM/D2O pickle or a d2o_fast snapshot as an eval-mode network on `device`.

    as_class: build this precond class instead of the recorded one (e.g. 'D2OPrecond' to load
        EDM weights into the one-step generator; the module tree is the same).
    key: the pickle's dict entry to read (default 'ema', then 'net').
    """
    if as_class is not None:
        check_target_class(as_class)
    net = _load(os.fspath(path), as_class=as_class, key=key, depth=0)
    return net.to(device).eval()


def _load(path, as_class, key, depth, sha256=None):
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    sha256 = sha256 or file_sha256(path)
    if is_snapshot_file(path):
        return _load_snapshot(path, sha256, as_class, depth)
    with open(path, 'rb') as f:
        if f.read(2) == b'PK':
            raise CheckpointError(f'{path}: a zip archive (torch.save?), not an EDM pickle or a d2o_fast snapshot')
        f.seek(0)
        try:
            obj = safe_load(f)
        except CheckpointError as e:
            raise type(e)(f'{path}: {e}') from None
    record, key = _pick_network(obj, key, path)
    net = network_from_record(record, as_class=as_class, where=path)
    net.checkpoint_info = CheckpointInfo(path=path, sha256=sha256, format='pickle', source_class_name=record.class_name,
                                         class_name=type(net).__name__, init_kwargs=dict(net.init_kwargs), key=key)
    return net


def _pick_network(obj, key, where):
    """The network record in an unpickled checkpoint, and the dict key it was under."""
    if isinstance(obj, ModuleRecord):
        if key is not None:
            raise CheckpointError(f'{where}: the pickle is a bare network, it has no entry {key!r}')
        return obj, None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{where}: the pickle holds a {type(obj).__name__}, '
                              'expected a network or a dict with "ema"')
    if key is None:
        key = next((k for k in NETWORK_KEYS if isinstance(obj.get(k), ModuleRecord)), None)
    if key is None:
        nets = [k for k, v in obj.items() if isinstance(v, ModuleRecord) and v.class_name in PRECOND_CLASSES]
        if len(nets) != 1:
            raise CheckpointError(f'{where}: cannot tell which entry is the network '
                                  f'(entries: {", ".join(map(str, obj))}); pass key=')
        key = nets[0]
    if key not in obj:
        raise CheckpointError(f'{where}: no entry {key!r} (entries: {", ".join(map(str, obj))})')
    if not isinstance(obj[key], ModuleRecord):
        raise CheckpointError(f'{where}: entry {key!r} is a {type(obj[key]).__name__}, not a network')
    return obj[key], key


def _load_snapshot(path, sha256, as_class, depth):
    record, tensors = read_snapshot(path)
    class_name = as_class or record['class_name']
    check_target_class(class_name)
    if record['trainable_only']:
        net = _load_base(path, record, class_name, depth)
        if _architecture(net.init_kwargs) != _architecture(record['init_kwargs']):
            raise CheckpointError(f'{path}: its base {record["base"]["path"]} holds another architecture '
                                  f'({net.init_kwargs} vs {record["init_kwargs"]})')
        if 'dropout' in record['init_kwargs']:  # fine-tuning may change the dropout rate (D2O trains without)
            net.set_dropout(record['init_kwargs']['dropout'])
        overlay_tensors(net, tensors, path)
    else:
        net = assign_tensors(build_meta_network(class_name, record['init_kwargs'], path), tensors, path)
    net.checkpoint_info = CheckpointInfo(path=path, sha256=sha256, format='snapshot',
                                         source_class_name=record['class_name'], class_name=type(net).__name__,
                                         init_kwargs=dict(net.init_kwargs), metadata=record['metadata'],
                                         base=record['base'])
    return net.eval()


# Training hyper-parameters recorded among the init kwargs; they shape no tensor.
_NOT_ARCHITECTURE = ('dropout', 'label_dropout')


def _architecture(init_kwargs):
    return {k: v for k, v in normalized_kwargs(init_kwargs).items() if k not in _NOT_ARCHITECTURE}


def _load_base(path, record, class_name, depth):
    """The checkpoint a trainable-only snapshot builds on, hash-checked before it is read."""
    if depth >= _MAX_BASE_DEPTH:
        raise CheckpointError(f'{path}: chain of base checkpoints deeper than {_MAX_BASE_DEPTH}')
    stored, expected = record['base']['path'], record['base']['sha256']
    here = os.path.dirname(os.path.abspath(path))
    candidates = [stored, os.path.join(here, stored), os.path.join(here, os.path.basename(stored))]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise CheckpointError(f'{path}: base checkpoint {stored} not found (also looked in {here})')
    actual = file_sha256(found)
    if actual != expected:
        raise CheckpointError(f'{path}: base checkpoint {found} has sha256 {actual}, '
                              f'but this snapshot was made on top of sha256 {expected}')
    return _load(found, as_class=class_name, key=None, depth=depth + 1, sha256=actual)
