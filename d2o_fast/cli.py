"""What every entry point shares: config flags generated from a dataclass, and one-line errors.

Bad input raises one of the project's error types (all ValueError / OSError / RuntimeError subclasses with a
message naming the problem); `run_main` prints that message on one line and exits non-zero, no traceback.
"""

import argparse
import dataclasses
import os
import sys
import typing


def _parse_bool(text):
    if text.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if text.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean, got {text!r}')


def _tuple_parser(item):
    def parse(text):
        try:
            return tuple(item(v) for v in text.split(',') if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected comma-separated {item.__name__} values, got {text!r}') from None
    return parse


def add_dataclass_flags(parser, cls, skip=()):
    """One --flag per field (underscores become dashes); every default is None = 'not given'."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = '--' + field.name.replace('_', '-')
        kind = hints[field.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = field.default if field.default is not dataclasses.MISSING else None
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs='?', const=True, default=None, metavar='BOOL',
                                help=f'(default: {default})')
        elif kind is tuple:
            item = type(default[0]) if default else str
            parser.add_argument(flag, type=_tuple_parser(item), default=None, metavar='A,B',
                                help=f'comma-separated (default: {",".join(map(str, default))})')
        else:  # metadata: choices (the allowed values), bare (the value of the flag given without one)
            bare = field.metadata.get('bare')
            extra = dict(nargs='?', const=bare) if bare is not None else {}
            parser.add_argument(flag, type=kind, default=None, choices=field.metadata.get('choices'),
                                help=f'(default: {default}' + (f'; bare {flag}: {bare})' if bare is not None else ')'), **extra)


def overrides_from_args(args, cls, skip=()):
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def parse_config(argv, prog, doc, cls, presets):
    """(config, dry_run) from --preset, --dry-run and one flag per field of the config dataclass."""
    from d2o_fast.engine.config import resolve_config
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', default='demo', choices=sorted(presets))
    parser.add_argument('--dry-run', action='store_true', help='print the resolved config and exit')
    add_dataclass_flags(parser, cls, skip=('preset',))
    args = parser.parse_args(argv)
    cfg = resolve_config(args.preset, cls=cls, presets=presets, **overrides_from_args(args, cls, skip=('preset',)))
    return cfg, args.dry_run


def run_main(main, argv=None):
    """Run an entry point; a user-facing error becomes one line on stderr and exit code 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        if os.environ.get('D2O_FAST_TRACEBACK'):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'error: {message}', file=sys.stderr)
        sys.exit(1)
