"""`DetectionPlan`: where the known flags of a CogCalib run come from, decided once from the config and the data.

The plan owns the flags: it reads them from the `known` column, flags the rows itself before the first batch
(`detection="auto"`: the model's own answer, or a threshold fitted on a `calibration_dataset`), or compares each
example's answer NLL with an online threshold in its training step. The flags it computed, the rule it flagged them by
and the online threshold are saved in every checkpoint and restored from it, so a resumed run trains on the flags of
the run it continues, whatever model the resuming trainer was given.

| paths (`path`)        | when                                                               | the flags                    |
|-----------------------|--------------------------------------------------------------------|------------------------------|
| `all`                 | `apply_to="all"`                                                   | every token                  |
| `column`              | every dataset has the `known` column (`precomputed`, or `auto`)    | the column                   |
| `multiple_choice`     | `auto`, multiple-choice rows without the column, no calibration set | the model's own answer      |
| `generation`          | `auto`, open-ended rows without the column, no calibration set     | the model's own greedy answer |
| `calibration_dataset` | `auto`, a `calibration_dataset` passed to the trainer              | an answer-NLL threshold      |
| `stream`              | `auto`, an `IterableDataset`                                       | online, one threshold fit    |
| `online`              | `detection="online"`                                               | online, re-fitted threshold  |
| `no_answer`           | `auto`, rows with no answer to score                               | every token                  |
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from itertools import islice

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names

from ..core.capture import example_index
from ..core.columns import check_flag_column
from ..evaluation.scoring import answer_rows
from ..mcq import is_multiple_choice
from .knowledge import KnowledgeRule, OnlineKnowledgeDetector, fit_knowledge_rule

logger = logging.getLogger(__name__)


def _encode(flags) -> str:
    return "".join("1" if f else "0" for f in flags)


class DetectionPlan:
    """
    The known flags of a `CalibSFTTrainer` (see the module docstring). Built before `SFTTrainer.__init__` (which
    prepares the datasets through the trainer's hooks, where `check_dataset` sees each), completed by `setup`.
    """

    def __init__(self, args, train_dataset, calibration_dataset):
        self.args = args
        self.column = args.known_column
        self.apply_to = args.apply_to
        self.train_rows, self.calibration_dataset = train_dataset, calibration_dataset
        # `all` for apply_to="all"; otherwise the flags come from the column (precomputed, or auto where present)
        self.path = "all" if args.apply_to == "all" else "online" if args.detection == "online" else "column"
        self.undetected: dict[str, object] = {}  # `auto`: datasets without the column, by name, as passed
        self.rule: KnowledgeRule | None = None
        self.flags: dict[str, list[bool]] = {}  # the flags the plan computed (or restored), by dataset name
        self.known_fractions: dict[str, dict] = {}
        self.flag_on_prepare = False  # after the first batch: a dataset prepared later is flagged when prepared
        self.detector: OnlineKnowledgeDetector | None = None
        self.summary: dict | None = None
        self._restored_from = None

    # -- the decision --------------------------------------------------------------------------------------------

    @property
    def uses_column(self) -> bool:
        """Whether the known flags travel as a dataset column (carried through preparation, per token in batches)."""
        return self.path in ("column", "multiple_choice", "generation", "calibration_dataset")

    @property
    def per_example_nll(self) -> bool:
        """Whether the flags come from each example's answer NLL in its training step (online)."""
        return self.path in ("online", "stream")

    def check_dataset(self, dataset, dataset_name: str) -> None:
        """A dataset as passed (after TRL's checks): recorded for detection when it lacks the column, else checked."""
        if self.path != "column":
            return
        if self.args.detection == "auto" and self.column not in get_dataset_column_names(dataset):
            self.undetected[dataset_name] = dataset
        elif dataset_name == "train":
            n_known, n = check_flag_column(dataset, self.column, dataset_name)
            if n_known == 0:
                warnings.warn(
                    f"No example of the {dataset_name} dataset is known: with `apply_to='known'` the loss is plain "
                    "cross-entropy (standard SFT).",
                    stacklevel=5,
                )
            elif n_known == n and n > 1:
                warnings.warn(
                    f"Every example of the {dataset_name} dataset is known: the loss is the calibration loss on all "
                    "data (`apply_to='all'`).",
                    stacklevel=5,
                )
        else:
            check_flag_column(dataset, self.column, dataset_name)

    def setup(self, trainer) -> None:
        """Decide the path from the config and the datasets `check_dataset` saw (once `SFTTrainer.__init__` ran)."""
        args, calibration = self.args, self.calibration_dataset
        if self.path == "online":
            if calibration is None or len(calibration) == 0:
                raise ValueError(
                    "Online detection (`detection='online'`) needs a non-empty `calibration_dataset` passed to the "
                    "trainer."
                )
            self._setup_online(trainer, calibration, args.online_refit_steps)
        elif self.path == "column" and args.detection == "auto":
            self._setup_auto(trainer)
        elif calibration is not None:
            logger.info("`calibration_dataset` is only used to detect known examples; it is ignored here.")
        if self.per_example_nll and args.packing and args.packing_strategy != "bfd":
            raise ValueError(
                f"Online detection needs each example's tokens together; `packing_strategy={args.packing_strategy!r}` "
                "cuts examples across packed rows. Use `packing_strategy='bfd'`, or precomputed detection."
            )

    def _setup_auto(self, trainer) -> None:
        args, train = self.args, self.train_rows
        if "train" in self.undetected and (isinstance(train, IterableDataset) or answer_rows(train) is None):
            self.undetected.clear()
            if isinstance(train, IterableDataset):
                self._setup_stream(trainer)
            else:
                self._calibrate_every_token(trainer, self._no_answers(train))
            return
        if not self.undetected:
            self._announce(trainer, f"from the `{self.column}` column of every dataset", logging.INFO)
            return
        # The others are flagged before the first batch (`before_batches`), when they can be
        if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
            raise ValueError(
                "Under DeepSpeed ZeRO-3 the weights are partitioned before training starts, so `detection='auto'` "
                "cannot score the rows ahead: flag them first with `calib_trl.detect_known` (or `calib-trl detect`), "
                "or use `detection='online'` with a `calibration_dataset`."
            )
        for name, dataset in self.undetected.items():
            if not isinstance(dataset, Dataset):
                why = "an `IterableDataset` cannot be scored ahead of training"
            elif answer_rows(dataset) is None:
                why = "its rows have no answer to score (prompt/completion or conversational `messages`)"
            else:
                continue
            raise ValueError(
                f"The {name} dataset has no `{self.column}` column, and `detection='auto'` cannot flag it: {why}. Add "
                "the column (`calib_trl.detect_known`), or leave the dataset out."
            )

    def _setup_online(self, trainer, calibration, refit_steps: int | None) -> None:
        """Flags from each example's answer NLL in its training step, against a fitted threshold."""
        args, train = self.args, self.train_rows
        if not self._loss_covers_answers(trainer, train):
            columns = get_dataset_column_names(train)
            raise ValueError(
                "Online detection compares each training example's answer NLL, read off the loss tokens of its "
                f"training step, with the threshold; the train dataset's rows ({columns}) have no separate answer, so "
                "their loss covers the whole sequence. Convert conversational rows to prompt/completion "
                "(`{'prompt': messages[:-1], 'completion': messages[-1:]}`), or set `assistant_only_loss=True` so that "
                "the loss covers the assistant's messages only; or use `detection='auto'`, which flags the rows "
                "before training."
            )
        self.answer_nll = args.answer_nll
        if self.answer_nll == "auto":
            self.answer_nll = "first" if is_multiple_choice(train) else "mean"
        if self.answer_nll == "first" and not (trainer.completion_only_loss or args.assistant_only_loss):
            raise ValueError(
                "Online detection with `answer_nll='first'` reads each example's answer NLL at its first loss "
                "token, which is the answer only with a completion-only loss. Use prompt/completion data with "
                "`completion_only_loss` left on, or `answer_nll='mean'`."
            )
        if self.path != "stream":
            self.path = "online"
        self.detector = OnlineKnowledgeDetector(
            calibration,
            trainer._tokenizer,
            refit_steps=refit_steps,
            batch_size=args.online_batch_size,
            max_samples=args.online_calibration_samples,
            progress=not args.disable_tqdm,
        )
        calibration_mcq = is_multiple_choice(self.detector.calibration_dataset)
        if calibration_mcq != (self.answer_nll == "first"):
            logger.warning(
                "Online detection compares the training NLL (%s) with a threshold fitted on %s calibration rows; "
                "use the same kind of data for both (or set `answer_nll`).",
                "answer letter" if self.answer_nll == "first" else "mean completion NLL",
                "multiple-choice" if calibration_mcq else "open-ended",
            )

    def _loss_covers_answers(self, trainer, train) -> bool:
        """Whether a training step's loss tokens are each example's answer (what online detection reads)."""
        columns = get_dataset_column_names(train)
        completions = "prompt" in columns and "completion" in columns and trainer._formatting_func is None
        return completions or self.args.assistant_only_loss

    def _setup_stream(self, trainer) -> None:
        """An `IterableDataset` cannot be scored ahead: online detection, with one fit before the first step."""
        source, calibration = "the calibration_dataset", self.calibration_dataset
        if calibration is None:
            calibration = Dataset.from_list(list(islice(self.train_rows, self.args.auto_detection_samples)))
            source = f"the first {len(calibration)} rows of the stream"
            if answer_rows(calibration) is None:
                self._calibrate_every_token(trainer, self._no_answers(calibration))
                return
        if not self._loss_covers_answers(trainer, self.train_rows):
            self._calibrate_every_token(
                trainer,
                "the train dataset is an `IterableDataset`, which cannot be scored ahead, and its loss covers whole "
                "sequences (no prompt/completion columns, no `assistant_only_loss`), so no answer NLL can be read in "
                "its training steps",
            )
            return
        self.path = "stream"
        self._setup_online(trainer, calibration, refit_steps=None)
        self._announce(
            trainer,
            "the train dataset is an `IterableDataset`, which cannot be scored ahead: a threshold fitted once, before "
            f"the first step, on {source}, compared with each example's answer NLL in its training step",
        )

    def _calibrate_every_token(self, trainer, reason: str) -> None:
        self.path = "no_answer"
        self._announce(
            trainer,
            f"{reason}, so the calibration term goes to every token, as with `apply_to='all'`",
            path="no_answer",
        )

    @staticmethod
    def _no_answers(dataset) -> str:
        return (
            f"the train dataset's rows ({get_dataset_column_names(dataset)}) have no answer to score (neither "
            "prompt/completion nor conversational `messages`)"
        )

    def _announce(self, trainer, description: str, level: int = logging.WARNING, path: str | None = None) -> None:
        """The one log line that says where the known flags come from; also recorded for the model card."""
        detection = self.args.detection
        self.summary = {"detection": detection, "path": path or self.path, "description": description}
        if trainer.is_world_process_zero():
            logger.log(level, "Knowledge detection (detection=%r): %s.", detection, description)

    # -- the flags -----------------------------------------------------------------------------------------------

    @contextmanager
    def _detection_model(self, trainer):
        """The model as it is when detection runs (before the first step), with any PEFT adapter disabled."""
        if is_peft_model(trainer.model):
            with trainer.model.disable_adapter():
                yield trainer.model
        else:
            yield trainer.model

    def _ensure_rule(self, trainer) -> KnowledgeRule:
        """Fit the rule `detection="auto"` flags rows by, once (see `calib_trl.cogcalib.knowledge.fit_knowledge_rule`)."""
        if self.rule is not None:
            return self.rule
        args = self.args
        rows = answer_rows(self.train_rows)
        calibration = self.calibration_dataset
        if calibration is not None:
            calibration = answer_rows(calibration)
            if calibration is None:
                raise ValueError(
                    "The `calibration_dataset` has no answers to fit the known threshold on: it needs "
                    "prompt/completion columns or conversational `messages`."
                )
        if rows is None and calibration is None:
            raise ValueError(
                "`detection='auto'` fits its rule on the training rows, which have no answer to score; pass a "
                "`calibration_dataset`, or add the `known` column to every dataset."
            )
        with self._detection_model(trainer) as model:
            self.rule = fit_knowledge_rule(
                model,
                trainer._tokenizer,
                rows,
                calibration,
                batch_size=args.per_device_eval_batch_size,
                progress=not args.disable_tqdm,
                max_new_tokens=args.detection_max_new_tokens,
            )
        if self.rule.report is not None:
            logger.info("Knowledge threshold (detection='auto'):\n%s", self.rule.report)
            if not self.rule.report.fitted:
                on_unfitted_threshold(self.rule.report, "Automatic detection", self.args.unfitted_threshold)
        return self.rule

    def flag(self, trainer, dataset, dataset_name: str):
        """`dataset` with the known column, from the rule (or from the flags restored for it)."""
        restored = self.flags.get(dataset_name)
        if restored is not None and len(restored) == len(dataset):
            known = restored
        else:
            rule = self._ensure_rule(trainer)
            args = self.args
            rows = answer_rows(dataset)
            if rule.path != "calibration_dataset" and is_multiple_choice(rows) != (rule.path == "multiple_choice"):
                rule = KnowledgeRule(
                    "multiple_choice" if is_multiple_choice(rows) else "generation",
                    max_new_tokens=args.detection_max_new_tokens,
                )
            announce_cost(trainer, rule, len(dataset), dataset_name, self.column)
            with self._detection_model(trainer) as model:
                known = rule.flag(
                    model,
                    trainer._tokenizer,
                    rows,
                    batch_size=args.per_device_eval_batch_size,
                    progress=not args.disable_tqdm,
                    desc=f"Detecting known rows ({dataset_name})",
                ).tolist()
            self.flags[dataset_name] = [bool(k) for k in known]
        known = [bool(k) for k in known]
        self.known_fractions[dataset_name] = {"known_fraction": sum(known) / max(len(known), 1), "rows": len(known)}
        return dataset.add_column(self.column, known)

    def before_batches(self, trainer, state: dict | None) -> None:
        """Restore what a checkpoint saved; flag, once, the datasets passed to the trainer without the column."""
        if state is not None:
            self.load_state_dict(state, trainer)
        if not self.undetected:
            return
        pending, self.undetected = self.undetected, {}
        args = self.args
        for name, dataset in pending.items():
            flagged = self.flag(trainer, dataset, name)
            packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
            prepared = trainer._prepare_dataset(
                flagged, trainer.processing_class, args, packing, trainer._formatting_func, name
            )
            if name == "train":
                trainer.train_dataset = prepared
            elif isinstance(trainer.eval_dataset, dict):
                trainer.eval_dataset[name] = prepared
            else:
                trainer.eval_dataset = prepared
        self.flag_on_prepare = True
        fractions = ", ".join(
            f"{name} {f['known_fraction']:.3f} of {f['rows']} rows" for name, f in self.known_fractions.items()
        )
        restored = f" (restored from {self._restored_from})" if self._restored_from else ""
        description = f"{self.rule.describe()}{restored}; known fraction: {fractions}"
        path = self.rule.path
        if "train" not in pending:
            description = f"the train dataset's from its `{self.column}` column; the others' by {description}"
            path = "column"
        self.path = path
        self._announce(trainer, description, path=path)
        self.summary.update(rule=self.rule.to_dict(), known=dict(self.known_fractions))
        if "train" in pending and not any(self.flags.get("train", [])):
            logger.warning(
                "No row of the train dataset is known to the model: with `apply_to='known'` the loss is plain "
                "cross-entropy (standard SFT)."
            )

    def before_prepare(self, trainer, dataset, dataset_name: str):
        """A dataset prepared after the first batch (passed to `evaluate`) is flagged by the same rule as the others."""
        if self.flag_on_prepare and self.column not in get_dataset_column_names(dataset):
            return self.flag(trainer, dataset, dataset_name)
        return dataset

    # -- per step ------------------------------------------------------------------------------------------------

    def before_forward(self, trainer, model) -> None:
        if self.detector is not None and self.detector.due(trainer.state.global_step):
            report = self.detector.refit(model, trainer.state.global_step)
            logger.info("Online detection re-fitted at step %d:\n%s", trainer.state.global_step, report)
            if not report.fitted:
                on_unfitted_threshold(
                    report, f"Online detection at step {trainer.state.global_step}", self.args.unfitted_threshold
                )

    def selected(self, trainer, inputs, known, nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss tokens of the examples that get the calibration term: all, the known ones, or the online-known."""
        if self.path in ("all", "no_answer"):
            return mask
        if self.detector is not None:
            example_nll, inverse = answer_nll_per_example(trainer, inputs, nll, mask, self.answer_nll)
            return self.detector.flags(example_nll)[inverse] & mask
        if known is None:
            raise KeyError(
                f"The batch has no `{self.column}` tensor. With a custom data collator, return it as a per-token "
                "tensor (see `calib_trl.DataCollatorWithKnowledgeFlags`)."
            )
        return mask & (trainer.to_outputs(known, inputs) > 0.5)

    def log(self, logs) -> None:
        """The online threshold and its fit; detection accuracy is NaN while no threshold is fitted."""
        report = self.detector.last_report
        logs["calib/threshold"].append(float(self.detector.threshold))
        logs["calib/threshold_fitted"].append(float(report.fitted))
        logs["calib/detection_accuracy"].append(report.detection_accuracy)

    # -- saved state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {}
        if self.detector is not None:
            state["online_detector"] = self.detector.state_dict()
        if self.flags:
            state["flags"] = {name: _encode(flags) for name, flags in self.flags.items()}
            state["rule"] = self.rule.to_dict() if self.rule is not None else None
        return state

    def load_state_dict(self, state: dict, trainer) -> None:
        """
        The online threshold and the flags a checkpoint saved. A damaged entry is named in a warning and replaced by a
        fresh fit or detection with the resuming trainer's model.
        """
        where = state.get("checkpoint", "the checkpoint")
        if self.detector is not None and "online_detector" in state:
            try:
                self.detector.load_state_dict(state["online_detector"])
            except (KeyError, TypeError, ValueError) as err:
                logger.warning(
                    "%s: calib-trl's saved online threshold is damaged (%s: %s); it is re-fitted before the next step.",
                    where,
                    type(err).__name__,
                    err,
                )
                self.detector.threshold = None
        flags = state.get("flags")
        if flags is None:
            return
        try:
            restored = {name: [c == "1" for c in code] for name, code in flags.items() if set(code) <= {"0", "1"}}
            if len(restored) != len(flags):
                raise ValueError("flags other than 0 and 1")
            rule = KnowledgeRule.from_dict(state["rule"]) if state.get("rule") else None
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            logger.warning(
                "%s: calib-trl's saved known flags are damaged (%s: %s); the rows are flagged again with the model "
                "this trainer was given.",
                where,
                type(err).__name__,
                err,
            )
            return
        self.flags.update(restored)
        if rule is not None:
            self.rule = rule
        self._restored_from = where


def answer_nll_per_example(trainer, inputs, nll: torch.Tensor, mask: torch.Tensor, answer_nll: str):
    """
    Each example's answer NLL in this very batch (`answer_nll`: `"first"`, the first loss token's, or `"mean"`, the
    mean over its loss tokens), and the index of each token's example in it (`-1`-padded positions share one).
    """
    ex = trainer.to_outputs(example_index(inputs, inputs["input_ids"].shape, trainer.padding_free), inputs)
    ex = torch.where(mask, ex, torch.full_like(ex, -1))
    ids, inverse = torch.unique(ex, return_inverse=True)
    n = ids.numel()
    if answer_nll == "first":
        # the first label position of each example holds its answer token
        pos = torch.arange(ex.shape[-1], device=ex.device).expand_as(ex)
        first = torch.full((n,), ex.shape[-1], device=ex.device, dtype=torch.long)
        first.scatter_reduce_(0, inverse[mask], pos[mask], reduce="amin")
        is_first = mask & (pos == first[inverse])
        return torch.zeros(n, device=nll.device).index_add_(0, inverse[is_first], nll[is_first]), inverse
    total = torch.zeros(n, device=nll.device).index_add_(0, inverse[mask], nll[mask])
    count = torch.zeros(n, device=nll.device).index_add_(0, inverse[mask], torch.ones_like(nll[mask]))
    return total / count.clamp(min=1), inverse


def announce_cost(trainer, rule: KnowledgeRule, rows: int, dataset_name: str, column: str) -> None:
    """Before a long scoring pass: how many rows, and how to avoid it."""
    if not trainer.is_world_process_zero():
        return
    work = {
        "generation": "a greedy answer of each of",
        "multiple_choice": "one forward pass over each of",
        "calibration_dataset": "one forward pass over each of",
    }.get(rule.path, "each of")
    logger.warning(
        "Detecting known rows before the first step (detection='auto'): %s the %d rows of the %s dataset; the "
        "progress bar shows the time left. To skip this, flag them once with `calib_trl.detect_known` (or "
        "`calib-trl detect`) and keep the `%s` column, or use detection='online' with a calibration_dataset.",
        work,
        rows,
        dataset_name,
        column,
    )


def on_unfitted_threshold(report, what: str, mode: str) -> None:
    """`unfitted_threshold`: stop, or go on with a loud warning, when no threshold separates known rows."""
    consequence = (
        "every example gets the calibration term"
        if report.threshold > 0
        else "no example gets the calibration term: training is plain cross-entropy (standard SFT)"
    )
    message = f"{what}: {report}. So {consequence}."
    if mode == "raise":
        raise ValueError(
            f"{message} Fit on rows the model answers partly right (more, or other, calibration rows), or set "
            "`unfitted_threshold='warn'` to train on."
        )
    logger.warning("NO KNOWLEDGE THRESHOLD. %s Set `unfitted_threshold='raise'` to stop instead.", message)
