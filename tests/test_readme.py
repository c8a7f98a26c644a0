"""Every command in README.md's fenced blocks names an entry point, script or path that exists, and flags that
entry point accepts (read from its --help; choice values given before --help are checked by its parser too).
The README's preset table is the one `preset_table()` renders from the preset registry
(`python tests/test_readme.py` prints it)."""

import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = ('python', 'python3', 'torchrun', 'pytest', 'pip')


def fenced_blocks(text):
    return re.findall(r'^```[^\n]*\n(.*?)^```', text, flags=re.S | re.M)


def commands(block):
    """Token lists of the block's commands: continuation lines joined, comments dropped, split at && ; |."""
    found = []
    for line in block.replace('\\\n', ' ').splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        command = []
        for token in tokens + ['&&']:
            if token in ('&&', '||', ';', '|'):
                while command and re.fullmatch(r'[A-Z_][A-Z0-9_]*=\S*', command[0]):  # VAR=value prefixes
                    command.pop(0)
                if command and command[0] in PROGRAMS:
                    found.append(command)
                command = []
            else:
                command.append(token)
    return found


def readme_commands():
    text = (REPO / 'README.md').read_text()
    return [c for block in fenced_blocks(text) for c in commands(block)]


def target(command):
    """('module', name, args) | ('script', path, args) | ('paths', [paths], []) | None for what is not ours."""
    program, rest = command[0], command[1:]
    if program == 'pip':
        return None
    if program == 'torchrun' or rest[:1] == ['-m']:
        i = rest.index('-m')
        module, args = rest[i + 1], rest[i + 2:]
        if module == 'pytest':
            return 'paths', [a for a in args if not a.startswith('-')], []
        return ('module', module, args) if module.split('.')[0] == 'd2o_fast' else None
    if program == 'pytest':
        return 'paths', [a for a in rest if not a.startswith('-')], []
    return 'script', rest[0], rest[1:]


def module_file(module):
    path = REPO.joinpath(*module.split('.'))
    return next((p for p in (path.with_suffix('.py'), path / '__main__.py') if p.is_file()), None)


def help_text(kind, name, args, capsys):
    """The --help of the (sub)command the README's arguments select, and its exit code."""
    if kind == 'module':
        with pytest.raises(SystemExit) as exit_info:
            entry = name + '.__main__' if module_file(name).name == '__main__.py' else name
            importlib.import_module(entry).main(args + ['--help'])
        return exit_info.value.code, capsys.readouterr().out
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, str(REPO / name), *args, '--help'], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    return proc.returncode, proc.stdout


def test_readme_commands_name_existing_entry_points_and_flags(capsys):
    found = readme_commands()
    modules = {t[1] for t in map(target, found) if t and t[0] == 'module'}
    assert {'d2o_fast.train', 'd2o_fast.pretrain', 'd2o_fast.sample', 'd2o_fast.evaluate'} <= modules, modules
    checked = 0
    for command in found:
        kind, name, args = target(command) or (None, None, None)
        if kind is None:
            continue
        where = ' '.join(command)
        if kind == 'paths':
            assert all((REPO / p).exists() for p in name), where
            continue
        assert (module_file(name) if kind == 'module' else (REPO / name).is_file()), f'no such entry point: {where}'
        code, text = help_text(kind, name, [a for a in args if a != '--help'], capsys)
        assert code == 0, f'{where}: its parser refused the arguments before --help'
        accepted = set(re.findall(r'(?<![\w-])--[a-z0-9][a-z0-9-]*', text))
        for flag in (a.split('=')[0] for a in args if a.startswith('--')):
            assert flag in accepted, f'{where}: {name} has no {flag}'
        checked += 1
    assert checked >= 10


def test_the_reader_sees_what_it_reads():
    """The parsing above on a hand-written block: continuations, comments, env prefixes, &&, non-commands."""
    block = ('pip install x && python -m d2o_fast.train --compile  # the demo\n'
             'OMP_NUM_THREADS=1 torchrun --nproc_per_node 8 -m d2o_fast.train --preset cifar10-cond \\\n'
             '    --freeze 1\n'
             'd2o_fast/\n  ops/    not a command\n'
             'python benchmarks/paper_config.py --help\n')
    found = commands(block)
    assert found == [['pip', 'install', 'x'], ['python', '-m', 'd2o_fast.train', '--compile'],
                     ['torchrun', '--nproc_per_node', '8', '-m', 'd2o_fast.train', '--preset', 'cifar10-cond', '--freeze', '1'],
                     ['python', 'benchmarks/paper_config.py', '--help']]
    assert [target(c) for c in found] == [None, ('module', 'd2o_fast.train', ['--compile']),
                                          ('module', 'd2o_fast.train', ['--preset', 'cifar10-cond', '--freeze', '1']),
                                          ('script', 'benchmarks/paper_config.py', ['--help'])]


def test_readme_and_docs_name_existing_files():
    """Every repository path the README and docs/*.md quote (in backticks or as a link target) exists; study outputs
    under docs/results/ and patterns (*, <...>, {...}) are not files."""
    quoted = re.compile(r'(?:`|\]\()((?:\.ci|d2o_fast|docs|benchmarks|tests|kernels)/[^`\s)]*)')
    missing = []
    for doc in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]:
        for path in quoted.findall(doc.read_text()):
            path = path.split('::')[0]
            if any(c in path for c in '*<{$') or path.startswith('docs/results/'):
                continue
            if not (REPO / path).exists():
                missing.append(f'{doc.name}: {path}')
    assert not missing, missing


#----------------------------------------------------------------------------
# The preset table, rendered from the registry.

def preset_table():
    """The README's preset table: every preset of engine/config.py PRESETS with the values it resolves to."""
    from d2o_fast.cli import format_value
    from d2o_fast.engine.config import PRESETS, preset_values
    rows = ['| preset | --init | --data | cond | freeze | batch | G lr | D lr | EMA half-life (Mimg) | EMA ramp-up '
            '| kimg | discriminator |', '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for name in PRESETS:
        v = preset_values(name)
        disc = (f"projected: {' + '.join(v['disc_backbones'])}" if v['disc'] == 'projected'
                else f"{v['disc']} (width {v['disc_channels']}, from scratch)")
        cells = [name, f"`{v['init']}`", f"`{v['data']}`", format_value(v['cond']), v['freeze'], v['batch'],
                 f"{v['lr']:g}", f"{v['dlr']:g}", f"{v['ema_mimg']:g}", f"{v['ema_rampup']:g}", f"{v['kimg']:g}", disc]
        rows.append('| ' + ' | '.join(map(str, cells)) + ' |')
    return '\n'.join(rows)


def test_readme_preset_table_is_the_registry():
    assert preset_table() in (REPO / 'README.md').read_text(), 'regenerate it with: python tests/test_readme.py'


if __name__ == '__main__':
    print(preset_table())
