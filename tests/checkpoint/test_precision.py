"""A network's precision comes from the run (its autocast), never from its checkpoint.

EDM's ImageNet ADM pickle records use_fp16=True; honouring it would cast the U-Net's inputs to float16 on CUDA
whatever --precision says (fp32 runs in fp16 without a grad scaler). The CUDA case is the one that would fail;
on CPU the switch never acted, so the CPU case checks the same contract where it can run.
"""

import pytest
import torch

from d2o_fast.checkpoint import load_network
from d2o_fast.nets import build_network
from tests.checkpoint import persistence_imitation as persistence
from tests.checkpoint.checkpoint_fixtures import VARIANTS, write_pickle
from tests.nets.test_networks import inputs, jitter

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)]


def adm_pickles(tmp_path):
    """The same ADM network pickled as EDM does, once recording use_fp16=True and once False."""
    with persistence.recording_init_args():
        net = jitter(build_network('EDMPrecond', **VARIANTS['adm-cond'], use_fp16=True), seed=1).eval()
    with_flag = write_pickle(tmp_path / 'adm-fp16.pkl', dict(ema=net))
    net._init_kwargs = dict(net._init_kwargs, use_fp16=False)
    return with_flag, write_pickle(tmp_path / 'adm-fp32.pkl', dict(ema=net))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('autocast', [None, torch.bfloat16], ids=['no-autocast', 'bf16-autocast'])
def test_recorded_use_fp16_does_not_change_the_precision(tmp_path, device, autocast):
    path_fp16, path_fp32 = adm_pickles(tmp_path)
    nets = {'use_fp16': load_network(path_fp16, device=device), 'plain': load_network(path_fp32, device=device)}
    assert nets['use_fp16'].init_kwargs['use_fp16'] is True  # kept as recorded: snapshots of it stay loadable
    x, sigma, labels = (t.to(device) for t in inputs(VARIANTS['adm-cond'])[:3])
    outputs, unet_inputs = {}, {}

    def record(name):
        def hook(module, args):
            unet_inputs[name] = args[0].dtype
        return hook
    for name, net in nets.items():
        hook = net.model.register_forward_pre_hook(record(name))
        with torch.no_grad(), torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            outputs[name] = net(x, sigma, labels)
        hook.remove()
    assert unet_inputs == {'use_fp16': torch.float32, 'plain': torch.float32}
    assert torch.equal(outputs['use_fp16'], outputs['plain'])
