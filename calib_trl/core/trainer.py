"""`CalibrationTrainer`: `SFTTrainer` plus the parts of one or more calibration methods.

What it adds to `SFTTrainer`, whatever the method:
- the configuration resolved as `SFTTrainer` resolves its own (`resolve_config`);
- the dataset hook: the columns the parts need are carried through TRL's preparation (packing included), each part
  checks and prepares each dataset, and the collator returns their per-token tensors;
- the loss: `SFTTrainer`'s own, through TRL's fused LM head, read by a forward hook (`ForwardCapture`) and passed
  through each part; a NaN/inf loss is raised or skipped (`nonfinite_loss`) on every path, reduced across processes;
- the saved state: each part's, in the checkpoints transformers writes (`CalibrationState`); a resume restores it,
  and `resume_from_checkpoint=True` skips an interrupted save;
- the model card (`CalibrationModelCardMixin`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

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
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import get_config_model_id

from ..losses import full_lm_head_params, lm_head_transform, project_logits
from .capture import ForwardCapture, shifted, unwrap_base
from .collator import DataCollatorWithKnowledgeFlags
from .columns import AnswerLocator, check_not_empty
from .config import CalibrationConfig
from .model_card import CalibrationModelCardMixin
from .part import CalibrationPart, LossStep
from .state import CalibrationState, checkpoint_state, last_complete_checkpoint

logger = logging.getLogger(__name__)


def resolve_config(args, config_class, model, suffix: str):
    """
    The trainer's configuration from its `args`, resolved as `SFTTrainer` resolves its own: `None` gives
    `config_class`'s defaults with the output directory `<model name>-<suffix>`; a `transformers.TrainingArguments` or
    `trl.SFTConfig` is converted (`config_class.from_training_arguments`: its fields kept, calib-trl's at their
    defaults), which is logged. The configuration of the other calib-trl trainer is refused.
    """
    if args is None:
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(f"{name.split('/')[-1]}-{suffix}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, CalibrationConfig):
        raise TypeError(
            f"`args` must be an instance of `{config_class.__name__}`, got {type(args).__name__}, which configures "
            f"another calib-trl trainer. Build a `{config_class.__name__}` with the settings you need."
        )
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"`args` must be an instance of `{config_class.__name__}`, `trl.SFTConfig` or `TrainingArguments`, got "
            f"{type(args).__name__}."
        )
    config = config_class.from_training_arguments(args)
    logger.warning(
        "`args` is a `%s`: converted to a `%s` with the same settings and calib-trl's own at their defaults.",
        type(args).__name__,
        config_class.__name__,
    )
    return config


class CalibrationTrainer(CalibrationModelCardMixin, SFTTrainer):
    """
    `SFTTrainer` with calibration parts (see the module docstring); its signature is `SFTTrainer`'s, plus
    `calibration_dataset`. Subclasses say which parts a configuration gets (`_make_parts`); `CalibSFTTrainer` and
    `RCFTTrainer` are the two.
    """

    _tag_names = ["trl", "sft", "calib-trl"]
    _config_class = CalibrationConfig

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: TrainingArguments | None = None,
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
        sft_kwargs = {k: v for k, v in locals().items() if k not in ("self", "model", "args", "calibration_dataset")}
        sft_kwargs.pop("__class__", None)
        args = resolve_config(args, self._config_class, model, self._name.split()[0])
        check_not_empty(train_dataset, "train")
        args, parts = self._make_parts(args, train_dataset, calibration_dataset)
        self.parts = parts
        self._skipped_steps = 0
        self._virtual_tokens = 0
        self._carried = tuple(dict.fromkeys(c for p in parts for c in p.carried_columns))
        self._token_columns = tuple(dict.fromkeys(c for p in parts for c in p.token_columns))
        self._resumed_state = None
        self._answers: AnswerLocator | None = None
        super().__init__(model, args, **sft_kwargs)

        if self._skip_prepare_dataset:  # `_prepare_dataset`, where the parts check each dataset, was skipped
            evals = self._eval_datasets(sft_kwargs.get("eval_dataset"))
            for name, dataset in {"train": sft_kwargs.get("train_dataset"), **evals}.items():
                for part in parts:
                    part.check_dataset(self, dataset, name)
        if self.adds_terms and (args.label_smoothing_factor > 0 or sft_kwargs.get("compute_loss_func") is not None):
            raise ValueError(
                "`label_smoothing_factor` and `compute_loss_func` replace the fused LM head's loss and cannot be "
                "combined with a calibration loss; use `calibration_loss='ls'` with `apply_to='all'` for label "
                "smoothing on all tokens."
            )
        if self._is_vision_dataset and self.adds_terms:
            raise ValueError(
                "calib-trl's calibration terms do not support vision datasets: SFTTrainer builds their batches on the "
                "fly (`DataCollatorForVisionLanguageModeling`) and skips dataset preparation, through which calib-trl "
                "carries the known flags and answer positions, and knowledge detection scores text only. Train with "
                "`calibration_loss='none'` (exactly `SFTTrainer`), or on text-only rows."
            )
        self._virtual_tokens = self._prompt_learning_offset()
        self._capture = ForwardCapture(self.model, want_hidden=any(p.needs_hidden for p in parts))
        self.head_transform = lm_head_transform(unwrap_base(self.model))
        for part in parts:
            part.setup(self)
        self._install_collator()
        self._check_parallelism()
        self.add_callback(CalibrationState.attach(self))

    def _check_parallelism(self) -> None:
        """Refuse the set-ups where per-token columns would be silently wrong; say where a path is unverified."""
        config = self.accelerator.parallelism_config
        sharded = config is not None and (getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False))
        if sharded and (self._token_columns or any(getattr(p, "per_example_nll", False) for p in self.parts)):
            raise NotImplementedError(
                "Context and sequence parallelism shard each sequence across processes, and calib-trl's per-token "
                "flags (known, answer positions) and per-example answer NLLs are not sharded with it. Train without "
                "`cp_size`/`sp_size`, or with `calibration_loss='none'`."
            )
        plugin = self.args.deepspeed_plugin
        readers = [p for p in self.parts if p.reads_lm_head]
        if readers and plugin is not None and plugin.zero_stage == 3:
            logger.warning(
                "%s reads the LM head outside the model's forward. Under DeepSpeed ZeRO-3 the head is gathered for it "
                "(TRL's `maybe_gather_lm_head_ctx`), but this path has not been verified on ZeRO-3; check the first "
                "steps against a ZeRO-2 run. CogCalib's `calibration_loss='ecp'` runs entirely inside TRL's fused "
                "head.",
                readers[0].reads_lm_head_what(),
            )

    def _make_parts(self, args, train_dataset, calibration_dataset) -> tuple:
        """The method's parts, decided before `SFTTrainer.__init__` prepares the datasets, and the arguments they use."""
        raise NotImplementedError

    @staticmethod
    def _eval_datasets(eval_dataset) -> dict:
        if isinstance(eval_dataset, dict):
            return eval_dataset
        return {"eval": eval_dataset} if eval_dataset is not None else {}

    @property
    def adds_terms(self) -> bool:
        """Whether the loss adds anything to `SFTTrainer`'s (otherwise no calib-trl check may refuse anything)."""
        return any(part.adds_terms for part in self.parts)

    def part(self, name: str) -> CalibrationPart | None:
        return next((p for p in self.parts if p.name == name), None)

    @property
    def detection_summary(self) -> dict | None:
        """Where the known flags came from (the path, its description, the rule and the known fractions), or `None`."""
        plan = next((p.plan for p in self.parts if getattr(p, "plan", None) is not None), None)
        return None if plan is None else plan.summary

    @property
    def detector(self):
        """The online knowledge threshold (`detection="online"`, or `"auto"` on a stream), or `None`."""
        plan = next((p.plan for p in self.parts if getattr(p, "plan", None) is not None), None)
        return None if plan is None else plan.detector

    def _prompt_learning_offset(self) -> int:
        """
        Positions a prompt-learning PEFT method prepends to each sequence: `num_virtual_tokens` for prompt tuning,
        p-tuning and multitask prompt tuning, with which `to_outputs` aligns labels and flags; 0 for prefix tuning,
        whose virtual tokens sit in the attention cache. CPT, which also trains on the tokens it prepends, is refused
        with a calibration term.
        """
        unwrapped = extract_model_from_parallel(self.model)
        if not (is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning):
            return 0
        config = unwrapped.active_peft_config
        if config.peft_type in ("PREFIX_TUNING", "CARTRIDGE"):
            return 0
        if config.peft_type == "CPT" and self.adds_terms:
            raise ValueError(
                "CPT trains on the context tokens it prepends to each sequence, which have no known flags; calib-trl's "
                "calibration terms support prompt tuning, p-tuning and prefix tuning. Use one of those, or "
                "`calibration_loss='none'`."
            )
        return config.num_virtual_tokens

    # -- the dataset hook ---------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        for part in self.parts:
            dataset = part.before_prepare(self, dataset, dataset_name)
        raw = dataset
        carried = [c for c in self._carried if c in get_dataset_column_names(dataset)]
        if not carried:
            dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            for part in self.parts:
                part.check_dataset(self, raw, dataset_name)
            return dataset
        # TRL's maps keep extra columns; only packing drops them. Tokenize and build labels as TRL does (without
        # truncation when packing, which handles the length itself), then pack the per-token columns.
        prep_args = args
        if packing:
            prep_args = copy.copy(args)
            prep_args.max_length = None
            prep_args.shuffle_dataset = False
        n_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, prep_args, False, formatting_func, dataset_name)
        for part in self.parts:
            part.check_dataset(self, raw, dataset_name)
        if packing and not isinstance(dataset, Dataset):
            raise ValueError(
                f"Packing an `IterableDataset` would drop its `{carried[0]}` column; pack a `datasets.Dataset`, or "
                "disable packing."
            )
        if n_before is not None and len(dataset) < n_before:
            dropped = n_before - len(dataset)
            for part in self.parts:
                part.rows_dropped(self, dropped, n_before, args, dataset_name)
            logger.warning(
                "%d of the %d rows of the %s dataset were dropped: `max_length=%s` truncation left them without any "
                "completion token. Raise `max_length` to keep them.",
                dropped,
                n_before,
                dataset_name,
                args.max_length,
            )
        for part in self.parts:
            dataset = part.prepare(self, dataset, args, dataset_name)
        if not packing:
            return dataset
        from .columns import spread_and_pack

        # a dataset prepared before its flags exist (`detection="auto"`) is prepared again once they do
        columns = [c for c in self._token_columns if c in dataset.column_names]
        return spread_and_pack(dataset, columns, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in self._token_columns:  # the carried-only columns have served their purpose by now
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _install_collator(self) -> None:
        """Swap TRL's default collator for the flag-carrying one, keeping its settings (padding-free included)."""
        if not self._token_columns:
            return
        columns = self._token_columns
        collator = self.data_collator
        if type(collator) is DataCollatorForLanguageModeling:
            self.data_collator = DataCollatorWithKnowledgeFlags(
                pad_token_id=collator.pad_token_id,
                padding_free=collator.padding_free,
                return_position_ids=collator.return_position_ids,
                pad_to_multiple_of=collator.pad_to_multiple_of,
                return_tensors=collator.return_tensors,
                flag_columns=columns,
                required=False,
                required_columns=tuple(c for p in self.parts for c in p.required_token_columns),
            )
        elif not isinstance(collator, DataCollatorWithKnowledgeFlags):
            logger.warning(
                "A custom data collator is in use: it must return the %s column(s) as per-token tensors (see "
                "`calib_trl.DataCollatorWithKnowledgeFlags`), or training stops at the first batch.",
                ", ".join(columns),
            )

    def answer_locator(self) -> AnswerLocator:
        """The trainer's one `AnswerLocator`: every dataset's option letters must map to the same tokens."""
        if self._answers is None:
            terms = [p.answer_terms for p in self.parts if getattr(p, "answer_terms", None)]
            self._answers = AnswerLocator(self.chat_template, " and ".join(reversed(terms)))
        return self._answers

    @property
    def option_ids(self) -> list[int] | None:
        """The token of each option letter at the answer token (once answers were located)."""
        return None if self._answers is None else self._answers.option_ids

    @property
    def option_index(self) -> torch.Tensor:
        return torch.tensor(self.option_ids)

    def option_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """
        float32 logits of the option letters at the given answer positions, from the `K` option rows of the LM head
        only (`K x hidden` per answer).
        """
        weight, bias, gather = full_lm_head_params(unwrap_base(model).get_output_embeddings())
        with gather:
            return project_logits(hidden, weight, bias, self.head_transform, rows=self.option_index.to(hidden.device))

    # -- before the first batch --------------------------------------------------------------------------------

    def _before_batches(self) -> None:
        state = self._resumed_state
        for part in self.parts:
            part_state = None
            if state is not None and part.name in state:
                if isinstance(state[part.name], dict):
                    part_state = {**state[part.name], "checkpoint": state["checkpoint"]}
                else:
                    logger.warning(
                        "%s: calib-trl's saved %s state is damaged (%r); it starts afresh.",
                        state["checkpoint"],
                        part.name,
                        state[part.name],
                    )
            part.before_batches(self, part_state)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        self._resumed_state = None
        if isinstance(checkpoint, str):
            state = checkpoint_state(checkpoint)
            if state is None:
                logger.warning(
                    "%s holds no calib-trl state (it was written by another trainer): the calib-trl state starts "
                    "afresh.",
                    checkpoint,
                )
            else:
                self._restore(state, checkpoint)
        self._before_batches()  # before the checkpoint's weights are loaded: detection reads the starting model
        self._resumed_state = None
        return super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _restore(self, state: dict, checkpoint: str) -> None:
        skipped = state.get("skipped_steps", 0)
        if not isinstance(skipped, int):
            logger.warning("%s: calib-trl's `skipped_steps` is damaged (%r); counting from 0.", checkpoint, skipped)
            skipped = 0
        self._skipped_steps = skipped
        self._resumed_state = {**state, "checkpoint": checkpoint}

    def get_train_dataloader(self):
        self._before_batches()
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        self._before_batches()
        return super().get_eval_dataloader(eval_dataset)

    # -- the saved state -----------------------------------------------------------------------------------------

    def calibration_state(self) -> dict:
        """What a resumed run needs: each part's state and the skipped-step count (saved in every checkpoint)."""
        state = {"skipped_steps": self._skipped_steps}
        for part in self.parts:
            part_state = part.state_dict()
            if part_state:
                state[part.name] = part_state
        return state

    # -- the loss ------------------------------------------------------------------------------------------------

    def to_outputs(self, tensor: torch.Tensor, inputs: dict, fill: float | None = None) -> torch.Tensor:
        """
        A per-token tensor of the batch (`[batch, seq]`: labels, flags, example index) aligned with the fused head's
        outputs. Prompt-learning PEFT prepends `_virtual_tokens` positions to each sequence, and `-100` to its labels,
        before the model shifts them; the same columns are prepended here (`fill`, or a copy of each row's first
        value) before `shifted`.
        """
        n = self._virtual_tokens
        if n:
            front = tensor[:, :1].expand(-1, n) if fill is None else tensor.new_full((tensor.shape[0], n), fill)
            tensor = torch.cat([front, tensor], dim=1)
        return shifted(tensor, inputs)

    def output_labels(self, inputs) -> torch.Tensor:
        """The labels aligned with the fused head's outputs (virtual tokens of prompt-learning PEFT included)."""
        return inputs["shift_labels"] if "shift_labels" in inputs else self.to_outputs(inputs["labels"], inputs, -100)

    def loss_scale(self, num_items_in_batch) -> float:
        """`SFTTrainer`'s scaling of a token-normalised loss under `average_tokens_across_devices`."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes // self.get_tp_size()
        return 1

    def log_mean(self, mode: str, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Log `total / count` summed over processes (both tensors are reduced)."""
        total = self.accelerator.gather_for_metrics(total.detach().float().reshape(1)).sum()
        count = self.accelerator.gather_for_metrics(count.detach().float().reshape(1)).sum()
        self._metrics[mode][name].append((total / count).item() if count > 0 else 0.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """
        `SFTTrainer`'s loss, passed through each part that adds a term; a NaN/inf loss is raised or skipped
        (`nonfinite_loss`), never trained on, on every path.
        """
        mode = "train" if self.model.training else "eval"
        columns = {c: inputs.pop(c) for c in self._token_columns if c in inputs}
        parts = [p for p in self.parts if p.adds_terms]
        if not parts:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self._guarded(result, model, return_outputs)
        for part in parts:
            part.before_forward(self, model, mode)
        with self._capture.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            step = LossStep(
                model,
                inputs,
                columns,
                self._capture.output,
                self._capture.hidden,
                num_items_in_batch,
                mode,
                self._metrics[mode],
            )
            loss = result[0] if return_outputs else result
            for part in parts:
                loss = part.loss(self, step, loss)
        return self._guarded((loss, result[1]) if return_outputs else loss, model, return_outputs)

    def _guarded(self, result, model, return_outputs: bool):
        if return_outputs:
            return self._guard_nonfinite(result[0], model), result[1]
        return self._guard_nonfinite(result, model)

    def _guard_nonfinite(self, loss: torch.Tensor, model) -> torch.Tensor:
        """
        Raise, or skip the micro-batch, when the loss is NaN/inf on any process. The check is reduced across processes,
        so that all of them raise or skip together (one rank raising alone would leave the others waiting in the
        gradient all-reduce, and skipping on one rank alone would apply the others' gradients at reduced weight).
        """
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        mode = "train" if self.model.training else "eval"
        if not bad.item():
            if mode == "train" and self.args.nonfinite_loss == "skip":
                self._metrics[mode]["calib/skipped_steps"] = [self._skipped_steps]
            return loss
        if self.args.nonfinite_loss == "raise" or mode == "eval":
            raise FloatingPointError(
                f"The {mode} loss is {loss.item()} at step {self.state.global_step} (on this or another process). Lower "
                "the learning rate, check the data, or set `nonfinite_loss='skip'` to skip such micro-batches (they are "
                "counted in `calib/skipped_steps`)."
            )
        self._skipped_steps += 1
        self._metrics[mode]["calib/skipped_steps"] = [self._skipped_steps]
        logger.warning(
            "Non-finite loss at step %d: micro-batch skipped (%d so far).", self.state.global_step, self._skipped_steps
        )
        # A zero that still reaches every trainable parameter, so DDP's gradient all-reduce sees them all
        params = [p for p in model.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].sum() * 0.0 for p in params), torch.zeros((), device=loss.device))

    # -- the model card ------------------------------------------------------------------------------------------

    def _card_settings(self) -> dict:
        settings = {}
        for part in self.parts:
            settings.update(part.card_settings())
        return settings
