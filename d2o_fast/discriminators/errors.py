"""Exceptions raised by the discriminators package (bad configuration or missing pretrained weights)."""


class DiscriminatorConfigError(ValueError):
    """A discriminator or backbone was asked for with arguments it cannot honour."""


class BackboneWeightsError(FileNotFoundError):
    """Pretrained backbone weights were requested but cannot be found or do not fit the architecture."""
