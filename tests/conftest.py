from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """
    The embedded default model converted once per test session into a temporary cache directory.

    Returns the checkpoint directory; its parent is the cache directory (set `CALIB_TRL_CACHE` to it to make
    `calib_trl.defaults` use this copy).
    """
    from calib_trl.defaults import default_model_path

    root = tmp_path_factory.mktemp("calib_trl_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIB_TRL_CACHE", str(root))
        return default_model_path()
