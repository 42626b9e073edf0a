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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and the char-level tokenizer of `helpers`, saved as a local checkpoint."""
    from helpers import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tok = make_tokenizer()
    make_model(len(tok), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A multiple-choice `DatasetDict` (train / calibration / test / ood) saved with `save_to_disk`."""
    from datasets import DatasetDict
    from helpers import make_mcq_dataset

    path = tmp_path_factory.mktemp("tiny_data")
    DatasetDict(
        train=make_mcq_dataset(24, seed=1),
        calibration=make_mcq_dataset(16, seed=2),
        test=make_mcq_dataset(12, seed=3),
        ood=make_mcq_dataset(12, seed=4),
    ).save_to_disk(str(path))
    return path
