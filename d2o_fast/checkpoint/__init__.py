"""Checkpoints: reading EDM / D2O pickles without running their code, and the project's snapshots.

    load_network(path, device='cpu', as_class=None, key=None) -> eval-mode network
    save_snapshot(net, path, metadata=None, base=None, trainable_only=False)
    file_sha256(path)

Imports d2o_fast.nets only.
"""

from d2o_fast.checkpoint.errors import CheckpointError, UnsafePickleError
from d2o_fast.checkpoint.load import CheckpointInfo, load_network
from d2o_fast.checkpoint.safe_pickle import ModuleRecord, safe_load
from d2o_fast.checkpoint.snapshot import read_snapshot, save_snapshot
from d2o_fast.files import file_sha256

__all__ = ['CheckpointError', 'UnsafePickleError', 'CheckpointInfo', 'ModuleRecord', 'load_network', 'save_snapshot',
           'read_snapshot', 'safe_load', 'file_sha256']
