"""What every entry point shares (d2o_fast/cli.py): --help that shows the chosen preset's values and every choice
flag's allowed values from the registries, and errors: a user's printed whole without a traceback, a bug's with one."""

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from d2o_fast import assets, data, dataset_tool, import_checkpoint, ops, pretrain, train
from d2o_fast.cli import add_config_flags, run_main
from d2o_fast.discriminators import BACKBONES, DISCRIMINATOR_KINDS
from d2o_fast.discriminators.weights import how_to_provide_weights
from d2o_fast.engine import optim
from d2o_fast.engine.config import PRESETS, PretrainConfig, TrainConfig, option, preset_values
from d2o_fast.nets import ARCHITECTURES
from d2o_fast.nets.freeze import FREEZE_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_lines(main, argv, capsys, monkeypatch):
    """{flag: its whole --help entry on one line} (printed wide, so that no help text wraps)."""
    monkeypatch.setenv('COLUMNS', '1000')
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ['--help'])
    assert exit_info.value.code == 0
    entries, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith('  -'):
            flag = line.split()[0]
            entries[flag] = line.strip()
        elif flag and line.startswith('    '):  # the help text of a long flag starts on the next line
            entries[flag] += ' ' + line.strip()
        else:
            flag = None
    return entries


# Each choice field and the registry it must take its allowed values from.
TRAIN_REGISTRIES = {
    '--kernels': ops.BACKENDS, '--data-backend': data.BACKENDS, '--disc': DISCRIMINATOR_KINDS,
    '--arch': tuple(ARCHITECTURES), '--freeze': tuple(FREEZE_KEYS), '--precision': optim.PRECISIONS,
    '--disc-precision': optim.DISC_PRECISIONS, '--preset': tuple(sorted(PRESETS)),
}


def test_train_help_lists_registries_and_the_presets_values(capsys, monkeypatch):
    demo = help_lines(train.main, [], capsys, monkeypatch)
    for flag, registry in TRAIN_REGISTRIES.items():
        assert '{' + ','.join(map(str, registry)) + '}' in demo[flag], demo[flag]
    assert ','.join(BACKBONES) in demo['--disc-backbones']
    # The demo preset's values, not the config class's defaults (batch 256, kimg 5000, precision auto).
    for flag, shown in [('--batch', '[demo: 16]'), ('--kimg', '[demo: 5]'), ('--precision', '[demo: auto]'),
                        ('--freeze', '[demo: 1]'), ('--disc', '[demo: stylegan2]'), ('--eval-demo', '[demo: true]'),
                        ('--lr', '[demo: 0.0003]'), ('--batch-gpu', '[demo: unset]')]:
        assert demo[flag].endswith(shown), demo[flag]
    cifar = help_lines(train.main, ['--preset', 'cifar10-cond'], capsys, monkeypatch)
    for flag, shown in [('--batch', '[cifar10-cond: 256]'), ('--kimg', '[cifar10-cond: 5000]'),
                        ('--precision', '[cifar10-cond: auto]'), ('--freeze', '[cifar10-cond: 0]'),
                        ('--disc', '[cifar10-cond: projected]'),
                        ('--disc-backbones', '[cifar10-cond: vgg16_bn,tf_efficientnet_lite0]'),
                        ('--init', '[cifar10-cond: pretrained/edm-cifar10-32x32-cond-ve.pkl]')]:
        assert shown in cifar[flag], cifar[flag]
    pre = help_lines(pretrain.main, [], capsys, monkeypatch)
    assert '[demo: 24]' in pre['--kimg'] and '[demo: 32]' in pre['--batch'] and '[demo: 1,2,2]' in pre['--channel-mult']
    assert '{' + ','.join(ARCHITECTURES) + '}' in pre['--arch']


def test_help_groups_every_flag():
    for cls in (TrainConfig, PretrainConfig):
        groups = {f.name: f.metadata['group'] for f in dataclasses.fields(cls)}
        assert set(groups.values()) <= {'data', 'model', 'optimisation', 'speed', 'run folder'}
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig, preset_values('demo'), 'demo', skip=('preset',))
    titled = {group.title: [a.dest for a in group._group_actions] for group in parser._action_groups}
    assert 'batch' in titled['optimisation'] and 'compile' in titled['speed'] and 'data' in titled['data']
    assert 'freeze' in titled['model'] and 'outdir' in titled['run folder']


