import os

import numpy as np
import pytest
import torch

from d2o_fast.cli import run_main

# 'i/n': run only the i-th of n interleaved shares of the selected tests (parallel pytest processes on one GPU).
SHARD_ENV = 'D2O_FAST_TEST_SHARD'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def user_error(capsys, monkeypatch):
    """user_error(main, argv) -> stderr of an entry point that must end in a user-facing error (exit 1, no traceback)."""
    monkeypatch.delenv('D2O_FAST_TRACEBACK', raising=False)

    def run(main, argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, [str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, err
        assert err.startswith('error: ') and 'Traceback' not in err, err
        return err
    return run
@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA device')
        for item in items:
            if item.get_closest_marker('gpu'):
                item.add_marker(skip)
    shard = os.environ.get(SHARD_ENV)
    if shard:
        try:
            index, count = (int(v) for v in shard.split('/'))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            raise pytest.UsageError(f'${SHARD_ENV} must be i/n with 0 <= i < n, got {shard!r}') from None
        dropped = [item for i, item in enumerate(items) if i % count != index]
        items[:] = [item for i, item in enumerate(items) if i % count == index]
        config.hook.pytest_deselected(items=dropped)
