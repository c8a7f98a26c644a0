"""The base of every error d2o_fast raises on purpose, at the bottom of the layers (every layer imports it).

A `D2OFastError` means bad input or an environment the program cannot run in: its message is the whole story,
hints included, and the entry points print it without a traceback (d2o_fast/cli.py run_main). Each layer's own
types derive from it and also from the builtin type callers already catch (ValueError, FileNotFoundError, ...).
Any other exception is a bug and keeps its traceback.
"""


class D2OFastError(Exception):
    """A user-facing error: bad input or an unusable environment; the message says what and how to fix it."""


class ConfigError(D2OFastError, ValueError):
    """An option (config field or command-line flag) with a value the program cannot use."""


__all__ = ['D2OFastError', 'ConfigError']
