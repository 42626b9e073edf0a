"""`RCFTLoss`: RCFT's part of a trainer, the EM-style ECE regulariser on the option letters at the answer token.

Loss: `(1 - ece_weight) * L + ece_weight * ece_scale * L_ECE`, where `L` is the loss of the parts before it
(`SFTTrainer`'s, plus CogCalib's term when the two are combined).

- E-step (`estimate_bins`): score the E-step rows with the current model (batched, no gradient, sharded across
  processes and gathered, so every process holds the same statistics), put each row in one of `n_bins` equal-width
  bins of its top option probability, and estimate each bin's accuracy. Repeated at the start of every epoch, every N
  steps, or once (`bin_refresh`). Every bin is used, the top one included.
- M-step (the loss): pull each row's option probabilities, from the option-letter logits at the answer token, towards
  `rcft_target`: top entry equal to its bin's accuracy, the others sharing the rest in rank order.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from datasets import Dataset

from ..core.capture import hidden_for_outputs
from ..core.columns import ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN
from ..core.part import CalibrationPart, LossStep
from ..evaluation.scoring import score_multiple_choice
from ..losses import rcft_ece_loss
from ..mcq import validate_mcq_dataset
from ..metrics import calibration_gaps, calibration_report, equal_width_bins

logger = logging.getLogger(__name__)

_STAT_KEYS = ("estep_accuracy", "estep_ece", "estep_cw_ece", "estep_confidence_gap")


def option_softmax(option_logits: torch.Tensor, num_choices: torch.Tensor) -> torch.Tensor:
    """Softmax over each row's own options (the columns beyond its `num_choices` get probability 0)."""
    valid = torch.arange(option_logits.shape[1], device=option_logits.device)[None, :] < num_choices[:, None]
    return option_logits.masked_fill(~valid, float("-inf")).softmax(-1)


