"""The training step and loop on a GPU (marked gpu): fused CUDA kernels, fused Adam, torch.compile with the D-step
fakes compiled (the CUDA default), CUDA graphs, and a whole run through the CLI (DALI loader, pinned copies, NVML
telemetry of this GPU). Tiny networks; fp32 without TF32 where paths are compared."""

import importlib.util
import json
import os

import pytest
import torch

from d2o_fast import ops
from d2o_fast.discriminators import build_discriminator
from d2o_fast.engine import compile as engine_compile
from d2o_fast.engine import telemetry
from d2o_fast.engine.trainer import D2OTrainer
from tests.engine.conftest import CLASSES, RES, tiny_config, tiny_edm
from tests.engine.test_compile import BATCH, _as_d2o, batch, run_train

pytestmark = pytest.mark.gpu

CUDA = torch.device('cuda')
STEPS = 3  # with r1_interval=2: step 2 runs R1


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    torch._dynamo.reset()
    yield
    ops.set_backend(None)


def cuda_trainer(tmp_path, tiny_init, tiny_data, kernels='cuda', **overrides):
    ops.set_backend(kernels)
    cfg = tiny_config(tmp_path, tiny_init, tiny_data, **{'precision': 'fp32', 'r1_interval': 2, **overrides})
    torch.manual_seed(0)
    G = _as_d2o(tiny_edm(seed=0))
    D = build_discriminator('stylegan2', img_resolution=RES, img_channels=3, c_dim=CLASSES, channel_max=16)
    trainer = D2OTrainer(G, D, cfg, CUDA, batch_gpu=BATCH, rounds=1)
    trainer.kernels = kernels  # the backend is process-wide: train() selects it again for eager steps
    return trainer


def train(trainer, steps=STEPS):
    ops.set_backend(trainer.kernels)
    images, labels = (t.to(CUDA) for t in batch())
    stats = [trainer.step(images, labels, step, step * BATCH) for step in range(steps)]
    torch.cuda.synchronize()
    return [{k: float(v) for k, v in s.items()} for s in stats]


def assert_same_training(a, b, stats_a, stats_b, rtol=1e-3, atol=1e-4):
    for sa, sb in zip(stats_a, stats_b, strict=True):
        for k in sa:
            assert sb[k] == pytest.approx(sa[k], rel=rtol, abs=atol), k
    for module in ('G', 'G_ema', 'D'):
        for (name, p), q in zip(getattr(a, module).named_parameters(), getattr(b, module).parameters()):
            torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=f'{module}.{name}')


def test_fused_kernels_and_adam_train_like_pytorch(tmp_path, tiny_init, tiny_data):
    reference = cuda_trainer(tmp_path / 'torch', tiny_init, tiny_data, kernels='torch')
    fused = cuda_trainer(tmp_path / 'cuda', tiny_init, tiny_data, kernels='cuda')
    assert all(group.get('fused') for opt in (fused.opt_g, fused.opt_d) for group in opt.param_groups)
    assert_same_training(reference, fused, train(reference), train(fused))
    assert all(ops.dispatch.SelfCheck.verdicts().values())


def test_compiled_step_matches_eager(tmp_path, tiny_init, tiny_data):
    eager = cuda_trainer(tmp_path / 'e', tiny_init, tiny_data)
    compiled = cuda_trainer(tmp_path / 'c', tiny_init, tiny_data, compile=True)
    assert compiled.G_fakes is compiled.G_fwd  # on CUDA the D step's fakes run compiled too
    assert_same_training(eager, compiled, train(eager), train(compiled))


@pytest.mark.parametrize('mode', ['networks', 'step'])
def test_cuda_graphs_match_the_compiled_step(tmp_path, tiny_init, tiny_data, mode):
    modes = getattr(engine_compile, 'CUDAGRAPH_MODES', None)
    if modes is None or mode not in modes:
        pytest.skip(f'this engine has no --cudagraphs {mode} (engine.compile.CUDAGRAPH_MODES = {modes})')
    compiled = cuda_trainer(tmp_path / 'c', tiny_init, tiny_data, compile=True)
    graphed = cuda_trainer(tmp_path / 'g', tiny_init, tiny_data, compile=True, cudagraphs=mode)
    assert_same_training(compiled, graphed, train(compiled, STEPS + 2), train(graphed, STEPS + 2))


def test_nvml_finds_this_gpu():
    pynvml = pytest.importorskip('pynvml')
    pynvml.nvmlInit()
    device = torch.device('cuda', torch.cuda.current_device())
    handle = telemetry.nvml_handle(pynvml, device)
    assert handle is not None, telemetry.gpu_report(device)
    uuid, pci = telemetry.cuda_device_identity(device)
    assert uuid and telemetry.normalized_uuid(pynvml.nvmlDeviceGetUUID(handle)) == uuid
    info = pynvml.nvmlDeviceGetPciInfo(handle)
    assert pci is None or (info.domain, info.bus, info.device) == pci
    readings = telemetry.gpu_telemetry(device)
    assert set(readings) == {'gpu_util', 'gpu_mem_gb', 'gpu_power_w'} and readings['gpu_mem_gb'] > 0
    assert telemetry.peak_memory_bandwidth(device)[0] > 100


def test_training_run_on_the_gpu(tmp_path, tiny_init, tiny_data):
    """The CLI on CUDA: loader (DALI when installed), fused kernels, NVML telemetry in every tick."""
    proc, run_dir = run_train(['--init', tiny_init, '--data', tiny_data, '--outdir', 'runs', '--precision', 'bf16'],
                              tmp_path)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'device cuda' in log and 'kernels auto' in log, log
    dali = importlib.util.find_spec('nvidia') is not None and importlib.util.find_spec('nvidia.dali') is not None
    assert f'loader {"DaliLoader" if dali else "NativeLoader"}' in log, log
    ticks = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert ticks and all(t['loss_g'] == t['loss_g'] and t['peak_mem_gb'] > 0 for t in ticks)
    assert all({'gpu_util', 'gpu_mem_gb', 'gpu_power_w'} <= set(t) for t in ticks), ticks[-1]
    assert any(name.startswith('network-snapshot-') for name in os.listdir(run_dir))
