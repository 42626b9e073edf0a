"""Calibration of lm-evaluation-harness multiple-choice tasks, read from its per-sample logs.

`lm_eval ... --log_samples --output_path OUT` writes, for each model, a directory `OUT/<model>/` holding
`results_<date>.json` and one `samples_<task>_<date>.jsonl` per task. For a task with `output_type: multiple_choice`
every line of the samples file is one question: `arguments` holds one `(context, continuation)` request per option,
`filtered_resps` the `(log-likelihood, is_greedy)` pair lm-eval scored each option with (as strings), `target` the right
option (`str(doc_to_target(doc))`: its index, or its text) and the per-sample values of the task's metrics (`acc`,
`acc_norm`, ...). This module reads those files (the `lm_eval` package is not needed) and computes
`calib_trl.metrics.calibration_report` for each task in lm-eval's two conventions:

- `acc`: the option probabilities are the softmax over the log-likelihoods, so the prediction is lm-eval's `acc`
  prediction, `argmax(lls)`;
- `acc_norm`: the softmax over the log-likelihoods divided by each option's length in characters, the normalisation of
  lm-eval's `acc_norm` (`lm_eval.api.task.ConfigurableTask.process_results`): `argmax(lls / len(choice))`, where a
  choice is the continuation without the task's `target_delimiter`.

Every per-sample `acc`/`acc_norm` value lm-eval logged is checked against the prediction rebuilt from the
log-likelihoods, so the reports' `accuracy` is lm-eval's own number or reading fails, naming the sample.

Questions with fewer options than the task's largest number of options get zero-probability options in the padded
columns (ARC has 3 to 5 options per question). Tasks whose options are in the context rather than the continuation
(`multiple_input`, e.g. WinoGrande) have no `acc_norm` (the option texts are not in the log), and their logged target
is the shared continuation: for two options the right one follows from lm-eval's logged `acc`; with more they are
skipped. Tasks that are not multiple choice, and multiple-choice tasks with several right options per question, are
skipped with the reason. Generation tasks (`generate_until`) are among them: lm-eval logs each generated answer and its
verdict but no token probability, so the logs hold no confidence of the answer; `calib-trl evaluate` measures the
calibration of generated answers on the rows themselves (`calib_trl.evaluation.generation`).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..metrics import calibration_report, reliability_diagram_data
from .reports import json_safe

logger = logging.getLogger(__name__)


__all__ = ["CONVENTIONS", "LmEvalRun", "LmEvalTask", "from_lm_eval", "read_lm_eval", "record_lm_eval"]

#: lm-eval's names of the two multiple-choice conventions: raw and length-normalised log-likelihood.
CONVENTIONS = ("acc", "acc_norm")

_DATE = r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?"
_SAMPLES_NAME = re.compile(rf"^samples_(?P<task>.+?)(?:_(?P<date>{_DATE}))?\.jsonl$")
_REQUIRED_FIELDS = ("doc_id", "target", "arguments", "filtered_resps")


@dataclass
class LmEvalTask:
    """The calibration of one lm-eval multiple-choice task (one filter of it) for one model."""

    task: str
    file: str
    split: str | None
    reports: dict[str, dict] = field(default_factory=dict)  # convention -> calibration_report
    diagrams: dict[str, dict] = field(default_factory=dict)  # convention -> reliability_diagram_data
    lm_eval: dict[str, float] = field(default_factory=dict)  # convention -> lm-eval's own aggregated value
    verified: list[str] = field(default_factory=list)  # conventions checked sample by sample against lm-eval's log

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "split": self.split,
            "lm_eval": self.lm_eval,
            "verified_against_lm_eval": self.verified,
            "conventions": {
                name: {"report": self.reports[name], "reliability_diagram": self.diagrams[name]}
                for name in self.reports
            },
        }


@dataclass
class LmEvalRun:
    """Everything read from one model's lm-eval output directory."""

    model: str
    path: str
    tasks: dict[str, LmEvalTask] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it has no calibration report

    def to_dict(self) -> dict:
        return json_safe(
            {
                "model": self.model,
                "path": self.path,
                "tasks": {name: task.to_dict() for name, task in self.tasks.items()},
                "skipped": self.skipped,
            }
        )


