"""`CogCalibLoss`: CogCalib's part of a trainer, the calibration term on the tokens of the examples the model knows.

Per completion token of a selected example, `NLL` becomes `NLL + calibration_weight * (L_method - NLL)`, normalised
like `SFTTrainer`'s loss; the term (`calib_trl.losses`) is computed without `[batch, seq, vocab]` logits, over the whole
vocabulary or over the option letters at the answer token (`calibration_space`). Which examples are selected is the
`DetectionPlan`'s (all, the known ones, the online-known ones).
"""

from __future__ import annotations

import logging

import torch
from datasets import IterableDataset
from trl.data_utils import get_dataset_column_names

from ..core.capture import hidden_for_outputs, unwrap_base
from ..core.columns import ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN
from ..core.part import CalibrationPart, LossStep
from ..losses import calibration_term, option_calibration_term
from ..mcq import is_multiple_choice
from .detection import DetectionPlan

logger = logging.getLogger(__name__)


def resolve_space(args, train_dataset) -> str:
    """The calibration space in use: `"auto"` resolved, and checked against the training data."""
    if not args.has_calibration_term:
        return "vocabulary"
    mcq = train_dataset is not None and is_multiple_choice(train_dataset)
    space = args.calibration_space
    if space == "auto":
        why_not = _why_not_options(args, train_dataset) if mcq else None
        space = "options" if mcq and why_not is None else "vocabulary"
        if why_not is not None:
            logger.warning(
                "calibration_space='auto': the rows are multiple choice, but %s, so the calibration term acts on the "
                "whole vocabulary, which can move probability off the option letters (watch `answer_mass` in the "
                "reports). Fix that, or set `calibration_space='vocabulary'` to silence this warning.",
                why_not,
            )
        else:
            logger.info(
                "calibration_space='auto': the calibration term acts on the %s.",
                "option letters at the answer token" if mcq else "whole vocabulary",
            )
    elif space == "options" and not mcq:
        columns = get_dataset_column_names(train_dataset) if train_dataset is not None else None
        raise ValueError(
            "`calibration_space='options'` calibrates the softmax over the option letters, which needs "
            "multiple-choice rows: prompt/completion with `choices` and `answer` columns (the train dataset has "
            f"{columns}). Use `calibration_space='vocabulary'` (or 'auto') for open-ended data."
        )
    return space


def _why_not_options(args, train_dataset) -> str | None:
    """Why multiple-choice rows cannot get the option-space term (`calibration_space="auto"`), or None."""
    if isinstance(train_dataset, IterableDataset):
        return "an `IterableDataset` cannot be searched for the answer positions ahead (use a `datasets.Dataset`)"
    columns = get_dataset_column_names(train_dataset)
    if "prompt" not in columns or "completion" not in columns:
        return (
            f"they are not prompt/completion rows (columns {columns}), so the answer token cannot be located "
            "(convert them to `prompt`/`completion`)"
        )
    if args.packing and args.packing_strategy != "bfd":
        return f"`packing_strategy={args.packing_strategy!r}` can cut a question off its answer (use 'bfd')"
    return None


