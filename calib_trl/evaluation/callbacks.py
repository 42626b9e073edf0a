"""`CalibrationCallback`: calibration of a multiple-choice or open-ended set, measured during training."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from ..mcq import claims_multiple_choice, validate_mcq_dataset
from ..metrics import reliability_diagram_data
from .evaluate import evaluate_calibration
from .reports import REPORT_METRICS, path_inside, safe_filename


class CalibrationCallback(TrainerCallback):
    """
    Evaluates the calibration of the model on a dataset every `eval_steps` optimizer steps, at the end of every epoch
    and at the end of training, logs the report's metrics (those of `calib_trl.evaluation.reports.REPORT_METRICS`:
    accuracy, mean confidence, ECE, smooth ECE, Brier, AUROC, ...) through the trainer's loggers (so every `report_to`
    integration receives them, under `calibration/{name}/...`), saves the reliability diagram as a PNG, and records the
    report for the model card: a report at step 0 (`at_start`) as the base model's, the others as the fine-tuned
    model's. The trainer writes the card at checkpoints, on `push_to_hub` and on `save_model` (or call
    `trainer.create_model_card()`).

    The rows are measured as `calib_trl.evaluation.evaluate.evaluate_calibration` measures them: multiple-choice rows
    by the softmax over their option letters (one forward pass per prompt, `logits_to_keep=1`), with `answer_mass`
    beside it; open-ended rows by the model's greedy answers, their match with the reference and their confidence,
    with the answers' `entropy` beside it. Both log `lm_nll`, the NLL of the evaluation prompts' own text. Under
    `accelerate launch` each process scores its share of the rows and the results are gathered, so no process repeats
    another's work; the diagram is written by the main process.

    Args:
        trainer: the `CalibSFTTrainer`, `RCFTTrainer` or any TRL trainer it evaluates.
        eval_dataset (`datasets.Dataset`): multiple-choice rows (`prompt`, `choices`, `answer`) or open-ended rows
            (`prompt`, `completion`: the reference answer).
        name (`str`): dataset name used in metric keys, file names and the model card.
        split (`str`): split name for the model card.
        eval_steps (`int`, *optional*): evaluate every this many steps (besides epoch ends).
        on_epoch (`bool`): evaluate at the end of every epoch.
        at_start (`bool`): evaluate once before training (the base model's calibration).
        batch_size (`int`): rows per forward pass or `generate` call.
        n_bins (`int`): equal-width bins of ECE and of the diagram.
        output_dir (`str`, *optional*): where diagrams go; defaults to `<args.output_dir>/calibration`.
        max_new_tokens (`int`): open-ended rows: the longest generated answer.
    """

    def __init__(
        self,
        trainer,
        eval_dataset,
        name: str = "mcq",
        split: str = "eval",
        eval_steps: int | None = None,
        on_epoch: bool = True,
        at_start: bool = False,
        batch_size: int = 16,
        n_bins: int = 10,
        output_dir: str | None = None,
        max_new_tokens: int = 32,
    ):
        if claims_multiple_choice(eval_dataset):
            validate_mcq_dataset(eval_dataset, name="CalibrationCallback eval_dataset")
        elif not {"prompt", "completion"} <= set(eval_dataset.column_names):
            raise ValueError(
                "CalibrationCallback's eval_dataset needs multiple-choice rows (`prompt`, `choices`, `answer`) or "
                f"open-ended ones (`prompt`, `completion`: the reference answer); got {eval_dataset.column_names}."
            )
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"`eval_steps` must be >= 1, got {eval_steps}.")
        self.trainer = trainer
        self.dataset = eval_dataset
        self.name = name
        self.split = split
        self.eval_steps = eval_steps
        self.on_epoch = on_epoch
        self.at_start = at_start
        self.batch_size = batch_size
        self.n_bins = n_bins
        self.max_new_tokens = max_new_tokens
        self.output_dir = output_dir or os.path.join(trainer.args.output_dir, "calibration")
        self.history: list[dict] = []
        self._last_step = None

    def evaluate(self, model=None) -> dict:
        """Score the dataset now; log, save the diagram and record the report. Returns the report."""
        trainer = self.trainer
        model = model if model is not None else trainer.model
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        result = evaluate_calibration(
            model,
            tokenizer,
            self.dataset,
            batch_size=self.batch_size,
            n_bins=self.n_bins,
            max_new_tokens=self.max_new_tokens,
            chat_template=getattr(trainer, "chat_template", None),
            shard=True,
            progress=not trainer.args.disable_tqdm,
            desc=f"Calibration ({self.name})",
        )
        report = result.report
        step = trainer.state.global_step
        self._last_step = step
        diagram = None
        if trainer.is_world_process_zero():
            from .plotting import plot_reliability_diagram

            os.makedirs(self.output_dir, exist_ok=True)
            data = reliability_diagram_data(result.confidences, result.correct, n_bins=self.n_bins)
            diagram = path_inside(
                self.output_dir, safe_filename(f"reliability_{self.name}_{self.split}_step{step}") + ".png"
            )
            plot_reliability_diagram(data=data, title=f"{self.name} ({self.split}), step {step}", path=diagram)
        logs = {
            f"calibration/{self.name}/{k}": report[k] for k in REPORT_METRICS if k != "n" and report.get(k) is not None
        }
        self._log(logs)
        if hasattr(trainer, "record_calibration"):
            # Before any optimizer step the model is the base model
            trainer.record_calibration(report, self.name, self.split, diagram=diagram, base=step == 0)
        self.history.append({"step": step, **report})
        return report

    def _log(self, logs: dict) -> None:
        # Like `Trainer.log`, without flushing the trainer's running training metrics into this entry
        trainer = self.trainer
        state = trainer.state
        entry = {**logs, "step": state.global_step}
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append(entry)
        trainer.control = trainer.callback_handler.on_log(trainer.args, state, trainer.control, logs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start and state.global_step == 0:
            self.evaluate(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step != self._last_step:
            self.evaluate(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.on_epoch and state.global_step != self._last_step:
            self.evaluate(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self._last_step:
            self.evaluate(model)