def read_lm_eval(path: str | os.PathLike, n_bins: int = 10, progress: bool = True) -> list[LmEvalRun]:
    """
    Read lm-eval's per-sample logs and compute the calibration of every multiple-choice task in them.

    Args:
        path (`str` or `os.PathLike`):
            A `samples_<task>_<date>.jsonl` file written by `lm_eval --log_samples`, or a directory searched
            recursively for them: a model's directory, or lm-eval's `--output_path` holding one directory per model.
            When a directory holds several runs of a task, the newest is read.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of bins of the ECE and the reliability diagrams.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the files.

    Returns:
        `list[LmEvalRun]`: One per directory holding samples files (one per model), in path order.
    """
    path = Path(path)
    if path.is_file():
        if not _SAMPLES_NAME.match(path.name):
            raise ValueError(
                f"{path} is not an lm-eval samples file: lm-eval names them `samples_<task>_<date>.jsonl`."
            )
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("samples_*.jsonl") if _SAMPLES_NAME.match(p.name))
        if not files:
            raise FileNotFoundError(
                f"No `samples_<task>_<date>.jsonl` file under {path}: run lm_eval with `--log_samples` and "
                "`--output_path`, and pass that output directory (or a model directory inside it)."
            )
    else:
        raise FileNotFoundError(f"{path} does not exist: pass an lm-eval output directory or a samples_*.jsonl file.")

    by_dir: dict[Path, dict[str, Path]] = {}
    for file in files:  # sorted, so a later date replaces an earlier one
        task = _SAMPLES_NAME.match(file.name)["task"]
        newest = by_dir.setdefault(file.parent, {})
        if task in newest:
            logger.warning("%s: reading the newest run of %s, %s; ignoring %s.", file.parent, task, file, newest[task])
        newest[task] = file

    runs, results_of = [], {}  # (directory, date) -> the results JSON, read once for all of a run's tasks
    bar = tqdm(
        total=sum(len(tasks) for tasks in by_dir.values()), desc="Reading lm-eval samples", disable=not progress
    )
    for directory, tasks in by_dir.items():
        run = LmEvalRun(model=directory.name, path=str(directory))
        for task, file in tasks.items():
            key = (directory, _SAMPLES_NAME.match(file.name)["date"])
            if key not in results_of:
                results_of[key] = _results_json(file)
            results = results_of[key]
            if results.get("model_name"):
                run.model = str(results["model_name"])
            for name, outcome in _read_task(file, task, results, n_bins).items():
                if isinstance(outcome, str):
                    run.skipped[name] = outcome
                else:
                    run.tasks[name] = outcome
            bar.update(1)
        runs.append(run)
    bar.close()
    return runs


def from_lm_eval(path: str | os.PathLike, n_bins: int = 10) -> dict[str, dict[str, dict]]:
    """
    The calibration of every multiple-choice task that lm-eval logged for one model.

    ```python
    >>> reports = calib_trl.from_lm_eval("results/my-model")  # lm_eval ... --log_samples --output_path results
    >>> reports["arc_challenge"]["acc_norm"]["ece"]
    ```

    Args:
        path (`str` or `os.PathLike`):
            One model's lm-eval output directory, or one `samples_<task>_<date>.jsonl` file (see `read_lm_eval`).
        n_bins (`int`, *optional*, defaults to `10`):
            Number of bins of the ECE.

    Returns:
        `dict[str, dict[str, dict]]`: task -> convention (`"acc"`, `"acc_norm"`) -> `calibration_report`. Tasks that
        are not multiple choice are left out (and logged as skipped).
    """
    runs = read_lm_eval(path, n_bins=n_bins, progress=False)
    if len(runs) > 1:
        raise ValueError(
            f"{path} holds lm-eval samples of {len(runs)} models ({', '.join(run.path for run in runs)}): pass one "
            "model's directory (`calib-trl report --lm-eval` compares several)."
        )
    for task, reason in runs[0].skipped.items():
        logger.warning("lm-eval task %s skipped: %s", task, reason)
    return {name: task.reports for name, task in runs[0].tasks.items()}


