"""What the `calib-trl` command and the example scripts load: a model by name or path, offline, and a multiple-choice
split by name.

- `resolve_model_name_or_path`: `default` (the embedded SmolLM2-135M-Instruct, see `calib_trl.default_model`), a local
  directory, or a Hub id, which must be in the local Hub cache when the Hub is offline (`huggingface_hub`'s own
  `is_offline_mode`, so calib-trl and the Hub client agree);
- `load_model`: the model (or its PEFT adapter) and tokenizer;
- `load_mcq_dataset`: `default` (the embedded MMLU splits), a `save_to_disk` directory or a JSON(L) file.
"""

from __future__ import annotations

import os

import torch
from huggingface_hub.constants import is_offline_mode

from .defaults.model import DEFAULT_MODEL_ALIASES, default_model_path
from .defaults.packages import DEFAULT_MODEL_NAME

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if is_offline_mode() and not _in_hub_cache(name):
        raise ValueError(
            f"'{name}' looks like a Hugging Face Hub id, but calib-trl runs offline (HF_HUB_OFFLINE=1), so it cannot "
            f"be downloaded. Pass a local model directory, or 'default' for the embedded {DEFAULT_MODEL_NAME}."
        )
    return name


def load_model(name_or_path: str | None, dtype: str | torch.dtype = "float32", device=None, **kwargs):
    """
    `(model, tokenizer)` for a model name or path (see `resolve_model_name_or_path`); a directory holding a PEFT
    adapter (`adapter_config.json`) loads the adapter on its base model. `dtype` is a `torch.dtype` or its name
    (`float32`, `bfloat16`, `float16`); `device` defaults to CUDA when available; `kwargs` go to `from_pretrained`
    (e.g. `attn_implementation`, `revision`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name_or_path(name_or_path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


class MissingSplitError(ValueError):
    """The dataset has no split of the name asked for."""

    def __init__(self, dataset: str, split: str, splits: list[str], flag: str = "--split", hint: str = ""):
        self.dataset, self.split, self.splits = dataset, split, splits
        super().__init__(f"{dataset} has splits {splits}; got {flag} {split!r}.{hint}")


def has_splits(dataset: str) -> bool:
    """Whether `load_mcq_dataset` reads a named split of `dataset`: not of a JSON(L) file or a saved single `Dataset`."""
    return dataset == "default" or os.path.isfile(os.path.join(dataset, "dataset_dict.json"))


def load_mcq_dataset(dataset: str, split: str, max_samples: int | None = None, seed: int = 0):
    """
    A multiple-choice split: `default` (the embedded MMLU, see `calib_trl.defaults.load_default_dataset`), a directory
    written by `datasets.save_to_disk` (a `DatasetDict` or a `Dataset`), or a `.json`/`.jsonl` file. Rows need
    `prompt`, `choices` and `answer`; rows with `question` instead of `prompt` are formatted with
    `calib_trl.mcq.make_mcq_example`. `split` names a split of `default` or of a saved `DatasetDict`
    (`MissingSplitError` if it has none of that name); a file or a saved `Dataset` has no splits (see `has_splits`).
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    from .mcq import answer_index, check_choices, make_mcq_example

    if dataset == "default":
        from .defaults.mmlu import load_default_dataset

        splits = load_default_dataset(seed=seed)
        if split not in splits:
            raise MissingSplitError("The default dataset", split, list(splits))
        data = splits[split]
    elif os.path.isdir(dataset):
        data = load_from_disk(dataset)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise MissingSplitError(dataset, split, list(data))
            data = data[split]
    elif os.path.isfile(dataset) and dataset.endswith((".json", ".jsonl")):
        data = _load_json_rows(dataset)
    else:
        raise FileNotFoundError(
            f"Dataset {dataset!r} is neither 'default', a directory saved with `save_to_disk`, nor a .json/.jsonl file."
        )
    if not isinstance(data, Dataset):
        raise ValueError(f"{dataset} did not load as a `datasets.Dataset`.")
    if "prompt" not in data.column_names and "question" in data.column_names:
        missing = [c for c in ("choices", "answer") if c not in data.column_names]
        if missing:
            raise ValueError(f"{dataset}: rows with `question` also need {missing}.")
        try:
            for i, (choices, answer) in enumerate(zip(data["choices"], data["answer"])):
                answer_index(answer, len(check_choices(choices, row=i)), row=i)
        except ValueError as err:
            raise ValueError(f"{dataset}: {err}") from None
        data = data.map(lambda row: make_mcq_example(row["question"], row["choices"], row["answer"]))
    if len(data) == 0:
        raise ValueError(
            f"{dataset}: no rows{'' if split is None else f' in split {split!r}'}: there is nothing to score."
        )
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    return data


def _load_json_rows(path: str):
    """The rows of a JSON or JSON-lines file, or a `ValueError` naming the file and what is wrong with it."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    with open(path, "rb") as f:
        if not f.read(4096).strip():
            raise ValueError(f"{path} is empty: there are no rows to score.")
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one small file: its bars would only bury what follows
    try:
        return load_dataset("json", data_files=path, split="train")
    except (DatasetGenerationError, ValueError, TypeError) as err:
        cause = err.__cause__ or err
        raise ValueError(
            f"{path}: not a readable JSON(L) dataset ({type(cause).__name__}: {str(cause).splitlines()[0][:200]}). Each "
            "line must be one JSON object with the same keys (`prompt`, `choices`, `answer`, ...)."
        ) from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()
