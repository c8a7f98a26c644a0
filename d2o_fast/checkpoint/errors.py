"""Errors of the checkpoint layer: one type to catch, a message that says what is wrong."""

from d2o_fast.errors import D2OFastError


class CheckpointError(D2OFastError, ValueError):
    """A checkpoint could not be read, written or matched to a network; the message says why."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something outside the allow-list (a global, an opcode, a hook)."""
