"""Exception type of the metrics layer: every bad input surfaces as one, with a message naming the problem."""

from d2o_fast.errors import D2OFastError


class MetricsError(D2OFastError, ValueError):
    """A detector, image set, reference file or classifier is missing or unusable (message names the problem)."""
