"""`DataCollatorWithKnowledgeFlags`: TRL's language-modeling collator plus per-token flag tensors.

TRL's `DataCollatorForLanguageModeling` keeps `input_ids` and `labels` only. The calibration trainers need more per
example: CogCalib the `known` flag of each example, RCFT the position of the answer and its number of options. Each
such column is turned into a tensor aligned with `input_ids` — one value per token — which is correct in all three
batch modes:

- padded: `[batch, max_len]`, each row holding its example's value (0 on padding);
- padding-free: `[1, total_len]`, each example's tokens holding its value;
- packed (`packing=True`, bfd): the dataset column is already per token (packing concatenates it like `input_ids`),
  and is flattened like `input_ids`.

A per-token layout needs no `seq_idx` bookkeeping in the loss: token `t`'s value is the value of the example that
token `t` belongs to, whatever the batch mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad


def _as_number(value: Any, column: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"The `{column}` column holds NaN; every example needs a value (0/1 or True/False).")
        return value
    try:  # numpy / torch scalars
        return _as_number(value.item(), column)
    except AttributeError:
        raise TypeError(
            f"The `{column}` column must hold booleans or numbers (or per-token lists of them after packing), got "
            f"{type(value).__name__}: {value!r}."
        ) from None


def token_values(example: dict[str, Any], column: str) -> list[float]:
    """One value per token of `example["input_ids"]`: a per-example value broadcast, or a per-token list checked."""
    length = len(example["input_ids"])
    value = example[column]
    if isinstance(value, (list, tuple)):
        if len(value) != length:
            raise ValueError(
                f"The per-token `{column}` column has {len(value)} values for {length} tokens; it must be aligned with "
                "`input_ids`."
            )
        return [_as_number(v, column) for v in value]
    return [_as_number(value, column)] * length


@dataclass
class DataCollatorWithKnowledgeFlags(DataCollatorForLanguageModeling):
    """
    [`~trl.trainer.sft_trainer.DataCollatorForLanguageModeling`] that also returns, for each column in
    `flag_columns` (by default `("known",)`), a float tensor aligned with `input_ids`.

    Args:
        pad_token_id, padding_free, return_position_ids, pad_to_multiple_of, return_tensors: as in TRL's collator.
        flag_columns (`tuple[str, ...]`): dataset columns to carry. Each may hold one value per example (bool or
            number) or, after packing, one value per token.
        required (`bool`): raise when an example lacks one of the columns (otherwise the column is skipped for the
            whole batch only if every example lacks it).
        required_columns (`tuple[str, ...]`): the columns that are required whatever `required` says.

    Example:
    ```python
    >>> collator = DataCollatorWithKnowledgeFlags(pad_token_id=0)
    >>> collator([{"input_ids": [1, 2, 3], "known": True}, {"input_ids": [4, 5], "known": False}])["known"]
    tensor([[1., 1., 1.],
            [0., 0., 0.]])
    ```
    """

    flag_columns: tuple[str, ...] = field(default=("known",))
    required: bool = True
    required_columns: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        flags = {}
        for column in self.flag_columns:
            present = [column in example for example in examples]
            if not any(present) and not (self.required or column in self.required_columns):
                continue
            if not all(present):
                raise KeyError(
                    f"An example of the batch has no `{column}` column. Run `calib_trl.detect_known` on the dataset "
                    "(or enable online detection with `detection='online'`), and keep the column through your "
                    "preprocessing."
                )
            flags[column] = [torch.tensor(token_values(example, column)) for example in examples]
        stripped = [{k: v for k, v in example.items() if k not in flags} for example in examples]
        output = super().torch_call(stripped)
        for column, values in flags.items():
            if self.padding_free:
                values = [torch.cat(values, dim=0)]
            output[column] = pad(
                values, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )
            if output[column].shape != output["input_ids"].shape:  # pragma: no cover - guards TRL changes
                raise RuntimeError(f"`{column}` {tuple(output[column].shape)} is not aligned with `input_ids`.")
        return output
