"""A restricted unpickler for NVIDIA EDM / D2O persistence pickles.

EDM's torch_utils.persistence pickles every network class as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where meta carries the whole
Python source of the class's module and the object's __dict__. Plain `pickle.load` exec()s
that source, so a .pkl from the internet can run anything. This unpickler runs nothing:

- every global the pickle names is looked up in an explicit allow-list (tensors, storages,
  dtypes, plain containers, numpy scalars/arrays); anything else raises UnsafePickleError
  naming it ("refused global posix.system");
- a persistent object becomes an inert ModuleRecord (class name, init args/kwargs,
  parameters, buffers, child records); `module_src` is never looked at beyond its type;
- torch.nn.ModuleDict/ModuleList/Sequential (pickled as plain objects) become records too;
- tensor storages are torch.save bytes inside the pickle; they are read with
  torch.load(weights_only=True), torch's own restricted loader.

Covers what torch 1.x and 2.x emit for tensors and parameters with plain pickle, protocols 0-5
(_rebuild_tensor_v2/_v3, _rebuild_parameter[_with_state], _rebuild_from_type_v2,
storage._load_from_bytes, and _codecs.encode for bytes under protocols < 3).
"""

import _compat_pickle
import builtins
import collections
import io
import pickle

import numpy as np
import torch

from d2o_fast.checkpoint.errors import CheckpointError, UnsafePickleError

#----------------------------------------------------------------------------
# Inert records of pickled modules.

# Module state entries that are structure, not attributes.
_STRUCTURE_KEYS = ('_parameters', '_buffers', '_modules', '_non_persistent_buffers_set', '_init_args', '_init_kwargs')


class ModuleRecord:
    """What a pickled torch.nn.Module (or other persistent object) held, as plain data.

    class_name:  the class's name in the pickle (e.g. 'EDMPrecond', 'UNetBlock', 'ModuleDict').
    persistent:  True when it came through torch_utils.persistence (then it carried source code).
    init_args, init_kwargs: the constructor arguments persistence recorded (empty otherwise).
    parameters, buffers: name -> tensor or None, in the module's registration order.
    children:    name -> ModuleRecord or None.
    attributes:  every other plain entry of the object's __dict__ (hook tables removed).
    """

    torch_class_name = None  # set on the stand-ins for torch containers

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.class_name = cls.torch_class_name
        self.persistent = False
        self.init_args = ()
        self.init_kwargs = {}
        self.parameters = collections.OrderedDict()
        self.buffers = collections.OrderedDict()
        self.non_persistent_buffers = set()
        self.children = collections.OrderedDict()
        self.attributes = {}
        self.is_module = False
        return self

    def __init__(self, class_name, state, persistent):
        self.class_name = class_name
        self.persistent = persistent
        self._fill(state)

    def __setstate__(self, state):
        # BUILD after NEWOBJ: how torch containers (not persistent) are pickled.
        self._fill(state)

    def __repr__(self):
        return f'ModuleRecord({self.class_name!r}, {len(self.parameters)} parameters, {len(self.children)} children)'

    def _fill(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f'state of {self.class_name} is a {type(state).__name__}, expected a dict')
        state = dict(state)
        self.is_module = '_parameters' in state or '_modules' in state
        init_args = state.get('_init_args') or ()
        init_kwargs = state.get('_init_kwargs') or {}
        if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
            raise UnsafePickleError(f'{self.class_name}: malformed _init_args/_init_kwargs')
        self.init_args = tuple(init_args)
        self.init_kwargs = dict(init_kwargs)
        self.parameters = _typed_table(state.get('_parameters'), torch.Tensor, f'{self.class_name}._parameters')
        self.buffers = _typed_table(state.get('_buffers'), torch.Tensor, f'{self.class_name}._buffers')
        self.children = _typed_table(state.get('_modules'), ModuleRecord, f'{self.class_name}._modules')
        self.non_persistent_buffers = set(state.get('_non_persistent_buffers_set') or ())
        self.attributes = {}
        for key, value in state.items():
            if key in _STRUCTURE_KEYS:
                continue
            if 'hook' in key:
                if value:  # hooks are callables; a pickle that carries any is not a plain network
                    raise UnsafePickleError(f'{self.class_name}: refused non-empty hook table {key}')
                continue
            self.attributes[key] = value

    def named_records(self, prefix=''):
        """(path, record) of this record and all descendants, like Module.named_modules()."""
        yield prefix, self
        for name, child in self.children.items():
            if child is not None:
                yield from child.named_records(f'{prefix}.{name}' if prefix else name)

    def state_tensors(self):
        """name -> tensor, exactly the entries Module.state_dict() would hold."""
        out = collections.OrderedDict()
        for path, record in self.named_records():
            prefix = f'{path}.' if path else ''
            for name, tensor in record.parameters.items():
                if tensor is not None:
                    out[prefix + name] = tensor
            for name, tensor in record.buffers.items():
                if tensor is not None and name not in record.non_persistent_buffers:
                    out[prefix + name] = tensor
        return out


