"""The project's own checkpoint format: one .safetensors file.

Tensors are stored by state-dict name. The safetensors header metadata (string -> string)
holds:
    'format':         'd2o_fast.snapshot'
    'format_version': '1'
    'snapshot':       JSON {class_name, init_kwargs, trainable_only, base, metadata}
where `metadata` holds free-form fields of the caller (images_seen, freeze_level, ...).

trainable_only (D2O-F): only parameters with requires_grad plus all buffers are stored, and
`base` = {path, sha256} names the checkpoint the frozen weights come from. Loading loads the
base first (its sha256 must match), then overlays the stored tensors.
"""

import json
import os

import safetensors
import safetensors.torch
import torch

from d2o_fast.checkpoint.errors import CheckpointError
from d2o_fast.checkpoint.transfer import to_plain
from d2o_fast.files import atomic_path, file_sha256
from d2o_fast.nets import PRECOND_CLASSES

FORMAT_NAME = 'd2o_fast.snapshot'
FORMAT_VERSION = 1


def _json(value, what):
    try:
        return json.dumps(to_plain(value), sort_keys=True)
    except (TypeError, ValueError, CheckpointError) as e:
        raise CheckpointError(f'snapshot {what} is not JSON data: {e}') from None


def normalized_kwargs(init_kwargs):
    """init kwargs as they come back from a snapshot (tuples become lists): for comparisons."""
    return json.loads(_json(init_kwargs, 'init_kwargs'))


def _base_record(net, base):
    if base is None:
        info = getattr(net, 'checkpoint_info', None)
        if info is None:
            raise CheckpointError('trainable_only snapshot needs base= (the checkpoint holding the frozen weights)')
        base = dict(path=info.path, sha256=info.sha256)
    if isinstance(base, (str, os.PathLike)):
        if not os.path.isfile(base):
            raise CheckpointError(f'base checkpoint {os.fspath(base)} not found')
        base = dict(path=os.fspath(base), sha256=file_sha256(base))
    if not isinstance(base, dict) or set(base) != {'path', 'sha256'}:
        raise CheckpointError(f'base must be a path or a dict with path and sha256, got {base!r}')
    return dict(path=os.path.abspath(os.fspath(base['path'])), sha256=str(base['sha256']))


def snapshot_tensors(net, trainable_only=False):
    """name -> tensor to store: the whole state dict, or trainable parameters plus all buffers."""
    state = net.state_dict()
    if trainable_only:
        keep = {n for n, p in net.named_parameters() if p.requires_grad} | {n for n, _ in net.named_buffers()}
        state = {n: t for n, t in state.items() if n in keep}
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def unwrap(net):
    """The network itself under torch.compile / DistributedDataParallel wrappers (their names prefix the state dict)."""
    while True:
        if hasattr(net, '_orig_mod'):
            net = net._orig_mod
        elif isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def save_snapshot(net, path, metadata=None, base=None, trainable_only=False):
    """Write `net` to a .safetensors snapshot, atomically. Returns the header record written."""
    net = unwrap(net)
    class_name = type(net).__name__
    if class_name not in PRECOND_CLASSES or not hasattr(net, 'init_kwargs'):
        raise CheckpointError(f'cannot snapshot a {class_name}; expected one of {", ".join(sorted(PRECOND_CLASSES))}')
    if base is not None and not trainable_only:
        raise CheckpointError('base= is only used with trainable_only=True (a full snapshot stands alone)')
    record = dict(class_name=class_name, init_kwargs=to_plain(net.init_kwargs), trainable_only=bool(trainable_only),
                  base=_base_record(net, base) if trainable_only else None, metadata=dict(metadata or {}))
    header = {'format': FORMAT_NAME, 'format_version': str(FORMAT_VERSION), 'snapshot': _json(record, 'header')}
    tensors = snapshot_tensors(net, trainable_only)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=header)
    return record


def is_snapshot_file(path):
    """True when the file starts like a safetensors file (8-byte header length, then JSON)."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'


def read_snapshot(path):
    """(header record, name -> tensor) of a snapshot file; tensors on the CPU."""
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f'{path}: unreadable safetensors file: {e}') from None
    if header.get('format') != FORMAT_NAME:
        raise CheckpointError(f'{path}: a safetensors file without d2o_fast snapshot metadata')
    if header.get('format_version') != str(FORMAT_VERSION):
        raise CheckpointError(f'{path}: snapshot format version {header.get("format_version")!r}, '
                              f'this d2o_fast reads version {FORMAT_VERSION}')
    try:
        record = json.loads(header['snapshot'])
        class_name, init_kwargs = record['class_name'], record['init_kwargs']
        trainable_only, base = record['trainable_only'], record['base']
        record.setdefault('metadata', {})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f'{path}: malformed snapshot header ({type(e).__name__}: {e})') from None
    if not isinstance(class_name, str) or not isinstance(init_kwargs, dict):
        raise CheckpointError(f'{path}: malformed snapshot header (class_name/init_kwargs)')
    base_ok = isinstance(base, dict) and isinstance(base.get('path'), str) and isinstance(base.get('sha256'), str)
    if trainable_only and not base_ok:
        raise CheckpointError(f'{path}: trainable-only snapshot without a valid base record')
    return record, tensors
