"""A minimal imitation of how NVIDIA's torch_utils.persistence pickles networks (written for the tests).

EDM decorates every network class so that an instance pickles as the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, with meta = {type: 'class',
version, module_src: <source of the class's module>, class_name, state: <the __dict__, incl.
_init_args/_init_kwargs>}; torch.nn.ModuleDict is not decorated and pickles normally.
Here the same byte layout is produced for our own network classes:

- `recording_init_args()`: while active, our layer and network constructors record their
  arguments as `_init_args` / `_init_kwargs`, as the decorator does;
- `dump(obj, file)`: while pickling, every module except torch containers gets a subclass
  whose __reduce__ returns (reconstruct_fn, (meta,)); `torch_utils.persistence` and
  `dnnlib.util` are registered in sys.modules so the pickle names them as EDM's do.
The reconstruct function really exec()s module_src, like the original: `plain_load` uses
it to show what an unrestricted pickle.load would do with a file.
"""

import contextlib
import copy
import functools
import inspect
import pickle
import sys
import types

import torch

from d2o_fast.nets import dhariwal_unet, layers, precond, song_unet

RECORDED_CLASSES = [layers.Linear, layers.Conv2d, layers.GroupNorm, layers.UNetBlock, layers.PositionalEmbedding,
                    layers.FourierEmbedding, song_unet.SongUNet, dhariwal_unet.DhariwalUNet, precond.EDMPrecond,
                    precond.D2OPrecond]
CONTAINERS = (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)

#----------------------------------------------------------------------------
# Stand-ins for the modules EDM pickles name.

def _reconstruct_persistent_obj(meta):
    """What the real one does: exec the pickled source, then restore the state (unsafe by design)."""
    module = types.ModuleType('_imported_module_for_test')
    exec(meta['module_src'], module.__dict__)  # noqa: S102 - this is the behaviour under test
    cls = module.__dict__[meta['class_name']]
    obj = cls.__new__(cls)
    obj.__dict__.update(meta['state'])
    return obj


class EasyDict(dict):
    """dnnlib.util.EasyDict: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _fake_modules():
    persistence = types.ModuleType('torch_utils.persistence')
    util = types.ModuleType('dnnlib.util')
    for module, fn in ((persistence, _reconstruct_persistent_obj), (util, EasyDict)):
        clone = fn if isinstance(fn, type) else types.FunctionType(fn.__code__, fn.__globals__, fn.__name__)
        clone.__module__ = module.__name__
        clone.__qualname__ = fn.__name__
        setattr(module, fn.__name__, clone)
    torch_utils, dnnlib = types.ModuleType('torch_utils'), types.ModuleType('dnnlib')
    torch_utils.persistence, dnnlib.util = persistence, util
    dnnlib.EasyDict = util.EasyDict
    return {'torch_utils': torch_utils, 'torch_utils.persistence': persistence, 'dnnlib': dnnlib, 'dnnlib.util': util}


@contextlib.contextmanager
def fake_upstream_modules():
    """torch_utils.persistence and dnnlib.util in sys.modules (restored afterwards)."""
    fakes = _fake_modules()
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield fakes
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def easy_dict(**kwargs):
    """A dnnlib.util.EasyDict that pickles under that name (use inside fake_upstream_modules)."""
    return sys.modules['dnnlib.util'].EasyDict(**kwargs)

#----------------------------------------------------------------------------
# Recording constructor arguments, as the persistent_class decorator does.

@contextlib.contextmanager
def recording_init_args():
    saved = {cls: cls.__dict__.get('__init__') for cls in RECORDED_CLASSES}

    def recorder(init):
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)
        return wrapped

    try:
        for cls in RECORDED_CLASSES:
            cls.__init__ = recorder(cls.__init__)
        yield
    finally:
        for cls, init in saved.items():
            if init is None:
                del cls.__init__
            else:
                cls.__init__ = init

#----------------------------------------------------------------------------
# Pickling.

def _persistent_reduce(self, class_names, module_src):
    orig = type(self).__mro__[1]
    state = dict(self.__dict__)
    state.setdefault('_init_args', ())
    state.setdefault('_init_kwargs', {})
    meta = dict(type='class', version=6, class_name=class_names.get(orig.__name__, orig.__name__),
                module_src=module_src.get(orig, None) or inspect.getsource(sys.modules[orig.__module__]), state=state)
    return sys.modules['torch_utils.persistence']._reconstruct_persistent_obj, (meta,)


@contextlib.contextmanager
def persistent_classes(net, class_names=None, module_src=None):
    """Make every non-container module of `net` pickle as a persistent object."""
    class_names, module_src = class_names or {}, module_src or {}
    made, swapped = {}, []
    for module in net.modules():
        cls = type(module)
        if isinstance(module, CONTAINERS):
            continue
        if cls not in made:
            reduce = functools.partialmethod(_persistent_reduce, class_names, module_src)
            made[cls] = type(cls.__name__, (cls,), {'__reduce__': reduce, '__module__': cls.__module__})
        module.__class__ = made[cls]
        swapped.append((module, cls))
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def dump(obj, file, protocol=4, class_names=None, module_src=None):
    """Pickle `obj` (a dict of networks and plain data, or a network) the way EDM does.

    class_names: our class name -> name written to the pickle (e.g. D2OPrecond -> GDDPrecond).
    module_src:  our class -> the module_src string to write (default: the real source).
    """
    nets = [v for v in (obj.values() if isinstance(obj, dict) else [obj]) if isinstance(v, torch.nn.Module)]
    with contextlib.ExitStack() as stack:
        if 'torch_utils.persistence' not in sys.modules or 'dnnlib.util' not in sys.modules:
            stack.enter_context(fake_upstream_modules())
        for net in nets:
            stack.enter_context(persistent_classes(net, class_names, module_src))
        pickle.dump(obj, file, protocol=protocol)


def plain_load(file):
    """pickle.load with the imitation registered: what an unrestricted loader would run."""
    with fake_upstream_modules():
        return pickle.load(file)


class EDMLoss:
    """A persistent object that is not a module (EDM pickles its loss function as 'loss_fn')."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __reduce__(self):
        state = dict(self.__dict__, _init_args=(), _init_kwargs=dict(self.__dict__))
        meta = dict(type='class', version=6, class_name='EDMLoss', module_src=inspect.getsource(sys.modules[__name__]),
                    state=state)
        return sys.modules['torch_utils.persistence']._reconstruct_persistent_obj, (meta,)
