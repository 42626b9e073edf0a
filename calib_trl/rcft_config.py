from __future__ import annotations

from dataclasses import dataclass, field

from .calib_sft_config import CalibSFTConfig
from .utils import check_in, check_range


@dataclass
class RCFTConfig(CalibSFTConfig):
    r"""
    Configuration class for the [`RCFTTrainer`] (CFT and RCFT, calibration-aware fine-tuning).

    Extends [`CalibSFTConfig`] (itself an [`~trl.SFTConfig`]); the CogCalib terms are off by default
    (`calibration_loss="none"`), and can be switched on to combine both methods. The loss is
    `(1 - ece_weight) * L_SFT + ece_weight * ece_scale * L_ECE`; `ece_weight=0` is CFT (plain SFT on the answer).

    Parameters:
        > Parameters that control the ECE regulariser

        ece_weight (`float`, *optional*, defaults to `0.5`):
            α, the weight of the ECE term against the SFT loss, in `[0, 1]`. `0` gives CFT.
        ece_scale (`float`, *optional*, defaults to `1.0`):
            λ, the scale of the ECE term, `>= 0`. The authors' code uses `1e-3`, which leaves the term negligible
            next to the SFT loss on small models; see `benchmarks/README.md` for how the default was chosen.
        n_bins (`int`, *optional*, defaults to `10`):
            Equal-width confidence bins of the E-step and of the ECE term, `>= 2`. Every bin is used, the top one
            included.
        sft_loss (`str`, *optional*, defaults to `"completion"`):
            `"completion"` (L_SFT1: loss on the answer only) or `"prompt_and_completion"` (L_SFT2). Sets
            `completion_only_loss` when that is left unset.
        bin_refresh (`str`, *optional*, defaults to `"epoch"`):
            When the E-step re-estimates the per-bin accuracies with the current model: `"once"` (before training),
            `"epoch"` (at the start of every epoch) or a number of steps, e.g. `"50"`.
        estep_samples (`int`, *optional*, defaults to `1000`):
            Training rows scored by each E-step (a fixed random subset; all rows if unset or larger).
        estep_batch_size (`int`, *optional*, defaults to `32`):
            Rows per forward pass of the E-step.
        invalid_rows (`str`, *optional*, defaults to `"raise"`):
            Rows whose answer position cannot be found (truncated away, or the completion is not the answer's option
            letter): `"raise"` an error naming the row, or `"exclude"` them from the ECE term (they still get the SFT
            loss) and log their count.
    """

    calibration_loss: str = field(
        default="none",
        metadata={
            "help": "CogCalib term on known examples, combinable with RCFT.",
            "choices": ["ls", "mbls", "ecp", "none"],
        },
    )
    ece_weight: float = field(
        default=0.5, metadata={"help": "α: weight of the ECE term against the SFT loss, in [0, 1]; 0 gives CFT."}
    )
    ece_scale: float = field(default=1.0, metadata={"help": "λ: scale of the ECE term, >= 0."})
    n_bins: int = field(default=10, metadata={"help": "Equal-width confidence bins (all used, top included), >= 2."})
    sft_loss: str = field(
        default="completion",
        metadata={
            "help": "`completion` (L_SFT1) or `prompt_and_completion` (L_SFT2).",
            "choices": ["completion", "prompt_and_completion"],
        },
    )
    bin_refresh: str = field(
        default="epoch",
        metadata={"help": 'When the E-step re-estimates bin accuracies: `once`, `epoch`, or every N steps (`"50"`).'},
    )
    estep_samples: int | None = field(
        default=1000, metadata={"help": "Training rows scored by each E-step (all if unset)."}
    )
    estep_batch_size: int = field(default=32, metadata={"help": "Rows per forward pass of the E-step."})
    invalid_rows: str = field(
        default="raise",
        metadata={
            "help": "Rows without a usable answer position: `raise`, or `exclude` them from the ECE term.",
            "choices": ["raise", "exclude"],
        },
    )

    @classmethod
    def from_training_arguments(cls, args, **overrides) -> RCFTConfig:
        """As [`CalibSFTConfig.from_training_arguments`]; a loss on the whole sequence becomes `sft_loss`'s setting."""
        if getattr(args, "completion_only_loss", None) is False:
            overrides.setdefault("sft_loss", "prompt_and_completion")
        return super().from_training_arguments(args, **overrides)

    def __post_init__(self):
        if self.completion_only_loss is None:
            self.completion_only_loss = self.sft_loss == "completion"
        super().__post_init__()
        check_in("sft_loss", self.sft_loss, ("completion", "prompt_and_completion"))
        check_in("invalid_rows", self.invalid_rows, ("raise", "exclude"))
        check_range("ece_weight", self.ece_weight, 0.0, 1.0)
        check_range("ece_scale", self.ece_scale, 0.0, None)
        if not isinstance(self.n_bins, int) or self.n_bins < 2:
            raise ValueError(f"`n_bins` must be an integer >= 2, got {self.n_bins!r}.")
        if (self.sft_loss == "completion") != bool(self.completion_only_loss):
            raise ValueError(
                f"`sft_loss={self.sft_loss!r}` contradicts `completion_only_loss={self.completion_only_loss}`; set only "
                "`sft_loss`."
            )
        self.bin_refresh = str(self.bin_refresh)
        if self.bin_refresh not in ("once", "epoch") and not (
            self.bin_refresh.isdigit() and int(self.bin_refresh) > 0
        ):
            raise ValueError(
                f"`bin_refresh` must be 'once', 'epoch' or a positive number of steps, got {self.bin_refresh!r}."
            )
        if self.estep_samples is not None and self.estep_samples < self.n_bins:
            raise ValueError(f"`estep_samples` must be at least `n_bins` ({self.n_bins}), got {self.estep_samples}.")
