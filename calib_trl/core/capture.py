"""What a calibration term reads of a forward pass, and how a per-token tensor of the batch lines up with it.

- `BackboneHook`: the last hidden state of a causal LM's backbone, from the first forward after `reset()` (the prompt's,
  also when `generate` then runs one pass per new token). The LM check of the scorers reads it.
- `ForwardCapture`: during a training step, the fused LM head's output (a `FusedCausalLMOutput`) of the top-level model
  and the backbone's last hidden state, read through forward hooks, so that the trainers reuse `SFTTrainer.compute_loss`
  unchanged and add their terms on top.
- `shifted`, `hidden_for_outputs`, `example_index`: the alignment of per-token inputs with the fused head's outputs,
  whose position `t` predicts token `t + 1`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from trl.trainer.utils import FusedCausalLMOutput


def unwrap_base(model):
    """
    The `PreTrainedModel` (the model TRL patches with its fused LM head) under the wrappers of distributed training
    (DDP, DeepSpeed, ...: `compute_loss` receives the wrapped model) and of PEFT.
    """
    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft_model(model) else model


class BackboneHook:
    """
    The last hidden state of `model`'s backbone from the first forward pass after `reset()` (or since it was made),
    read through a forward hook on the backbone itself, which PEFT and distributed wrappers all end up calling.
    """

    def __init__(self, model):
        self.base = unwrap_base(model)
        self.value = None
        self.enabled = True
        self._handle = self.base.base_model.register_forward_hook(self._hook)

    def reset(self) -> None:
        self.value = None

    def _hook(self, module, args, output):
        if self.enabled and self.value is None:
            self.value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def remove(self) -> None:
        self._handle.remove()


class ForwardCapture:
    """
    Reads, during one training forward, the fused LM head output of the top-level model and (with `want_hidden`) the
    last hidden state of its backbone. Hooks on the modules themselves keep working under PEFT, DDP, FSDP and DeepSpeed;
    only the first fused call inside `capture()` is kept.
    """

    def __init__(self, model, want_hidden: bool):
        self.active = False
        self.output = None
        self._handle = model.register_forward_hook(self._on_output)
        self._hidden = BackboneHook(model) if want_hidden else None
        if self._hidden is not None:
            self._hidden.enabled = False

    @property
    def hidden(self):
        return None if self._hidden is None else self._hidden.value

    def _on_output(self, module, args, output):
        if self.active and self.output is None and isinstance(output, FusedCausalLMOutput):
            self.output = output

    @contextmanager
    def capture(self):
        """Capture within this block."""
        self.output, self.active = None, True
        if self._hidden is not None:
            self._hidden.reset()
            self._hidden.enabled = True
        try:
            yield self
        finally:
            self.output, self.active = None, False
            if self._hidden is not None:
                self._hidden.reset()
                self._hidden.enabled = False


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
