"""Per-example columns carried through TRL's dataset preparation, and the answer token of multiple-choice rows.

TRL's maps keep a dataset's extra columns; only packing drops them, so the trainers tokenize as `SFTTrainer` does and
then spread each carried value over the example's tokens before packing (`spread_and_pack`). The answer token of a
multiple-choice row is read off `SFTTrainer`'s own tokenization (`locate_answers`), so tools, chat templates and
`chat_template_kwargs` are accounted for exactly as in training.
"""

from __future__ import annotations

import logging

from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names, pack_dataset

from ..mcq import LETTERS, answer_index
from ..tokenization import OptionTokenLookup, template_kwargs
from .collator import _as_number

logger = logging.getLogger(__name__)

ANSWER_TOKEN_COLUMN = "calib_answer_token"
"""Per-token column: 1 at the answer token of a multiple-choice row (where option-letter logits are read), else 0."""

NUM_CHOICES_COLUMN = "calib_num_choices"
"""Per-example column: the number of options of a multiple-choice row (spread over its tokens when packed)."""


def check_not_empty(dataset, dataset_name: str) -> None:
    """An empty dataset, which `SFTTrainer` would stop on with a bare `StopIteration` when it reads its first row."""
    if isinstance(dataset, Dataset):
        empty = len(dataset) == 0
    elif isinstance(dataset, IterableDataset):
        empty = next(iter(dataset), None) is None
    else:
        return
    if empty:
        raise ValueError(
            f"The {dataset_name} dataset is empty: there is nothing to train on. Check the split you loaded and any "
            "filtering applied to it."
        )


def check_flag_column(dataset, column: str, dataset_name: str) -> tuple[int, int]:
    """
    Validate a per-example 0/1 column (`known`): present, boolean-like, no NaN. Returns `(n_true, n)` for a `Dataset`
    (first example only for an `IterableDataset`).
    """
    if column not in get_dataset_column_names(dataset):
        raise ValueError(
            f"The {dataset_name} dataset has no `{column}` column, which `detection='precomputed'` needs. Run "
            f"`calib_trl.detect_known(model, tokenizer, dataset, calibration_dataset)` first (or `calib-trl detect`), "
            f"or set `detection='online'` and pass a `calibration_dataset` to the trainer."
        )
    values = [next(iter(dataset))[column]] if isinstance(dataset, IterableDataset) else dataset[column]
    total = 0.0
    for i, value in enumerate(values):
        if isinstance(value, (list, tuple)):
            raise TypeError(
                f"`{column}` (row {i}) of the {dataset_name} dataset is a list; it must hold one boolean per example."
            )
        try:
            number = _as_number(value, column)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (row {i} of the {dataset_name} dataset)") from None
        if number not in (0.0, 1.0):
            raise ValueError(
                f"`{column}` (row {i}) of the {dataset_name} dataset is {value!r}; it must be True/False or 0/1."
            )
        total += number
    return int(total), len(values)


def spread_and_pack(dataset: Dataset, columns: list[str], args, dataset_name: str) -> Dataset:
    """
    Pack a tokenized dataset as `SFTTrainer` packs it, with each of `columns` turned into one value per token first
    (a per-example value repeated; a per-token list kept), so that packing concatenates them like `input_ids`.
    """

    def per_token(example):
        n = len(example["input_ids"])
        return {c: [_as_number(example[c], c)] * n for c in columns if not isinstance(example[c], (list, tuple))}

    map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Spreading {', '.join(columns)} over tokens"}
    dataset = dataset.map(per_token, **map_kwargs)
    dataset = dataset.select_columns(["input_ids", "labels", *columns])
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    map_kwargs["desc"] = f"Packing {dataset_name} dataset"
    dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


def first_completion_token(row: dict, truncation_mode: str) -> int | None:
    """
    Index in `input_ids` of the first completion token of a row prepared by `SFTTrainer`, or `None` when it has no
    completion. TRL truncates `input_ids` and `labels` but not a `completion_mask` it leaves in place, so an index
    read off that mask can lie outside the kept tokens (at or beyond their end, or negative with `keep_end`).
    """
    mask = row.get("completion_mask")
    if mask is None:
        return next((i for i, label in enumerate(row["labels"]) if label != -100), None)
    first = next((i for i, m in enumerate(mask) if m), None)
    cut = len(mask) - len(row["input_ids"])
    if first is not None and truncation_mode == "keep_end" and cut > 0:
        first -= cut
    return first


