"""From recorded tensors to one of our networks, strictly.

A network is rebuilt from its class name and EDM-style init kwargs on the meta device (no
random init of hundreds of millions of weights), then every state-dict entry is assigned from
the checkpoint. Missing, unexpected or mis-shaped tensors are an error naming them; so is a
recorded submodule whose configuration differs from what our constructor built.
"""

import inspect

import numpy as np
import torch

from d2o_fast.checkpoint.errors import CheckpointError
from d2o_fast.nets import PRECOND_CLASSES, build_network

# Constructor kwargs of the D2O authors' layers that our layers do not have; fine at these values.
TOLERATED_DEFAULTS = {'groups': 1, 'elementwise_affine': True}

# Attributes that decide a submodule's forward math without showing in tensor shapes; the
# checkpoint's recorded value must equal the one our constructor derived from the init kwargs.
CHECKED_ATTRIBUTES = ('in_features', 'out_features', 'in_channels', 'out_channels', 'emb_channels', 'up', 'down',
                      'fused_resample', 'num_groups', 'eps', 'num_heads', 'skip_scale', 'adaptive_scale',
                      'num_channels', 'max_positions', 'endpoint', 'img_resolution', 'img_channels', 'label_dim',
                      'sigma_data')

_MAX_LISTED = 6

#----------------------------------------------------------------------------
# Plain data.

def to_plain(value):
    """Recorded kwargs as plain Python data (numpy scalars -> numbers, EasyDict -> dict)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_plain(v) for v in value)
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise CheckpointError(f'constructor argument of type {type(value).__name__} is not plain data: {value!r}')


def _listing(names):
    names = sorted(names)
    shown = ', '.join(names[:_MAX_LISTED])
    return shown + (f', ... ({len(names) - _MAX_LISTED} more)' if len(names) > _MAX_LISTED else '')

#----------------------------------------------------------------------------
# Tensors into networks.

def _compare(expected, tensors, where, partial):
    """Raise if names or shapes differ. expected: name -> tensor of the net's state dict."""
    problems = []
    missing = [] if partial else [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    mismatched = [f'{n} (file {list(t.shape)}, net {list(expected[n].shape)})'
                  for n, t in tensors.items() if n in expected and tuple(t.shape) != tuple(expected[n].shape)]
    nonfloat = [n for n, t in tensors.items() if n in expected and not t.is_floating_point()]
    if missing:
        problems.append(f'{len(missing)} missing: {_listing(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected: {_listing(unexpected)}')
    if mismatched:
        problems.append(f'{len(mismatched)} with another shape: {_listing(mismatched)}')
    if nonfloat:
        problems.append(f'{len(nonfloat)} not floating point: {_listing(nonfloat)}')
    if problems:
        raise CheckpointError(f'{where}: tensors do not match the network: ' + '; '.join(problems))


def assign_tensors(net, tensors, where):
    """Give a meta-device net its weights: every state-dict entry must be present, with its shape."""
    expected = net.state_dict()
    _compare(expected, tensors, where, partial=False)
    seen = set()
    ready = {}
    for name, t in tensors.items():
        t = t.detach().to(device='cpu', dtype=expected[name].dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:  # never let two parameters share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        ready[name] = t
    net.load_state_dict(ready, strict=True, assign=True)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f'{where}: no values for {_listing(left)}')
    return net


def overlay_tensors(net, tensors, where):
    """Overwrite some of a materialised net's entries (names must exist, shapes must match)."""
    expected = net.state_dict()
    _compare(expected, tensors, where, partial=True)
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t)
    return net


def build_meta_network(class_name, init_kwargs, where):
    """Our network with these init kwargs, on the meta device (no memory, no random init)."""
    try:
        with torch.device('meta'):
            return build_network(class_name, **init_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f'{where}: cannot build {class_name} from the recorded arguments: {e}') from None

#----------------------------------------------------------------------------
# Persistence records into networks.

def record_init_kwargs(record, class_name, where):
    """The record's constructor arguments as kwargs of our class (positional ones named)."""
    if not record.init_args and not record.init_kwargs:
        raise CheckpointError(f'{where}: the {record.class_name} object does not record its constructor arguments')
    names = [p.name for p in inspect.signature(PRECOND_CLASSES[class_name].__init__).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if len(record.init_args) > len(names):
        raise CheckpointError(f'{where}: {record.class_name} was built with {len(record.init_args)} positional '
                              f'arguments, expected at most {len(names)}')
    kwargs = dict(zip(names, record.init_args))
    for name, value in record.init_kwargs.items():
        if name in kwargs:
            raise CheckpointError(f'{where}: {record.class_name} argument {name!r} given twice')
        kwargs[name] = value
    return to_plain(kwargs)


def _same(a, b):
    a, b = to_plain(a) if isinstance(a, np.generic) else a, to_plain(b) if isinstance(b, np.generic) else b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)
    return a == b


def check_record_matches(record, net, where):
    """Every recorded submodule must be configured as ours (see CHECKED_ATTRIBUTES, TOLERATED_DEFAULTS)."""
    modules = dict(net.named_modules())
    for path, rec in record.named_records():
        label = f'{where}: {path or "<root>"} ({rec.class_name})'
        for key, default in TOLERATED_DEFAULTS.items():
            for table in (rec.init_kwargs, rec.attributes):
                if key in table and not _same(table[key], default):
                    raise CheckpointError(f'{label} has {key}={table[key]!r}; only {key}={default!r} is supported')
        module = modules.get(path)
        if module is None:
            if rec.parameters or rec.buffers or rec.children or rec.is_module:
                raise CheckpointError(f'{label} has no counterpart in our {type(net).__name__}')
            continue
        for attr in CHECKED_ATTRIBUTES:
            if attr not in rec.attributes or not hasattr(module, attr):
                continue
            if not _same(rec.attributes[attr], getattr(module, attr)):
                raise CheckpointError(f'{label} has {attr}={rec.attributes[attr]!r}, but the network built from its '
                                      f'arguments has {getattr(module, attr)!r}')


def check_target_class(class_name):
    if class_name not in PRECOND_CLASSES:
        raise CheckpointError(f'unknown target class {class_name!r}; '
                              f'expected one of {", ".join(sorted(PRECOND_CLASSES))}')


def network_from_record(record, as_class=None, where='checkpoint'):
    """One of our precond networks (eval mode, CPU) holding the record's weights."""
    if record.class_name not in PRECOND_CLASSES:
        raise CheckpointError(f'{where}: unsupported network class {record.class_name!r}; '
                              f'supported: {", ".join(sorted(PRECOND_CLASSES))}')
    class_name = as_class or record.class_name
    check_target_class(class_name)
    kwargs = record_init_kwargs(record, class_name, where)
    net = build_meta_network(class_name, kwargs, where)
    check_record_matches(record, net, where)
    assign_tensors(net, record.state_tensors(), where)
    return net.eval()
