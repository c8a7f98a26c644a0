"""What every entry point shares: flags generated from a config dataclass, and one way to report errors.

Config flags: one --flag per field, in the field's --help group, with the registry of allowed values its field
declares (engine/config.py option) and, shown in --help, the value the chosen preset gives it.

Errors: `run_main` prints a user-facing error (d2o_fast.errors.D2OFastError, or a missing / unreadable path) as
`error: ` and its whole message, hints included, and exits 1 without a traceback (D2O_FAST_TRACEBACK=1 shows one);
any other exception is a bug and keeps its traceback. Usage errors exit 2, as argparse does.
"""

import argparse
import dataclasses
import os
import sys
import typing

from d2o_fast.errors import D2OFastError

# Exceptions that mean bad input or an unusable environment, not a bug: printed whole, without a traceback.
USER_ERRORS = (D2OFastError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def run_main(main, argv=None):
    """Run an entry point's main(argv) the same way for every entry point."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if os.environ.get('D2O_FAST_TRACEBACK'):
            raise
        print(f'error: {str(e).strip() or type(e).__name__}', file=sys.stderr)
        sys.exit(1)

#----------------------------------------------------------------------------
# Config flags.

def _parse_bool(text):
    if text.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if text.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean, got {text!r}')


def _tuple_parser(item, choices):
    def parse(text):
        try:
            values = tuple(item(v) for v in text.split(',') if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected comma-separated {item.__name__} values, got {text!r}') from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f'{bad[0]!r} is not one of {", ".join(map(str, choices))}')
        return values
    return parse


def format_value(value):
    """A field's value as it is typed on the command line."""
    if value is None:
        return 'unset'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ','.join(map(str, value))
    return str(value)


def _field_type(cls, field):
    kind = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def add_config_flags(parser, cls, shown, preset, skip=()):
    """One --flag per field of `cls` (underscores become dashes), in argparse groups by the field's group.

    Every default is None = 'not given', so that the preset's value applies; --help shows `shown[name]`, the value
    under `preset`, and the allowed values of every choice field.
    """
    from d2o_fast.engine.config import FLAG_GROUPS, flag_name
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    used = {f.metadata['group'] for f in fields}
    groups = {name: parser.add_argument_group(name, about) for name, about in FLAG_GROUPS.items() if name in used}
    for field in fields:
        meta, kind = field.metadata, _field_type(cls, field)
        name = meta['group']
        choices = meta.get('choices')
        help = f'{meta["help"]} [{preset}: {format_value(shown[field.name])}]'
        flag = flag_name(field.name)
        if kind is bool:
            groups[name].add_argument(flag, type=_parse_bool, nargs='?', const=True, default=None, metavar='BOOL',
                                      help=help)
        elif kind is tuple:
            item = type(field.default[0]) if field.default else str
            metavar = 'NAME,...' if choices else f'{item.__name__.upper()},...'
            if choices:
                help += f'; names from {{{",".join(map(str, choices))}}}'
            groups[name].add_argument(flag, type=_tuple_parser(item, choices), default=None, metavar=metavar, help=help)
        else:
            bare = meta.get('bare')
            if bare is not None:
                help += f'; bare {flag}: {format_value(bare)}'
            groups[name].add_argument(flag, type=kind, choices=choices, default=None, help=help,
                                      metavar=None if choices else field.name.upper(),
                                      **(dict(nargs='?', const=bare) if bare is not None else {}))


def overrides_from_args(args, cls, skip=()):
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def parse_config(argv, prog, doc, cls, presets):
    """(config, dry_run) from --preset, --dry-run and one flag per field of the config dataclass.

    --preset is read first, so that --help shows the values of the preset given with it."""
    from d2o_fast.engine.config import preset_values, resolve_config
    first = argparse.ArgumentParser(prog=prog, add_help=False)
    first.add_argument('--preset', default='demo')
    preset = first.parse_known_args(argv)[0].preset
    shown_preset = preset if preset in presets else 'demo'  # an unknown one is reported by the full parser below

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage='%(prog)s [--preset NAME] [--dry-run] [--FLAG VALUE ...]')
    parser.add_argument('--preset', default='demo', choices=sorted(presets),
                        help='the values every flag starts from [default: demo]; with --help, each flag shows '
                             'its value under this preset in [brackets]')
    parser.add_argument('--dry-run', action='store_true', help='print the resolved config and exit')
    add_config_flags(parser, cls, preset_values(shown_preset, cls, presets), shown_preset, skip=('preset',))
    args = parser.parse_args(argv)
    cfg = resolve_config(args.preset, cls=cls, presets=presets, **overrides_from_args(args, cls, skip=('preset',)))
    return cfg, args.dry_run
