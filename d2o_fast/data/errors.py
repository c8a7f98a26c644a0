"""Exception types of the data layer: every bad input surfaces as one of these, with a one-line message."""


class DatasetError(ValueError):
    """A dataset file or folder is missing, corrupt, or not usable by the network (message names the problem)."""


class LoaderError(ValueError):
    """A loader was configured inconsistently, or given a state saved for a different stream."""
