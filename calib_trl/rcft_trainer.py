from __future__ import annotations

import logging

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainingArguments

from .calib_sft_trainer import CalibSFTTrainer
from .evaluation.scoring import score_multiple_choice
from .losses import rcft_ece_loss
from .mcq import validate_mcq_dataset
from .metrics import calibration_gaps, calibration_report, equal_width_bins
from .model_card import COGCALIB_CITATION, RCFT_CITATION
from .rcft_config import RCFTConfig
from .trainer_mixin import ANSWER_COLUMN, hidden_for_outputs, resolve_config, shifted

logger = logging.getLogger(__name__)


class RCFTTrainer(CalibSFTTrainer):
    """
    Trainer for CFT and RCFT, from "Restoring Calibration for Aligned Large Language Models: A Calibration-Aware
    Fine-Tuning Approach" (Xiao et al., ICML 2025). A drop-in replacement for [`~trl.SFTTrainer`] on multiple-choice
    data (prompt/completion rows with `choices` and `answer`, see `calib_trl.mcq`).

    Loss: `(1 - ece_weight) * L_SFT + ece_weight * ece_scale * L_ECE`. `L_SFT` is `SFTTrainer`'s loss (on the answer
    with `sft_loss="completion"`; CogCalib's terms can be added through the inherited `calibration_loss`). `L_ECE` is
    an EM-style regulariser:

    - E-step: score a fixed subset of held-out rows (`estep_dataset`, else `calibration_dataset`; the training rows
      when neither is given, with a warning, or with `estep_source="train"`) with the current model (batched, no
      gradient, sharded across processes and gathered, so every process holds the same statistics), put each row in
      one of `n_bins` equal-width bins of its top option probability, and estimate each bin's accuracy. Repeated at
      the start of every epoch, every N steps, or once (`bin_refresh`). Unlike the authors' code, every bin is used,
      the top one included.
    - M-step (the loss): pull each row's option probabilities, from the option-letter logits at the answer position,
      towards `rcft_target` — top entry equal to its bin's accuracy, the others sharing the rest in rank order. The
      target is a constant of the step by default (`ece_target_gradient`): the E/M alternation regresses the model
      onto fixed targets.

    `RCFTConfig`'s docstring lists every departure from the paper and the authors' code, and why.

    Logged beside the losses (`rcft/...`): the E-step's accuracy, conf-ECE, class-wise ECE and confidence gap
    `|accuracy - mean confidence|` (a lower bound on the ECE under any binning), the accuracy and confidence of the
    batches' own rows at their answer positions (`row_accuracy`, `row_confidence`, before the step's update), and,
    when the E-step reads held-out rows, `accuracy_gap`: the batches' accuracy minus the E-step's.

    Only the `K` option rows of the LM head are projected at the answer positions (`K x hidden` per example), so
    the term costs almost nothing; the E-step costs one prompt-only forward pass per scored row.

    Args:
        model, args, and the other arguments: as in [`CalibSFTTrainer`] (whose signature is `SFTTrainer`'s).
        estep_dataset (`datasets.Dataset`, *optional*): held-out multiple-choice rows for the E-step.
        calibration_dataset (`datasets.Dataset`, *optional*): held-out multiple-choice rows; the E-step scores them
            when no `estep_dataset` is given, and CogCalib's online detection (when switched on) fits its threshold
            on them.
    """

    _config_class = RCFTConfig
    _tag_names = ["trl", "sft", "calib-trl", "rcft"]
    _name = "RCFT"
    _paper = {
        "title": "Restoring Calibration for Aligned Large Language Models: A Calibration-Aware Fine-Tuning Approach",
        "id": "2505.01997",
        "citation": RCFT_CITATION + "\n\n" + COGCALIB_CITATION,
    }

    def __init__(
        self,
        model,
        args: RCFTConfig | TrainingArguments | None = None,
        *sft_args,
        calibration_dataset: Dataset | None = None,
        estep_dataset: Dataset | None = None,
        **sft_kwargs,
    ):
        args = resolve_config(args, self._config_class, model, self._name)
        self._rcft_active = args.ece_weight > 0
        if args.has_calibration_term:  # RCFT combined with CogCalib's calibration loss
            self._tag_names = [*type(self)._tag_names, "cogcalib"]
        self._option_ids = None
        self._excluded_rows = 0
        self._ece_rows = None  # training rows with an answer position (the `"estep"` normalisation's N)
        self._bin_stats = None
        self._last_estep = None  # {"epoch": ..., "step": ...} when the last E-step ran
        # CalibSFTTrainer reads `calibration_dataset` to detect known examples only, and says it ignores it otherwise
        detects = args.has_calibration_term and args.apply_to == "known" and args.detection in ("auto", "online")
        super().__init__(
            model, args, *sft_args, calibration_dataset=calibration_dataset if detects else None, **sft_kwargs
        )
        if self._rcft_active and self._virtual_tokens:
            raise ValueError(
                "RCFT's ECE term reads the option-letter logits at each answer position, which prompt-learning "
                "virtual tokens shift; it is not aligned with them yet. Use LoRA, prefix tuning, or `ece_weight=0` "
                "(CFT)."
            )
        self._install_flag_collator((ANSWER_COLUMN,), required=True)
        if self._option_ids is None:
            raise RuntimeError("The answer positions were not located during dataset preparation.")
        estep_rows, self.estep_source = self._pick_estep_rows(
            args, self._train_rows, estep_dataset, calibration_dataset
        )
        if args.estep_samples is not None and len(estep_rows) > args.estep_samples:
            pick = np.random.default_rng(args.seed).choice(len(estep_rows), args.estep_samples, replace=False)
            estep_rows = estep_rows.select(np.sort(pick))
        self._estep_rows = estep_rows

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
            if self._rcft_active:
                logger.info("RCFT E-step: %d held-out rows (`%s`).", len(heldout), name)
            return heldout, "heldout"
        if self._rcft_active and args.estep_source == "auto":
            logger.warning(
                "RCFT's E-step reads the training rows: their accuracy runs ahead of held-out accuracy as the model "
                "learns them, and the targets pull confidence up towards it. Pass held-out multiple-choice rows "
                "(`calibration_dataset=` or `estep_dataset=`), or set `estep_source='train'` to keep this choice "
                "without the warning."
            )
        elif self._rcft_active:
            logger.info("RCFT E-step: the training rows (`estep_source='train'`).")
        return train_dataset, "train"

    # -- dataset -------------------------------------------------------------------------------------------------

    def _needs_hidden(self) -> bool:
        return True

    def _adds_terms(self) -> bool:
        return self._rcft_active or super()._adds_terms()

    def _check_dataset(self, dataset, args, dataset_name: str) -> None:
        super()._check_dataset(dataset, args, dataset_name)
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"RCFT needs a `datasets.Dataset` (an `IterableDataset` cannot be scored by the E-step), got "
                f"{type(dataset).__name__} as the {dataset_name} dataset."
            )
        validate_mcq_dataset(dataset, name=f"{dataset_name} dataset", require_completion=True)

    def _reads_lm_head(self) -> bool:
        return self._rcft_active or super()._reads_lm_head()

    def _columns_to_carry(self, args) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # The prompt/completion/choices columns ride along through TRL's maps; `_post_tokenize` uses them to locate
        # the answer, and writes the per-token `answer_num_choices` column the collator carries
        carried, flags = super()._columns_to_carry(args)
        return tuple(dict.fromkeys((*carried, "choices"))), tuple(dict.fromkeys((*flags, ANSWER_COLUMN)))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if formatting_func is not None:
            raise ValueError(
                "RCFT needs prompt/completion rows to find the answer position; a `formatting_func` "
                "turns them into plain text. Format the prompts before passing the dataset instead."
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _on_rows_dropped(self, dropped: int, total: int, args, dataset_name: str) -> None:
        if args.invalid_rows == "raise":
            raise ValueError(
                f"{dropped} of the {total} rows of the {dataset_name} dataset have prompts too long for "
                f"`max_length={args.max_length}`: truncation cuts off their answer position (and their whole "
                "completion). Raise `max_length`, drop those rows, or set `invalid_rows='exclude'`."
            )
        super()._on_rows_dropped(dropped, total, args, dataset_name)
        self._excluded_rows += dropped

    def _answer_terms(self) -> str:
        if self._space == "options":
            return "RCFT's ECE term and the option-letter calibration term"
        return "RCFT's ECE term"

    def _post_tokenize(self, dataset, processing_class, args, dataset_name):
        dataset = super()._post_tokenize(dataset, processing_class, args, dataset_name)
        if ANSWER_COLUMN in dataset.column_names:  # located already for CogCalib's option-space term
            return dataset
        return self._locate_answers(dataset, processing_class, args, dataset_name, invalid_rows=args.invalid_rows)

    # -- loss ----------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        answers = inputs.get(ANSWER_COLUMN)  # `CalibSFTTrainer._compute_loss` pops it
        if answers is None:
            raise KeyError(
                f"The batch has no `{ANSWER_COLUMN}` tensor; use `calib_trl.DataCollatorWithKnowledgeFlags`."
            )
        if not self._rcft_active:  # CFT
            return super()._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._bin_stats is None or (mode == "train" and self._estep_due()):
            self._estep(model)
        args = self.args
        with self._capture.capture():
            result = super()._compute_loss(model, inputs, return_outputs, num_items_in_batch)
            hidden = self._capture.hidden
            n_tokens = self._capture.output.label_mask.sum()
            base = result[0] if return_outputs else result
            at = shifted(answers, inputs) > 0
            option_logits, num_choices = self._option_logits(
                model, hidden_for_outputs(hidden, inputs)[at], shifted(answers, inputs)[at]
            )
            probs = _option_softmax(option_logits, num_choices)
        bins, accuracy = self._row_bins(probs)
        ece = rcft_ece_loss(
            probs,
            bins,
            accuracy,
            args.n_bins,
            num_choices,
            bin_counts=self._ece_bin_counts(bins),
            target_gradient=args.ece_target_gradient,
        )
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        scale = 1.0 / steps if (num_items_in_batch is not None and mode == "train") else 1.0
        loss = (1 - args.ece_weight) * base + args.ece_weight * args.ece_scale * ece * scale

        self._log_mean(mode, "rcft/ece_loss", ece.detach(), torch.ones((), device=ece.device))
        # `base` is this micro-batch's share of the step's token-normalised loss; log its token mean instead
        denominator = n_tokens if num_items_in_batch is None else num_items_in_batch
        sft_sum = base.detach() / self._loss_scale(num_items_in_batch) * torch.as_tensor(denominator).clamp(min=1)
        self._log_mean(mode, "rcft/sft_loss", sft_sum, n_tokens)
        self._log_rows(mode, probs.detach(), inputs["input_ids"][answers > 0])
        if self._excluded_rows:
            self._metrics[mode]["rcft/excluded_rows"] = [self._excluded_rows]
        return (loss, result[1]) if return_outputs else loss

    def _row_bins(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's confidence bin and that bin's E-step accuracy, the target of its top entry."""
        conf = probs.detach().max(-1).values
        bins = equal_width_bins(conf, self.args.n_bins, one_apart=False)
        accuracy = self._bin_stats["accuracy"].to(conf.device)[bins]
        # A bin the E-step left empty has no estimate (the authors use 0): its rows keep their own confidence
        return bins, torch.where(torch.isnan(accuracy), conf, accuracy)

    def _ece_bin_counts(self, bins: torch.Tensor) -> torch.Tensor | None:
        """
        The `N_b` of `rcft_ece_loss`: `None` (this batch's rows in each bin) under `ece_normalization="batch"`; under
        `"estep"`, the bin's share of the E-step rows times the number of training rows that get the term — the
        authors' count when the E-step scores the whole training set — and at least the batch's rows in the bin
        (a bin the E-step left empty would otherwise divide by zero).
        """
        if self.args.ece_normalization == "batch":
            return None
        if self._ece_rows is None:
            self._ece_rows = sum(sum(1 for v in row if v > 0) for row in self.train_dataset[ANSWER_COLUMN])
        counts = self._bin_stats["counts"].to(bins.device, torch.float32)
        expected = counts / counts.sum() * self._ece_rows
        in_batch = torch.zeros_like(expected).index_add_(0, bins, torch.ones_like(bins, dtype=expected.dtype))
        return torch.maximum(expected, in_batch)

    def _log_rows(self, mode: str, probs: torch.Tensor, answer_ids: torch.Tensor) -> None:
        """The E-step's statistics, and the accuracy and confidence of this batch's rows (`answer_ids`: the letters)."""
        stats = self._bin_stats
        for key in ("estep_accuracy", "estep_ece", "estep_cw_ece", "estep_confidence_gap"):
            if key in stats:  # (a checkpoint from an older version has no confidence gap)
                self._metrics[mode][f"rcft/{key}"] = [stats[key]]
        option_ids = torch.tensor(self._option_ids, device=probs.device)
        correct = (option_ids[probs.argmax(-1)] == answer_ids).float()
        local = torch.stack([correct.sum(), probs.max(-1).values.sum().float(), correct.new_tensor(len(correct))])
        hits, confidence, rows = self.accelerator.gather_for_metrics(local[None]).sum(0).tolist()
        if rows == 0:
            return
        self._metrics[mode]["rcft/row_accuracy"].append(hits / rows)
        self._metrics[mode]["rcft/row_confidence"].append(confidence / rows)
        if self.estep_source == "heldout":  # this batch's rows against the held-out rows
            self._metrics[mode]["rcft/accuracy_gap"].append(hits / rows - stats["estep_accuracy"])

    # -- E-step --------------------------------------------------------------------------------------------------

    def _estep_due(self) -> bool:
        refresh = self.args.bin_refresh
        if self._bin_stats is None:
            return True
        if refresh == "once":
            return False
        if refresh == "epoch":
            return int(self.state.epoch + 1e-9) != self._last_estep["epoch"]
        step = self.state.global_step
        return step % int(refresh) == 0 and step != self._last_estep["step"]

    @torch.no_grad()
    def estimate_bins(self, model=None) -> dict:
        """The E-step: per-bin counts, accuracies and mean confidences of the current model on the E-step rows."""
        model = model if model is not None else self.model
        scores = score_multiple_choice(
            model,
            self._tokenizer,
            self._estep_rows,
            batch_size=self.args.estep_batch_size,
            desc="RCFT E-step",
            progress=not self.args.disable_tqdm,
            shard=True,
            chat_template=self.chat_template,
        )
        n_bins = self.args.n_bins
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

    def _estep(self, model) -> None:
        self._bin_stats = self.estimate_bins(model)
        self._last_estep = {"epoch": int(self.state.epoch + 1e-9), "step": self.state.global_step}
        s = self._bin_stats
        logger.info(
            "RCFT E-step at step %d on %d %s rows: accuracy %.4f, conf-ECE %.4f, class-wise ECE %.4f; bin counts %s",
            self.state.global_step,
            len(self._estep_rows),
            "held-out" if self.estep_source == "heldout" else "training",
            s["estep_accuracy"],
            s["estep_ece"],
            s["estep_cw_ece"],
            s["counts"].long().tolist(),
        )

    # -- state, model card ---------------------------------------------------------------------------------------

    def _calib_state(self) -> dict:
        state = super()._calib_state()
        if self._bin_stats is not None:
            state["rcft_bins"] = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in self._bin_stats.items()}
            state["rcft_last_estep"] = self._last_estep
        return state

    def _load_calib_state(self, state: dict) -> None:
        super()._load_calib_state(state)
        if "rcft_bins" in state:
            bins = state["rcft_bins"]
            self._bin_stats = {
                k: (
                    torch.tensor(v, dtype=torch.float64 if k == "counts" else torch.float32)
                    if isinstance(v, list)
                    else v
                )
                for k, v in bins.items()
            }
            self._last_estep = state["rcft_last_estep"]

    def _card_settings(self) -> dict:
        a = self.args
        settings = {
            "ece_weight": a.ece_weight,
            "ece_scale": a.ece_scale,
            "ece_normalization": a.ece_normalization,
            "ece_target_gradient": a.ece_target_gradient,
            "estep_rows": self.estep_source,
            "n_bins": a.n_bins,
            "sft_loss": a.sft_loss,
            "bin_refresh": a.bin_refresh,
        }
        if a.has_calibration_term:
            settings.update(super()._card_settings())
        return settings


def _option_softmax(option_logits: torch.Tensor, num_choices: torch.Tensor) -> torch.Tensor:
    """Softmax over each row's own options (the columns beyond its `num_choices` get probability 0)."""
    valid = torch.arange(option_logits.shape[1], device=option_logits.device)[None, :] < num_choices[:, None]
    return option_logits.masked_fill(~valid, float("-inf")).softmax(-1)
