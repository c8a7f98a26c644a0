"""Exceptions raised by the discriminators package (bad configuration or missing pretrained weights)."""

from d2o_fast.errors import D2OFastError


class DiscriminatorConfigError(D2OFastError, ValueError):
    """A discriminator or backbone was asked for with arguments it cannot honour."""


class BackboneWeightsError(D2OFastError, FileNotFoundError):
    """Pretrained backbone weights were requested but cannot be found or do not fit the architecture."""