def _typed_table(table, value_type, what):
    if table is None:
        return collections.OrderedDict()
    if not isinstance(table, dict):
        raise UnsafePickleError(f'{what} is a {type(table).__name__}, expected a dict')
    for name, value in table.items():
        if not isinstance(name, str) or not (value is None or isinstance(value, value_type)):
            raise UnsafePickleError(f'{what}[{name!r}] is a {type(value).__name__}, expected {value_type.__name__}')
    return collections.OrderedDict(table)


def _container_record_class(name):
    return type(name, (ModuleRecord,), {'torch_class_name': name, '__module__': __name__})


_CONTAINER_RECORDS = {name: _container_record_class(name) for name in ('ModuleDict', 'ModuleList', 'Sequential')}


class LoadedEasyDict(dict):
    """dnnlib.util.EasyDict as a plain dict (attribute access is not needed to read a checkpoint)."""

    def __setstate__(self, state):
        if state:
            if not isinstance(state, dict):
                raise UnsafePickleError('malformed EasyDict state')
            self.update(state)

#----------------------------------------------------------------------------
# The callables a pickle may invoke. Each checks its arguments; none runs foreign code.

class _Allowed:
    """An allow-listed callable; refuses BUILD so a pickle cannot set attributes on it."""

    __slots__ = ('fn', 'name')

    def __init__(self, fn, name):
        self.fn = fn
        self.name = name

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setstate__(self, state):
        raise UnsafePickleError(f'refused BUILD on {self.name}')

    def __repr__(self):
        return f'<allowed {self.name}>'


class _TensorType:
    """Stands in for torch.Tensor / torch.nn.Parameter as the type argument of _rebuild_from_type_v2."""

    __slots__ = ('name',)

    def __init__(self, name):
        self.name = name

    def __setstate__(self, state):
        raise UnsafePickleError(f'refused BUILD on {self.name}')


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict):
        raise UnsafePickleError(f'persistent object meta is a {type(meta).__name__}, expected a dict')
    if meta.get('type') != 'class':
        raise UnsafePickleError(f'refused persistent object of type {meta.get("type")!r}')
    class_name = meta.get('class_name')
    if not isinstance(class_name, str) or not class_name.isidentifier():
        raise UnsafePickleError(f'persistent object has an invalid class name {class_name!r}')
    if not isinstance(meta.get('module_src', ''), str):
        raise UnsafePickleError(f'persistent object {class_name}: module_src is not a string')
    return ModuleRecord(class_name, meta.get('state') or {}, persistent=True)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor, protocols 0/1: only for our own record stand-ins.
    if not (isinstance(cls, type) and issubclass(cls, (ModuleRecord, LoadedEasyDict))):
        raise UnsafePickleError(f'refused copyreg._reconstructor for {cls!r}')
    if base is object and state is None:
        return cls.__new__(cls)
    if base is dict and issubclass(cls, dict) and isinstance(state, dict):
        return cls(state)
    raise UnsafePickleError(f'refused copyreg._reconstructor with base {base!r}')


def _latin1_encode(text, encoding='latin1'):
    # How protocols < 3 spell bytes: _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise UnsafePickleError(f'refused _codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


def _load_storage(data):
    # torch.storage._load_from_bytes, minus its weights_only=False.
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f'storage payload is a {type(data).__name__}, expected bytes')
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location='cpu')
    except Exception as e:
        raise CheckpointError(f'could not read a tensor storage: {type(e).__name__}: {e}') from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'storage payload holds a {type(storage).__name__}, expected a storage')
    return storage


def _int_tuple(value, what):
    if not isinstance(value, (tuple, list, torch.Size)) or not all(isinstance(v, int) for v in value):
        raise UnsafePickleError(f'tensor {what} is not a tuple of ints: {value!r}')
    return tuple(value)


def _check_hooks(backward_hooks):
    if backward_hooks:
        raise UnsafePickleError('refused tensor with backward hooks')


