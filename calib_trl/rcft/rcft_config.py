from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..cogcalib.calib_sft_config import CalibSFTConfig
from ..core.config import CalibrationConfig, check_in, check_range

logger = logging.getLogger(__name__)


@dataclass
class RCFTConfig(CalibrationConfig):
    r"""
    Configuration class for the [`RCFTTrainer`] (CFT and RCFT, calibration-aware fine-tuning).

    Extends [`~trl.SFTConfig`] (through [`CalibrationConfig`]) with RCFT's parameters only. The loss is
    `(1 - ece_weight) * L_SFT + ece_weight * ece_scale * L_ECE`; `ece_weight=0` is CFT (plain SFT on the answer). To
    add CogCalib's calibration term as well, use [`CalibRCFTConfig`], which has the parameters of both.

    Parameters:
        > Parameters that control the ECE regulariser

        ece_weight (`float`, *optional*, defaults to `0.5`):
            α, the weight of the ECE term against the SFT loss, in `[0, 1]`. `0` gives CFT.
        ece_scale (`float`, *optional*, defaults to `1.0`):
            λ, the scale of the ECE term, `>= 0`. Its meaning depends on `ece_normalization`: the authors' `1e-3`
            belongs with `ece_normalization="estep"`.
        ece_normalization (`str`, *optional*, defaults to `"batch"`):
            What each bin's sum of squared distances is divided by: `"batch"`, the bin's rows in the current batch
            (each bin present in the batch contributes its mean), or `"estep"`, the bin's number of training rows as
            the E-step estimates it (the authors' objective). See "Departures" below.
        ece_target_gradient (`bool`, *optional*, defaults to `False`):
            Let the gradient flow through the M-step target, as the authors' code does. See "Departures" below.
        n_bins (`int`, *optional*, defaults to `10`):
            Equal-width confidence bins of the E-step and of the ECE term, `>= 2`. Every bin is used, the top one
            included.
        sft_loss (`str`, *optional*, defaults to `"completion"`):
            `"completion"` (L_SFT1: loss on the answer only) or `"prompt_and_completion"` (L_SFT2). Sets
            `completion_only_loss` when that is left unset.

        > Parameters that control the E-step

        estep_source (`str`, *optional*, defaults to `"auto"`):
            Rows the E-step scores: `"auto"` scores held-out rows when the trainer is given some (`estep_dataset=`,
            else `calibration_dataset=`) and the training rows otherwise, with a warning; `"heldout"` requires
            held-out rows; `"train"` scores the training rows even when held-out rows are given (the authors'
            choice). The choice is logged and written into the model card.
        bin_refresh (`str`, *optional*, defaults to `"epoch"`):
            When the E-step re-estimates the per-bin accuracies with the current model: `"once"` (before training),
            `"epoch"` (at the start of every epoch) or a number of steps, e.g. `"50"`.
        estep_samples (`int`, *optional*, defaults to `1000`):
            Rows scored by each E-step (a fixed random subset of `estep_source`'s rows; all rows if unset or larger).
        estep_batch_size (`int`, *optional*, defaults to `32`):
            Rows per forward pass of the E-step.
        invalid_rows (`str`, *optional*, defaults to `"raise"`):
            Rows whose answer position cannot be found (truncated away, or the completion is not the answer's option
            letter): `"raise"` an error naming the row, or `"exclude"` them from the ECE term (they still get the SFT
            loss) and log their count.

    Departures from the paper and from the authors' code (github: ZhanliangAaronWang/RestoreLLMCalibration), each
    chosen on purpose and pinned by a test in `tests/test_rcft_trainer.py` or `tests/test_losses.py`:

    - **E-step rows.** The authors estimate the per-bin accuracies on the training rows. Those are the rows the model
      is learning, so their accuracy runs ahead of held-out accuracy and the targets pull confidence up towards it.
      calib-trl scores held-out rows whenever it is given them (`estep_source="auto"`), and warns when it is not.
    - **L_ECE normalisation.** The authors divide each bin's sum by the bin's count over the whole E-step (their
      training set) and weight the term `0.5 * 1e-3` against `0.5 * L_SFT`. A batch of `B` rows then carries about
      `B / N_train` of the term, so its pull shrinks as the training set grows, down to nothing on a full-size split.
      calib-trl's default (`"batch"`, `λ = 1`) divides by the bin's rows in the batch, so the term's pull does not
      depend on the dataset size (the measured ratios of the two gradients: `benchmarks/rcft_normalization.py`,
      benchmarks/README.md). `ece_normalization="estep"` with `ece_scale=1e-3` gives the authors' objective; under it
      `N_b` is the E-step's fraction of rows in bin `b` times the number of training rows with an answer position,
      which is the authors' count when the E-step scores the whole training set (`estep_source="train"`,
      `estep_samples=None`).
    - **SFT term.** The paper's summary gives RCFT the joint question-and-answer loss (L_SFT2); the authors' code
      trains on the answer only (a completion-only collator), and so does calib-trl by default
      (`sft_loss="completion"`): the calibration of the answer is what is measured, and the question's tokens would
      add a language-modelling loss on text the model is not asked to produce. `"prompt_and_completion"` is L_SFT2.
    - **Target gradient.** The authors' target is a function of the probabilities it is compared with, and their
      gradient flows through it (through `γ` and the `tanh` terms; the top entry's target, the bin accuracy, is a
      constant either way). calib-trl detaches it by default: the M-step regresses onto targets fixed by the E-step
      (the measured difference between the two gradients is in benchmarks/README.md). `ece_target_gradient=True` is
      the authors' choice.
    - **Bins.** The authors' loss loop stops one bin short, so rows with confidence >= 0.9 never get the term, and
      their bins are estimated once, before training. calib-trl uses every bin, the top one included, and
      re-estimates them (`bin_refresh`, all-reduced across processes); `bin_refresh="once"` is the authors' schedule.
      The top-bin fix is not an option: it is ours.
    - **Empty bins.** The authors give a bin the E-step left empty accuracy 0 (and divide by its zero count when a
      batch row lands in it). calib-trl keeps such a row's own confidence as its top target (no pull on the top
      entry; the other entries are still shaped), and under `"estep"` divides by at least the batch's rows in the
      bin.
    """

    ece_weight: float = field(
        default=0.5, metadata={"help": "α: weight of the ECE term against the SFT loss, in [0, 1]; 0 gives CFT."}
    )
    ece_scale: float = field(
        default=1.0,
        metadata={"help": "λ: scale of the ECE term, >= 0 (the authors' 1e-3 goes with `ece_normalization='estep'`)."},
    )
    ece_normalization: str = field(
        default="batch",
        metadata={
            "help": "Divide each bin's term by its rows in the batch (`batch`), or by its training rows as the E-step "
            "estimates them (`estep`, the authors' objective).",
            "choices": ["batch", "estep"],
        },
    )
    ece_target_gradient: bool = field(
        default=False,
        metadata={"help": "Let the gradient flow through the M-step target (the authors' code); detached by default."},
    )
    n_bins: int = field(default=10, metadata={"help": "Equal-width confidence bins (all used, top included), >= 2."})
    sft_loss: str = field(
        default="completion",
        metadata={
            "help": "`completion` (L_SFT1) or `prompt_and_completion` (L_SFT2).",
            "choices": ["completion", "prompt_and_completion"],
        },
    )
    estep_source: str = field(
        default="auto",
        metadata={
            "help": "Rows the E-step scores: `auto` (held-out rows when the trainer gets `estep_dataset` or "
            "`calibration_dataset`, else the training rows, with a warning), `heldout` (required), or `train`.",
            "choices": ["auto", "heldout", "train"],
        },
    )
    bin_refresh: str = field(
        default="epoch",
        metadata={"help": 'When the E-step re-estimates bin accuracies: `once`, `epoch`, or every N steps (`"50"`).'},
    )
    estep_samples: int | None = field(
        default=1000, metadata={"help": "Rows scored by each E-step (a fixed random subset; all if unset)."}
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
        check_in("ece_normalization", self.ece_normalization, ("batch", "estep"))
        check_in("estep_source", self.estep_source, ("auto", "heldout", "train"))
        check_range("ece_weight", self.ece_weight, 0.0, 1.0)
        check_range("ece_scale", self.ece_scale, 0.0, None)
        if self.ece_normalization == "batch" and 0 < self.ece_scale <= 1e-2 and self.ece_weight > 0:
            logger.warning(
                "`ece_scale=%g` with `ece_normalization='batch'`: the authors' λ = 1e-3 belongs with their "
                "normalisation (`ece_normalization='estep'`); with per-batch normalisation it shrinks the ECE term "
                "to almost nothing.",
                self.ece_scale,
            )
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


@dataclass
class CalibRCFTConfig(RCFTConfig, CalibSFTConfig):
    r"""
    Configuration class for the [`RCFTTrainer`] with CogCalib's calibration term added: the parameters of both
    [`RCFTConfig`] and [`CalibSFTConfig`]. The loss is
    `(1 - ece_weight) * (L_SFT + CogCalib's term) + ece_weight * ece_scale * L_ECE`, where CogCalib's term is
    `calibration_weight * (L_method - NLL)` on the known examples' tokens (or their option letters, with
    `calibration_space="options"`), as in `CalibSFTTrainer`.

    Example:
    ```python
    >>> args = CalibRCFTConfig("out", ece_weight=0.5, calibration_loss="ecp", ecp_beta=1.0)
    >>> trainer = RCFTTrainer(model=model, args=args, train_dataset=train, calibration_dataset=calib)
    ```
    """
