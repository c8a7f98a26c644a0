"""The one atomic-write helper: all-or-nothing replacement, and the permissions of any other file of the process."""

import json
import os
import stat

import pytest
import torch

from d2o_fast.checkpoint import save_snapshot
from d2o_fast.engine.progress import save_image_grid
from d2o_fast.engine.run import write_config
from d2o_fast.engine.state import save_state
from d2o_fast.files import atomic_path
from d2o_fast.nets import architecture_kwargs, build_network


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_every_writer_gives_the_mode_of_an_ordinary_file(tmp_path, umask):
    (tmp_path / 'log.txt').write_text('a file the run opens itself\n')
    expected = 0o666 & ~umask
    assert mode(tmp_path / 'log.txt') == expected
    net = build_network('D2OPrecond', **architecture_kwargs('ddpmpp', 8, 3, 0, model_channels=8, channel_mult=[1],
                                                            num_blocks=1, attn_resolutions=[], dropout=0))
    save_snapshot(net, tmp_path / 'network-snapshot.safetensors')
    save_state(str(tmp_path), dict(step=torch.arange(3)), 7, keep=2)
    save_image_grid(torch.rand(4, 3, 8, 8) * 2 - 1, str(tmp_path / 'fakes.png'))
    write_config(str(tmp_path), dict(batch=4), 'id')
    written = [tmp_path / name for name in ('network-snapshot.safetensors', 'training-state-000000007.pt', 'fakes.png',
                                            'config.json')]
    for path in written:
        assert mode(path) == expected, (path, oct(mode(path)))
    assert json.loads((tmp_path / 'config.json').read_text()) == dict(batch=4, identity='id')
    assert sorted(os.listdir(tmp_path)) == sorted(['log.txt'] + [p.name for p in written])  # no temporary left


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    target = tmp_path / 'out.bin'
    target.write_bytes(b'previous')
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'half of the new contents')
            1 / 0
    assert target.read_bytes() == b'previous' and os.listdir(tmp_path) == ['out.bin']
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.getsize(tmp) == 0
        with open(tmp, 'wb') as f:
            f.write(b'new')
    assert target.read_bytes() == b'new' and os.listdir(tmp_path) == ['out.bin']
