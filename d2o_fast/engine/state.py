"""Full training state on disk: written atomically, the last K kept, found again on resume.

A training state holds everything needed to continue bit-for-bit: G, EMA, D, both optimizers, the grad
scaler, images seen, the step counter, the data loader position and every rank's RNG states. It is written
atomically (d2o_fast/files.py atomic_path), so an interrupted or failed save never leaves a corrupt file and
never touches the previous checkpoint.
"""

import glob
import os
import random
import re

import numpy as np
import torch

from d2o_fast.checkpoint import CheckpointError
from d2o_fast.files import atomic_path

STATE_PATTERN = 'training-state-{:09d}.pt'
STATE_GLOB = 'training-state-*.pt'


def list_states(run_dir):
    """Training-state files of a run folder, oldest first."""
    def images(p):
        m = re.search(r'training-state-(\d+)\.pt$', p)
        return int(m.group(1)) if m else -1
    return sorted(glob.glob(os.path.join(run_dir, STATE_GLOB)), key=images)


def save_state(run_dir, state, images_seen, keep):
    path = os.path.join(run_dir, STATE_PATTERN.format(images_seen))
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_states(run_dir)[:-keep] if keep > 0 else []:
        if os.path.abspath(old) != os.path.abspath(path):
            os.remove(old)
    return path


def load_state(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'training state not found: {path}') from None
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f'cannot read training state {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None


#----------------------------------------------------------------------------
# RNG states of one process, in a form torch.load(weights_only=True) accepts.

def capture_rng():
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = dict(torch=torch.get_rng_state(), python=dict(version=py_version, internal=list(py_internal), gauss=py_gauss),
                 numpy=dict(key=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                            has_gauss=int(np_state[3]), cached=float(np_state[4])))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state['torch'])
    py = state['python']
    random.setstate((py['version'], tuple(py['internal']), py['gauss']))
    n = state['numpy']
    np.random.set_state(('MT19937', n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])