class CogCalibLoss(CalibrationPart):
    """
    CogCalib's part (see the module docstring). `space` is the calibration space in use (`"auto"` resolved by
    `resolve_space`); `plan` where the known flags come from.
    """

    name = "cogcalib"
    tags = ("cogcalib",)

    def __init__(self, args, space: str, plan: DetectionPlan | None):
        self.args = args
        self.space = space
        self.plan = plan
        self.adds_terms = args.has_calibration_term
        self.needs_hidden = self.reads_lm_head = self.adds_terms and (
            space == "options" or args.calibration_loss in ("ls", "mbls")
        )
        self.answer_terms = "the option-letter calibration term" if space == "options" else ""
        columns = (args.known_column,) if plan is not None and plan.uses_column else ()
        self.required_token_columns = columns
        if space == "options":  # `choices` rides along to locate the answers, which become per-token columns
            self.carried_columns = (*columns, "choices")
            self.token_columns = (*columns, ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN)
        else:
            self.carried_columns = self.token_columns = columns

    @property
    def per_example_nll(self) -> bool:
        return self.plan is not None and self.plan.per_example_nll

    def reads_lm_head_what(self) -> str:
        return f"calibration_loss={self.args.calibration_loss!r}"

    # -- datasets ------------------------------------------------------------------------------------------------

    def check_dataset(self, trainer, dataset, dataset_name: str) -> None:
        if self.plan is not None:
            self.plan.check_dataset(dataset, dataset_name)

    def before_prepare(self, trainer, dataset, dataset_name: str):
        return dataset if self.plan is None else self.plan.before_prepare(trainer, dataset, dataset_name)

    def prepare(self, trainer, dataset, args, dataset_name: str):
        if self.space != "options" or ANSWER_TOKEN_COLUMN in dataset.column_names:
            return dataset
        if "choices" not in dataset.column_names:
            logger.warning(
                "The %s dataset has no `choices`: its loss has no option-letter calibration term (plain cross-entropy).",
                dataset_name,
            )
            return dataset
        locator = trainer.answer_locator()
        return locator(dataset, trainer._tokenizer, args, dataset_name, getattr(args, "invalid_rows", "raise"))

    def setup(self, trainer) -> None:
        if self.plan is not None:
            self.plan.setup(trainer)
            if not self.plan.uses_column:  # every token, or online flags: no flag column travels
                self.required_token_columns = ()

    def before_batches(self, trainer, state: dict | None) -> None:
        if self.plan is not None:
            self.plan.before_batches(trainer, state)

    # -- the loss ------------------------------------------------------------------------------------------------

    def before_forward(self, trainer, model, mode: str) -> None:
        if self.plan is not None:
            self.plan.before_forward(trainer, model)

    def loss(self, trainer, step: LossStep, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus `calibration_weight * term`, normalised by `SFTTrainer`'s token count."""
        args, out, inputs = self.args, step.output, step.inputs
        mask = out.label_mask
        nll = -out.log_probs.detach()
        known = step.columns.get(args.known_column)
        selected = mask if self.plan is None else self.plan.selected(trainer, inputs, known, nll, mask)
        if self.space == "options":
            term, n_eligible = self._option_term(trainer, step, selected)
        else:
            term, n_eligible = self._vocabulary_term(trainer, step, selected), mask.sum()
        n = step.num_items_in_batch
        num_tokens = mask.sum() if n is None else n
        extra = args.calibration_weight * term.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        self._log(trainer, step, term, n_eligible, nll, mask)
        return loss + extra * trainer.loss_scale(n)

    def _vocabulary_term(self, trainer, step: LossStep, selected: torch.Tensor) -> torch.Tensor:
        """`L_method - NLL` over the whole vocabulary at every selected token (`calibration_space="vocabulary"`)."""
        args, hidden, out = self.args, step.hidden, step.output
        return calibration_term(
            args.calibration_loss,
            hidden_for_outputs(hidden, step.inputs)[selected] if hidden is not None else None,
            trainer.output_labels(step.inputs)[selected],
            out.entropy[selected] if out.entropy is not None else None,
            unwrap_base(step.model).get_output_embeddings() if hidden is not None else None,
            trainer.head_transform,
            ls_epsilon=args.ls_epsilon,
            mbls_margin=args.mbls_margin,
            mbls_lambda=args.mbls_lambda,
            ecp_beta=args.ecp_beta,
        )

    def _option_term(self, trainer, step: LossStep, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `L_method - NLL` on the softmax over the option letters at the answer token of each selected example
        (`calibration_space="options"`), and the number of answers in the batch.
        """
        hidden, inputs = step.hidden, step.inputs
        answers = step.columns.get(ANSWER_TOKEN_COLUMN)
        if answers is None:  # an eval batch without `choices`
            return hidden.new_zeros(0, dtype=torch.float32), torch.zeros((), device=hidden.device)
        at = trainer.to_outputs(answers, inputs, 0) > 0
        picked = at & selected
        num_choices = trainer.to_outputs(step.columns[NUM_CHOICES_COLUMN], inputs, 0)[picked].long()
        option_logits = trainer.option_logits(step.model, hidden_for_outputs(hidden, inputs)[picked])
        labels = trainer.output_labels(inputs)[picked]
        target = (labels[:, None] == trainer.option_index.to(labels.device)[None, :]).long().argmax(-1)
        args = self.args
        term = option_calibration_term(
            args.calibration_loss,
            option_logits,
            num_choices,
            target,
            ls_epsilon=args.ls_epsilon,
            mbls_margin=args.mbls_margin,
            mbls_lambda=args.mbls_lambda,
            ecp_beta=args.ecp_beta,
        )
        return term, at.sum()

    def _log(self, trainer, step: LossStep, term, n_eligible, nll, mask) -> None:
        """`calib/` metrics of this step, reduced over processes."""
        n_tok, device = mask.sum(), nll.device
        trainer.log_mean(
            step.mode, "calib/known_fraction", torch.tensor(float(term.numel()), device=device), n_eligible
        )
        trainer.log_mean(step.mode, "calib/nll", (nll * mask).sum(), n_tok)
        weighted = self.args.calibration_weight * term.detach().sum()
        trainer.log_mean(step.mode, "calib/calibration_term", weighted, n_tok)
        if self.plan is not None and self.plan.detector is not None and step.mode == "train":
            self.plan.log(step.logs)

    # -- state, model card ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {} if self.plan is None else self.plan.state_dict()

    def card_settings(self) -> dict:
        a = self.args
        settings = {
            "calibration_loss": a.calibration_loss,
            "apply_to": a.apply_to,
            "calibration_weight": a.calibration_weight,
        }
        if a.has_calibration_term:
            settings["calibration_space"] = f"{self.space} (auto)" if a.calibration_space == "auto" else self.space
        settings.update(
            {
                "ls": {"ls_epsilon": a.ls_epsilon},
                "mbls": {"mbls_margin": a.mbls_margin, "mbls_lambda": a.mbls_lambda},
                "ecp": {"ecp_beta": a.ecp_beta},
            }.get(a.calibration_loss, {})
        )
        summary = None if self.plan is None else self.plan.summary
        if summary is not None:
            settings["detection"] = f"{a.detection} ({summary['description']})"
        elif a.apply_to == "known":
            settings["detection"] = a.detection
        return settings