class AnswerLocator:
    """
    Finds the answer token of each multiple-choice row of a tokenized dataset and the token of each option letter there
    (`option_ids`, one per letter, the same for every row and dataset of a trainer).

    The answer token is the first completion token, i.e. the first token with a label (completion-only loss) or the
    first one of `completion_mask` (which TRL keeps when the loss also covers the prompt). It must be the right option's
    letter. Rows where it is not, or where truncation cut it off, raise a `ValueError` naming the row, or with
    `invalid_rows="exclude"` get no answer mark (they keep their cross-entropy) and are counted in `excluded`.
    """

    def __init__(self, chat_template: str | None, terms: str):
        self.chat_template = chat_template
        self.terms = terms  # the loss terms that read the answer, for messages
        self.option_ids: list[int] | None = None
        self.excluded = 0

    def __call__(self, dataset: Dataset, tokenizer, args, dataset_name: str, invalid_rows: str = "raise") -> Dataset:
        """`dataset` with `ANSWER_TOKEN_COLUMN` and `NUM_CHOICES_COLUMN` added."""
        if args.packing and args.packing_strategy != "bfd":
            raise ValueError(
                f"Reading option-letter logits needs each question whole: `packing_strategy={args.packing_strategy!r}` "
                "can cut a question off its answer. Use `packing_strategy='bfd'`."
            )
        columns = dataset.column_names
        needed = ["prompt", "completion", "choices", "answer", "input_ids", "labels"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"Locating the answer of each row of the {dataset_name} dataset needs prompt/completion rows with "
                f"`choices` and `answer`; the prepared dataset lacks {missing}."
            )
        extra = [c for c in ("completion_mask", "tools", "chat_template_kwargs") if c in columns]
        lookup = OptionTokenLookup(tokenizer, max(len(c) for c in dataset["choices"]), self.chat_template)
        # With packing, preparation skips truncation and bfd packing keeps the first `max_length` tokens
        limit = args.max_length if args.packing and args.max_length is not None else None
        markers, num_choices, problems = [], [], []
        for i, row in enumerate(dataset.select_columns(needed + extra)):
            ids = row["input_ids"]
            position = first_completion_token(row, args.truncation_mode)
            marker = [0] * len(ids)
            k = len(row["choices"])
            markers.append(marker)
            num_choices.append(k)
            kept = len(ids) if limit is None else min(len(ids), limit)
            if position is None or not 0 <= position < kept:
                where = (
                    "it has no completion token"
                    if position is None
                    else f"its answer position ({position}) is outside the {kept} tokens kept (`max_length="
                    f"{args.max_length}` cuts it off)"
                )
                problems.append((i, where))
                continue
            letters = lookup(row["prompt"], ids[:position], row["completion"], template_kwargs(row))
            if self.option_ids is None:
                self.option_ids = letters
            elif letters[: len(self.option_ids)] != self.option_ids[: len(letters)]:
                raise ValueError(
                    f"Row {i} of the {dataset_name} dataset ends its prompt differently from the first row, so its "
                    "option letters map to other tokens; one prompt format per dataset is needed to read option "
                    "logits."
                )
            answer = answer_index(row["answer"], k, row=i)
            if ids[position] != letters[answer]:
                problems.append(
                    (
                        i,
                        f"its completion starts with {tokenizer.decode([ids[position]])!r} instead of the answer "
                        f"letter {LETTERS[answer]!r}",
                    )
                )
            else:
                marker[position] = 1
        if problems:
            i, why = problems[0]
            if invalid_rows == "raise":
                raise ValueError(
                    f"Row {i} of the {dataset_name} dataset cannot get {self.terms}: {why}. {len(problems)} row(s) are "
                    "affected; fix them, or set `invalid_rows='exclude'` to train them with cross-entropy only."
                )
            logger.warning(
                "%d row(s) of the %s dataset are excluded from %s (first: row %d, %s).",
                len(problems),
                dataset_name,
                self.terms,
                i,
                why,
            )
            self.excluded += len(problems)
        return dataset.add_column(ANSWER_TOKEN_COLUMN, markers).add_column(NUM_CHOICES_COLUMN, num_choices)
