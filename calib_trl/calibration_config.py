from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .config_checks import check_in, resolve_bf16_default


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

    @property
    def has_calibration_term(self) -> bool:
        """Whether CogCalib's calibration term can reach any token (its loss is on, applied to some examples)."""
        return self.calibration_loss != "none" and self.apply_to != "none" and self.calibration_weight > 0
