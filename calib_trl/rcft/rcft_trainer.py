from __future__ import annotations

import textwrap

from ..cogcalib.calib_sft_config import CalibSFTConfig
from ..cogcalib.calib_sft_trainer import cogcalib_part
from ..core.model_card import RCFT_PAPER
from ..core.trainer import CalibrationTrainer
from .loss import RCFTLoss
from .rcft_config import RCFTConfig


class RCFTTrainer(CalibrationTrainer):
    """
    Trainer for CFT and RCFT, from "Restoring Calibration for Aligned Large Language Models: A Calibration-Aware
    Fine-Tuning Approach" (Xiao et al., ICML 2025). A drop-in replacement for [`~trl.SFTTrainer`] on multiple-choice
    data (prompt/completion rows with `choices` and `answer`, see `calib_trl.mcq`).

    Loss: `(1 - ece_weight) * L_SFT + ece_weight * ece_scale * L_ECE` (`calib_trl.rcft.loss.RCFTLoss`). `L_SFT` is
    `SFTTrainer`'s loss (on the answer with `sft_loss="completion"`). With a `CalibRCFTConfig`, CogCalib's part adds its
    term to `L_SFT` first. `L_ECE` is an EM-style regulariser:

    - E-step: score a fixed subset of held-out rows (`estep_dataset`, else `calibration_dataset`; the training rows
      when neither is given, with a warning, or with `estep_source="train"`) with the current model, put each row in
      one of `n_bins` equal-width bins of its top option probability, and estimate each bin's accuracy. Repeated at
      the start of every epoch, every N steps, or once (`bin_refresh`). Unlike the authors' code, every bin is used,
      the top one included.
    - M-step (the loss): pull each row's option probabilities, from the option-letter logits at the answer position,
      towards `rcft_target`: top entry equal to its bin's accuracy, the others sharing the rest in rank order. The
      target is a constant of the step by default (`ece_target_gradient`).

    `RCFTConfig`'s docstring lists every departure from the paper and the authors' code, and why.

    Logged beside the losses (`rcft/...`): the E-step's accuracy, conf-ECE, class-wise ECE and confidence gap
    `|accuracy - mean confidence|` (a lower bound on the ECE under any binning), the accuracy and confidence of the
    batches' own rows at their answer positions (`row_accuracy`, `row_confidence`, before the step's update), and,
    when the E-step reads held-out rows, `accuracy_gap`: the batches' accuracy minus the E-step's.

    Only the `K` option rows of the LM head are projected at the answer positions (`K x hidden` per example), so
    the term costs almost nothing; the E-step costs one prompt-only forward pass per scored row.

    Args:
        model, data_collator, train_dataset, eval_dataset, processing_class, callbacks, optimizers, peft_config,
        formatting_func, and the other arguments: as in [`~trl.SFTTrainer`] (`CalibrationTrainer`'s signature).
        args (`RCFTConfig` or `CalibRCFTConfig`, *optional*): converted from a `TrainingArguments` or `SFTConfig` as
            `SFTTrainer` converts one; `None` gives `RCFTConfig()`'s defaults.
        estep_dataset (`datasets.Dataset`, *optional*): held-out multiple-choice rows for the E-step.
        calibration_dataset (`datasets.Dataset`, *optional*): held-out multiple-choice rows; the E-step scores them
            when no `estep_dataset` is given, and CogCalib's detection (with a `CalibRCFTConfig`) fits its threshold
            on them.
    """

    _config_class = RCFTConfig
    _tag_names = ["trl", "sft", "calib-trl", "rcft"]
    _name = "RCFT"
    _paper = RCFT_PAPER

    def __init__(self, model, args: RCFTConfig | None = None, *sft_args, estep_dataset=None, **sft_kwargs):
        self._estep_dataset = estep_dataset
        super().__init__(model, args, *sft_args, **sft_kwargs)

    def _make_parts(self, args, train_dataset, calibration_dataset) -> tuple:
        parts = []
        if isinstance(args, CalibSFTConfig) and args.has_calibration_term:  # RCFT combined with CogCalib's term
            self._tag_names = [*type(self)._tag_names, "cogcalib"]
            # CogCalib reads `calibration_dataset` to detect known examples only
            detects = args.apply_to == "known" and args.detection in ("auto", "online")
            args, part = cogcalib_part(args, train_dataset, calibration_dataset if detects else None)
            parts.append(part)
        parts.append(RCFTLoss(args, train_dataset, self._estep_dataset, calibration_dataset))
        return args, parts

    @property
    def estep_source(self) -> str:
        """Where the E-step's rows come from: `"heldout"` or `"train"`."""
        return self.part("rcft").estep_source

    @property
    def _bin_stats(self) -> dict | None:
        """The last E-step's per-bin statistics."""
        return self.part("rcft").bin_stats

    def estimate_bins(self, model=None) -> dict:
        """Run an E-step now: per-bin counts, accuracies and mean confidences of `model` (default: the trainer's)."""
        return self.part("rcft").estimate_bins(self, model if model is not None else self.model)

    def _card_settings(self) -> dict:
        settings = self.part("rcft").card_settings()  # RCFT's settings first, then CogCalib's when combined
        cogcalib = self.part("cogcalib")
        if cogcalib is not None:
            settings.update(cogcalib.card_settings())
        return settings


RCFTTrainer.__doc__ = textwrap.dedent(RCFTTrainer.__doc__)
