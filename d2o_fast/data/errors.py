"""Exception types of the data layer: every bad input surfaces as one of these, with a message naming the problem."""

from d2o_fast.errors import D2OFastError


class DatasetError(D2OFastError, ValueError):
    """A dataset file or folder is missing, corrupt, or not usable by the network (message names the problem)."""


class LoaderError(D2OFastError, ValueError):
    """A loader was configured inconsistently, or given a state saved for a different stream."""
