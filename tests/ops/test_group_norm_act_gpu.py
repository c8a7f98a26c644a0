"""The fused GroupNorm kernels on a GPU (marked gpu: skipped without CUDA, run by `pytest -m gpu`).

- The CUDA and Triton kernels, forward and backward, against the float64 reference on every GroupNorm site of the
  four U-Nets (unet_norm_sites.py) in float32 / bfloat16 / float16, NCHW and channels_last, on the edge shapes
  and optional-input combinations of test_group_norm_act_kernels.py, and on the largest sites at the authors'
  64 images per GPU.
- The dispatcher's first-call self-check verdicts for every configuration the U-Nets use in training.
- The custom ops inside torch.compile'd U-Nets (Inductor, fullgraph: no graph break), per backend.
On a GPU machine a missing backend is a failure, not a skip: these tests exist to run the GPU code.
"""

import importlib

import pytest
import torch

from d2o_fast.ops import group_norm_act, resolve_backend, set_backend
from d2o_fast.ops.dispatch import SelfCheck
from tests.ops.test_group_norm_act import compiled_step_matches_eager, random_inputs, run_with_grads, tiny_unet
from tests.ops.test_group_norm_act_kernels import DTYPES, FLAGS, SHAPES, check_backend
from tests.ops.unet_norm_sites import NUM_GROUPS, all_sites

pytestmark = pytest.mark.gpu

BACKENDS = ('cuda', 'triton')
LAYOUTS = {'nchw': False, 'nhwc': True}
# The largest sites per modulation (elements per sample), at the authors' 64 images per GPU.
LARGEST = [((64, 576, 64, 64), 'none'), ((64, 384, 64, 64), 'scale_shift'), ((64, 256, 64, 64), 'add')]


def kernels(name):
    """The backend module, which must be usable on this GPU machine."""
    if name == 'cuda':
        native = importlib.import_module('d2o_fast.ops.native')
        why = native.unavailable_reason() or 'the extension was built without CUDA'
        assert native.available('cuda'), f'CUDA kernels unavailable: {why} (install with D2O_FAST_CUDA=1)'
        return native
    module = importlib.import_module('d2o_fast.ops.triton_group_norm')
    assert module.available('cuda'), 'Triton kernels unavailable on CUDA (TRITON_INTERPRET set?)'
    return module


def modulation_flags(modulation):
    """(add, scale, shift) of a site's modulation."""
    return modulation == 'add', modulation == 'scale_shift', modulation == 'scale_shift'


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """No TF32 in the compiled-vs-eager comparisons; dispatch and self-check state reset around each test."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    set_backend(None)
    SelfCheck.reset()
    yield
    set_backend(None)
    SelfCheck.reset()

#----------------------------------------------------------------------------
# Kernels against the float64 reference.

SITES = all_sites()


@pytest.mark.parametrize('site', SITES, ids=[f'{c}x{h}x{w}-{m}{"-silu" * s}' for c, h, w, _, m, s in SITES])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('backend', BACKENDS)
def test_unet_sites(backend, dtype, layout, site):
    C, H, W, eps, modulation, silu = site
    check_backend(kernels(backend), (2, C, H, W), NUM_GROUPS, dtype, LAYOUTS[layout], *modulation_flags(modulation),
                  silu=silu, eps=eps)


@pytest.mark.parametrize('shape,groups', SHAPES, ids=[f'{"x".join(map(str, s))}-g{g}' for s, g in SHAPES])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('backend', BACKENDS)
def test_edge_shapes(backend, dtype, layout, shape, groups):
    check_backend(kernels(backend), shape, groups, dtype, LAYOUTS[layout], add=True, scale=True, shift=True, silu=True)


@pytest.mark.parametrize('flags', FLAGS, ids=['add' * a + 'scale' * s + 'shift' * t + 'silu' * u or 'plain'
                                              for a, s, t, u in FLAGS])
@pytest.mark.parametrize('backend', BACKENDS)
def test_optional_inputs(backend, flags):
    i = FLAGS.index(flags)
    check_backend(kernels(backend), (2, 16, 3, 4), 4, DTYPES[i % 3], bool(i % 2), *flags, seed=i)


@pytest.mark.parametrize('shape,modulation', LARGEST, ids=[f'{"x".join(map(str, s))}-{m}' for s, m in LARGEST])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('backend', BACKENDS)
def test_largest_sites_at_the_training_batch(backend, dtype, layout, shape, modulation):
    check_backend(kernels(backend), shape, NUM_GROUPS, dtype, LAYOUTS[layout], *modulation_flags(modulation), silu=True)

#----------------------------------------------------------------------------
# Dispatch: 'auto' picks the CUDA kernels, and every configuration passes its first-call self-check.

def test_auto_picks_the_cuda_kernels():
    kernels('cuda')
    assert resolve_backend('cuda') == 'cuda'


@pytest.mark.parametrize('backend', BACKENDS)
def test_self_check_verdicts(backend):
    """Every (dtype, layout, modulation) the U-Nets train with: the op through the dispatcher, forward and backward,
    matches the float64 reference, and the backend's first-call self-check trusted it."""
    kernels(backend)
    set_backend(backend)
    configurations = [(dtype, layout, modulation, silu) for dtype in DTYPES for layout in LAYOUTS
                      for modulation, silu in [('none', True), ('none', False), ('add', True), ('scale_shift', True)]]
    for dtype, layout, modulation, silu in configurations:
        add, scale, shift = modulation_flags(modulation)
        inputs, groups = random_inputs(shape=(2, 64, 8, 8), groups=NUM_GROUPS // 2, dtype=dtype,
                                       channels_last=LAYOUTS[layout], add=add, scale=scale, shift=shift)
        inputs = {k: None if v is None else v.cuda() for k, v in inputs.items()}
        y, grads, _ = run_with_grads(group_norm_act, inputs, groups, silu)
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    verdicts = SelfCheck.verdicts()
    assert len(verdicts) == len(configurations) and all(key[0] == backend for key in verdicts)
    assert all(verdicts.values()), [key for key, ok in verdicts.items() if not ok]

#----------------------------------------------------------------------------
# The custom ops in compiled graphs.

@pytest.mark.parametrize('arch', ['song', 'dhariwal'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_compiled_unet_through_the_kernels(backend, arch):
    """Inductor compiles a U-Net around the custom ops with fullgraph=True (a graph break is an error), traced
    once, and the compiled forward and backward match eager; the backend's kernels ran inside the graph."""
    kernels(backend)
    set_backend(backend)
    compiled_step_matches_eager(tiny_unet(arch).cuda(), 'inductor', device='cuda')
    ran = {key[0] for key in SelfCheck.verdicts()}
    assert ran == {backend} and all(SelfCheck.verdicts().values())