def test_a_choice_flag_given_bare_takes_its_bare_value(capsys):
    @dataclasses.dataclass
    class Modes:
        mode: str = option('off', 'speed', 'how to run', choices=('off', 'some', 'all'), bare='all')

    parser = argparse.ArgumentParser(prog='modes')
    add_config_flags(parser, Modes, dict(mode='some'), 'preset-x')
    assert parser.parse_args(['--mode']).mode == 'all' and parser.parse_args(['--mode', 'some']).mode == 'some'
    assert parser.parse_args([]).mode is None  # not given: the preset's value applies
    parser.print_help()
    out = ' '.join(capsys.readouterr().out.split())
    assert 'speed: how it runs (results differ at most by rounding) --mode [{off,some,all}] how to run [preset-x: some]; ' \
           'bare --mode: all' in out and 'run folder' not in out  # groups without flags are left out
    with pytest.raises(SystemExit):
        parser.parse_args(['--mode', 'most'])


def test_choice_fields_hold_the_registries_themselves():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert fields['kernels'].metadata['choices'] is ops.BACKENDS
    assert fields['data_backend'].metadata['choices'] is data.BACKENDS
    assert fields['disc'].metadata['choices'] is DISCRIMINATOR_KINDS
    assert fields['precision'].metadata['choices'] is optim.PRECISIONS


@pytest.mark.parametrize('argv, pattern', [
    (['--kernels', 'cuda2'], "argument --kernels: invalid choice: 'cuda2'"),
    (['--disc-backbones', 'vgg16_bn,resnet50'], "'resnet50' is not one of"),
    (['--preset', 'cifar11'], "argument --preset: invalid choice: 'cifar11'"),
])
def test_bad_choices_are_usage_errors(argv, pattern, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ['--dry-run'])
    assert exit_info.value.code == 2 and pattern in capsys.readouterr().err


def test_a_multi_line_hint_is_printed_whole(tmp_path, monkeypatch, user_error):
    """No timm and no weight files: the error says, over several lines, how to make the files."""
    monkeypatch.setitem(sys.modules, 'timm', None)  # `import timm` fails, as where it is not installed
    weights = tmp_path / 'weights'
    weights.mkdir()
    err = user_error(train.main, ['--disc', 'projected', '--disc-weights', weights, '--kimg', '0.016',
                                  '--outdir', tmp_path / 'runs', '--eval-demo', 'false'])
    hint = how_to_provide_weights('vgg16_bn', str(weights))
    assert hint.count('\n') >= 2 and hint in err, err
    assert err.startswith(f'error: pretrained weights for vgg16_bn not found ({weights}/vgg16_bn.safetensors')


def test_pretrain_refuses_cudagraphs_from_the_command_line(user_error):
    assert '--cudagraphs is not implemented for EDM pre-training' in user_error(pretrain.main, ['--cudagraphs'])


def test_a_bad_path_is_a_user_error(tmp_path, user_error):
    dest = tmp_path / 'no-such-folder' / 'demo.safetensors'
    err = user_error(import_checkpoint.main, [assets.demo_checkpoint_path(), dest])
    assert err == f'error: [Errno 2] No such file or directory: cannot create {dest}\n'


def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        return {}['a key the code forgot']
    monkeypatch.setattr(dataset_tool, 'open_dataset', bug)
    with pytest.raises(KeyError, match='a key the code forgot'):  # run_main lets it through, traceback and all
        run_main(dataset_tool.main, ['info', str(tmp_path)])
    # As a user meets it: Python's own report of an uncaught exception.
    program = ('import d2o_fast.dataset_tool as t, d2o_fast.cli as c\n'
               't.open_dataset = lambda *a, **k: {}["a key the code forgot"]\n'
               f'c.run_main(t.main, ["info", {str(tmp_path)!r}])\n')
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop('D2O_FAST_TRACEBACK', None)
    proc = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith('Traceback (most recent call last):'), proc.stderr
    assert "KeyError: 'a key the code forgot'" in proc.stderr
    assert 'dataset_tool.py' in proc.stderr  # the frames down to the failing call
