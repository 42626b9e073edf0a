"""What every calib-trl configuration adds to `trl.SFTConfig` (`CalibrationConfig`), and the checks of their arguments,
including the one default calib-trl sets differently from TRL (`bf16`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from trl import SFTConfig

logger = logging.getLogger(__name__)


def check_in(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_range(name: str, value: float, low: float | None, high: float | None, high_inclusive: bool = True) -> None:
    ok = value == value and (low is None or value >= low)  # value == value rejects NaN
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        upper = "" if high is None else (f", {high}]" if high_inclusive else f", {high})")
        interval = f"in [{low}{upper}" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be {interval}, got {value!r}.")


def bf16_supported() -> bool:
    """Whether bfloat16 mixed precision runs natively on this machine's accelerator."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    return False


def resolve_bf16_default(config) -> None:
    """
    TRL turns bf16 on whenever it is unset; calib-trl turns it on only where it is native, so that a CPU run uses
    float32 (bf16 autocast on a CPU without native support is an order of magnitude slower).
    """
    if config.bf16 is None and not config.fp16:
        config.bf16 = bool(bf16_supported() and not getattr(config, "use_cpu", False))
        if not config.bf16:
            logger.info("bf16 is not supported natively here: training in float32 (set `bf16=True` to override).")


@dataclass
class CalibrationConfig(SFTConfig):
    r"""
    What every calib-trl configuration ([`CalibSFTConfig`], [`RCFTConfig`], [`CalibRCFTConfig`]) adds to
    [`~trl.SFTConfig`].

    > One difference from `SFTConfig`: `bf16` defaults to `True` only where the accelerator supports bfloat16 (a CUDA
    > GPU with bf16, or an explicit `use_cpu=False` device that does); on a CPU it defaults to float32, since a CPU
    > without native bf16 runs mixed precision an order of magnitude slower.

    Parameters:
        > Parameters that control robustness

        nonfinite_loss (`str`, *optional*, defaults to `"raise"`):
            What to do when a step's loss is NaN or infinite: `"raise"` stops training with an error, `"skip"` zeroes
            that step's loss (no update from it) and counts it in the `calib/skipped_steps` metric.
    """

    nonfinite_loss: str = field(
        default="raise",
        metadata={
            "help": "On a NaN/inf loss: `raise`, or `skip` the step and count it.",
            "choices": ["raise", "skip"],
        },
    )

    def __post_init__(self):
        resolve_bf16_default(self)
        super().__post_init__()
        check_in("nonfinite_loss", self.nonfinite_loss, ("raise", "skip"))

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides) -> CalibrationConfig:
        """
        This configuration from a `transformers.TrainingArguments` or a `trl.SFTConfig`, converted as `SFTTrainer`
        converts a `TrainingArguments`: every field they share is kept, calib-trl's own take their defaults (or
        `overrides`).
        """
        values = args.to_dict()
        values.update({k: getattr(args, k) for k in values if k.endswith("_token")})  # `to_dict` hides tokens
        return cls(**{**values, **overrides})
