from __future__ import annotations

import textwrap
import warnings

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from trl import SFTTrainer

from .calib_sft_config import CalibSFTConfig
from .knowledge import OnlineKnowledgeDetector, is_multiple_choice
from .losses import (
    calibration_term,
    full_lm_head_params,
    lm_head_transform,
    option_calibration_term,
    project_logits,
)
from .model_card import COGCALIB_CITATION, RCFT_CITATION, CalibrationModelCardMixin
from .trainer_utils import (
    ANSWER_COLUMN,
    CalibrationTrainerMixin,
    ForwardCapture,
    check_flag_column,
    example_index,
    predicting,
    shifted,
    unwrap_base,
)
from .utils import logger


class CalibSFTTrainer(CalibrationModelCardMixin, CalibrationTrainerMixin, SFTTrainer):
    """
    Trainer for CogCalib: supervised fine-tuning in which the tokens of examples the model already *knows* get a
    calibration loss (label smoothing, margin-based label smoothing or a confidence penalty) and the others plain
    cross-entropy. A drop-in replacement for [`~trl.SFTTrainer`], from "Towards Objective Fine-tuning: How LLMs' Prior
    Knowledge Causes Potential Poor Calibration?" (Wang et al., ACL 2025).

    What it adds to `SFTTrainer`:
    - the dataset hook: the `known` column (from `calib_trl.detect_known`) is carried through tokenisation, truncation
      and packing, and the collator turns it into a per-token tensor (`DataCollatorWithKnowledgeFlags`); with
      `detection="online"` the flags are computed in each step instead, from the answer NLL and a threshold re-fitted
      on `calibration_dataset`;
    - the loss: `SFTTrainer`'s token-normalised cross-entropy through TRL's fused LM head (unchanged), plus
      `calibration_weight * term` on the selected tokens, where `term = L_method - NLL` is computed without
      `[batch, seq, vocab]` logits (see `calib_trl.losses`), normalised by the same token count;
    - logging under `calib/` (known fraction, the NLL and calibration parts, the online threshold);
    - the model card: `calib-trl` and `cogcalib` tags, both papers' citations, calibration results when available.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
        peft_config, formatting_func, and the other keyword arguments: as in [`~trl.SFTTrainer`].
        calibration_dataset (`datasets.Dataset`, *optional*):
            Held-out rows of the training task (multiple choice, or prompt/completion for open-ended data), on which
            online detection re-fits its threshold. Required with `detection="online"`.

    Example:
    ```python
    >>> from calib_trl import CalibSFTConfig, CalibSFTTrainer, detect_known
    >>> train = detect_known(model, tokenizer, train, calibration_dataset=calib)
    >>> trainer = CalibSFTTrainer(model=model, args=CalibSFTConfig("out", calibration_loss="ls"), train_dataset=train)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "calib-trl", "cogcalib"]
    _name = "CalibSFT (CogCalib)"
    _paper = {
        "title": "Towards Objective Fine-tuning: How LLMs' Prior Knowledge Causes Potential Poor Calibration?",
        "id": "2505.20903",
        "citation": COGCALIB_CITATION + "\n\n" + RCFT_CITATION,
    }

    def __init__(self, model, args: CalibSFTConfig | None = None, *pos_args, calibration_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = CalibSFTConfig(f"{str(name).split('/')[-1]}-CalibSFT")
        elif not isinstance(args, CalibSFTConfig):
            raise TypeError(
                f"`args` must be a `CalibSFTConfig`, got {type(args).__name__}. Build one with the same arguments: "
                "`CalibSFTConfig(**sft_config.to_dict(), calibration_loss=...)`."
            )
        train_dataset = kwargs.get("train_dataset", pos_args[1] if len(pos_args) > 1 else None)
        eval_dataset = kwargs.get("eval_dataset", pos_args[2] if len(pos_args) > 2 else None)

        self._needs_flags = args.calibrates and args.apply_to == "known"
        self._precomputed = self._needs_flags and args.detection == "precomputed"
        self._space = self._resolve_space(args, train_dataset)
        if args.calibrates and (args.label_smoothing_factor > 0 or kwargs.get("compute_loss_func") is not None):
            raise ValueError(
                "`label_smoothing_factor` and `compute_loss_func` replace the fused LM head's loss and cannot be "
                "combined with a calibration loss; use `calibration_loss='ls'` with `apply_to='all'` for label "
                "smoothing on all tokens."
            )
        if train_dataset is not None and self._precomputed:
            self._check_known(train_dataset, args.known_column, "train")
        if eval_dataset is not None and self._precomputed:
            evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            for name, dataset in evals.items():
                check_flag_column(dataset, args.known_column, name)
        online = self._needs_flags and args.detection == "online"
        if online and (calibration_dataset is None or len(calibration_dataset) == 0):
            raise ValueError(
                "Online detection (`detection='online'`) needs a non-empty `calibration_dataset` passed to the trainer."
            )
        self._carried_columns, self._flag_columns = self._columns_to_carry(args)
        self._skipped_steps = 0

        super().__init__(model, args, *pos_args, **kwargs)

        if self._precomputed:
            self._install_flag_collator((args.known_column,), required=True)
        if self._space == "options":  # eval datasets without `choices` carry no answer marks
            self._install_flag_collator((ANSWER_COLUMN,), required=False)
        self._check_parallelism(online)
        self._capture = ForwardCapture(self.model, want_hidden=self._needs_hidden())
        self._head_transform = lm_head_transform(unwrap_base(self.model))
        self._answer_nll = args.answer_nll
        if self._answer_nll == "auto":
            self._answer_nll = "first" if train_dataset is not None and is_multiple_choice(train_dataset) else "mean"

        self.detector = None
        if online:
            if self._answer_nll == "first" and not self.completion_only_loss:
                raise ValueError(
                    "Online detection with `answer_nll='first'` reads each example's answer NLL at its first loss "
                    "token, which is the answer only with a completion-only loss. Use prompt/completion data with "
                    "`completion_only_loss` left on, or `answer_nll='mean'`."
                )
            self.detector = OnlineKnowledgeDetector(
                calibration_dataset,
                self._tokenizer,
                refit_steps=args.online_refit_steps,
                batch_size=args.online_batch_size,
                max_samples=args.online_calibration_samples,
            )
            if is_multiple_choice(self.detector.calibration_dataset) != (self._answer_nll == "first"):
                logger.warning(
                    "Online detection compares the training NLL (%s) with a threshold fitted on %s calibration rows; "
                    "use the same kind of data for both (or set `answer_nll`).",
                    "answer letter" if self._answer_nll == "first" else "mean completion NLL",
                    "multiple-choice" if is_multiple_choice(self.detector.calibration_dataset) else "open-ended",
                )
        elif calibration_dataset is not None:
            logger.info("`calibration_dataset` is only used by online detection; it is ignored here.")

    @staticmethod
    def _resolve_space(args, train_dataset) -> str:
        """The calibration space in use: `"auto"` resolved, and checked against the training data."""
        if not args.calibrates:
            return "vocabulary"
        mcq = train_dataset is not None and is_multiple_choice(train_dataset)
        space = args.calibration_space
        if space == "auto":
            space = "options" if mcq else "vocabulary"
            logger.info(
                "calibration_space='auto': the calibration term acts on the %s.",
                "option letters at the answer token" if mcq else "whole vocabulary",
            )
        elif space == "options" and not mcq:
            columns = train_dataset.column_names if train_dataset is not None else None
            raise ValueError(
                "`calibration_space='options'` calibrates the softmax over the option letters, which needs "
                "multiple-choice rows: prompt/completion with `choices` and `answer` columns (the train dataset has "
                f"{columns}). Use `calibration_space='vocabulary'` (or 'auto') for open-ended data."
            )
        return space

    def _reads_lm_head(self) -> bool:
        """Whether the loss reads the LM head's weight outside the model's forward (see `_check_parallelism`)."""
        if not self.args.calibrates:
            return False
        return self._space == "options" or self.args.calibration_loss in ("ls", "mbls")

    def _check_parallelism(self, online: bool) -> None:
        """Refuse the set-ups where per-token flags or per-example grouping would be silently wrong."""
        args = self.args
        config = self.accelerator.parallelism_config
        if (
            (self._flag_columns or online)
            and config is not None
            and (getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False))
        ):
            raise NotImplementedError(
                "Context and sequence parallelism shard each sequence across processes, and calib-trl's per-token "
                "flags (known, answer positions) and per-example answer NLLs are not sharded with it. Train without "
                "`cp_size`/`sp_size`, or with `calibration_loss='none'`."
            )
        if online and args.packing and args.packing_strategy != "bfd":
            raise ValueError(
                f"Online detection needs each example's tokens together; `packing_strategy={args.packing_strategy!r}` "
                "cuts examples across packed rows. Use `packing_strategy='bfd'`, or precomputed detection."
            )
        unwrapped = extract_model_from_parallel(self.model)
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            raise ValueError(
                "Prompt-learning PEFT methods (prompt tuning, prefix tuning, p-tuning) prepend virtual tokens, which "
                "shifts the per-token flags of calib-trl against the labels. Use LoRA or another adapter method."
            )
        plugin = args.deepspeed_plugin
        if self._reads_lm_head() and plugin is not None and plugin.zero_stage == 3:
            logger.warning(
                "%s reads the LM head outside the model's forward. Under DeepSpeed ZeRO-3 the head is gathered for it "
                "(TRL's `maybe_gather_lm_head_ctx`), but this path has not been verified on ZeRO-3; check the first "
                "steps against a ZeRO-2 run. CogCalib's `calibration_loss='ecp'` runs entirely inside TRL's fused "
                "head.",
                type(self).__name__ if not args.calibrates else f"calibration_loss={args.calibration_loss!r}",
            )

    def _columns_to_carry(self, args) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Dataset columns kept through preparation, and those the collator turns into per-token tensors."""
        columns = (args.known_column,) if self._precomputed else ()
        if self._space == "options":  # `choices` rides along to locate the answers, which become a per-token column
            return (*columns, "choices"), (*columns, ANSWER_COLUMN)
        return columns, columns

    def _post_tokenize(self, dataset, processing_class, args, dataset_name):
        dataset = super()._post_tokenize(dataset, processing_class, args, dataset_name)
        if self._space != "options" or ANSWER_COLUMN in dataset.column_names:
            return dataset
        if "choices" not in dataset.column_names:
            logger.warning(
                "The %s dataset has no `choices`: its loss has no option-letter calibration term (plain cross-entropy).",
                dataset_name,
            )
            return dataset
        return self._locate_answers(
            dataset, processing_class, args, dataset_name, invalid_rows=getattr(args, "invalid_rows", "raise")
        )

    def _needs_hidden(self) -> bool:
        """Whether the loss needs the backbone's hidden states: those that project them through the LM head do."""
        return self._reads_lm_head()

    # -- dataset -------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_known(dataset, column: str, name: str) -> None:
        n_known, n = check_flag_column(dataset, column, name)
        if n_known == 0:
            warnings.warn(
                f"No example of the {name} dataset is known: with `apply_to='known'` the loss is plain cross-entropy "
                "(standard SFT).",
                stacklevel=3,
            )
        elif n_known == n and n > 1:
            warnings.warn(
                f"Every example of the {name} dataset is known: the loss is the calibration loss on all data "
                "(`apply_to='all'`).",
                stacklevel=3,
            )

    # -- loss ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Once, on every path (calibration on or off, RCFT or not): NaN/inf is raised or skipped, never trained on
        if return_outputs:
            return self._guard_nonfinite(result[0], model), result[1]
        return self._guard_nonfinite(result, model)

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`SFTTrainer`'s loss plus the calibration term on the selected tokens (see the class docstring)."""
        mode = "train" if self.model.training else "eval"
        args = self.args
        known = inputs.pop(args.known_column, None) if self._precomputed else None
        answers = inputs.pop(ANSWER_COLUMN, None)
        if self._precomputed and known is None:
            raise KeyError(
                f"The batch has no `{args.known_column}` tensor. With a custom data collator, return it as a per-token "
                "tensor (see `calib_trl.DataCollatorWithKnowledgeFlags`)."
            )
        if not args.calibrates:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        if self.detector is not None and self.detector.due(self.state.global_step):
            report = self.detector.refit(model, self.state.global_step)
            logger.info("Online detection re-fitted at step %d:\n%s", self.state.global_step, report)

        with self._capture.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            out, hidden = self._capture.output, self._capture.hidden
        loss = result[0] if return_outputs else result

        mask = out.label_mask
        nll = -out.log_probs.detach()
        selected = self._select_tokens(inputs, known, nll, mask)
        if self._space == "options":
            term, n_eligible = self._option_term(model, inputs, hidden, selected, answers)
        else:
            term, n_eligible = self._vocabulary_term(model, inputs, hidden, out, selected), mask.sum()
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        extra = args.calibration_weight * term.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        loss = loss + extra * self._loss_scale(num_items_in_batch)

        self._log_calibration(mode, term, int(term.numel()), n_eligible, nll, mask)
        return (loss, result[1]) if return_outputs else loss

    def _select_tokens(self, inputs, known, nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss tokens of the examples that get the calibration term: all, the known ones, or the online-known."""
        if self.args.apply_to == "all":
            return mask
        if self.detector is not None:
            return mask & self._online_flags(inputs, nll, mask)
        return mask & (shifted(known, inputs) > 0.5)

    def _vocabulary_term(self, model, inputs, hidden, out, selected: torch.Tensor) -> torch.Tensor:
        """`L_method - NLL` over the whole vocabulary at every selected token (`calibration_space="vocabulary"`)."""
        args = self.args
        labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][:, 1:]
        return calibration_term(
            args.calibration_loss,
            predicting(hidden, inputs)[selected] if hidden is not None else None,
            labels[selected],
            out.entropy[selected] if out.entropy is not None else None,
            unwrap_base(model).get_output_embeddings() if hidden is not None else None,
            self._head_transform,
            ls_epsilon=args.ls_epsilon,
            mbls_margin=args.mbls_margin,
            mbls_lambda=args.mbls_lambda,
            ecp_beta=args.ecp_beta,
        )

    def _option_term(
        self, model, inputs, hidden, selected: torch.Tensor, answers
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `L_method - NLL` on the softmax over the option letters at the answer token of each selected example
        (`calibration_space="options"`), and the number of answers in the batch.
        """
        if answers is None:  # an eval batch without `choices`
            zero = hidden.new_zeros(0, dtype=torch.float32)
            return zero, torch.zeros((), device=hidden.device)
        at = shifted(answers, inputs) > 0
        picked = at & selected
        option_logits, num_choices = self._option_logits(
            model, predicting(hidden, inputs)[picked], shifted(answers, inputs)[picked]
        )
        labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][:, 1:]
        target = (labels[picked][:, None] == self._option_index.to(labels.device)[None, :]).long().argmax(-1)
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

    def _option_logits(self, model, hidden: torch.Tensor, num_choices: torch.Tensor):
        """
        float32 logits of the option letters at the given answer positions, from the `K` option rows of the LM head
        only (`K x hidden` per answer), and each row's number of options.
        """
        weight, bias, gather = full_lm_head_params(unwrap_base(model).get_output_embeddings())
        with gather:
            z = project_logits(hidden, weight, bias, self._head_transform, rows=self._option_index.to(hidden.device))
        return z, num_choices.long()

    @property
    def _option_index(self) -> torch.Tensor:
        """The option letters' token ids, as a tensor (set when the answers were located)."""
        return torch.tensor(self._option_ids)

    def _log_calibration(self, mode, term, n_selected, n_eligible, nll, mask) -> None:
        """`calib/` metrics of this step, reduced over processes."""
        args = self.args
        n_tok = mask.sum()
        device = nll.device
        self._log_mean(mode, "calib/known_fraction", torch.tensor(float(n_selected), device=device), n_eligible)
        self._log_mean(mode, "calib/nll", (nll * mask).sum(), n_tok)
        self._log_mean(mode, "calib/calibration_term", args.calibration_weight * term.detach().sum(), n_tok)
        if self.detector is not None and mode == "train":
            self._metrics[mode]["calib/threshold"].append(float(self.detector.threshold))
            self._metrics[mode]["calib/detection_accuracy"].append(self.detector.last_report.detection_accuracy)

    def _online_flags(self, inputs, nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token known flags from each example's answer NLL in this very batch."""
        ex = shifted(example_index(inputs, inputs["input_ids"].shape, self.padding_free), inputs)
        ex = torch.where(mask, ex, torch.full_like(ex, -1))
        ids, inverse = torch.unique(ex, return_inverse=True)
        n = ids.numel()
        if self._answer_nll == "first":
            # the first label position of each example holds its answer token
            pos = torch.arange(ex.shape[-1], device=ex.device).expand_as(ex)
            first = torch.full((n,), ex.shape[-1], device=ex.device, dtype=torch.long)
            first.scatter_reduce_(0, inverse[mask], pos[mask], reduce="amin")
            is_first = mask & (pos == first[inverse])
            example_nll = torch.zeros(n, device=nll.device).index_add_(0, inverse[is_first], nll[is_first])
        else:
            total = torch.zeros(n, device=nll.device).index_add_(0, inverse[mask], nll[mask])
            count = torch.zeros(n, device=nll.device).index_add_(0, inverse[mask], torch.ones_like(nll[mask]))
            example_nll = total / count.clamp(min=1)
        known = self.detector.flags(example_nll)
        return known[inverse] & mask

    # -- model card ----------------------------------------------------------------------------------------------

    def _card_settings(self) -> dict:
        a = self.args
        settings = {
            "calibration_loss": a.calibration_loss,
            "apply_to": a.apply_to,
            "calibration_weight": a.calibration_weight,
        }
        settings.update(
            {
                "ls": {"ls_epsilon": a.ls_epsilon},
                "mbls": {"mbls_margin": a.mbls_margin, "mbls_lambda": a.mbls_lambda},
                "ecp": {"ecp_beta": a.ecp_beta},
            }.get(a.calibration_loss, {})
        )
        if a.apply_to == "known":
            settings["detection"] = a.detection
        return settings

    # -- state ---------------------------------------------------------------------------------------------------

    def _calib_state(self) -> dict:
        state = super()._calib_state()
        if self.detector is not None:
            state["online_detector"] = self.detector.state_dict()
        return state

    def _load_calib_state(self, state: dict) -> None:
        super()._load_calib_state(state)
        if self.detector is not None and "online_detector" in state:
            self.detector.load_state_dict(state["online_detector"])


CalibSFTTrainer.__doc__ = textwrap.dedent(CalibSFTTrainer.__doc__)
