"""A task the embedded model learns: addition with growing operands in domain, country capitals out of domain.

Every row exists in two forms with the same answer:

- `open_ended`: `What is 27 + 45?` -> `72` (the completion is the answer, judged by `calib_trl.evaluation.generation`);
- `multiple_choice`: the same question with four lettered options (`calib_trl.mcq.format_question`), the completion
  the right letter, `choices` and `answer` as in `calib_trl.mcq`.

The in-domain rows are additions at `LEVELS` of difficulty, from one-digit operands to three-digit ones, so that a
small model knows some rows before fine-tuning, learns more of them, and still misses some: known and unknown rows
side by side, which is what CogCalib's detection and a calibration measure need. The out-of-domain split asks for the
capitals of the 149 countries of `data/capitals.tsv` (a fact table written for calib-trl, Apache-2.0 like the package):
another family of questions, in the same answer format.

Everything is generated from a seed, offline and the same on every machine. No question is in two splits. The multiple-choice distractors of a sum are near misses (off by one, by ten, by a hundred, a dropped
carry); those of a capital are three other capitals.
"""

from __future__ import annotations

import random
from importlib import resources

from ..core.model_card import register_dataset
from ..mcq import make_mcq_example

LEVELS = {
    # name: (digits of one operand, digits of the other), share of the in-domain rows
    "1+1 digits": ((1, 1), 0.03),
    "2+1 digits": ((2, 1), 0.17),
    "2+2 digits": ((2, 2), 0.40),
    "3+3 digits": ((3, 3), 0.40),
}
"""
The difficulty levels of the in-domain additions and their shares (the `subject` column names the level). Measured on
SmolLM2-135M-Instruct (benchmarks/README.md): before fine-tuning it states about 40 % of the one-digit sums in its
sentences and few of the others; after a short SFT, most one-digit sums, about half of the two-digit ones and a quarter
of the three-digit ones. One-digit sums are few (81 questions in all), hence their small share.
"""

SPLIT_SIZES = {"train": 1500, "calibration": 300, "test": 600, "ood": 149}
"""Rows per split: `train`, `calibration` and `test` are in-domain additions, `ood` every capital of the table."""

FORMS = ("open_ended", "multiple_choice")

NOTE = (
    "arithmetic: calib-trl's generated task (`calib_trl.defaults.load_default_dataset('arithmetic')`): additions with "
    "one- to three-digit operands in domain (`train`, `calibration`, `test`), the capitals of 149 countries out of "
    "domain (`ood`)."
)
register_dataset("arithmetic", None, "arithmetic", None, NOTE)
register_dataset("arithmetic-mc", None, "arithmetic (multiple choice)", None, NOTE)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _pool_size(digits: tuple[int, int]) -> int:
    """Distinct questions of a level, either operand first (the bound on its rows across all splits)."""
    a, b = (9 if d == 1 else 9 * 10 ** (d - 1) for d in digits)
    return a * b if digits[0] == digits[1] else 2 * a * b


