"""Knowledge-bias detection (CogCalib, step 1).

An example is *known* when the negative log-likelihood of its answer under the model is at most a threshold `t`:
`known = [answer_nll <= t]`. `t` is fitted on a held-out calibration split to maximise Youden's J (TPR + TNR - 1),
the ground truth being whether the model answers the calibration item correctly: the argmax over the options for
multiple choice, a normalised exact match of the greedy answer for open-ended data.

- `answer_nll` of a multiple-choice row is `-log p(correct letter)` over the whole vocabulary at the answer position
  (one forward pass of the prompt, `logits_to_keep=1`); of an open-ended row, the mean NLL of its completion tokens
  (both from `calib_trl.scoring.score_answers`).
- `detect_known` scores a dataset once (precomputed mode) and adds `answer_nll` and `known` columns, optionally after a
  short style adaptation so that the NLL reflects knowledge rather than unfamiliar wording.
- `OnlineKnowledgeDetector` re-fits the threshold every N training steps on the calibration split (online mode); the
  trainer compares it with the per-example NLL that the training step computes anyway.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..evaluation.scoring import answer_rows, score_answers, score_multiple_choice
from ..mcq import is_multiple_choice, validate_mcq_dataset

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Threshold
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionReport:
    """What a threshold fit found on the calibration split, and what it flags on the scored dataset."""

    threshold: float  # +inf / -inf: no threshold could be fitted, every example is flagged known / unknown
    youden_j: float
    tpr: float  # fraction of correctly answered calibration items flagged known
    tnr: float  # fraction of wrongly answered calibration items flagged unknown
    # fraction of calibration items whose flag equals their correctness; NaN when no threshold was fitted, since
    # flagging everything one way is no detection (it would read 1.0 when the model answers no item correctly)
    detection_accuracy: float
    calibration_accuracy: float  # fraction of calibration items the model answers correctly
    n_calibration: int
    known_fraction: float | None = None  # on the scored dataset
    n: int | None = None
    style_adaptation_steps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        """Whether a threshold separates known from unknown items (`False` when it flags all of them one way)."""
        return math.isfinite(self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.fitted:
            lines = [
                f"threshold (answer NLL)       {self.threshold:.4f}",
                f"Youden's J                   {self.youden_j:.4f}  (TPR {self.tpr:.4f}, TNR {self.tnr:.4f})",
                f"detection accuracy (calib.)  {self.detection_accuracy:.4f}  on {self.n_calibration} items",
                f"model accuracy (calib.)      {self.calibration_accuracy:.4f}",
            ]
        else:
            why = "" if self.calibration_accuracy in (0.0, 1.0) else "; no NLL threshold separates right from wrong"
            lines = [
                f"no threshold fitted (the model answers {self.calibration_accuracy:.0%} of the {self.n_calibration} "
                f"calibration items correctly{why}): every example is flagged "
                f"{'known' if self.threshold > 0 else 'unknown'}"
            ]
        if self.known_fraction is not None:
            lines.append(f"known fraction (dataset)     {self.known_fraction:.4f}  of {self.n} examples")
        return "\n".join(lines)


def youden_threshold(nll, correct) -> tuple[float, float, float, float]:
    """
    NLL threshold maximising Youden's J = TPR + TNR - 1 for the rule `known = nll <= t`, with `correct` the truth.

    Every split between two consecutive distinct NLL values is tried (exact, `O(n log n)`); the returned threshold is
    the midpoint of the best split, so that it generalises symmetrically. Among equally good splits, the lowest is
    kept (the fewest examples flagged known). With only correct or only wrong answers J is undefined: the threshold
    flags everything known (`+inf`) or nothing (`-inf`), with a warning.

    Returns:
        `(threshold, j, tpr, tnr)`.
    """
    nll = np.asarray(nll, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if nll.ndim != 1 or nll.shape != correct.shape:
        raise ValueError(f"`nll` and `correct` must be 1-D of the same length, got {nll.shape} and {correct.shape}.")
    if nll.size == 0:
        raise ValueError("Fitting a threshold needs at least one calibration example.")
    if not np.isfinite(nll).all():
        raise ValueError("`nll` holds NaN or infinite values; check the model's outputs.")
    pos, neg = int(correct.sum()), int((~correct).sum())
    if pos == 0 or neg == 0:
        warnings.warn(
            f"The model answers {'every' if neg == 0 else 'no'} calibration item correctly, so a known/unknown "
            f"threshold cannot be fitted; every example is flagged {'known' if neg == 0 else 'unknown'}.",
            stacklevel=2,
        )
        return (math.inf, 0.0, 1.0, 0.0) if neg == 0 else (-math.inf, 0.0, 0.0, 1.0)
    order = np.argsort(nll, kind="stable")
    values, flags = nll[order], correct[order]
    # Cut after each last occurrence of a distinct value: known = the first `k` sorted items
    last = np.r_[values[1:] != values[:-1], True]
    tp = np.cumsum(flags)[last]
    fp = np.cumsum(~flags)[last]
    tpr = tp / pos
    tnr = 1 - fp / neg
    j = tpr + tnr - 1
    best = int(np.argmax(j))
    distinct = values[last]
    if j[best] <= 0:  # no split beats flagging nothing
        return -math.inf, 0.0, 0.0, 1.0
    upper = distinct[best + 1] if best + 1 < len(distinct) else distinct[best] + 1.0
    threshold = float((distinct[best] + upper) / 2)
    return threshold, float(j[best]), float(tpr[best]), float(tnr[best])


def detection_report(nll, correct, threshold: float, j=None, tpr=None, tnr=None, **kwargs) -> DetectionReport:
    nll = np.asarray(nll, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    flagged = nll <= threshold
    accuracy = float((flagged == correct).mean()) if math.isfinite(threshold) else float("nan")
    if tpr is None:
        tpr = float(flagged[correct].mean()) if correct.any() else 0.0
        tnr = float((~flagged[~correct]).mean()) if (~correct).any() else 0.0
        j = tpr + tnr - 1
    return DetectionReport(
        threshold=float(threshold),
        youden_j=float(j),
        tpr=float(tpr),
        tnr=float(tnr),
        detection_accuracy=accuracy,
        calibration_accuracy=float(correct.mean()),
        n_calibration=int(nll.size),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# Style adaptation
# --------------------------------------------------------------------------------------------------------------------


def style_adapt(
    model,
    tokenizer,
    dataset,
    steps: int = 60,
    learning_rate: float = 4e-5,
    batch_size: int = 64,
    per_device_batch_size: int = 8,
    peft_config=None,
    seed: int = 0,
    in_place: bool = False,
    progress: bool = True,
    **sft_kwargs,
):
    """
    A short SFT on the task's format, so that the answer NLL reflects what the model knows rather than how unfamiliar
    the wording is (a base model spreads probability over "The answer is", " B", "b)", ...).

    Trains a copy of `model` (or a LoRA adapter on it, with `peft_config`) for `steps` optimizer steps of `batch_size`
    examples drawn from `dataset` (its `prompt`/`completion` columns), with a constant learning rate. The input model
    is left untouched unless `in_place=True`. It announces itself in one log line and shows a progress bar
    (`progress`), so that it is not taken for the training run it precedes.

    Returns:
        The adapted model (a `PeftModel` when `peft_config` is given).
    """
    from trl import SFTConfig, SFTTrainer

    from ..core.config import bf16_supported

    if steps <= 0:
        return model
    if len(dataset) == 0:
        raise ValueError("Style adaptation needs a non-empty dataset.")
    from accelerate import PartialState

    # `batch_size` is the optimizer batch over all processes, as in a single-process run
    world = PartialState().num_processes
    per_device = max(1, min(per_device_batch_size, batch_size // world))
    accumulation = max(1, batch_size // (per_device * world))
    needed = steps * per_device * accumulation * world
    data = dataset.select_columns(["prompt", "completion"]).shuffle(seed=seed)
    if len(data) < needed:  # several passes over a small dataset
        from datasets import concatenate_datasets

        data = concatenate_datasets([data] * math.ceil(needed / len(data)))
    data = data.select(range(needed))
    target = model if in_place else copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            max_steps=steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            activation_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=steps + 1,  # no loss lines: they would read as the training run's
            disable_tqdm=not progress,
            seed=seed,
            bf16=sft_kwargs.pop("bf16", bf16_supported()),
            **sft_kwargs,
        )
        trainer = SFTTrainer(
            model=target, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
        )
        logger.warning(
            "Style adaptation (CogCalib's step before detection): %d SFT steps of %d rows at lr %g on %d rows of the "
            "task's format, on a copy of the model, so that the answer NLL reflects knowledge rather than wording.",
            steps,
            per_device * accumulation * world,
            learning_rate,
            len(dataset),
        )
        trainer.train()
        adapted = trainer.model
        # Free the optimizer state now rather than whenever the trainer's reference cycles are collected
        del trainer
        gc.collect()
    adapted.eval()
    return adapted


# --------------------------------------------------------------------------------------------------------------------
# Precomputed detection
# --------------------------------------------------------------------------------------------------------------------


def detect_known(
    model,
    tokenizer,
    dataset,
    calibration_dataset=None,
    threshold: float | None = None,
    batch_size: int = 16,
    style_adaptation_steps: int = 0,
    style_adaptation_kwargs: dict | None = None,
    style_adaptation_dataset=None,
    keep_adapted: bool = False,
    check_correct: bool = True,
    progress: bool = True,
    return_report: bool = False,
):
    """
    Score every example's answer NLL and flag it known (`answer_nll <= threshold`).

    Args:
        model: causal LM to probe (its weights are not changed unless `keep_adapted=True`).
        tokenizer: its tokenizer.
        dataset (`datasets.Dataset`): prompt/completion rows to flag; multiple-choice rows (with `choices` and
            `answer`) are scored by their answer letter, the others by their completion tokens.
        calibration_dataset (`datasets.Dataset`, *optional*): held-out rows of the same task to fit the threshold on
            (Youden's J), required unless `threshold` is given.
        threshold (`float`, *optional*): use this threshold instead of fitting one.
        batch_size (`int`): rows per forward pass.
        style_adaptation_steps (`int`): optimizer steps of style adaptation before scoring (0: none).
        style_adaptation_kwargs (`dict`, *optional*): arguments of `style_adapt` (`learning_rate`, `batch_size`,
            `peft_config`, ...).
        style_adaptation_dataset (`datasets.Dataset`, *optional*): rows to adapt on. By default, half of
            `calibration_dataset` (a fixed random half) is used for adaptation and the other half for fitting the
            threshold, so that neither the flagged rows nor the rows the threshold is fitted (and its detection
            accuracy measured) on have been seen by the adapted model: adapting on the flagged rows themselves would
            lower their NLL and flag rows known that the model had only just been shown. Without a calibration
            dataset, `dataset` itself is used, with that bias.
        keep_adapted (`bool`): return the adapted model too, to continue training from it.
        check_correct (`bool`): for open-ended calibration rows, the ground truth is a greedy-answer match.
        progress (`bool`): progress bars.
        return_report (`bool`): also return the `DetectionReport`.

    Returns:
        The dataset with `answer_nll` (float) and `known` (bool) columns; with `return_report=True`, a tuple
        `(dataset, report)`; with `keep_adapted=True`, the adapted model is appended to the tuple.

    Under `accelerate launch`, each process scores a share of the rows and the results are gathered in order, so every
    process returns the same dataset as a single-process run.
    """
    if threshold is None and calibration_dataset is None:
        raise ValueError(
            "`detect_known` needs a `calibration_dataset` to fit the known/unknown threshold on, or an explicit "
            "`threshold`."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset to flag is empty.")
    if is_multiple_choice(dataset):
        validate_mcq_dataset(dataset, name="dataset")
    probe = model
    if style_adaptation_steps > 0:
        if style_adaptation_dataset is None and calibration_dataset is not None and len(calibration_dataset) >= 4:
            halves = calibration_dataset.train_test_split(test_size=0.5, seed=0, shuffle=True)
            style_adaptation_dataset, calibration_dataset = halves["train"], halves["test"]
        elif style_adaptation_dataset is None:
            logger.warning(
                "Style adaptation on the rows being flagged lowers their NLL; pass a "
                "`calibration_dataset` or a `style_adaptation_dataset` to avoid it."
            )
            style_adaptation_dataset = dataset
        kwargs = {"progress": progress, **(style_adaptation_kwargs or {})}
        probe = style_adapt(model, tokenizer, style_adaptation_dataset, steps=style_adaptation_steps, **kwargs)
    report = None
    if calibration_dataset is not None:
        if is_multiple_choice(calibration_dataset):
            validate_mcq_dataset(calibration_dataset, name="calibration_dataset")
        cal_nll, cal_correct = score_answers(
            probe,
            tokenizer,
            calibration_dataset,
            batch_size,
            check_correct=check_correct,
            progress=progress,
            desc="Scoring calibration split",
        )
        if cal_correct is None:
            raise ValueError(
                "Fitting a threshold on open-ended calibration rows needs `check_correct=True` (the ground truth is "
                "whether the greedy answer matches)."
            )
        if threshold is None:
            t, j, tpr, tnr = youden_threshold(cal_nll, cal_correct)
            report = detection_report(cal_nll, cal_correct, t, j, tpr, tnr)
            threshold = t
        else:
            report = detection_report(cal_nll, cal_correct, threshold)
    nll, _ = score_answers(probe, tokenizer, dataset, batch_size, progress=progress, desc="Scoring dataset")
    known = nll <= threshold
    if report is not None:
        report.known_fraction = float(known.mean())
        report.n = int(len(known))
        report.style_adaptation_steps = style_adaptation_steps
        if style_adaptation_steps > 0:
            report.extra["style_adaptation_rows"] = len(style_adaptation_dataset)
        logger.info("Knowledge detection:\n%s", report)
    for column in ("answer_nll", "known"):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
    dataset = dataset.add_column("answer_nll", nll.tolist()).add_column("known", known.tolist())
    if probe is not model and not keep_adapted:
        del probe
        gc.collect()
    out = (dataset,)
    if return_report:
        out += (report,)
    if keep_adapted:
        out += (probe,)
    return out[0] if len(out) == 1 else out


# --------------------------------------------------------------------------------------------------------------------
# Automatic detection (`detection="auto"`)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class KnowledgeRule:
    """
    How `detection="auto"` flags rows that have no `known` column: by the model's own multiple-choice answer
    (`threshold=None`), or by comparing the answer NLL with a threshold fitted on `path`'s rows.
    """

    path: str  # "calibration_dataset", "multiple_choice" or "generation"
    threshold: float | None = None
    report: DetectionReport | None = None  # the threshold fit
    max_new_tokens: int = 32  # the longest greedy answer of the "generation" path

    def describe(self) -> str:
        if self.path == "multiple_choice":
            return (
                "the model's own answer (multiple-choice rows, no calibration_dataset): known = it answers correctly"
            )
        if self.path == "generation":
            return (
                "the model's own greedy answer (open-ended rows, no calibration_dataset): known = it states the "
                "reference answer (`calib_trl.evaluation.generation.match_answer`)"
            )
        where = "the calibration_dataset"
        if not self.report.fitted:
            return f"no threshold, from {self.report.n_calibration} rows of {where}: {self.report}"
        return (
            f"an answer-NLL threshold of {self.threshold:.4f} fitted on {self.report.n_calibration} rows of {where} "
            f"(detection accuracy there {self.report.detection_accuracy:.3f})"
        )

    def flag(self, model, tokenizer, rows, batch_size: int = 16, progress: bool = True, desc: str = "Detecting"):
        """Known flags of `rows` (answer rows), scored in batches sharded across processes."""
        if self.path == "multiple_choice":
            scores = score_multiple_choice(
                model, tokenizer, rows, batch_size=batch_size, progress=progress, desc=desc, shard=True
            )
            return scores.correct
        if self.path == "generation":
            from ..evaluation.generation import score_generations

            scores = score_generations(
                model,
                tokenizer,
                rows,
                batch_size=batch_size,
                max_new_tokens=self.max_new_tokens,
                lm_check=False,
                progress=progress,
                desc=desc,
                shard=True,
            )
            return scores.correct
        nll, _ = score_answers(model, tokenizer, rows, batch_size, progress=progress, desc=desc)
        return nll <= self.threshold

    @classmethod
    def from_dict(cls, state: dict) -> KnowledgeRule:
        report = state.get("report")
        return cls(
            state["path"],
            state.get("threshold"),
            DetectionReport(**report) if report else None,
            state.get("max_new_tokens", 32),
        )

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "threshold": self.threshold,
            "max_new_tokens": self.max_new_tokens,
            "report": self.report.to_dict() if self.report is not None else None,
        }


def fit_knowledge_rule(
    model,
    tokenizer,
    rows,
    calibration_dataset=None,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: int = 32,
) -> KnowledgeRule:
    """
    The rule `detection="auto"` flags rows by, when they have no `known` column (`rows` and `calibration_dataset` as
    `answer_rows` returns them):

    - with a `calibration_dataset`: an answer-NLL threshold fitted on it (Youden's J), as `detect_known` fits it;
    - without, on multiple-choice rows: the model's own answer (known = its argmax over the options is right), exact
      and with no threshold, at the cost of one prompt forward pass per row;
    - without, on open-ended rows: the model's own greedy answer (known = it states the reference, as
      `calib_trl.evaluation.generation.match_answer` judges it), exact and with no threshold, at the cost of one greedy
      generation of up to `max_new_tokens` tokens per row. The NLL of the bare reference says little before
      fine-tuning: a model that answers in sentences ("27 + 45 = 72") gives the bare answer ("72") a high NLL whether
      or not it knows it, which is why CogCalib adapts the style first; the match reads the sentence itself.

    A threshold that cannot be fitted (the model answers every or no fitting row correctly) is returned as `+inf` /
    `-inf` with `report.fitted` false; the caller decides whether to go on.
    """
    if calibration_dataset is None:
        if is_multiple_choice(rows):
            validate_mcq_dataset(rows, name="train dataset")
            return KnowledgeRule("multiple_choice")
        return KnowledgeRule("generation", max_new_tokens=max_new_tokens)
    if is_multiple_choice(calibration_dataset):
        validate_mcq_dataset(calibration_dataset, name="calibration_dataset")
    with warnings.catch_warnings():  # an unfitted threshold is reported through `report.fitted`
        warnings.simplefilter("ignore")
        report = fit_threshold(
            model, tokenizer, calibration_dataset, batch_size, progress, "Fitting the known threshold"
        )
    return KnowledgeRule("calibration_dataset", report.threshold, report)


def fit_threshold(model, tokenizer, rows, batch_size: int, progress: bool, desc: str) -> DetectionReport:
    """The Youden threshold of the answer NLL on `rows`, against whether the model answers each correctly."""
    nll, correct = score_answers(model, tokenizer, rows, batch_size, check_correct=True, progress=progress, desc=desc)
    t, j, tpr, tnr = youden_threshold(nll, correct)
    return detection_report(nll, correct, t, j, tpr, tnr)


# --------------------------------------------------------------------------------------------------------------------
# Online detection
# --------------------------------------------------------------------------------------------------------------------


class OnlineKnowledgeDetector:
    """
    The threshold of online detection: re-fitted every `refit_steps` optimizer steps on a calibration split with the
    current model (one batched forward pass over the split, sharded across processes), and compared by the trainer
    with the per-example answer NLL of each training step.

    A re-fit costs one forward pass per calibration row (the prompt only, for multiple-choice rows; prompt and
    completion for open-ended ones) plus, for open-ended rows, a greedy generation of up to the completion's length
    + 8 tokens per row, which dominates on a CPU. It shows a progress bar when `progress` is set.

    Args:
        calibration_dataset (`datasets.Dataset`): held-out rows of the training task: prompt/completion rows
            (multiple choice with `choices` and `answer`, or open-ended), or conversational `messages` rows, whose last
            assistant message is the answer (see `answer_rows`).
        tokenizer: the model's tokenizer.
        refit_steps (`int`, *optional*): optimizer steps between re-fits; `None` fits once, before the first step.
        batch_size (`int`): rows per forward pass of a re-fit.
        max_samples (`int`, *optional*): use only the first `max_samples` calibration rows.
        progress (`bool`): show a progress bar for each re-fit (main process only).
    """

    def __init__(
        self,
        calibration_dataset,
        tokenizer,
        refit_steps: int | None = 50,
        batch_size: int = 32,
        max_samples: int | None = None,
        progress: bool = False,
    ):
        if calibration_dataset is None or len(calibration_dataset) == 0:
            raise ValueError(
                "Online detection (`detection='online'`) needs a non-empty `calibration_dataset` passed to the trainer."
            )
        if max_samples is not None:
            calibration_dataset = calibration_dataset.select(range(min(max_samples, len(calibration_dataset))))
        rows = answer_rows(calibration_dataset)
        if rows is None:
            raise ValueError(
                "The `calibration_dataset` has no answers to fit the known threshold on: it needs prompt/completion "
                f"columns or conversational `messages` (got {calibration_dataset.column_names})."
            )
        calibration_dataset = rows
        if is_multiple_choice(calibration_dataset):
            validate_mcq_dataset(calibration_dataset, name="calibration_dataset")
        self.calibration_dataset = calibration_dataset
        self.tokenizer = tokenizer
        self.refit_steps = refit_steps
        self.batch_size = batch_size
        self.progress = progress
        self.threshold: float | None = None
        self.last_report: DetectionReport | None = None
        self.last_refit_step: int | None = None
        self.history: list[dict] = []

    def due(self, global_step: int) -> bool:
        if self.threshold is None or self.refit_steps is None:
            return self.threshold is None
        return global_step % self.refit_steps == 0 and global_step != self.last_refit_step

    def refit(self, model, global_step: int = 0) -> DetectionReport:
        desc = "Re-fitting the known threshold"
        report = fit_threshold(model, self.tokenizer, self.calibration_dataset, self.batch_size, self.progress, desc)
        self.threshold = report.threshold
        self.last_refit_step = global_step
        self.last_report = report
        self.history.append({"step": global_step, **self.last_report.to_dict()})
        return self.last_report

    def flags(self, example_nll: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            raise RuntimeError("The online threshold has not been fitted yet; call `refit(model)` first.")
        return example_nll <= self.threshold

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "last_refit_step": self.last_refit_step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = state["threshold"]
        self.last_refit_step = state["last_refit_step"]
        self.history = list(state.get("history", []))
        # The report of the last re-fit, which the trainer logs at every step until the next re-fit
        last = next((h for h in reversed(self.history) if h.get("step") == self.last_refit_step), None)
        self.last_report = DetectionReport(**{k: v for k, v in last.items() if k != "step"}) if last else None
