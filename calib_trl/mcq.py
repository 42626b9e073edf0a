"""The multiple-choice format of calib-trl, and its validation.

A multiple-choice dataset in calib-trl is a TRL prompt/completion dataset with two extra columns:

- `prompt`: the question with its lettered options, either a string or a list of chat messages;
- `completion`: the answer letter (`"B"`, or `[{"role": "assistant", "content": "B"}]`);
- `choices`: the option texts (`list[str]`); the number of options may differ between rows;
- `answer`: the index of the correct option (`int`), or its letter (`"B"`).

The model's confidence in each option is the softmax, over the option-letter tokens only, of the next-token logits at
the answer position (the first completion token): `calib_trl.tokenization` finds those tokens, `calib_trl.scoring`
reads them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
from trl.data_utils import get_dataset_column_names

LETTERS = tuple(string.ascii_uppercase)


DEFAULT_INSTRUCTION = "Answer with only a single letter."


REQUIRED_COLUMNS = ("prompt", "choices", "answer")

# An option line of a prompt as `format_question` writes it: "A. text" (or "A) text") at the start of a line
_OPTION_LINE = re.compile(r"(?m)^([A-Z])[.)] ")


def check_choices(choices: Any, row: int | None = None) -> list[str]:
    """
    `choices` as a list of option texts, or a `ValueError` naming the row and the column: a string (which would be
    read as one option per character), a list with `None` or non-text entries, or fewer than 2 or more than 26 options.
    """
    where = "" if row is None else f" (row {row})"
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise ValueError(
            f"`choices`{where} must be a list of option texts, got {type(choices).__name__} {choices!r:.60}; a string "
            "would be read as one option per character. Split it into a list first."
        )
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(
            f"`choices`{where} must hold 2 to {len(LETTERS)} options, got {len(choices)}: {choices!r:.80}."
        )
    bad = next((i for i, c in enumerate(choices) if not isinstance(c, str)), None)
    if bad is not None:
        raise ValueError(
            f"`choices`{where} holds {choices[bad]!r} at position {bad}; every option must be a text (a missing option "
            "would be shown as 'None')."
        )
    return list(choices)


def shown_options(prompt: Any) -> int:
    """
    How many lettered options (`A.`, `B.`, ... at the start of a line, from `A` on) a prompt shows: a text prompt, or
    the last message of a conversational one; 0 when it shows none (a prompt in another format).
    """
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    if not isinstance(prompt, str):
        return 0
    letters = set(_OPTION_LINE.findall(prompt))
    n = 0
    while n < len(LETTERS) and LETTERS[n] in letters:
        n += 1
    return n


def format_question(question: str, choices: Sequence[str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    """
    Render a question and its options as one prompt text.

    ```
    {question}

    A. {choices[0]}
    B. {choices[1]}
    ...

    Answer with only a single letter.
    ```
    """
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"A multiple-choice question needs 2 to {len(LETTERS)} choices, got {len(choices)}.")
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return f"{question.strip()}\n\n{options}\n\n{instruction}"


def make_mcq_example(
    question: str,
    choices: Sequence[str],
    answer: int | str,
    conversational: bool = True,
    instruction: str = DEFAULT_INSTRUCTION,
) -> dict[str, Any]:
    """
    Build one prompt/completion row of a multiple-choice dataset.

    With `conversational=True` the prompt is a user message and the completion an assistant message holding the
    letter, so the tokenizer's chat template is applied (as `SFTTrainer` does). Otherwise the prompt ends with
    `"Answer:"` and the completion is `" {letter}"`.
    """
    choices = check_choices(choices)
    index = answer_index(answer, len(choices))
    letter = LETTERS[index]
    text = format_question(question, choices, instruction)
    if conversational:
        prompt = [{"role": "user", "content": text}]
        completion = [{"role": "assistant", "content": letter}]
    else:
        prompt = f"{text}\nAnswer:"
        completion = f" {letter}"
    return {"prompt": prompt, "completion": completion, "choices": list(choices), "answer": index}


def answer_index(answer: Any, num_choices: int, row: int | None = None) -> int:
    """Return the answer as an option index, accepting an index or a letter; raise if it is not among the options."""
    where = "" if row is None else f" (row {row})"
    if isinstance(answer, str):
        letter = answer.strip().upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise ValueError(f"`answer`{where} must be an option index or a single letter, got {answer!r}.")
        index = LETTERS.index(letter)
    elif isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        index = int(answer)
    else:
        raise ValueError(f"`answer`{where} must be an option index or a letter, got {answer!r}.")
    if not 0 <= index < num_choices:
        raise ValueError(
            f"`answer`{where} is {answer!r}, which is not among the {num_choices} choices "
            f"({', '.join(LETTERS[:num_choices])})."
        )
    return index


def is_multiple_choice(dataset) -> bool:
    """Whether the rows carry `choices` and `answer` (an `IterableDataset` without features: its first row)."""
    return {"choices", "answer"} <= set(get_dataset_column_names(dataset))


def claims_multiple_choice(dataset) -> bool:
    """Whether the rows carry `choices` or `answer`: meant as multiple choice (and checked as such, to say what's missing)."""
    return bool({"choices", "answer"} & set(get_dataset_column_names(dataset)))


def validate_mcq_dataset(dataset, name: str = "dataset", require_completion: bool = False) -> None:
    """Raise a `ValueError` naming the problem if `dataset` is not a usable multiple-choice dataset."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise ValueError(f"The {name} must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError(f"The {name} is empty: there is nothing to score.")
    required = REQUIRED_COLUMNS + (("completion",) if require_completion else ())
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"The {name} is missing the column(s) {missing}; a multiple-choice dataset needs {list(required)} "
            f"(got {columns}). `calib_trl.defaults.load_default_dataset` or `calib_trl.mcq.make_mcq_example` builds "
            "rows in this format."
        )
    for i, (prompt, choices, answer) in enumerate(zip(dataset["prompt"], dataset["choices"], dataset["answer"])):
        choices = check_choices(choices, row=i)
        answer_index(answer, len(choices), row=i)
        shown = shown_options(prompt)
        if shown and shown != len(choices):
            raise ValueError(
                f"`prompt` (row {i}) shows {shown} lettered options ({', '.join(LETTERS[:shown])}) but `choices` holds "
                f"{len(choices)}: the option probabilities would not be those of the question asked. Make `choices` "
                "list every option the prompt shows."
            )