def _level_counts(total: int) -> dict[str, int]:
    """Rows of each level in a split of `total` rows: the shares, rounded down, the rest to the largest levels."""
    counts = {name: int(total * share) for name, (_, share) in LEVELS.items()}
    for name in list(LEVELS)[::-1][: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def addition_rows(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """
    The in-domain rows of each split as `{"question", "answer", "subject", "choices", "index"}`: `sizes` rows per
    split (default `SPLIT_SIZES` but `ood`), each level's share, no question in two splits (nor twice in one).
    """
    sizes = {k: v for k, v in (sizes or SPLIT_SIZES).items() if k != "ood"}
    for level, (digits, _) in LEVELS.items():
        needed = sum(_level_counts(n)[level] for n in sizes.values())
        if needed > _pool_size(digits):
            raise ValueError(f"{needed} rows of level {level!r} asked for; it has {_pool_size(digits)} questions.")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, total in sizes.items():
        rows = []
        for level, count in _level_counts(total).items():
            digits = LEVELS[level][0]
            for _ in range(count):
                while True:
                    a, b = _operand(rng, digits[0]), _operand(rng, digits[1])
                    if rng.random() < 0.5:
                        a, b = b, a
                    question = f"What is {a} + {b}?"
                    if question not in seen:
                        break
                seen.add(question)
                choices, index = _sum_choices(a, b, rng)
                rows.append(
                    {"question": question, "answer": str(a + b), "subject": level, "choices": choices, "index": index}
                )
        rng.shuffle(rows)
        out[split] = rows
    return out


def _sum_choices(a: int, b: int, rng: random.Random) -> tuple[list[str], int]:
    """The right sum and three near misses, in a random order; returns `(choices, index of the right one)`."""
    total = a + b
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:03d}", f"{b:03d}"))) or total
    near = [total + d for d in (1, -1, 10, -10, 2, -2, 100, -100, 11, -11)] + [no_carry]
    candidates = list(dict.fromkeys(n for n in near if n > 0 and n != total))
    wrong = rng.sample(candidates, 3)
    choices = [str(n) for n in [total, *wrong]]
    rng.shuffle(choices)
    return choices, choices.index(str(total))


def capital_rows(seed: int = 0) -> list[dict]:
    """The out-of-domain rows: every country of `data/capitals.tsv`, with three other capitals as distractors."""
    text = resources.files("calib_trl.defaults").joinpath("data/capitals.tsv").read_text(encoding="utf-8")
    table = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    rng = random.Random(seed)
    capitals = [capital for _, capital in table]
    rows = []
    for country, capital in table:
        choices = [capital, *rng.sample([c for c in capitals if c != capital], 3)]
        rng.shuffle(choices)
        rows.append(
            {
                "question": f"What is the capital of {country}?",
                "answer": capital,
                "subject": "capitals",
                "choices": choices,
                "index": choices.index(capital),
            }
        )
    return rows


def _as_row(item: dict, form: str, conversational: bool) -> dict:
    if form == "multiple_choice":
        row = make_mcq_example(item["question"], item["choices"], item["index"], conversational=conversational)
    elif conversational:
        row = {
            "prompt": [{"role": "user", "content": item["question"]}],
            "completion": [{"role": "assistant", "content": item["answer"]}],
        }
    else:
        row = {"prompt": f"{item['question']}\nAnswer:", "completion": f" {item['answer']}"}
    return {**row, "subject": item["subject"]}


def load_arithmetic_dataset(form: str = "open_ended", conversational: bool = True, seed: int = 0):
    """
    The arithmetic task as a `DatasetDict` with the splits of `SPLIT_SIZES`, in one of `FORMS`.

    | split         | rows  | contents                                                              |
    |---------------|-------|-----------------------------------------------------------------------|
    | `train`       | 1,500 | additions, `LEVELS`' shares (3 % one-digit sums ... 40 % three-digit)  |
    | `calibration` | 300   | additions, for fitting thresholds and temperatures                    |
    | `test`        | 600   | additions, for evaluation                                             |
    | `ood`         | 149   | the capital of every country of the table                             |

    Row `i` of a split is the same question in both forms, with the same answer: the open-ended completion is the
    text of the multiple-choice row's right option. `subject` names the level (`"2+2 digits"`) or `"capitals"`.

    Args:
        form (`str`): `"open_ended"` (prompt/completion, the completion is the answer) or `"multiple_choice"`
            (with `choices` and `answer`, the completion its letter).
        conversational (`bool`): chat-message prompts and completions (formatted by the tokenizer's chat template, as
            `SFTTrainer` does), or plain text ending in `"Answer:"`.
        seed (`int`): seed of the additions and the distractors.
    """
    from datasets import Dataset, DatasetDict

    if form not in FORMS:
        raise ValueError(f"`form` must be one of {list(FORMS)}, got {form!r}.")
    splits = {**addition_rows(seed), "ood": capital_rows(seed)}
    return DatasetDict(
        {
            name: Dataset.from_list([_as_row(item, form, conversational) for item in items])
            for name, items in splits.items()
        }
    )
