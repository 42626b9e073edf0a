"""Machinery shared by `CalibSFTTrainer` and `RCFTTrainer` on top of `SFTTrainer`.

- `ForwardCapture`: the fused LM head's output and the backbone's last hidden state of the training forward, read
  through forward hooks, so the trainers reuse `SFTTrainer.compute_loss` unchanged and add their term on top.
- `CalibrationTrainerMixin`: carrying extra per-example columns through TRL's dataset preparation (including packing,
  where TRL keeps only `input_ids` and `labels`), the answer position of multiple-choice rows, calib-trl's dataset
  checks after TRL's own, the alignment of per-token tensors with prompt-learning virtual tokens, the flag collator,
  checkpointed trainer state, NaN/inf handling.
- `resolve_config`, `check_not_empty`: the trainers' `args` and training dataset, resolved and checked as
  `SFTTrainer` resolves its own.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.data_utils import get_dataset_column_names, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import FusedCausalLMOutput, get_config_model_id

from .calibration_config import CalibrationConfig
from .collator import DataCollatorWithKnowledgeFlags, _as_number
from .mcq import LETTERS, answer_index
from .tokenization import OptionTokenLookup, template_kwargs

logger = logging.getLogger(__name__)


STATE_FILE = "calib_trl_state.json"

# Per-token column marking each multiple-choice row's answer token with the row's number of options (0 elsewhere):
# where RCFT and the option-space calibration terms read the option-letter logits
ANSWER_COLUMN = "answer_num_choices"


def unwrap_base(model):
    """
    The `PreTrainedModel` (the model TRL patches with its fused LM head) under the wrappers of distributed training
    (DDP, DeepSpeed, ...: `compute_loss` receives the wrapped model) and of PEFT.
    """
    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft_model(model) else model


class ForwardCapture:
    """
    Reads, during one training forward, the fused LM head output (a `FusedCausalLMOutput`) of the top-level model and
    the last hidden state of its backbone. Hooks on the modules themselves keep working under PEFT, DDP, FSDP and
    DeepSpeed, which all end up calling these modules; only the first fused call inside `capture()` is kept.
    """

    def __init__(self, model, want_hidden: bool):
        self.model = model
        self.want_hidden = want_hidden
        self.active = False
        self.output = None
        self.hidden = None
        self._handles = [model.register_forward_hook(self._on_output)]
        if want_hidden:
            self._handles.append(unwrap_base(model).base_model.register_forward_hook(self._on_hidden))

    def _on_output(self, module, args, output):
        if self.active and self.output is None and isinstance(output, FusedCausalLMOutput):
            self.output = output

    def _on_hidden(self, module, args, output):
        if self.active and self.hidden is None:
            self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    @contextmanager
    def capture(self):
        """Capture within this block; re-entrant, so an inner block of a subclass shares the outer capture."""
        if self.active:
            yield self
            return
        self.output, self.hidden, self.active = None, None, True
        try:
            yield self
        finally:
            self.output, self.hidden, self.active = None, None, False


def shifted(tensor: torch.Tensor, inputs: dict) -> torch.Tensor:
    """
    Align a per-token input tensor (e.g. the flag of each token) with the fused head's outputs, whose position `t`
    predicts token `t + 1`: positions `1:`, or, when the labels come pre-shifted (`shift_labels`), the same shift
    padded with 0 at the end to keep the sequence length.
    """
    if "shift_labels" in inputs:
        return torch.nn.functional.pad(tensor[:, 1:], (0, 1))
    return tensor[:, 1:]


def hidden_for_outputs(hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
    """
    The hidden states aligned with the fused head's outputs (each predicts the next token's label): positions `:-1`,
    unless the labels come pre-shifted.
    """
    return hidden if "shift_labels" in inputs else hidden[:, :-1]


def example_index(inputs: dict, shape: torch.Size, padding_free: bool) -> torch.Tensor:
    """
    Index of the example each token belongs to, `[batch, seq]`: the row in a padded batch, the segment (delimited by
    `position_ids == 0`) in a padding-free or packed one.
    """
    rows = torch.arange(shape[0], device=inputs["input_ids"].device)[:, None].expand(shape)
    if padding_free and "position_ids" in inputs:
        starts = (inputs["position_ids"] == 0).long()
        return rows * shape[1] + starts.cumsum(-1) - 1
    return rows


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


def check_not_empty(dataset, dataset_name: str) -> None:
    """An empty dataset, which `SFTTrainer` would stop on with a bare `StopIteration` when it reads its first row."""
    if isinstance(dataset, Dataset):
        empty = len(dataset) == 0
    elif isinstance(dataset, IterableDataset):
        empty = next(iter(dataset), None) is None
    else:
        return
    if empty:
        raise ValueError(
            f"The {dataset_name} dataset is empty: there is nothing to train on. Check the split you loaded and any "
            "filtering applied to it."
        )


def check_flag_column(dataset, column: str, dataset_name: str) -> tuple[int, int]:
    """
    Validate a per-example 0/1 column (`known`): present, boolean-like, no NaN. Returns `(n_true, n)` for a `Dataset`
    (first example only for an `IterableDataset`).
    """
    if column not in get_dataset_column_names(dataset):
        raise ValueError(
            f"The {dataset_name} dataset has no `{column}` column, which `detection='precomputed'` needs. Run "
            f"`calib_trl.detect_known(model, tokenizer, dataset, calibration_dataset)` first (or `calib-trl detect`), "
            f"or set `detection='online'` and pass a `calibration_dataset` to the trainer."
        )
    values = [next(iter(dataset))[column]] if isinstance(dataset, IterableDataset) else dataset[column]
    total = 0.0
    for i, value in enumerate(values):
        if isinstance(value, (list, tuple)):
            raise TypeError(
                f"`{column}` (row {i}) of the {dataset_name} dataset is a list; it must hold one boolean per example."
            )
        try:
            number = _as_number(value, column)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (row {i} of the {dataset_name} dataset)") from None
        if number not in (0.0, 1.0):
            raise ValueError(
                f"`{column}` (row {i}) of the {dataset_name} dataset is {value!r}; it must be True/False or 0/1."
            )
        total += number
    return int(total), len(values)


class CalibrationTrainerMixin:
    """Mixed into `SFTTrainer` subclasses before it in the MRO."""

    # Dataset columns the trainer carries through preparation (set in `__init__` before `super().__init__`), and the
    # columns its collator turns into per-token tensors (a subset of them, or columns `_post_tokenize` derives)
    _carried_columns: tuple[str, ...] = ()
    _flag_columns: tuple[str, ...] = ()
    # Positions a prompt-learning PEFT method (prompt tuning, p-tuning) prepends to every sequence
    _virtual_tokens: int = 0

    def _check_dataset(self, dataset, args, dataset_name: str) -> None:
        """
        Hook: calib-trl's own checks of a dataset as the user passed it. Called after `SFTTrainer` has prepared (and
        validated) it, so that TRL's errors come first; `calib-trl` refuses only what it cannot do.
        """

    def _post_tokenize(self, dataset, processing_class, args, dataset_name):
        """Hook on the tokenized (unpacked) dataset, before packing; `RCFTTrainer` locates answer positions here."""
        return dataset

    def _on_rows_dropped(self, dropped: int, total: int, args, dataset_name: str) -> None:
        """TRL drops rows whose whole completion `max_length` truncation cut off; say so rather than lose them."""
        logger.warning(
            "%d of the %d rows of the %s dataset were dropped: `max_length=%s` truncation left them without any "
            "completion token. Raise `max_length` to keep them.",
            dropped,
            total,
            dataset_name,
            args.max_length,
        )

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        raw = dataset
        carried = [c for c in self._carried_columns if c in get_dataset_column_names(dataset)]
        if not carried:
            dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            self._check_dataset(raw, args, dataset_name)
            return dataset
        # TRL's maps keep extra columns; only packing drops them. Tokenize and build labels as TRL does (without
        # truncation when packing, which handles the length itself), then pack the flag columns per token.
        prep_args = args
        if packing:
            prep_args = copy.copy(args)
            prep_args.max_length = None
            prep_args.shuffle_dataset = False
        n_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, prep_args, False, formatting_func, dataset_name)
        self._check_dataset(raw, args, dataset_name)
        if packing and not isinstance(dataset, Dataset):
            raise ValueError(
                f"Packing an `IterableDataset` would drop its `{carried[0]}` column; pack a `datasets.Dataset`, or "
                "disable packing."
            )
        if n_before is not None and len(dataset) < n_before:
            self._on_rows_dropped(n_before - len(dataset), n_before, args, dataset_name)
        dataset = self._post_tokenize(dataset, processing_class, args, dataset_name)
        if not packing:
            return dataset
        # `detection="auto"` prepares a dataset once before its flags exist (and again once they do): spread what it has
        flags = [c for c in self._flag_columns if c in dataset.column_names]

        def per_token(example):
            n = len(example["input_ids"])
            return {c: [_as_number(example[c], c)] * n for c in flags if not isinstance(example[c], (list, tuple))}

        map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Spreading {', '.join(flags)} over tokens"}
        dataset = dataset.map(per_token, **map_kwargs)
        dataset = dataset.select_columns(["input_ids", "labels", *flags])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        map_kwargs["desc"] = f"Packing {dataset_name} dataset"
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _locate_answers(self, dataset, processing_class, args, dataset_name: str, invalid_rows: str = "raise"):
        """
        Add the per-token `ANSWER_COLUMN` to a tokenized multiple-choice dataset, and set `self._option_ids` (the token
        of each option letter at the answer position).

        The answer token is read off `SFTTrainer`'s own tokenization: the first completion token, i.e. the first token
        with a label (completion-only loss) or the first one of `completion_mask` (which TRL keeps when the loss also
        covers the prompt), so tools and `chat_template_kwargs` are accounted for exactly as in training. It must be
        the right option's letter. Rows where it is not, or where truncation cut it off, raise a `ValueError` naming
        the row, or with `invalid_rows="exclude"` get no answer mark (they keep their cross-entropy) and are counted
        in `self._excluded_rows`.
        """
        tok = getattr(processing_class, "tokenizer", processing_class)
        if args.packing and args.packing_strategy != "bfd":
            raise ValueError(
                f"Reading option-letter logits needs each question whole: `packing_strategy={args.packing_strategy!r}` "
                "can cut a question off its answer. Use `packing_strategy='bfd'`."
            )
        columns = dataset.column_names
        needed = ["prompt", "completion", "choices", "answer", "input_ids", "labels"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"Locating the answer of each row of the {dataset_name} dataset needs prompt/completion rows with "
                f"`choices` and `answer`; the prepared dataset lacks {missing}."
            )
        extra = [c for c in ("completion_mask", "tools", "chat_template_kwargs") if c in columns]
        lookup = OptionTokenLookup(tok, max(len(c) for c in dataset["choices"]), self.chat_template)
        # With packing, preparation skips truncation and bfd packing keeps the first `max_length` tokens
        limit = args.max_length if args.packing and args.max_length is not None else None
        markers, problems = [], []
        option_ids = getattr(self, "_option_ids", None)
        for i, row in enumerate(dataset.select_columns(needed + extra)):
            ids = row["input_ids"]
            position = _first_completion_token(row, args.truncation_mode)
            marker = [0] * len(ids)
            kept = len(ids) if limit is None else min(len(ids), limit)
            if position is None or not 0 <= position < kept:
                markers.append(marker)
                problems.append(
                    (
                        i,
                        "it has no completion token"
                        if position is None
                        else f"its answer position ({position}) is "
                        f"outside the {kept} tokens kept (`max_length={args.max_length}` cuts it off)",
                    )
                )
                continue
            letters = lookup(row["prompt"], ids[:position], row["completion"], template_kwargs(row))
            if option_ids is None:
                option_ids = letters
            elif letters[: len(option_ids)] != option_ids[: len(letters)]:
                raise ValueError(
                    f"Row {i} of the {dataset_name} dataset ends its prompt differently from the first row, so its "
                    "option letters map to other tokens; one prompt format per dataset is needed to read option "
                    "logits."
                )
            k = len(row["choices"])
            answer = answer_index(row["answer"], k, row=i)
            if ids[position] != letters[answer]:
                problems.append(
                    (
                        i,
                        f"its completion starts with {tok.decode([ids[position]])!r} instead of the answer letter "
                        f"{LETTERS[answer]!r}",
                    )
                )
            else:
                marker[position] = k
            markers.append(marker)
        if problems:
            i, why = problems[0]
            if invalid_rows == "raise":
                raise ValueError(
                    f"Row {i} of the {dataset_name} dataset cannot get {self._answer_terms()}: {why}. {len(problems)} "
                    "row(s) are affected; fix them, or set `invalid_rows='exclude'` to train them with cross-entropy "
                    "only."
                )
            logger.warning(
                "%d row(s) of the %s dataset are excluded from %s (first: row %d, %s).",
                len(problems),
                dataset_name,
                self._answer_terms(),
                i,
                why,
            )
            self._excluded_rows = getattr(self, "_excluded_rows", 0) + len(problems)
        self._option_ids = option_ids
        return dataset.add_column(ANSWER_COLUMN, markers)

    def _answer_terms(self) -> str:
        """The loss terms that read the option letters at the answer, for messages."""
        return "the option-letter calibration term"

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in self._flag_columns:  # the carried-only columns have served their purpose by now
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _install_flag_collator(self, columns: tuple[str, ...], required: bool) -> None:
        """Swap TRL's default collator for the flag-carrying one, keeping its settings (padding-free included)."""
        collator = self.data_collator
        if type(collator) is DataCollatorForLanguageModeling:
            self.data_collator = DataCollatorWithKnowledgeFlags(
                pad_token_id=collator.pad_token_id,
                padding_free=collator.padding_free,
                return_position_ids=collator.return_position_ids,
                pad_to_multiple_of=collator.pad_to_multiple_of,
                return_tensors=collator.return_tensors,
                flag_columns=columns,
                required=required,
            )
        elif isinstance(collator, DataCollatorWithKnowledgeFlags):
            collator.flag_columns = tuple(dict.fromkeys((*collator.flag_columns, *columns)))
            collator.required = collator.required or required
        else:
            logger.warning(
                "A custom data collator is in use: it must return the %s column(s) as per-token tensors (see "
                "`calib_trl.DataCollatorWithKnowledgeFlags`), or training stops at the first batch.",
                ", ".join(columns),
            )

    # -- loss helpers --------------------------------------------------------------------------------------------

    def _to_outputs(self, tensor: torch.Tensor, inputs: dict, fill: float | None = None) -> torch.Tensor:
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

    def _loss_scale(self, num_items_in_batch) -> float:
        """`SFTTrainer`'s scaling of a token-normalised loss under `average_tokens_across_devices`."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes // self.get_tp_size()
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """
        The trainer's `_compute_loss`, guarded once, on every path (calibration on or off, RCFT or not): a NaN/inf
        loss is raised or skipped (`nonfinite_loss`), never trained on.
        """
        result = self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            return self._guard_nonfinite(result[0], model), result[1]
        return self._guard_nonfinite(result, model)

    def _sft_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`SFTTrainer`'s own loss (the next `compute_loss` after this mixin's), which the trainers add their terms to."""
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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
                "the learning rate, check the "
                "data, or set `nonfinite_loss='skip'` to skip such micro-batches (they are counted in "
                "`calib/skipped_steps`)."
            )
        self._skipped_steps += 1
        self._metrics[mode]["calib/skipped_steps"] = [self._skipped_steps]
        logger.warning(
            "Non-finite loss at step %d: micro-batch skipped (%d so far).", self.state.global_step, self._skipped_steps
        )
        # A zero that still reaches every trainable parameter, so DDP's gradient all-reduce sees them all
        params = [p for p in model.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].sum() * 0.0 for p in params), torch.zeros((), device=loss.device))

    def _log_mean(self, mode: str, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Log `total / count` summed over processes (both tensors are reduced)."""
        total = self.accelerator.gather_for_metrics(total.detach().float().reshape(1)).sum()
        count = self.accelerator.gather_for_metrics(count.detach().float().reshape(1)).sum()
        self._metrics[mode][name].append((total / count).item() if count > 0 else 0.0)

    # -- checkpointed state --------------------------------------------------------------------------------------

    def _calib_state(self) -> dict:
        return {"skipped_steps": self._skipped_steps}

    def _load_calib_state(self, state: dict) -> None:
        self._skipped_steps = state.get("skipped_steps", 0)

    def _save_checkpoint(self, model, trial):
        # Written before the checkpoint itself, so that a push of the checkpoint to the Hub includes it
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self._calib_state(), f, indent=2, default=_json_default)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, STATE_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    self._load_calib_state(json.load(f))
            else:
                logger.warning("%s has no %s: calib-trl state starts afresh.", checkpoint, STATE_FILE)
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _first_completion_token(row: dict, truncation_mode: str) -> int | None:
    """
    Index in `input_ids` of the first completion token of a row prepared by `SFTTrainer`, or `None` when it has no
    completion. TRL truncates `input_ids` and `labels` but not a `completion_mask` it leaves in place, so an index
    read off that mask can lie outside the kept tokens (at or beyond their end, or negative with `keep_end`).
    """
    mask = row.get("completion_mask")
    if mask is None:
        return next((i for i, label in enumerate(row["labels"]) if label != -100), None)
    first = next((i for i, m in enumerate(mask) if m), None)
    cut = len(mask) - len(row["input_ids"])
    if first is not None and truncation_mode == "keep_end" and cut > 0:
        first -= cut
    return first


def _json_default(value):
    if hasattr(value, "tolist"):  # tensors and numpy values
        return value.tolist()
    raise TypeError(f"Cannot serialise {type(value).__name__}")
