from __future__ import annotations

import copy
import logging
import textwrap
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from itertools import islice

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from transformers import (
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainingArguments,
)
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names

from .calib_sft_config import DEFAULT_ECP_BETA, CalibSFTConfig
from .evaluation.scoring import answer_rows
from .knowledge import KnowledgeRule, OnlineKnowledgeDetector, fit_knowledge_rule
from .losses import (
    calibration_term,
    full_lm_head_params,
    lm_head_transform,
    option_calibration_term,
    project_logits,
)
from .mcq import is_multiple_choice
from .model_card import COGCALIB_CITATION, RCFT_CITATION, CalibrationModelCardMixin
from .trainer_mixin import (
    ANSWER_COLUMN,
    CalibrationTrainerMixin,
    ForwardCapture,
    check_flag_column,
    check_not_empty,
    example_index,
    hidden_for_outputs,
    resolve_config,
    unwrap_base,
)

logger = logging.getLogger(__name__)


class CalibSFTTrainer(CalibrationModelCardMixin, CalibrationTrainerMixin, SFTTrainer):
    """
    Trainer for CogCalib: supervised fine-tuning in which the tokens of examples the model already *knows* get a
    calibration loss (label smoothing, margin-based label smoothing or a confidence penalty) and the others plain
    cross-entropy. A drop-in replacement for [`~trl.SFTTrainer`], from "Towards Objective Fine-tuning: How LLMs' Prior
    Knowledge Causes Potential Poor Calibration?" (Wang et al., ACL 2025).

    What it adds to `SFTTrainer`:
    - knowledge detection: with `detection="auto"` (the default), the flags come from the `known` column where the
      dataset has one, and are otherwise detected inside `train()`, before the first step (see
      `CalibSFTConfig.detection` for the paths, and the one log line that names the one taken); with
      `detection="online"` they are computed in each step, from the answer NLL and a threshold re-fitted on
      `calibration_dataset`;
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
            defaults.
        calibration_dataset (`datasets.Dataset`, *optional*):
            Held-out rows of the training task (multiple choice, prompt/completion for open-ended data, or
            conversational `messages`), on which detection fits its threshold: once with `detection="auto"`, every
            `online_refit_steps` with `detection="online"`, where it is required.

    Example (the one-class swap of a TRL script):
    ```python
    >>> from trl import SFTConfig
    >>> from calib_trl import CalibSFTTrainer  # instead of `from trl import SFTTrainer`
    >>> trainer = CalibSFTTrainer(model=model, args=SFTConfig("out"), train_dataset=train)
    >>> trainer.train()  # detects the known rows first, then trains with CoECP on them
    ```
    """

    _config_class = CalibSFTConfig
    _tag_names = ["trl", "sft", "calib-trl", "cogcalib"]
    _name = "CalibSFT (CogCalib)"
    _paper = {
        "title": "Towards Objective Fine-tuning: How LLMs' Prior Knowledge Causes Potential Poor Calibration?",
        "id": "2505.20903",
        "citation": COGCALIB_CITATION + "\n\n" + RCFT_CITATION,
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: CalibSFTConfig | TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config=None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        calibration_dataset: Dataset | None = None,
    ):
        args = resolve_config(args, self._config_class, model, self._name.split()[0])
        check_not_empty(train_dataset, "train")

        # Decided before `SFTTrainer.__init__`, which prepares the datasets through `_prepare_dataset`
        self._needs_flags = args.has_calibration_term and args.apply_to == "known"
        self._calibrate_all = args.has_calibration_term and args.apply_to == "all"
        self._precomputed = self._needs_flags and args.detection in ("precomputed", "auto")
        self._space = self._resolve_space(args, train_dataset)
        if args.ecp_beta is None:  # the space's own β, on a copy: the caller's config may serve another trainer
            args = copy.copy(args)
            args.ecp_beta = DEFAULT_ECP_BETA[self._space]
        self._train_rows, self._calibration_dataset = train_dataset, calibration_dataset
        self._undetected = {}  # `detection="auto"`: datasets without the flag column, by name, as passed
        self._flag_on_prepare = False  # after `__init__`, `detection="auto"` flags a dataset when it is prepared
        self._rule = None
        self._known_fractions = {}
        self.detection_summary = None
        self._carried_columns, self._flag_columns = self._columns_to_carry(args)
        self._skipped_steps = 0

        super().__init__(
            model,
            args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        # calib-trl's own checks, after SFTTrainer's
        if self._skip_prepare_dataset:  # `_prepare_dataset`, which runs `_check_dataset`, was skipped
            evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset} if eval_dataset else {}
            for name, dataset in {"train": train_dataset, **evals}.items():
                self._check_dataset(dataset, args, name)
        if args.has_calibration_term and (args.label_smoothing_factor > 0 or compute_loss_func is not None):
            raise ValueError(
                "`label_smoothing_factor` and `compute_loss_func` replace the fused LM head's loss and cannot be "
                "combined with a calibration loss; use `calibration_loss='ls'` with `apply_to='all'` for label "
                "smoothing on all tokens."
            )
        self._check_vision()
        self._virtual_tokens = self._prompt_learning_offset()
        self._capture = ForwardCapture(self.model, want_hidden=self._needs_hidden())
        self._head_transform = lm_head_transform(unwrap_base(self.model))
        self._answer_nll = args.answer_nll
        if self._answer_nll == "auto":
            self._answer_nll = "first" if is_multiple_choice(train_dataset) else "mean"

        self.detector = None
        if self._needs_flags and args.detection == "online":
            if calibration_dataset is None or len(calibration_dataset) == 0:
                raise ValueError(
                    "Online detection (`detection='online'`) needs a non-empty `calibration_dataset` passed to the "
                    "trainer."
                )
            self._setup_online(train_dataset, calibration_dataset, args.online_refit_steps)
        elif self._needs_flags and args.detection == "auto":
            self._setup_auto(train_dataset, calibration_dataset)
        elif calibration_dataset is not None:
            logger.info("`calibration_dataset` is only used to detect known examples; it is ignored here.")
        if self._precomputed:
            self._install_flag_collator((args.known_column,), required=True)
        if self._space == "options":  # eval datasets without `choices` carry no answer marks
            self._install_flag_collator((ANSWER_COLUMN,), required=False)
        self._check_parallelism(self.detector is not None)

    def _adds_terms(self) -> bool:
        """Whether the loss adds anything to `SFTTrainer`'s (otherwise no calib-trl check may refuse anything)."""
        return self.args.has_calibration_term

    def _check_vision(self) -> None:
        if self._is_vision_dataset and self._adds_terms():
            raise ValueError(
                "calib-trl's calibration terms do not support vision datasets: SFTTrainer builds their batches on the "
                "fly (`DataCollatorForVisionLanguageModeling`) and skips dataset preparation, through which calib-trl "
                "carries the known flags and answer positions, and knowledge detection scores text only. Train with "
                "`calibration_loss='none'` (exactly `SFTTrainer`), or on text-only rows."
            )

    def _prompt_learning_offset(self) -> int:
        """
        Positions a prompt-learning PEFT method prepends to each sequence: `num_virtual_tokens` for prompt tuning,
        p-tuning and multitask prompt tuning, with which `_to_outputs` aligns labels and flags; 0 for prefix tuning,
        whose virtual tokens sit in the attention cache. CPT, which also trains on the tokens it prepends, is refused
        with a calibration term.
        """
        unwrapped = extract_model_from_parallel(self.model)
        if not (is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning):
            return 0
        config = unwrapped.active_peft_config
        if config.peft_type in ("PREFIX_TUNING", "CARTRIDGE"):
            return 0
        if config.peft_type == "CPT" and self._adds_terms():
            raise ValueError(
                "CPT trains on the context tokens it prepends to each sequence, which have no known flags; calib-trl's "
                "calibration terms support prompt tuning, p-tuning and prefix tuning. Use one of those, or "
                "`calibration_loss='none'`."
            )
        return config.num_virtual_tokens

    @staticmethod
    def _resolve_space(args, train_dataset) -> str:
        """The calibration space in use: `"auto"` resolved, and checked against the training data."""
        if not args.has_calibration_term:
            return "vocabulary"
        mcq = train_dataset is not None and is_multiple_choice(train_dataset)
        space = args.calibration_space
        if space == "auto":
            why_not = CalibSFTTrainer._why_not_options(args, train_dataset) if mcq else None
            space = "options" if mcq and why_not is None else "vocabulary"
            if why_not is not None:
                logger.warning(
                    "calibration_space='auto': the rows are multiple choice, but %s, so the calibration term acts on "
                    "the whole vocabulary, which can move probability off the option letters (watch `answer_mass` in "
                    "the reports). Fix that, or set `calibration_space='vocabulary'` to silence this warning.",
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

    @staticmethod
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

    def _reads_lm_head(self) -> bool:
        """Whether the loss reads the LM head's weight outside the model's forward (see `_check_parallelism`)."""
        if not self.args.has_calibration_term:
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
        plugin = args.deepspeed_plugin
        if self._reads_lm_head() and plugin is not None and plugin.zero_stage == 3:
            logger.warning(
                "%s reads the LM head outside the model's forward. Under DeepSpeed ZeRO-3 the head is gathered for it "
                "(TRL's `maybe_gather_lm_head_ctx`), but this path has not been verified on ZeRO-3; check the first "
                "steps against a ZeRO-2 run. CogCalib's `calibration_loss='ecp'` runs entirely inside TRL's fused "
                "head.",
                type(self).__name__
                if not args.has_calibration_term
                else f"calibration_loss={args.calibration_loss!r}",
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

    # -- knowledge detection -------------------------------------------------------------------------------------

    def _setup_online(self, train_dataset, calibration_dataset, refit_steps: int | None) -> None:
        """Online detection: flags from each example's answer NLL in its training step against a fitted threshold."""
        args = self.args
        if not self._loss_covers_answers(train_dataset):
            columns = get_dataset_column_names(train_dataset)
            raise ValueError(
                "Online detection compares each training example's answer NLL, read off the loss tokens of its "
                f"training step, with the threshold; the train dataset's rows ({columns}) have no separate answer, so "
                "their loss covers the whole sequence. Convert conversational rows to prompt/completion "
                "(`{'prompt': messages[:-1], 'completion': messages[-1:]}`), or set `assistant_only_loss=True` so that "
                "the loss covers the assistant's messages only; or use `detection='auto'`, which flags the rows "
                "before training."
            )
        if self._answer_nll == "first" and not (self.completion_only_loss or args.assistant_only_loss):
            raise ValueError(
                "Online detection with `answer_nll='first'` reads each example's answer NLL at its first loss "
                "token, which is the answer only with a completion-only loss. Use prompt/completion data with "
                "`completion_only_loss` left on, or `answer_nll='mean'`."
            )
        self.detector = OnlineKnowledgeDetector(
            calibration_dataset,
            self._tokenizer,
            refit_steps=refit_steps,
            batch_size=args.online_batch_size,
            max_samples=args.online_calibration_samples,
            progress=not args.disable_tqdm,
        )
        if is_multiple_choice(self.detector.calibration_dataset) != (self._answer_nll == "first"):
            logger.warning(
                "Online detection compares the training NLL (%s) with a threshold fitted on %s calibration rows; "
                "use the same kind of data for both (or set `answer_nll`).",
                "answer letter" if self._answer_nll == "first" else "mean completion NLL",
                "multiple-choice" if is_multiple_choice(self.detector.calibration_dataset) else "open-ended",
            )

    def _loss_covers_answers(self, train_dataset) -> bool:
        """Whether a training step's loss tokens are each example's answer (what online detection reads)."""
        columns = get_dataset_column_names(train_dataset)
        completions = "prompt" in columns and "completion" in columns and self._formatting_func is None
        return completions or self.args.assistant_only_loss

    def _setup_auto(self, train_dataset, calibration_dataset) -> None:
        """`detection="auto"`: decide where the flags come from (see `CalibSFTConfig.detection`)."""
        args = self.args
        if "train" in self._undetected and (
            isinstance(train_dataset, IterableDataset) or answer_rows(train_dataset) is None
        ):
            self._undetected.clear()
            self._precomputed = False
            if isinstance(train_dataset, IterableDataset):
                self._setup_stream(train_dataset, calibration_dataset)
            else:
                self._calibrate_every_token(self._no_answers(train_dataset))
            return
        if not self._undetected:
            self._announce("column", f"from the `{args.known_column}` column of every dataset", logging.INFO)
            return
        # The others are flagged inside `train()` (`_ensure_flags`), when they can be
        if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
            raise ValueError(
                "Under DeepSpeed ZeRO-3 the weights are partitioned before training starts, so `detection='auto'` "
                "cannot score the rows ahead: flag them first with `calib_trl.detect_known` (or `calib-trl detect`), "
                "or use `detection='online'` with a `calibration_dataset`."
            )
        for name, dataset in self._undetected.items():
            if not isinstance(dataset, Dataset):
                why = "an `IterableDataset` cannot be scored ahead of training"
            elif answer_rows(dataset) is None:
                why = "its rows have no answer to score (prompt/completion or conversational `messages`)"
            else:
                continue
            raise ValueError(
                f"The {name} dataset has no `{args.known_column}` column, and `detection='auto'` cannot flag it: "
                f"{why}. Add the column (`calib_trl.detect_known`), or leave the dataset out."
            )

    def _setup_stream(self, train_dataset, calibration_dataset) -> None:
        """An `IterableDataset` cannot be scored ahead: online detection, with one fit before the first step."""
        source = "the calibration_dataset"
        if calibration_dataset is None:
            calibration_dataset = Dataset.from_list(list(islice(train_dataset, self.args.auto_detection_samples)))
            source = f"the first {len(calibration_dataset)} rows of the stream"
            if answer_rows(calibration_dataset) is None:
                self._calibrate_every_token(self._no_answers(calibration_dataset))
                return
        if not self._loss_covers_answers(train_dataset):
            self._calibrate_every_token(
                "the train dataset is an `IterableDataset`, which cannot be scored ahead, and its loss covers whole "
                "sequences (no prompt/completion columns, no `assistant_only_loss`), so no answer NLL can be read in "
                "its training steps"
            )
            return
        self._setup_online(train_dataset, calibration_dataset, refit_steps=None)
        self._announce(
            "stream",
            "the train dataset is an `IterableDataset`, which cannot be scored ahead: a threshold fitted once, before "
            f"the first step, on {source}, compared with each example's answer NLL in its training step",
        )

    def _calibrate_every_token(self, reason: str) -> None:
        self._precomputed, self._calibrate_all = False, True
        self._announce("no_answer", f"{reason}, so the calibration term goes to every token, as with `apply_to='all'`")

    @staticmethod
    def _no_answers(dataset) -> str:
        return (
            f"the train dataset's rows ({get_dataset_column_names(dataset)}) have no answer to score (neither "
            "prompt/completion nor conversational `messages`)"
        )

    def _announce(self, path: str, description: str, level: int = logging.WARNING) -> None:
        """The one log line that says where the known flags come from; also recorded for the model card."""
        self.detection_summary = {"detection": self.args.detection, "path": path, "description": description}
        if self.is_world_process_zero():
            logger.log(level, "Knowledge detection (detection=%r): %s.", self.args.detection, description)

    def _check_dataset(self, dataset, args, dataset_name: str) -> None:
        if not self._precomputed:
            return
        column = args.known_column
        if args.detection == "auto" and column not in get_dataset_column_names(dataset):
            self._undetected[dataset_name] = dataset
        elif dataset_name == "train":
            self._check_known(dataset, column, dataset_name)
        else:
            check_flag_column(dataset, column, dataset_name)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # A dataset prepared after `__init__` (passed to `evaluate`) is flagged by the same rule as the others
        if self._flag_on_prepare and args.known_column not in get_dataset_column_names(dataset):
            dataset = self._flag(dataset, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    @contextmanager
    def _detection_model(self):
        """The model as it is when detection runs (before the first step), with any PEFT adapter disabled."""
        if is_peft_model(self.model):
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model

    def _ensure_rule(self) -> KnowledgeRule:
        """Fit the rule `detection="auto"` flags rows by, once (see `calib_trl.knowledge.fit_knowledge_rule`)."""
        if self._rule is None:
            args = self.args
            rows = answer_rows(self._train_rows)
            calibration = self._calibration_dataset
            if calibration is not None:
                calibration = answer_rows(calibration)
                if calibration is None:
                    raise ValueError(
                        "The `calibration_dataset` has no answers to fit the known threshold on: it needs "
                        "prompt/completion columns or conversational `messages`."
                    )
            if rows is None and calibration is None:
                raise ValueError(
                    "`detection='auto'` fits its rule on the training rows, which have no answer to score; pass a "
                    "`calibration_dataset`, or add the `known` column to every dataset."
                )
            with self._detection_model() as model:
                self._rule = fit_knowledge_rule(
                    model,
                    self._tokenizer,
                    rows,
                    calibration,
                    batch_size=args.per_device_eval_batch_size,
                    progress=not args.disable_tqdm,
                    max_new_tokens=args.detection_max_new_tokens,
                )
            if self._rule.report is not None:
                logger.info("Knowledge threshold (detection='auto'):\n%s", self._rule.report)
                if not self._rule.report.fitted:
                    self._on_unfitted_threshold(self._rule.report, "Automatic detection")
        return self._rule

    def _flag(self, dataset, dataset_name: str):
        """`dataset` with the known column, from `detection="auto"`'s rule."""
        rule = self._ensure_rule()
        args = self.args
        with self._detection_model() as model:
            known = rule.flag(
                model,
                self._tokenizer,
                answer_rows(dataset),
                batch_size=args.per_device_eval_batch_size,
                progress=not args.disable_tqdm,
                desc=f"Detecting known rows ({dataset_name})",
            )
        self._known_fractions[dataset_name] = {"known_fraction": float(known.mean()), "rows": len(known)}
        return dataset.add_column(args.known_column, known.tolist())

    def _ensure_flags(self) -> None:
        """`detection="auto"`: flag, once, the datasets passed to the trainer without the known column."""
        if not self._undetected:
            return
        pending, self._undetected = self._undetected, {}
        args = self.args
        for name, dataset in pending.items():
            flagged = self._flag(dataset, name)
            packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
            prepared = self._prepare_dataset(
                flagged, self.processing_class, args, packing, self._formatting_func, name
            )
            if name == "train":
                self.train_dataset = prepared
            elif isinstance(self.eval_dataset, dict):
                self.eval_dataset[name] = prepared
            else:
                self.eval_dataset = prepared
        self._flag_on_prepare = True
        fractions = ", ".join(
            f"{name} {f['known_fraction']:.3f} of {f['rows']} rows" for name, f in self._known_fractions.items()
        )
        description = f"{self._rule.describe()}; known fraction: {fractions}"
        if "train" not in pending:
            description = f"the train dataset's from its `{args.known_column}` column; the others' by {description}"
        self._announce(self._rule.path if "train" in pending else "column", description)
        self.detection_summary.update(rule=self._rule.to_dict(), known=dict(self._known_fractions))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._ensure_flags()  # before a checkpoint is loaded: the flags are the starting model's
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_train_dataloader(self):
        self._ensure_flags()
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        self._ensure_flags()
        return super().get_eval_dataloader(eval_dataset)

    def _on_unfitted_threshold(self, report, what: str) -> None:
        """`unfitted_threshold`: stop, or go on with a loud warning, when no threshold separates known rows."""
        consequence = (
            "every example gets the calibration term"
            if report.threshold > 0
            else "no example gets the calibration term: training is plain cross-entropy (standard SFT)"
        )
        message = f"{what}: {report}. So {consequence}."
        if self.args.unfitted_threshold == "raise":
            raise ValueError(
                f"{message} Fit on rows the model answers partly right (more, or other, calibration rows), or set "
                "`unfitted_threshold='warn'` to train on."
            )
        logger.warning("NO KNOWLEDGE THRESHOLD. %s Set `unfitted_threshold='raise'` to stop instead.", message)

    def _refit_detector(self, model) -> None:
        report = self.detector.refit(model, self.state.global_step)
        logger.info("Online detection re-fitted at step %d:\n%s", self.state.global_step, report)
        if not report.fitted:
            self._on_unfitted_threshold(report, f"Online detection at step {self.state.global_step}")

    def _log_detector(self, mode: str) -> None:
        """The online threshold and its fit; detection accuracy is NaN while no threshold is fitted."""
        report = self.detector.last_report
        self._metrics[mode]["calib/threshold"].append(float(self.detector.threshold))
        self._metrics[mode]["calib/threshold_fitted"].append(float(report.fitted))
        self._metrics[mode]["calib/detection_accuracy"].append(report.detection_accuracy)

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
        if not args.has_calibration_term:
            return self._sft_loss(model, inputs, return_outputs, num_items_in_batch)

        if self.detector is not None and self.detector.due(self.state.global_step):
            self._refit_detector(model)

        with self._capture.capture():
            result = self._sft_loss(model, inputs, return_outputs, num_items_in_batch)
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

    def _output_labels(self, inputs) -> torch.Tensor:
        """The labels aligned with the fused head's outputs (virtual tokens of prompt-learning PEFT included)."""
        return inputs["shift_labels"] if "shift_labels" in inputs else self._to_outputs(inputs["labels"], inputs, -100)

    def _select_tokens(self, inputs, known, nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss tokens of the examples that get the calibration term: all, the known ones, or the online-known."""
        if self._calibrate_all:
            return mask
        if self.detector is not None:
            return mask & self._online_flags(inputs, nll, mask)
        return mask & (self._to_outputs(known, inputs) > 0.5)

    def _vocabulary_term(self, model, inputs, hidden, out, selected: torch.Tensor) -> torch.Tensor:
        """`L_method - NLL` over the whole vocabulary at every selected token (`calibration_space="vocabulary"`)."""
        args = self.args
        return calibration_term(
            args.calibration_loss,
            hidden_for_outputs(hidden, inputs)[selected] if hidden is not None else None,
            self._output_labels(inputs)[selected],
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
            return hidden.new_zeros(0, dtype=torch.float32), torch.zeros((), device=hidden.device)
        at = self._to_outputs(answers, inputs, 0) > 0
        picked = at & selected
        num_choices = self._to_outputs(answers, inputs, 0)[picked]
        option_logits, num_choices = self._option_logits(
            model, hidden_for_outputs(hidden, inputs)[picked], num_choices
        )
        labels = self._output_labels(inputs)[picked]
        target = (labels[:, None] == self._option_index.to(labels.device)[None, :]).long().argmax(-1)
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
            self._log_detector(mode)

    def _online_flags(self, inputs, nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token known flags from each example's answer NLL in this very batch."""
        ex = self._to_outputs(example_index(inputs, inputs["input_ids"].shape, self.padding_free), inputs)
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

    @property
    def calibration_space(self) -> str:
        """The distribution the calibration term acts on in this run: `"options"` or `"vocabulary"` (`"auto"` resolved)."""
        return self._space

    def _card_settings(self) -> dict:
        a = self.args
        settings = {
            "calibration_loss": a.calibration_loss,
            "apply_to": a.apply_to,
            "calibration_weight": a.calibration_weight,
        }
        if a.has_calibration_term:
            settings["calibration_space"] = f"{self._space} (auto)" if a.calibration_space == "auto" else self._space
        settings.update(
            {
                "ls": {"ls_epsilon": a.ls_epsilon},
                "mbls": {"mbls_margin": a.mbls_margin, "mbls_lambda": a.mbls_lambda},
                "ecp": {"ecp_beta": a.ecp_beta},
            }.get(a.calibration_loss, {})
        )
        if self.detection_summary is not None:
            summary = self.detection_summary
            settings["detection"] = f"{a.detection} ({summary['description']})"
        elif a.apply_to == "known":
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
