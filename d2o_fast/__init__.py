"""d2o_fast: fast D2O / D2O-F training of one-step generators from pretrained EDM U-Nets."""

__version__ = '0.1.0'


def load_network(path, **kwargs):
    """Load an EDM / D2O pickle or a d2o_fast snapshot as a ready torch.nn.Module (no code executed)."""
    from d2o_fast.checkpoint import load_network as _load
    return _load(path, **kwargs)
