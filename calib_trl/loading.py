"""What the `calib-trl` command and the example scripts load: a model by name or path, offline, and a split of evaluation
rows by name.

- `resolve_model_name_or_path` (from `calib_trl.defaults.model`): `default`, a local directory, or a Hub id in the local
  Hub cache when offline;
- `load_model`: the model (or its PEFT adapter) and tokenizer;
- `load_split`: an embedded dataset by name, a `save_to_disk` directory or a JSON(L) file; multiple-choice or open-ended
  rows.
"""

from __future__ import annotations

import os

import torch

from .defaults.model import resolve_model_name_or_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def is_embedded(dataset: str) -> bool:
    """Whether `dataset` names an embedded dataset (`default`, `arithmetic`, `arithmetic-mc`, `mmlu`)."""
    from .defaults import DATASETS

    return dataset == "default" or dataset in DATASETS


def has_splits(dataset: str) -> bool:
    """Whether `load_split` reads a named split of `dataset`: not of a JSON(L) file or a saved single `Dataset`."""
    return is_embedded(dataset) or os.path.isfile(os.path.join(dataset, "dataset_dict.json"))


def load_split(dataset: str, split: str, max_samples: int | None = None, seed: int = 0):
    """
    A split of evaluation rows: an embedded dataset by name (`default`, `arithmetic`, `arithmetic-mc`, `mmlu`: see
    `calib_trl.defaults.load_default_dataset`), a directory written by `datasets.save_to_disk` (a `DatasetDict` or a
    `Dataset`), or a `.json`/`.jsonl` file. Rows are either multiple choice (`prompt`, `choices` and `answer`; rows
    with `question` instead of `prompt` are formatted with `calib_trl.mcq.make_mcq_example`) or open-ended
    (`prompt` and `completion`, the completion being the reference answer). `split` names a split of an embedded
    dataset or of a saved `DatasetDict` (`MissingSplitError` if it has none of that name); a file or a saved
    `Dataset` has no splits (see `has_splits`). Errors name the file, the row and the column.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    from .mcq import answer_index, check_choices, claims_multiple_choice, make_mcq_example, validate_mcq_dataset

    if is_embedded(dataset):
        from .defaults import load_default_dataset, resolve_dataset_name

        splits = load_default_dataset(dataset, seed=seed)
        if split not in splits:
            raise MissingSplitError(f"The embedded dataset {resolve_dataset_name(dataset)!r}", split, list(splits))
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
            f"Dataset {dataset!r} is neither an embedded dataset ('default', 'arithmetic', 'arithmetic-mc', 'mmlu'), "
            "a directory saved with `save_to_disk`, nor a .json/.jsonl file."
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
    try:
        if claims_multiple_choice(data):
            validate_mcq_dataset(data)
        elif "prompt" not in data.column_names or "completion" not in data.column_names:
            raise ValueError(
                f"rows need `prompt` and `completion` (an open-ended answer to generate and match), or `prompt`, "
                f"`choices` and `answer` (multiple choice); got columns {data.column_names}"
            )
    except ValueError as err:
        raise ValueError(f"{dataset}: {err}") from None
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
