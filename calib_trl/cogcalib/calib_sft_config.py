from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import CalibrationConfig, check_in, check_range

# `ecp_beta=None`: β in each calibration space. The entropy over K options is at most ln K (1.39 for 4), against up to
# ln V over the vocabulary, so the two spaces need their own weights. The option letters' β follows the default rule
# on the multiple-choice table (benchmarks/README.md, MMLU); the vocabulary's is the earlier default.
DEFAULT_ECP_BETA = {"options": 4.0, "vocabulary": 2.0}
# `calibration_loss=None` and `ls_epsilon=None`: the term and its weight in each space, chosen by the default rule on
# each space's table (benchmarks/README.md): CoECP on the option letters (MMLU table), CoLS with ε 0.1 over the
# vocabulary (the open-ended arithmetic table, where CoECP β 2 and CoLS ε 0.5 raised the LM check). The option letters'
# ε is the earlier default, not judged.
DEFAULT_LOSS = {"options": "ecp", "vocabulary": "ls"}
DEFAULT_LS_EPSILON = {"options": 0.5, "vocabulary": 0.1}


@dataclass
class CalibSFTConfig(CalibrationConfig):
    r"""
    Configuration class for the [`CalibSFTTrainer`] (CogCalib: known/unknown-aware calibration losses).

    Extends [`~trl.SFTConfig`] (through [`CalibrationConfig`]); only the CogCalib parameters are listed here. Per completion token, with
    `NLL = -log p_y`, a token of an *unknown* example gets `NLL` and a token of a *known* example gets
    `NLL + calibration_weight * (L_method - NLL)`, normalised like `SFTTrainer`'s loss.

    Parameters:
        > Parameters that control the calibration loss

        calibration_loss (`str` or `None`, *optional*, defaults to `None`):
            Calibration term for known examples: `"ls"` (label smoothing, CoLS), `"mbls"` (margin-based label
            smoothing, CoMbLS), `"ecp"` (confidence penalty, CoECP) or `"none"` (plain SFT). `None`: `"ecp"` on the
            option letters, `"ls"` over the vocabulary (`calibration_space`; the trainer's `args` holds the value a
            run uses). The defaults of `calibration_loss`, `calibration_space` and the weights below follow one
            rule, applied to the tables of `benchmarks/reproduce.py` (benchmarks/README.md), each judged by its
            paired interval: the lowest ECE (test and out-of-domain) among the settings that keep accuracy at least
            SFT's minus 1 point and, on multiple choice, `answer_mass` at least 0.9 x SFT's (MMLU table: CoECP on the
            option letters, β 4), on open-ended answers the LM check within its interval of SFT's (arithmetic table:
            CoLS over the vocabulary, ε 0.1, on the known rows). `mbls_margin` and `mbls_lambda` keep earlier
            defaults.
        apply_to (`str`, *optional*, defaults to `"known"`):
            Which examples get the calibration term: `"known"` (CogCalib), `"all"` (the plain calibration loss on all
            data) or `"none"` (standard SFT). With the paper's ablations in one trainer.
        calibration_weight (`float`, *optional*, defaults to `1.0`):
            α in `NLL + α (L_method - NLL)`; `1.0` gives the method's standard loss on known tokens. In `[0, 1]`.
        ls_epsilon (`float` or `None`, *optional*, defaults to `None`):
            Label-smoothing ε of `"ls"`, in `[0, 1)`. `None`: `0.1` over the vocabulary (the default rule on the
            arithmetic table), `0.5` on the option letters (the earlier default).
        mbls_margin (`float`, *optional*, defaults to `10.0`):
            Margin `m` of `"mbls"` (logit units), `>= 0`.
        mbls_lambda (`float`, *optional*, defaults to `0.1`):
            Weight λ of the margin penalty of `"mbls"`, `>= 0`.
        ecp_beta (`float` or `None`, *optional*, defaults to `None`):
            Weight β of the entropy bonus of `"ecp"`, `>= 0`. `None`: `4.0` when the term acts on the option
            letters (`calibration_space`), where the entropy is at most ln K, and `2.0` over the vocabulary (the
            trainer's `args.ecp_beta` holds the value a run uses). The bonus β·H(p) is subtracted from the cross-entropy
            of known tokens, so the logged training `loss` can be negative: that is expected, not a bug. Watch
            `calib/nll`, the plain cross-entropy of the completion tokens (what `SFTTrainer` logs as `loss`), to
            follow how well the model fits the data.

        calibration_space (`str`, *optional*, defaults to `"auto"`):
            Which distribution the calibration term acts on. `"vocabulary"`: the next-token distribution over the
            whole vocabulary, at every completion token of a selected example (the papers' losses). `"options"`
            (multiple-choice data, with `choices` and `answer` columns): the softmax over the option letters at the
            answer token only, the distribution that option-letter ECE measures; every other token keeps plain
            cross-entropy, so probability is moved between the options and not off them. `"auto"`: `"options"` when
            the training rows are multiple-choice prompt/completion rows in a `datasets.Dataset` (packed, if at
            all, with `packing_strategy="bfd"`); multiple-choice rows that cannot take the option term
            (conversational `messages`, an `IterableDataset`, packing that can cut a question off its answer) get
            `"vocabulary"`, with a warning saying why. Other rows (open-ended answers, plain text) get
            `"vocabulary"`. The trainer's `calibration_space` property says which one a run uses.

        > Parameters that control knowledge detection

        known_column (`str`, *optional*, defaults to `"known"`):
            Dataset column holding the known flag (written by `calib_trl.detect_known`).
        detection (`str`, *optional*, defaults to `"auto"`):
            Where the known flags come from.

            - `"auto"`: from `known_column` where the dataset has it. Otherwise the trainer detects them itself, once,
              inside `train()` before the first step (progress bar, rows sharded across processes), with the model as
              it is before training (PEFT adapters disabled), and logs one line naming the path it took:
              - with a `calibration_dataset` passed to the trainer: an answer-NLL threshold fitted on it (Youden's J);
              - multiple-choice rows (`choices`, `answer`): the model's own answer to each row, exact, no threshold;
              - open-ended rows (prompt/completion, or `messages` whose last assistant message is the answer): the
                model's own greedy answer to each row (up to `detection_max_new_tokens` tokens), known = it states the
                reference answer (`calib_trl.evaluation.generation.match_answer`), exact, no threshold;
              - rows with no answer to score (plain text, pre-tokenized or formatted rows): the calibration term goes
                to every token, as with `apply_to="all"`;
              - an `IterableDataset` cannot be scored ahead: the threshold is fitted once before the first step (on
                the `calibration_dataset`, or the first `auto_detection_samples` rows) and compared with each
                example's answer NLL in its training step, as online detection does.
              Evaluation datasets without the column are flagged by the same rule.
            - `"precomputed"`: flags come from `known_column`, which every dataset must have.
            - `"online"`: each example is known when the answer NLL that the training step computes is at most a
              threshold, re-fitted every `online_refit_steps` steps on the `calibration_dataset` passed to the trainer.
        auto_detection_samples (`int`, *optional*, defaults to `128`):
            Rows of a streamed training set (`IterableDataset`) that a `detection="auto"` threshold is fitted on when
            there is no `calibration_dataset`. Each costs a forward pass and a greedy generation; see
            `benchmarks/README.md` for the detection accuracy this gives.
        detection_max_new_tokens (`int`, *optional*, defaults to `32`):
            The longest greedy answer detection generates for an open-ended row (`detection="auto"` without a
            `calibration_dataset`): long enough for an answer stated in a sentence.
        online_refit_steps (`int`, *optional*, defaults to `50`):
            Steps between two re-fits of the online threshold (also fitted before the first step). A re-fit costs one
            forward pass per calibration row, plus a greedy generation per row for open-ended rows (see
            `benchmarks/README.md`), and shows a progress bar unless `disable_tqdm`.
        online_calibration_samples (`int`, *optional*):
            Use at most this many calibration examples for each re-fit (the first ones); all if unset.
        online_batch_size (`int`, *optional*, defaults to `32`):
            Batch size of the re-fit's forward passes over the calibration set.
        unfitted_threshold (`str`, *optional*, defaults to `"warn"`):
            What to do when no known/unknown threshold can be fitted, because the model answers every (or no) row it
            is fitted on correctly, or no NLL threshold separates right from wrong answers: `"raise"` stops with an
            error; `"warn"` goes on with a warning, every example then being flagged known (or unknown, so that no
            example gets the calibration term), and `calib/threshold_fitted` is logged as 0 (online detection).
        answer_nll (`str`, *optional*, defaults to `"auto"`):
            The per-example NLL compared with the threshold: `"first"` (NLL of the first completion token, the answer
            letter of a multiple-choice completion), `"mean"` (mean over completion tokens), or `"auto"` (`"first"`
            when the dataset has `choices`, else `"mean"`).

        Every calib-trl config also has `nonfinite_loss` and calib-trl's `bf16` default (see [`CalibrationConfig`]).
    """

    calibration_loss: str | None = field(
        default=None,
        metadata={
            "help": "Calibration term for known examples. Default: `ecp` on the option letters, `ls` over the "
            "vocabulary.",
            "choices": ["ls", "mbls", "ecp", "none"],
        },
    )
    apply_to: str = field(
        default="known",
        metadata={
            "help": "Which examples get the calibration term: `known` (CogCalib), `all`, or `none` (standard SFT).",
            "choices": ["known", "all", "none"],
        },
    )
    calibration_weight: float = field(
        default=1.0,
        metadata={"help": "α in NLL + α (L_method - NLL) on selected tokens; 1.0 gives the method's loss. In [0, 1]."},
    )
    ls_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Label-smoothing ε of `ls`, in [0, 1). Default: 0.1 over the vocabulary, 0.5 on the options."
        },
    )
    mbls_margin: float = field(default=10.0, metadata={"help": "Margin m of `mbls` in logit units, >= 0."})
    mbls_lambda: float = field(default=0.1, metadata={"help": "Weight λ of the margin penalty of `mbls`, >= 0."})
    ecp_beta: float | None = field(
        default=None,
        metadata={
            "help": "Weight β of the entropy bonus of `ecp`, >= 0. Default: 4.0 on the option letters, 2.0 over "
            "the vocabulary."
        },
    )
    calibration_space: str = field(
        default="auto",
        metadata={
            "help": "Distribution the calibration term acts on: `vocabulary` (every completion token), `options` (the "
            "softmax over the option letters at the answer token; multiple-choice data) or `auto` (`options` for "
            "multiple-choice rows, `vocabulary` for others).",
            "choices": ["vocabulary", "options", "auto"],
        },
    )
    known_column: str = field(
        default="known", metadata={"help": "Dataset column with the known flag (from `calib_trl.detect_known`)."}
    )
    detection: str = field(
        default="auto",
        metadata={
            "help": "`auto` (flags from `known_column` where present, else detected inside `train()` before the first "
            "step), `precomputed` (flags from `known_column`) or `online` (answer NLL vs a threshold re-fitted on "
            "the calibration dataset every `online_refit_steps`).",
            "choices": ["auto", "precomputed", "online"],
        },
    )
    auto_detection_samples: int = field(
        default=128,
        metadata={
            "help": "Rows of a streamed training set an `auto` threshold is fitted on without a calibration dataset."
        },
    )
    detection_max_new_tokens: int = field(
        default=32, metadata={"help": "Longest greedy answer detection generates for an open-ended row."}
    )
    online_refit_steps: int = field(default=50, metadata={"help": "Steps between re-fits of the online threshold."})
    online_calibration_samples: int | None = field(
        default=None, metadata={"help": "Cap on the calibration examples used by each online re-fit."}
    )
    online_batch_size: int = field(default=32, metadata={"help": "Batch size of the online re-fit's forward passes."})
    answer_nll: str = field(
        default="auto",
        metadata={
            "help": "Per-example NLL for detection: `first` completion token, `mean` over completion tokens, or `auto`.",
            "choices": ["auto", "first", "mean"],
        },
    )
    unfitted_threshold: str = field(
        default="warn",
        metadata={
            "help": "When no known/unknown threshold can be fitted: `raise`, or `warn` and flag every example alike.",
            "choices": ["raise", "warn"],
        },
    )

    @property
    def has_calibration_term(self) -> bool:
        """Whether CogCalib's calibration term can reach any token (its loss is on, applied to some examples)."""
        return self.calibration_loss != "none" and self.apply_to != "none" and self.calibration_weight > 0

    def __post_init__(self):
        super().__post_init__()
        if self.calibration_loss is not None:
            check_in("calibration_loss", self.calibration_loss, ("ls", "mbls", "ecp", "none"))
        check_in("apply_to", self.apply_to, ("known", "all", "none"))
        check_in("calibration_space", self.calibration_space, ("vocabulary", "options", "auto"))
        check_in("detection", self.detection, ("auto", "precomputed", "online"))
        check_in("unfitted_threshold", self.unfitted_threshold, ("raise", "warn"))
        check_in("answer_nll", self.answer_nll, ("auto", "first", "mean"))
        check_range("calibration_weight", self.calibration_weight, 0.0, 1.0)
        if self.ls_epsilon is not None:
            check_range("ls_epsilon", self.ls_epsilon, 0.0, 1.0, high_inclusive=False)
        check_range("mbls_margin", self.mbls_margin, 0.0, None)
        check_range("mbls_lambda", self.mbls_lambda, 0.0, None)
        if self.ecp_beta is not None:
            check_range("ecp_beta", self.ecp_beta, 0.0, None)
        if self.online_refit_steps < 1:
            raise ValueError(f"`online_refit_steps` must be >= 1, got {self.online_refit_steps}.")
        if self.detection_max_new_tokens < 1:
            raise ValueError(f"`detection_max_new_tokens` must be >= 1, got {self.detection_max_new_tokens}.")
        if self.auto_detection_samples < 2:
            raise ValueError(f"`auto_detection_samples` must be >= 2, got {self.auto_detection_samples}.")
        if self.online_calibration_samples is not None and self.online_calibration_samples < 2:
            raise ValueError(
                f"`online_calibration_samples` must be >= 2 (or unset), got {self.online_calibration_samples}."
            )
