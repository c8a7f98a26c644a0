import numpy as np
import pytest
import torch

from d2o_fast.cli import run_main


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
