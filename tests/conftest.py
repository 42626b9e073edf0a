import dataclasses
from pathlib import Path

import pytest
import torch

# Arguments of the trainers themselves; `make_trainer` passes every other keyword to the config
TRAINER_ARGUMENTS = {
    "eval_dataset",
    "calibration_dataset",
    "estep_dataset",
    "peft_config",
    "callbacks",
    "formatting_func",
    "data_collator",
    "compute_loss_func",
}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny models run fastest on one thread, which also keeps them fast when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tok():
    """The character-level tokenizer of `helpers` (a fresh one per test: some tests change its chat template)."""
    from helpers import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def make_trainer(tmp_path, tok):
    """
    Builds a trainer for a tiny run: `make_trainer(train_dataset, RCFTTrainer, model_seed=3, ece_weight=0.6,
    calibration_dataset=heldout)`. The model is `helpers.make_model(len(tokenizer), seed=model_seed)` unless `model`
    is given, the tokenizer the `tok` fixture's unless `tokenizer` is; the trainer's own arguments
    (`TRAINER_ARGUMENTS`) go to the trainer, every other keyword to `helpers.make_config` (output directory: the
    test's `tmp_path` unless `output_dir` is given), or pass a ready `args`.
    """
    from helpers import make_config, make_model

    from calib_trl import CalibRCFTConfig, CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer

    def build(
        train_dataset, trainer_class=CalibSFTTrainer, *, model=None, model_seed=0, tokenizer=None, args=None, **kwargs
    ):
        tokenizer = tok if tokenizer is None else tokenizer
        trainer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in TRAINER_ARGUMENTS}
        if args is None:
            config_class = CalibSFTConfig
            if issubclass(trainer_class, RCFTTrainer):  # CogCalib's settings make it RCFT + CogCalib
                rcft_fields = {f.name for f in dataclasses.fields(RCFTConfig)} | {"output_dir"}
                config_class = RCFTConfig if set(kwargs) <= rcft_fields else CalibRCFTConfig
            args = make_config(config_class, kwargs.pop("output_dir", tmp_path), **kwargs)
        elif kwargs:
            raise TypeError(f"config settings {sorted(kwargs)} given beside a ready `args`")
        return trainer_class(
            model=make_model(len(tokenizer), seed=model_seed) if model is None else model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            **trainer_kwargs,
        )

    return build


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
