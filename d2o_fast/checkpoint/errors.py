"""Errors of the checkpoint layer: one type to catch, one line to print."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, written or matched to a network; the message says why."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something outside the allow-list (a global, an opcode, a hook)."""
