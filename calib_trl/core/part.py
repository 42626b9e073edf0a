"""`CalibrationPart`: what one calibration method contributes to a `CalibrationTrainer`.

A trainer holds a list of parts (CogCalib's loss, RCFT's ECE term, or both) and calls each at fixed points: the
columns it needs carried through dataset preparation, its checks and preparation of each dataset, its set-up once the
trainer exists, its work before the first batch (detection) and before each forward pass (a re-fit, an E-step), its
loss, its saved state and its model-card settings. A part that a configuration switches off is not in the list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossStep:
    """What a part's loss reads of one training or evaluation step."""

    model: torch.nn.Module
    inputs: dict  # the batch as the model received it
    columns: dict  # the per-token columns the parts asked for, popped from the batch
    output: object  # the fused LM head's `FusedCausalLMOutput`
    hidden: torch.Tensor | None  # the backbone's last hidden state, for parts with `needs_hidden`
    num_items_in_batch: torch.Tensor | int | None
    mode: str  # "train" or "eval"
    logs: dict = field(default_factory=dict)  # the trainer's `_metrics[mode]`


class CalibrationPart:
    """The interface of a calibration method's part; every hook does nothing unless the method needs it."""

    name = "part"  # its key in the saved state
    tags: tuple[str, ...] = ()  # model-card tags
    carried_columns: tuple[str, ...] = ()  # dataset columns kept through preparation
    token_columns: tuple[str, ...] = ()  # per-token tensors the collator returns (carried, or made by `prepare`)
    required_token_columns: tuple[str, ...] = ()  # those the collator must find in every example
    needs_hidden = False  # the loss reads the backbone's hidden states
    reads_lm_head = False  # the loss reads the LM head's weight outside the model's forward
    adds_terms = True  # the loss differs from `SFTTrainer`'s (otherwise no check may refuse anything)
    answer_terms = ""  # the loss terms that read the option letters at the answer token, for messages

    def check_dataset(self, trainer, dataset, dataset_name: str) -> None:
        """A dataset as the user passed it, checked after `SFTTrainer` prepared (and checked) it."""

    def before_prepare(self, trainer, dataset, dataset_name: str):
        """A dataset as passed, before `SFTTrainer` prepares it: add a column it needs (the known flags)."""
        return dataset

    def prepare(self, trainer, dataset, args, dataset_name: str):
        """The tokenized dataset, before packing: add the per-token columns the loss reads."""
        return dataset

    def rows_dropped(self, trainer, dropped: int, total: int, args, dataset_name: str) -> None:
        """TRL's truncation dropped `dropped` of `total` rows: refuse it, or count it."""

    def setup(self, trainer) -> None:
        """Once `SFTTrainer.__init__` has run: what needs the model, the tokenizer or the prepared datasets."""

    def before_batches(self, trainer, state: dict | None) -> None:
        """
        Before the first batch is drawn (inside `train()` or a dataloader getter), with the part's state from the
        checkpoint being resumed (`None` when not resuming or when it holds none): flag rows, restore what it saved.
        """

    def before_forward(self, trainer, model, mode: str) -> None:
        """Before each forward pass: a threshold re-fit, an E-step."""

    def loss(self, trainer, step: LossStep, loss: torch.Tensor) -> torch.Tensor:
        """The loss after this part: `loss` is `SFTTrainer`'s, with the parts before this one applied."""
        return loss

    def state_dict(self) -> dict:
        """What a resumed run needs of this part (JSON-safe)."""
        return {}

    def card_settings(self) -> dict:
        """The part's settings, as the model card lists them."""
        return {}

    def reads_lm_head_what(self) -> str:
        """What reads the LM head outside the forward, for the ZeRO-3 warning."""
        return type(self).__name__