class RCFTLoss(CalibrationPart):
    """RCFT's part (see the module docstring); with `ece_weight=0` (CFT) it locates the answers and adds nothing."""

    name = "rcft"
    tags = ("rcft",)
    carried_columns = ("choices",)
    token_columns = (ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN)
    required_token_columns = (ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN)
    needs_hidden = True
    answer_terms = "RCFT's ECE term"

    def __init__(self, args, train_dataset, estep_dataset, calibration_dataset):
        self.args = args
        self.adds_terms = self.reads_lm_head = args.ece_weight > 0
        self.bin_stats: dict | None = None
        self.last_estep: dict | None = None  # {"epoch": ..., "step": ...} when the last E-step ran
        self._ece_rows = None  # training rows with an answer token (the `"estep"` normalisation's N)
        self._sources = (train_dataset, estep_dataset, calibration_dataset)
        self.estep_rows, self.estep_source = None, None  # picked in `setup`, once the datasets are checked

    def _pick_estep_rows(self, args, train_dataset, estep_dataset, calibration_dataset):
        """The rows the E-step scores and where they come from (`"heldout"` or `"train"`), per `estep_source`."""
        heldout, name = (
            (estep_dataset, "estep_dataset")
            if estep_dataset is not None
            else (calibration_dataset, "calibration_dataset")
        )
        if heldout is not None:
            validate_mcq_dataset(heldout, name=name)
        if args.estep_source == "heldout" and heldout is None:
            raise ValueError(
                "`estep_source='heldout'` needs held-out multiple-choice rows: pass `estep_dataset=` or "
                "`calibration_dataset=` to the trainer, or set `estep_source='train'`."
            )
        if heldout is not None and args.estep_source != "train":
            if self.adds_terms:
                logger.info("RCFT E-step: %d held-out rows (`%s`).", len(heldout), name)
            return heldout, "heldout"
        if self.adds_terms and args.estep_source == "auto":
            logger.warning(
                "RCFT's E-step reads the training rows: their accuracy runs ahead of held-out accuracy as the model "
                "learns them, and the targets pull confidence up towards it. Pass held-out multiple-choice rows "
                "(`calibration_dataset=` or `estep_dataset=`), or set `estep_source='train'` to keep this choice "
                "without the warning."
            )
        elif self.adds_terms:
            logger.info("RCFT E-step: the training rows (`estep_source='train'`).")
        return train_dataset, "train"

    # -- datasets ------------------------------------------------------------------------------------------------

    def check_dataset(self, trainer, dataset, dataset_name: str) -> None:
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"RCFT needs a `datasets.Dataset` (an `IterableDataset` cannot be scored by the E-step), got "
                f"{type(dataset).__name__} as the {dataset_name} dataset."
            )
        validate_mcq_dataset(dataset, name=f"{dataset_name} dataset", require_completion=True)

    def before_prepare(self, trainer, dataset, dataset_name: str):
        if trainer._formatting_func is not None:
            raise ValueError(
                "RCFT needs prompt/completion rows to find the answer position; a `formatting_func` "
                "turns them into plain text. Format the prompts before passing the dataset instead."
            )
        return dataset

    def rows_dropped(self, trainer, dropped: int, total: int, args, dataset_name: str) -> None:
        if args.invalid_rows == "raise":
            raise ValueError(
                f"{dropped} of the {total} rows of the {dataset_name} dataset have prompts too long for "
                f"`max_length={args.max_length}`: truncation cuts off their answer position (and their whole "
                "completion). Raise `max_length`, drop those rows, or set `invalid_rows='exclude'`."
            )
        trainer.answer_locator().excluded += dropped

    def prepare(self, trainer, dataset, args, dataset_name: str):
        if ANSWER_TOKEN_COLUMN in dataset.column_names:  # located already for CogCalib's option-space term
            return dataset
        return trainer.answer_locator()(dataset, trainer._tokenizer, args, dataset_name, args.invalid_rows)

    def setup(self, trainer) -> None:
        if self.adds_terms and trainer._virtual_tokens:
            raise ValueError(
                "RCFT's ECE term reads the option-letter logits at each answer position, which prompt-learning "
                "virtual tokens shift; it is not aligned with them yet. Use LoRA, prefix tuning, or `ece_weight=0` "
                "(CFT)."
            )
        if trainer.option_ids is None:
            raise RuntimeError("The answer positions were not located during dataset preparation.")
        args = self.args
        self.estep_rows, self.estep_source = self._pick_estep_rows(args, *self._sources)
        if args.estep_samples is not None and len(self.estep_rows) > args.estep_samples:
            pick = np.random.default_rng(args.seed).choice(len(self.estep_rows), args.estep_samples, replace=False)
            self.estep_rows = self.estep_rows.select(np.sort(pick))

    def before_batches(self, trainer, state: dict | None) -> None:
        if state is None or not {"bins", "last_estep"} <= set(state):
            if state is not None:
                logger.warning("%s holds no RCFT bin statistics: a new E-step runs.", state.get("checkpoint"))
            return
        try:
            bins = state["bins"]
            stats = {
                k: torch.tensor(v, dtype=torch.float64 if k == "counts" else torch.float32)
                if isinstance(v, list)
                else v
                for k, v in bins.items()
            }
            if not {"counts", "accuracy"} <= set(stats) or len(stats["counts"]) != self.args.n_bins:
                raise ValueError(f"expected `counts` and `accuracy` of {self.args.n_bins} bins")
            last = state["last_estep"]
            if not (isinstance(last, dict) and {"epoch", "step"} <= set(last)):
                raise ValueError("`last_estep` needs `epoch` and `step`")
        except (KeyError, TypeError, ValueError) as err:
            logger.warning(
                "%s: calib-trl's saved RCFT bin statistics are damaged (%s: %s); a new E-step runs instead.",
                state.get("checkpoint"),
                type(err).__name__,
                err,
            )
            return
        self.bin_stats, self.last_estep = stats, last

    # -- the E-step ----------------------------------------------------------------------------------------------

    def estep_due(self, trainer) -> bool:
        refresh = self.args.bin_refresh
        if self.bin_stats is None:
            return True
        if refresh == "once":
            return False
        if refresh == "epoch":
            return int(trainer.state.epoch + 1e-9) != self.last_estep["epoch"]
        step = trainer.state.global_step
        return step % int(refresh) == 0 and step != self.last_estep["step"]

    @torch.no_grad()
    def estimate_bins(self, trainer, model) -> dict:
        """The E-step: per-bin counts, accuracies and mean confidences of the current model on the E-step rows."""
        args = self.args
        scores = score_multiple_choice(
            model,
            trainer._tokenizer,
            self.estep_rows,
            batch_size=args.estep_batch_size,
            desc="RCFT E-step",
            progress=not args.disable_tqdm,
            shard=True,
            chat_template=trainer.chat_template,
        )
        n_bins = args.n_bins
        conf = torch.tensor(scores.confidences, dtype=torch.float64)
        correct = torch.tensor(scores.correct, dtype=torch.float64)
        bins = equal_width_bins(conf, n_bins, one_apart=False)
        counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
        hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
        conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
        report = calibration_report(scores.probs, scores.labels, n_bins=n_bins)
        return {
            "counts": counts,
            "accuracy": (hits / counts).float(),  # NaN for empty bins
            "confidence": (conf_sum / counts).float(),
            "estep_accuracy": report["accuracy"],
            "estep_ece": report["ece"],
            "estep_cw_ece": report["cw_ece"],
            "estep_confidence_gap": calibration_gaps(report)["confidence_gap"],
        }

    def before_forward(self, trainer, model, mode: str) -> None:
        if self.bin_stats is not None and not (mode == "train" and self.estep_due(trainer)):
            return
        self.bin_stats = trainer.estimate_bins(model)
        self.last_estep = {"epoch": int(trainer.state.epoch + 1e-9), "step": trainer.state.global_step}
        s = self.bin_stats
        logger.info(
            "RCFT E-step at step %d on %d %s rows: accuracy %.4f, conf-ECE %.4f, class-wise ECE %.4f; bin counts %s",
            trainer.state.global_step,
            len(self.estep_rows),
            "held-out" if self.estep_source == "heldout" else "training",
            s["estep_accuracy"],
            s["estep_ece"],
            s["estep_cw_ece"],
            s["counts"].long().tolist(),
        )

    # -- the loss ------------------------------------------------------------------------------------------------

    def loss(self, trainer, step: LossStep, loss: torch.Tensor) -> torch.Tensor:
        """`(1 - ece_weight) * loss + ece_weight * ece_scale * L_ECE` (see the module docstring)."""
        args, inputs = self.args, step.inputs
        answers = step.columns.get(ANSWER_TOKEN_COLUMN)
        if answers is None:
            raise KeyError(
                f"The batch has no `{ANSWER_TOKEN_COLUMN}` tensor; use `calib_trl.DataCollatorWithKnowledgeFlags`."
            )
        at = trainer.to_outputs(answers, inputs, 0) > 0
        num_choices = trainer.to_outputs(step.columns[NUM_CHOICES_COLUMN], inputs, 0)[at].long()
        option_logits = trainer.option_logits(step.model, hidden_for_outputs(step.hidden, inputs)[at])
        probs = option_softmax(option_logits, num_choices)
        bins, accuracy = self.row_bins(probs)
        ece = rcft_ece_loss(
            probs,
            bins,
            accuracy,
            args.n_bins,
            num_choices,
            bin_counts=self.ece_bin_counts(trainer, bins),
            target_gradient=args.ece_target_gradient,
        )
        n = step.num_items_in_batch
        steps = getattr(trainer, "current_gradient_accumulation_steps", 1)
        scale = 1.0 / steps if (n is not None and step.mode == "train") else 1.0
        mixed = (1 - args.ece_weight) * loss + args.ece_weight * args.ece_scale * ece * scale

        n_tokens = step.output.label_mask.sum()
        trainer.log_mean(step.mode, "rcft/ece_loss", ece.detach(), torch.ones((), device=ece.device))
        # `loss` is this micro-batch's share of the step's token-normalised loss; log its token mean instead
        denominator = n_tokens if n is None else n
        sft_sum = loss.detach() / trainer.loss_scale(n) * torch.as_tensor(denominator).clamp(min=1)
        trainer.log_mean(step.mode, "rcft/sft_loss", sft_sum, n_tokens)
        self._log_rows(trainer, step, probs.detach(), inputs["input_ids"][answers > 0])
        excluded = trainer.answer_locator().excluded
        if excluded:
            step.logs["rcft/excluded_rows"] = [excluded]
        return mixed

    def row_bins(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's confidence bin and that bin's E-step accuracy, the target of its top entry."""
        conf = probs.detach().max(-1).values
        bins = equal_width_bins(conf, self.args.n_bins, one_apart=False)
        accuracy = self.bin_stats["accuracy"].to(conf.device)[bins]
        # A bin the E-step left empty has no estimate (the authors use 0): its rows keep their own confidence
        return bins, torch.where(torch.isnan(accuracy), conf, accuracy)

    def ece_bin_counts(self, trainer, bins: torch.Tensor) -> torch.Tensor | None:
        """
        The `N_b` of `rcft_ece_loss`: `None` (this batch's rows in each bin) under `ece_normalization="batch"`; under
        `"estep"`, the bin's share of the E-step rows times the number of training rows that get the term — the
        authors' count when the E-step scores the whole training set — and at least the batch's rows in the bin
        (a bin the E-step left empty would otherwise divide by zero).
        """
        if self.args.ece_normalization == "batch":
            return None
        if self._ece_rows is None:
            self._ece_rows = sum(sum(1 for v in row if v > 0) for row in trainer.train_dataset[ANSWER_TOKEN_COLUMN])
        counts = self.bin_stats["counts"].to(bins.device, torch.float32)
        expected = counts / counts.sum() * self._ece_rows
        in_batch = torch.zeros_like(expected).index_add_(0, bins, torch.ones_like(bins, dtype=expected.dtype))
        return torch.maximum(expected, in_batch)

    def _log_rows(self, trainer, step: LossStep, probs: torch.Tensor, answer_ids: torch.Tensor) -> None:
        """The E-step's statistics, and the accuracy and confidence of this batch's rows (`answer_ids`: the letters)."""
        stats, logs = self.bin_stats, step.logs
        for key in _STAT_KEYS:
            if key in stats:
                logs[f"rcft/{key}"] = [stats[key]]
        option_ids = trainer.option_index.to(probs.device)
        correct = (option_ids[probs.argmax(-1)] == answer_ids).float()
        local = torch.stack([correct.sum(), probs.max(-1).values.sum().float(), correct.new_tensor(len(correct))])
        hits, confidence, rows = trainer.accelerator.gather_for_metrics(local[None]).sum(0).tolist()
        if rows == 0:
            return
        logs["rcft/row_accuracy"].append(hits / rows)
        logs["rcft/row_confidence"].append(confidence / rows)
        if self.estep_source == "heldout":  # this batch's rows against the held-out rows
            logs["rcft/accuracy_gap"].append(hits / rows - stats["estep_accuracy"])

    # -- state, model card ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.bin_stats is None:
            return {}
        bins = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in self.bin_stats.items()}
        return {"bins": bins, "last_estep": self.last_estep}

    def card_settings(self) -> dict:
        a = self.args
        return {
            "ece_weight": a.ece_weight,
            "ece_scale": a.ece_scale,
            "ece_normalization": a.ece_normalization,
            "ece_target_gradient": a.ece_target_gradient,
            "estep_rows": self.estep_source,
            "n_bins": a.n_bins,
            "sft_loss": a.sft_loss,
            "bin_refresh": a.bin_refresh,
        }