def record_lm_eval(trainer, path: str | os.PathLike, convention: str = "acc", n_bins: int = 10) -> list[str]:
    """
    Record the calibration of every multiple-choice task lm-eval logged for the trainer's model, so that the model
    card (`trainer.create_model_card()`) carries them: one `trainer.record_calibration` per task, named by the task,
    with the split lm-eval evaluated and the convention, e.g. `test (acc_norm)`.

    Args:
        trainer (`CalibSFTTrainer` or `RCFTTrainer`):
            Any trainer with `record_calibration` (`calib_trl.model_card.CalibrationModelCardMixin`).
        path (`str` or `os.PathLike`):
            The model's lm-eval output directory, or one samples file.
        convention (`str`, *optional*, defaults to `"acc"`):
            `"acc"` or `"acc_norm"`. Call again with the other to record both.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of bins of the ECE.

    Returns:
        `list[str]`: The tasks recorded.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"`convention` must be one of {list(CONVENTIONS)}, got {convention!r}.")
    runs = read_lm_eval(path, n_bins=n_bins, progress=False)
    if len(runs) > 1:
        raise ValueError(f"{path} holds lm-eval samples of {len(runs)} models: pass the directory of the trainer's.")
    recorded = []
    for name, task in runs[0].tasks.items():
        if convention in task.reports:
            trainer.record_calibration(task.reports[convention], name, f"{task.split or 'lm-eval'} ({convention})")
            recorded.append(name)
    return recorded


# ---------------------------------------------------------------------------------------------------------------------
# Reading one samples file
# ---------------------------------------------------------------------------------------------------------------------


def _results_json(samples_file: Path) -> dict:
    """The aggregated results lm-eval wrote with a samples file (same directory, same date), or `{}`."""
    date = _SAMPLES_NAME.match(samples_file.name)["date"]
    if date is None:
        return {}
    for candidate in sorted(samples_file.parent.glob(f"*_{date}.json")):
        try:
            results = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{candidate}: not a readable lm-eval results JSON ({err}).") from err
        if isinstance(results, dict) and "results" in results:
            for key in ("results", "configs"):
                if key in results and not isinstance(results[key], dict):
                    raise ValueError(
                        f"{candidate}: `{key}` must be an object mapping task names to their {key[:-1]}, got "
                        f"{type(results[key]).__name__}; this is not a results file lm-eval wrote."
                    )
            return results
    return {}


def _load_samples(file: Path) -> list[dict]:
    samples = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start}); lm-eval writes UTF-8.") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{file}, line {number}: not valid JSON ({err}).") from err
        if not isinstance(sample, dict):
            raise ValueError(f"{file}, line {number}: expected a JSON object (one sample), got {sample!r:.80}.")
        missing = [key for key in _REQUIRED_FIELDS if key not in sample]
        if missing:
            raise ValueError(
                f"{file}, line {number}: no {missing} field(s); an lm-eval `--log_samples` line has "
                f"{list(_REQUIRED_FIELDS)}."
            )
        sample["_line"] = number
        samples.append(sample)
    if not samples:
        raise ValueError(f"{file} holds no samples.")
    return samples


def _requests(sample: dict, where: str) -> list[tuple[str, Any]]:
    """The `(context, continuation)` of each request, in request order."""
    arguments = sample["arguments"]
    if not isinstance(arguments, dict) or not all(isinstance(arg, dict) for arg in arguments.values()):
        raise ValueError(f"{where}: `arguments` must map `gen_args_<i>` to `{{arg_0: ..., arg_1: ...}}`.")
    try:
        order = sorted(arguments, key=lambda key: int(key.rsplit("_", 1)[1]))
    except (IndexError, ValueError) as err:
        raise ValueError(f"{where}: `arguments` keys must be `gen_args_<i>`, got {list(arguments)}.") from err
    return [(arguments[key].get("arg_0"), arguments[key].get("arg_1")) for key in order]


def _is_loglikelihood_pair(resp: Any) -> bool:
    if not isinstance(resp, list) or len(resp) != 2:
        return False
    try:
        float(resp[0])
    except (TypeError, ValueError):
        return False
    return True


# lm-eval's `generate_until` samples hold the generated text and the metric's verdict, but no token probability: there
# is no confidence of the answer to calibrate. `calib-trl evaluate` answers open-ended rows itself and measures it.
_NO_GENERATION_CONFIDENCE = (
    "lm-eval logs the generated text and its verdict but no token probabilities, so the answers have no confidence to "
    "calibrate; `calib-trl evaluate` on the task's rows (prompt/completion) measures the calibration of generated "
    "answers"
)


def _not_multiple_choice(sample: dict, results_config: dict) -> str | None:
    """Why a task is not multiple choice, from its config when lm-eval wrote one, else from its first sample."""
    output_type = results_config.get("output_type")
    if output_type == "generate_until":
        return f"output_type is 'generate_until': {_NO_GENERATION_CONFIDENCE}"
    if output_type is not None:
        if output_type != "multiple_choice":
            return f"output_type is {output_type!r}, not 'multiple_choice': there is no log-likelihood per option"
        return None
    resps = sample["filtered_resps"]
    if isinstance(resps, list) and resps and all(isinstance(resp, str) for resp in resps):
        return f"not multiple choice: its samples are generated text; {_NO_GENERATION_CONFIDENCE}"
    if not isinstance(resps, list) or not all(_is_loglikelihood_pair(resp) for resp in resps):
        return (
            "not multiple choice: its samples' `filtered_resps` are not (log-likelihood, is_greedy) pairs "
            f"(got {json.dumps(resps)[:60]})"
        )
    if len(resps) < 2:
        return "not multiple choice: one log-likelihood per sample (output_type 'loglikelihood')"
    return None


def _effective_delimiter(results: dict, config: dict, continuations: list[list[str]]) -> str:
    """
    The `target_delimiter` lm-eval put in front of each choice. With a chat template lm-eval drops it unless the task
    has a `gen_prefix` that does not end with whitespace (`ConfigurableTask.construct_requests`). Without the results
    JSON: lm-eval's default `" "` when every continuation starts with it.
    """
    if "target_delimiter" in config:
        delimiter = config["target_delimiter"]
        if results.get("chat_template") is not None:
            gen_prefix = config.get("gen_prefix")
            delimiter = delimiter if gen_prefix and not gen_prefix[-1:].isspace() else ""
        return delimiter
    return " " if all(c.startswith(" ") for options in continuations for c in options) else ""


def _gold(target: str, choices: list[str], continuations: list[str], where: str) -> int | list[int]:
    """
    lm-eval's right option from the logged `str(target)`: an index (lm-eval turns a digit string into one), a choice's
    text (with the delimiter for the class-based `MultipleChoiceTask`), or a list of indices (several right options).
    """
    if target.isdigit():
        gold = int(target)
        if gold >= len(choices):
            raise ValueError(f"{where}: target {gold} is out of range for {len(choices)} options.")
        return gold
    if target in choices:
        return choices.index(target)
    if target in continuations:
        return continuations.index(target)
    if target.startswith("[") and target.endswith("]"):
        try:
            value = ast.literal_eval(target)
        except (SyntaxError, ValueError):
            value = None
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return value
    raise ValueError(
        f"{where}: target {target!r} is neither an option index, nor one of the options {choices}, nor a list of "
        "indices."
    )


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


def _read_task(file: Path, task: str, results: dict, n_bins: int) -> dict[str, LmEvalTask | str]:
    """task name -> its `LmEvalTask`, or the reason it is skipped (one entry per lm-eval filter)."""
    samples = _load_samples(file)
    config = results.get("configs", {}).get(task, {})
    if not isinstance(config, dict):
        raise ValueError(
            f"{file}: the results file's `configs` entry of {task} is a {type(config).__name__}, not a task config."
        )
    reason = _not_multiple_choice(samples[0], config)
    if reason is not None:
        return {task: reason}

    parsed = []  # (sample, where, lls, contexts, continuations)
    for sample in samples:
        where = f"{file}, line {sample['_line']} (doc_id {sample['doc_id']})"
        requests = _requests(sample, where)
        resps = sample["filtered_resps"]
        if not isinstance(resps, list) or len(resps) != len(requests):
            raise ValueError(
                f"{where}: {len(requests)} requests in `arguments` but `filtered_resps` is {resps!r:.80}."
            )
        if not all(_is_loglikelihood_pair(resp) for resp in resps):
            raise ValueError(
                f"{where}: `filtered_resps` must be (log-likelihood, is_greedy) pairs, got {resps!r:.80}."
            )
        lls = np.array([float(resp[0]) for resp in resps])
        if not np.isfinite(lls).all():
            raise ValueError(f"{where}: a log-likelihood in `filtered_resps` is not finite ({lls.tolist()}).")
        if "acc_mutual_info" in sample.get("metrics", []):  # the second half: unconditional log-likelihoods
            half = len(lls) // 2
            lls, requests = lls[:half], requests[:half]
        if not all(isinstance(cont, str) and isinstance(ctx, str) for ctx, cont in requests):
            raise ValueError(f"{where}: every request in `arguments` must be a (context, continuation) string pair.")
        if len(requests) < 2:
            raise ValueError(f"{where}: a multiple-choice sample needs at least 2 options, got {len(requests)}.")
        parsed.append((sample, where, lls, [ctx for ctx, _ in requests], [cont for _, cont in requests]))

    multiple_input = all(len(set(conts)) == 1 and len(set(ctxs)) > 1 for _, _, _, ctxs, conts in parsed)
    if multiple_input and any(len(lls) != 2 for _, _, lls, _, _ in parsed):
        return {task: "the options are in the context (multiple_input) and the log does not say which is right"}
    delimiter = _effective_delimiter(results, config, [conts for *_, conts in parsed])

    rows: dict[str, list] = {}  # filter -> [(scores per convention, gold)]
    verified: dict[str, set] = {}
    for sample, where, lls, _, conts in parsed:
        if multiple_input:  # WinoGrande: two options, the logged target is the shared continuation
            if "acc" not in sample:
                return {task: "the options are in the context (multiple_input) and lm-eval logged no per-sample acc"}
            pred = int(np.argmax(lls))
            gold = pred if float(sample["acc"]) == 1.0 else 1 - pred
            scores = {"acc": lls}
        else:
            if not all(cont.startswith(delimiter) for cont in conts):
                raise ValueError(f"{where}: a continuation does not start with the target_delimiter {delimiter!r}.")
            choices = [cont[len(delimiter) :] for cont in conts]
            gold = _gold(str(sample["target"]), choices, conts, where)
            if isinstance(gold, list):
                return {task: "several right options per question (multiple_target): no single label to calibrate"}
            # exactly lm-eval's normalisation: lls / np.array([float(len(i)) for i in choices])
            scores = {"acc": lls, "acc_norm": lls / np.array([float(len(choice)) for choice in choices])}
        filter_name = str(sample.get("filter", "none"))
        for convention, values in scores.items():
            if convention in sample and not multiple_input:  # (multiple_input: the label came from the logged acc)
                ours = 1.0 if int(np.argmax(values)) == gold else 0.0
                if ours != float(sample[convention]):
                    raise ValueError(
                        f"{where}: lm-eval logged {convention} = {sample[convention]}, but the logged log-likelihoods "
                        f"give {ours} (right option {gold}); the file does not match lm-eval's multiple-choice scoring."
                    )
                verified.setdefault(filter_name, set()).add(convention)
        rows.setdefault(filter_name, []).append((scores, gold))

    split = config.get("test_split") or config.get("validation_split")
    out: dict[str, LmEvalTask | str] = {}
    for filter_name, filter_rows in rows.items():
        name = task if len(rows) == 1 else f"{task},{filter_name}"
        entry = LmEvalTask(task=name, file=str(file), split=split)
        entry.verified = [c for c in CONVENTIONS if c in verified.get(filter_name, set())]
        n_options = max(len(scores["acc"]) for scores, _ in filter_rows)
        labels = np.array([gold for _, gold in filter_rows])
        for convention in CONVENTIONS:
            if convention not in filter_rows[0][0]:
                continue
            probs = np.zeros((len(filter_rows), n_options))
            for i, (scores, _) in enumerate(filter_rows):
                probs[i, : len(scores[convention])] = _softmax(scores[convention])
            entry.reports[convention] = calibration_report(probs, labels, n_bins=n_bins)
            correct = probs.argmax(axis=1) == labels
            entry.diagrams[convention] = reliability_diagram_data(probs.max(axis=1), correct, n_bins=n_bins)
            value = results.get("results", {}).get(task, {}).get(f"{convention},{filter_name}")
            if isinstance(value, (int, float)) and math.isfinite(value):
                entry.lm_eval[convention] = float(value)
        out[name] = entry
    return out
