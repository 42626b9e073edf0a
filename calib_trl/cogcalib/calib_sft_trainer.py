from __future__ import annotations

import copy
import textwrap

from ..core.model_card import COGCALIB_PAPER
from ..core.trainer import CalibrationTrainer
from .calib_sft_config import DEFAULT_ECP_BETA, DEFAULT_LOSS, DEFAULT_LS_EPSILON, CalibSFTConfig
from .detection import DetectionPlan
from .loss import CogCalibLoss, resolve_space


class CalibSFTTrainer(CalibrationTrainer):
    """
    Trainer for CogCalib: supervised fine-tuning in which the tokens of examples the model already *knows* get a
    calibration loss (label smoothing, margin-based label smoothing or a confidence penalty) and the others plain
    cross-entropy. A drop-in replacement for [`~trl.SFTTrainer`], from "Towards Objective Fine-tuning: How LLMs' Prior
    Knowledge Causes Potential Poor Calibration?" (Wang et al., ACL 2025).

    What it adds to `SFTTrainer` (through `calib_trl.core.CalibrationTrainer` and its part, `CogCalibLoss`):
    - knowledge detection (`DetectionPlan`): with `detection="auto"` (the default), the flags come from the `known`
      column where the dataset has one, and are otherwise detected inside `train()`, before the first step (see
      `CalibSFTConfig.detection` for the paths, and the one log line that names the one taken); with
      `detection="online"` they are computed in each step, from the answer NLL and a threshold re-fitted on
      `calibration_dataset`. The flags are saved in checkpoints and restored on resume;
    - the dataset hook: the `known` column is carried through tokenisation, truncation and packing, and the collator
      turns it into a per-token tensor (`DataCollatorWithKnowledgeFlags`);
    - the loss: `SFTTrainer`'s token-normalised cross-entropy through TRL's fused LM head (unchanged), plus
      `calibration_weight * term` on the selected tokens, where `term = L_method - NLL` is computed without
      `[batch, seq, vocab]` logits (see `calib_trl.losses`), normalised by the same token count;
    - logging under `calib/` (known fraction, the NLL and calibration parts, the online threshold and whether one
      could be fitted);
    - the model card: `calib-trl` and `cogcalib` tags, both papers' citations, the detection path, calibration results
      when available.

    Everything else is `SFTTrainer`'s, whose own checks come first; with the calibration off (`calibration_loss="none"`
    or `apply_to="none"`) it trains exactly as `SFTTrainer`. Vision datasets are refused with a calibration term.

    Args:
        model, data_collator, train_dataset, eval_dataset, processing_class, callbacks, optimizers, peft_config,
        formatting_func, and the other keyword arguments: as in [`~trl.SFTTrainer`].
        args (`CalibSFTConfig`, *optional*):
            A `transformers.TrainingArguments` or `trl.SFTConfig` is converted, as `SFTTrainer` converts a
            `TrainingArguments` (calib-trl's parameters at their defaults, logged); `None` gives `CalibSFTConfig()`'s
            defaults. With `ecp_beta=None`, the trainer's `args` (a copy) holds the β the run uses.
        calibration_dataset (`datasets.Dataset`, *optional*):
            Held-out rows of the training task (multiple choice, prompt/completion for open-ended data, or
            conversational `messages`), on which detection fits its threshold: once with `detection="auto"`, every
            `online_refit_steps` with `detection="online"`, where it is required.

    Example (the one-class swap of a TRL script):
    ```python
    >>> from trl import SFTConfig
    >>> from calib_trl import CalibSFTTrainer  # instead of `from trl import SFTTrainer`
    >>> trainer = CalibSFTTrainer(model=model, args=SFTConfig("out"), train_dataset=train)
    >>> trainer.train()  # detects the known rows, then CoECP on their option letters (CoLS on open-ended rows)
    ```
    """

    _config_class = CalibSFTConfig
    _tag_names = ["trl", "sft", "calib-trl", "cogcalib"]
    _name = "CalibSFT (CogCalib)"
    _paper = COGCALIB_PAPER

    def _make_parts(self, args, train_dataset, calibration_dataset) -> tuple:
        args, part = cogcalib_part(args, train_dataset, calibration_dataset)
        return args, [part]

    @property
    def calibration_space(self) -> str:
        """The distribution the calibration term acts on in this run: `"options"` or `"vocabulary"` (`"auto"` resolved)."""
        return self.part("cogcalib").space


def cogcalib_part(args, train_dataset, calibration_dataset) -> tuple:
    """
    CogCalib's part for a trainer, decided before `SFTTrainer.__init__` prepares the datasets, and the arguments the
    run uses: where `calibration_loss`, `ls_epsilon` or `ecp_beta` is None, a copy holding the calibration space's own
    default (the caller's config may serve another trainer).
    """
    space = resolve_space(args, train_dataset)
    defaults = {
        "calibration_loss": DEFAULT_LOSS[space],
        "ls_epsilon": DEFAULT_LS_EPSILON[space],
        "ecp_beta": DEFAULT_ECP_BETA[space],
    }
    unset = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    if unset:
        args = copy.copy(args)
        for name, value in unset.items():
            setattr(args, name, value)
    plan = DetectionPlan(args, train_dataset, calibration_dataset) if args.has_calibration_term else None
    return args, CogCalibLoss(args, space, plan)


CalibSFTTrainer.__doc__ = textwrap.dedent(CalibSFTTrainer.__doc__)
