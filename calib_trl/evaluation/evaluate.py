"""One call that measures calibration on a set of rows, whatever their kind: what `calib-trl evaluate`, the examples,
`CalibrationCallback` and the benchmarks share.

- multiple-choice rows (`choices`, `answer`): the softmax over the option letters (`score_multiple_choice`);
- open-ended rows (`prompt`, `completion`): the model's greedy answers, matched with the completion
  (`score_generations`).

Both give a report (`accuracy`, ECE, smooth ECE, Brier, AUROC, ... and the side-effect measures), the per-row
confidence and correctness behind it, and, with a temperature, the same after temperature scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..mcq import claims_multiple_choice
from .generation import DEFAULT_CONFIDENCE, fit_answer_temperature, score_generations
from .scoring import score_multiple_choice
from .temperature_scaling import apply_temperature, fit_temperature


@dataclass
class Evaluation:
    """A calibration measurement: the report, and the per-row confidence and correctness it summarises."""

    kind: str  # "multiple_choice" or "generation"
    report: dict
    confidences: np.ndarray
    correct: np.ndarray
    scores: object  # the `MCQScores` or `GenerationScores` it was computed from
    scaled_report: dict | None = None  # after temperature scaling, when a temperature was given
    scaled_confidences: np.ndarray | None = None


def row_kind(dataset) -> str:
    """`"multiple_choice"` for rows with `choices` or `answer` (checked as such), else `"generation"` (open-ended)."""
    return "multiple_choice" if claims_multiple_choice(dataset) else "generation"


def evaluate_calibration(
    model,
    tokenizer,
    dataset,
    batch_size: int = 16,
    temperature: float | None = None,
    n_bins: int = 10,
    lm_check: bool = True,
    max_new_tokens: int = 32,
    confidence: str = DEFAULT_CONFIDENCE,
    match: Callable[[str, str], bool] | None = None,
    chat_template: str | None = None,
    shard: bool = False,
    progress: bool = True,
    desc: str = "Scoring",
) -> Evaluation:
    """
    Measure calibration on `dataset`'s rows (multiple choice or open-ended, see the module docstring), and after
    temperature scaling by `temperature` when given (the option logits, or the token logits of generated answers,
    divided by it).

    Args:
        max_new_tokens, confidence, match: for open-ended rows (see `score_generations` and
            `GenerationScores.report`).
        The others: as in `score_multiple_choice`.
    """
    kind = row_kind(dataset)
    common = dict(batch_size=batch_size, chat_template=chat_template, progress=progress, desc=desc, shard=shard)
    if kind == "multiple_choice":
        scores = score_multiple_choice(model, tokenizer, dataset, lm_check=lm_check, **common)
        report, confidences = scores.report(n_bins=n_bins), scores.confidences
    else:
        temperatures = [] if temperature is None else [temperature]
        scores = score_generations(
            model,
            tokenizer,
            dataset,
            max_new_tokens=max_new_tokens,
            match=match,
            temperatures=temperatures,
            lm_check=lm_check,
            **common,
        )
        report, confidences = scores.report(n_bins=n_bins, confidence=confidence), scores.confidences(confidence)
    evaluation = Evaluation(kind, report, confidences, scores.correct, scores)
    if temperature is None:
        return evaluation
    if kind == "multiple_choice":
        evaluation.scaled_report = scores.report(n_bins=n_bins, temperature=temperature)
        evaluation.scaled_confidences = apply_temperature(scores.logits, temperature).max(axis=1)
    else:
        evaluation.scaled_report = scores.report(n_bins=n_bins, confidence=confidence, temperature=temperature)
        evaluation.scaled_confidences = scores.confidences(confidence, temperature)
    return evaluation


def fit_temperature_on(
    model, tokenizer, dataset, batch_size: int = 16, chat_template: str | None = None, progress: bool = True
) -> float:
    """
    The temperature fitted by NLL on held-out rows: of the option logits (multiple choice), or of the token logits of
    the reference answers (open-ended rows, `fit_answer_temperature`).
    """
    if row_kind(dataset) == "multiple_choice":
        fit = score_multiple_choice(
            model,
            tokenizer,
            dataset,
            batch_size=batch_size,
            chat_template=chat_template,
            progress=progress,
            desc="Fitting the temperature",
        )
        return fit_temperature(fit.logits, fit.labels)
    return fit_answer_temperature(model, tokenizer, dataset, batch_size, chat_template, progress)