def _tensor(storage, storage_offset, size, stride, dtype=None, metadata=None):
    if isinstance(storage, torch.storage.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    elif isinstance(storage, torch.UntypedStorage) and isinstance(dtype, torch.dtype):
        untyped = storage
    else:
        raise UnsafePickleError(f'tensor storage is a {type(storage).__name__}')
    if not isinstance(storage_offset, int):
        raise UnsafePickleError(f'tensor storage offset is a {type(storage_offset).__name__}')
    size, stride = _int_tuple(size, 'size'), _int_tuple(stride, 'stride')
    # set_() would silently grow the storage to fit, so check the view lies inside it.
    itemsize = torch.empty((), dtype=dtype).element_size()
    extent = 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if (len(size) != len(stride) or storage_offset < 0 or min(size + stride, default=0) < 0
            or (extent and (storage_offset + extent) * itemsize > untyped.nbytes())):
        raise CheckpointError(f'malformed tensor: size {list(size)}, stride {list(stride)}, offset {storage_offset} '
                              f'do not fit a storage of {untyped.nbytes() // itemsize} elements')
    try:
        tensor = torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, size, stride)
    except RuntimeError as e:  # out-of-bounds view of the storage
        raise CheckpointError(f'malformed tensor: {e}') from None
    if metadata:
        plain_bits = isinstance(metadata, dict) and set(metadata) <= {'conj', 'neg'}
        if not plain_bits or not all(isinstance(v, bool) for v in metadata.values()):
            raise UnsafePickleError(f'refused tensor metadata {metadata!r}')
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_hooks(backward_hooks)
    return _tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_hooks(backward_hooks)
    return _tensor(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # Records keep parameters as plain tensors: the network they are loaded into owns the Parameters.
    _check_hooks(backward_hooks)
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f'parameter data is a {type(data).__name__}')
    return data


def _rebuild_from_type(func, new_type, args, state):
    if not (isinstance(func, _Allowed) and func.fn in _TENSOR_REBUILDERS and isinstance(new_type, _TensorType)):
        raise UnsafePickleError(f'refused _rebuild_from_type_v2({func!r}, {new_type!r})')
    if not isinstance(args, tuple):
        raise UnsafePickleError('malformed _rebuild_from_type_v2 arguments')
    return func(*args)  # python-level attributes in `state` are dropped


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)

#----------------------------------------------------------------------------
# The allow-list.

def _numpy_globals():
    core = np._core if hasattr(np, '_core') else np.core
    table = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype}
    for prefix in ('numpy.core', 'numpy._core'):  # numpy 1.x / 2.x spellings
        table[f'{prefix}.multiarray._reconstruct'] = core.multiarray._reconstruct
        table[f'{prefix}.multiarray.scalar'] = core.multiarray.scalar
        table[f'{prefix}.numeric._frombuffer'] = core.numeric._frombuffer
    return table


def _build_allow_list():
    allowed = {}
    own = {
        'torch_utils.persistence._reconstruct_persistent_obj': _reconstruct_persistent_obj,
        'torch._utils._rebuild_tensor': _rebuild_tensor,
        'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
        'torch._utils._rebuild_tensor_v3': _rebuild_tensor_v3,
        'torch._utils._rebuild_parameter': _rebuild_parameter,
        'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
        'torch._tensor._rebuild_from_type_v2': _rebuild_from_type,
        'torch._tensor._rebuild_from_type': _rebuild_from_type,
        'torch.storage._load_from_bytes': _load_storage,
        'copyreg._reconstructor': _reconstructor,
        '_codecs.encode': _latin1_encode,
    }
    allowed.update({name: _Allowed(fn, name) for name, fn in own.items()})
    allowed.update({f'torch.nn.modules.container.{name}': cls for name, cls in _CONTAINER_RECORDS.items()})
    allowed.update({'dnnlib.EasyDict': LoadedEasyDict, 'dnnlib.util.EasyDict': LoadedEasyDict})
    allowed.update({name: _TensorType(name) for name in ('torch.Tensor', 'torch.nn.parameter.Parameter')})
    allowed.update({'torch.Size': torch.Size, 'torch.device': torch.device})
    allowed['collections.OrderedDict'] = collections.OrderedDict
    for name in ('set', 'frozenset', 'list', 'dict', 'tuple', 'complex', 'slice', 'bytearray', 'bytes', 'object', 'int',
                 'float', 'bool'):
        allowed[f'builtins.{name}'] = getattr(builtins, name)
    allowed.update(_numpy_globals())
    return allowed


ALLOWED_GLOBALS = _build_allow_list()


def _modern_name(module, name):
    # Protocol 0-2 pickles written by Python 2 name modules the old way (__builtin__, copy_reg).
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves globals only from ALLOWED_GLOBALS."""

    def find_class(self, module, name):
        module, name = _modern_name(module, name)
        key = f'{module}.{name}'
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f'refused global {key}')

    def persistent_load(self, pid):
        raise UnsafePickleError(f'refused persistent id {pid!r} (torch.save archives are not EDM pickles)')


def safe_load(file):
    """Unpickle an EDM/D2O .pkl (a binary file object) without executing any of its code.

    Returns the pickled object with every network replaced by a ModuleRecord. Raises
    UnsafePickleError for anything outside the allow-list, CheckpointError for malformed data.
    """
    try:
        return RestrictedUnpickler(file).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated files, wrong opcodes, type errors from malformed REDUCE args
        raise CheckpointError(f'malformed pickle: {type(e).__name__}: {e}') from None
