"""Exception type of the metrics layer: every bad input surfaces as one, with a one-line message."""


class MetricsError(ValueError):
    """A detector, image set, reference file or classifier is missing or unusable (message names the problem)."""
