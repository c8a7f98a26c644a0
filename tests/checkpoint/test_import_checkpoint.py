"""python -m d2o_fast.import_checkpoint: converts without running the pickle; errors say why, exit code 1."""

import os
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch

from d2o_fast import import_checkpoint
from d2o_fast.checkpoint import file_sha256, load_network
from d2o_fast.nets import PRECOND_CLASSES
from tests.checkpoint.checkpoint_fixtures import VARIANTS, make_net, outputs, write_pickle

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-m', 'd2o_fast.import_checkpoint', *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def test_converts_an_edm_pickle(tmp_path):
    net = make_net('ddpmpp-cond-aug')
    src = write_pickle(tmp_path / 'edm-tiny.pkl', dict(ema=net))
    out = tmp_path / 'gen.safetensors'
    result = _run(src, out, '--as', 'D2OPrecond')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'D2OPrecond (from EDMPrecond' in lines[1] and 'ddpmpp' in lines[2]
    assert f'{sum(p.numel() for p in net.parameters()):,}' in lines[3]
    assert file_sha256(src) in lines[4] and file_sha256(out) in lines[5]
    gen = load_network(out)
    assert type(gen).__name__ == 'D2OPrecond' and gen.checkpoint_info.metadata['source_sha256'] == file_sha256(src)
    reference = load_network(src, as_class='D2OPrecond')
    assert torch.equal(outputs(gen, 'ddpmpp-cond-aug'), outputs(reference, 'ddpmpp-cond-aug'))


def test_refused_pickle_exits_1_with_the_reason(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    src = tmp_path / 'evil.pkl'
    src.write_bytes(pickle.dumps(dict(ema=Evil())))
    result = _run(src, tmp_path / 'out.safetensors')
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr.count('\n') == 1 and 'refused global' in result.stderr and 'Traceback' not in result.stderr
    assert not marker.exists() and not (tmp_path / 'out.safetensors').exists()


def test_bad_arguments_and_missing_files(tmp_path, capsys, user_error):
    err = user_error(import_checkpoint.main, [tmp_path / 'absent.pkl', tmp_path / 'out.safetensors'])
    assert err.strip() == f'error: {tmp_path / "absent.pkl"}: no such file'
    with pytest.raises(SystemExit) as exit_info:  # a usage error: argparse's exit code 2, with the allowed values
        import_checkpoint.main([str(tmp_path / 'in.pkl'), str(tmp_path / 'out.safetensors'), '--as', 'VPPrecond'])
    assert exit_info.value.code == 2
    allowed = ', '.join(repr(name) for name in sorted(PRECOND_CLASSES))
    assert f"invalid choice: 'VPPrecond' (choose from {allowed})" in capsys.readouterr().err


def test_architecture_names():
    assert import_checkpoint.architecture_name(VARIANTS['ncsnpp-uncond']) == 'ncsnpp'
    assert import_checkpoint.architecture_name(VARIANTS['ddpmpp-cond-aug']) == 'ddpmpp'
    assert import_checkpoint.architecture_name(VARIANTS['adm-cond']) == 'adm'
    assert import_checkpoint.architecture_name(VARIANTS['skip-encoder-skip-decoder']) == \
        'model_type=SongUNet, embedding_type=positional, encoder_type=skip, decoder_type=skip'
