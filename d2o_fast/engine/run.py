"""Run folders, resume discovery and graceful stops, shared by every training loop (train, pretrain).

A run lives in outdir/NNNNN-<preset>-<desc>/ with config.json. Re-running the same command finds the newest
folder whose config has the same identity and continues from its latest training state (--resume auto).
"""

import json
import os
import re
import signal

from d2o_fast.checkpoint import CheckpointError
from d2o_fast.engine.state import list_states
from d2o_fast.files import atomic_path

FINISHED_MARKER = 'finished'


def _numbered_dirs(outdir):
    if not os.path.isdir(outdir):
        return []
    found = []
    for name in os.listdir(outdir):
        m = re.match(r'^(\d{5})-', name)
        if m and os.path.isdir(os.path.join(outdir, name)):
            found.append((int(m.group(1)), os.path.join(outdir, name)))
    return sorted(found)


def find_resumable_run(outdir, identity):
    """Newest unfinished run folder in outdir whose config has this identity, or None."""
    for _, path in reversed(_numbered_dirs(outdir)):
        try:
            with open(os.path.join(path, 'config.json')) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue
        if saved.get('identity') == identity and not os.path.exists(os.path.join(path, FINISHED_MARKER)):
            return path
    return None


def new_run_dir(outdir, desc):
    os.makedirs(outdir, exist_ok=True)
    runs = _numbered_dirs(outdir)
    number = runs[-1][0] + 1 if runs else 0
    path = os.path.join(outdir, f'{number:05d}-{desc}')
    os.makedirs(path)
    return path


def choose_run_dir(cfg, desc, identity):
    """(run_dir, state_path or None) for this config, honouring --run-dir and --resume."""
    if cfg.run_dir:
        run_dir = cfg.run_dir
        os.makedirs(run_dir, exist_ok=True)
    elif cfg.resume == 'auto':
        run_dir = find_resumable_run(cfg.outdir, identity) or new_run_dir(cfg.outdir, desc)
    else:
        run_dir = new_run_dir(cfg.outdir, desc)

    if cfg.resume == 'none':
        return run_dir, None
    if cfg.resume == 'auto':
        states = list_states(run_dir)
        return run_dir, (states[-1] if states else None)
    if not os.path.isfile(cfg.resume):
        raise CheckpointError(f'--resume: no such training state: {cfg.resume}')
    return run_dir, cfg.resume


def write_config(run_dir, config_dict, identity):
    with atomic_path(os.path.join(run_dir, 'config.json')) as tmp, open(tmp, 'w') as f:
        json.dump(dict(config_dict, identity=identity), f, indent=2, sort_keys=True)


def mark_finished(run_dir):
    with open(os.path.join(run_dir, FINISHED_MARKER), 'w') as f:
        f.write('done\n')


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves at the next iteration boundary and exits."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:   # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self):
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
