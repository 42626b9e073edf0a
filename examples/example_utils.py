# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""What the example scripts share: their arguments, model and data loading, and the before/after evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from trl import ModelConfig, ScriptArguments

from calib_trl import CalibrationCallback
from calib_trl.evaluation.evaluate import evaluate_calibration, fit_temperature_on
from calib_trl.evaluation.plotting import plot_reliability_diagrams
from calib_trl.evaluation.reports import escape_markdown, json_safe
from calib_trl.evaluation.temperature_scaling import at_temperature_bound
from calib_trl.loading import MissingSplitError, load_model, load_split
from calib_trl.metrics import reliability_diagram_data


@dataclass
class CalibScriptArguments(ScriptArguments):
    """Data and evaluation settings of the calib-trl examples (on top of TRL's `ScriptArguments`)."""

    dataset_name: str | None = field(
        default="default",
        metadata={
            "help": "An embedded dataset (`default` = `arithmetic`, answered in words; `arithmetic-mc`, the same rows "
            "as multiple choice; `mmlu`), a `save_to_disk` directory or a JSON(L) file."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str = field(default="test", metadata={"help": "Evaluation split (before/after table)."})
    calibration_split: str = field(
        default="calibration",
        metadata={"help": "Held-out split the temperature (and a detection threshold, if any) is fitted on."},
    )
    ood_split: str | None = field(
        default="ood",
        metadata={
            "help": "Out-of-domain split also evaluated; `none` for none (a name the dataset lacks is an error)."
        },
    )
    max_train_samples: int | None = field(default=96, metadata={"help": "Training rows used (0: all)."})
    max_eval_samples: int | None = field(
        default=64, metadata={"help": "Evaluation rows used, per evaluation split (0: all)."}
    )
    max_calibration_samples: int | None = field(default=64, metadata={"help": "Calibration rows used (0: all)."})
    style_adaptation_steps: int = field(
        default=0,
        metadata={
            "help": "Flag the known rows with `detect_known` after this many style-adaptation steps instead of the "
            "trainer's own detection (0: the trainer detects them)."
        },
    )
    style_adaptation_lr: float = field(default=4e-5, metadata={"help": "Style-adaptation learning rate."})
    style_adaptation_batch_size: int = field(default=16, metadata={"help": "Style-adaptation batch size."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the calibration evaluations."})
    max_new_tokens: int = field(default=32, metadata={"help": "Open-ended rows: the longest generated answer."})
    calibration_eval_steps: int | None = field(
        default=None,
        metadata={"help": "Also measure calibration on the evaluation split every N steps during training."},
    )


def model_from_args(model_args: ModelConfig, training_args):
    """`(model, tokenizer)` as `ModelConfig` and the training arguments ask, on the training device (where evaluation
    and detection run before the trainer takes the model)."""
    dtype = model_args.dtype
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    return load_model(
        model_args.model_name_or_path,
        dtype=dtype,
        device=training_args.device,
        attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision,
    )


def load_splits(script_args, keys=("train", "eval", "calibration", "ood"), optional=("calibration",)):
    """
    The splits `keys` (of `train`, `eval`, `calibration`, `ood`) that the arguments name. Each must exist, except
    those in `optional`, which are left out when missing (by default the calibration split); `--ood_split none` skips
    `ood`.
    """
    splits = {}
    for key, flag, name, cap in (
        ("train", "dataset_train_split", script_args.dataset_train_split, script_args.max_train_samples),
        ("eval", "dataset_test_split", script_args.dataset_test_split, script_args.max_eval_samples),
        ("calibration", "calibration_split", script_args.calibration_split, script_args.max_calibration_samples),
        ("ood", "ood_split", script_args.ood_split, script_args.max_eval_samples),
    ):
        if key not in keys or name is None or (key == "ood" and name.lower() == "none"):
            continue
        try:
            splits[key] = load_split(script_args.dataset_name, name, cap or None)  # 0: all rows
        except MissingSplitError as err:
            if key in optional:
                continue
            hint = " Pass `--ood_split none` to skip the out-of-domain evaluation." if key == "ood" else ""
            raise MissingSplitError(err.dataset, name, err.splits, flag=f"--{flag}", hint=hint) from None
    return splits


def evaluate_splits(model, tokenizer, splits, script_args) -> dict:
    """
    Calibration of the model on the evaluation and out-of-domain splits, before and after temperature scaling (the
    temperature fitted on the calibration split when there is one): `{split key: (report, scaled report, diagram)}`.
    """
    temperature = None
    if "calibration" in splits:
        temperature = fit_temperature_on(
            model, tokenizer, splits["calibration"], batch_size=script_args.eval_batch_size, progress=False
        )
    out = {}
    for name in ("eval", "ood"):
        if name not in splits:
            continue
        result = evaluate_calibration(
            model,
            tokenizer,
            splits[name],
            batch_size=script_args.eval_batch_size,
            temperature=temperature,
            max_new_tokens=script_args.max_new_tokens,
            shard=True,
            desc=f"Evaluating ({name})",
        )
        diagram = reliability_diagram_data(result.confidences, result.correct)
        out[name] = (result.report, result.scaled_report, diagram)
    return out


def add_calibration_callback(trainer, splits, script_args) -> None:
    """Measure calibration on the evaluation split every `calibration_eval_steps` steps, if asked."""
    if script_args.calibration_eval_steps:
        trainer.add_callback(
            CalibrationCallback(
                trainer,
                splits["eval"],
                name=script_args.dataset_name or "eval",
                split=script_args.dataset_test_split,
                eval_steps=script_args.calibration_eval_steps,
                on_epoch=False,
                batch_size=script_args.eval_batch_size,
                max_new_tokens=script_args.max_new_tokens,
            )
        )


# The table's columns: (key, heading, which direction is better)
_COLUMNS = (
    ("accuracy", "accuracy", "↑"),
    ("auroc", "AUROC", "↑"),
    ("ece", "ECE", "↓"),
    ("ece_ts", "ECE after TS (T)", "↓"),
    ("side", "", ""),
    ("lm_nll", "LM NLL", "↓"),
)


def _ece_floor(confidences: np.ndarray, draws: int = 200) -> float:
    """The ECE a perfectly calibrated model with these confidences shows on this many rows (binned ECE's bias)."""
    rng = np.random.default_rng(0)
    correct = rng.uniform(size=(draws, len(confidences))) < confidences[None, :]
    edges = np.arange(11) / 10
    ece = []
    for row in correct:
        index = np.searchsorted(edges, confidences, side="right") - 1
        gap = np.bincount(index, confidences - row, minlength=11)
        ece.append(np.abs(gap).sum() / len(confidences))
    return float(np.mean(ece))


def before_after_table(before: dict, after: dict, split_names: dict, method: str) -> str:
    """
    The before/after table: for each split, the base model, the fine-tuned one and their difference, on the key
    columns, each heading saying which direction is better; then what the row count can and cannot show.
    """
    kind = next(iter(after.values()))[0].get("kind", "multiple_choice")
    side = ("entropy", "answer entropy", "") if kind == "generation" else ("answer_mass", "answer mass", "↑")
    columns = [(side if key == "side" else (key, heading, better)) for key, heading, better in _COLUMNS]
    accuracy = "match rate" if kind == "generation" else "accuracy"
    header = [f"{accuracy if k == 'accuracy' else h} {b}".strip() for k, h, b in columns]
    lines = ["| split | model | rows | " + " | ".join(header) + " |", "|---" * (len(columns) + 3) + "|"]

    def cells(report, scaled):
        values = []
        for key, _, _ in columns:
            if key == "ece_ts":
                t = scaled.get("temperature") if scaled else None
                flag = ", search bound" if t is not None and at_temperature_bound(t) else ""
                values.append(f"{scaled['ece']:.3f} ({t:.2f}{flag})" if scaled else "")
            else:
                value = report.get(key)
                values.append("" if value is None else f"{value:.3f}")
        return values

    for name, (report, scaled, _) in after.items():
        base, base_scaled, _ = before[name]
        split = escape_markdown(split_names[name])
        lines.append(f"| {split} | base | {base['n']} | " + " | ".join(cells(base, base_scaled)) + " |")
        lines.append(f"| {split} | {method} | {report['n']} | " + " | ".join(cells(report, scaled)) + " |")
        diffs = []
        for key, _, _ in columns:
            a = scaled["ece"] if key == "ece_ts" and scaled else report.get(key)
            b = base_scaled["ece"] if key == "ece_ts" and base_scaled else base.get(key)
            diffs.append("" if a is None or b is None else f"{a - b:+.3f}")
        lines.append(f"| {split} | difference | | " + " | ".join(diffs) + " |")
    n = min(report["n"] for report, _, _ in after.values())
    report = after["eval"][0] if "eval" in after else next(iter(after.values()))[0]
    se = (report["accuracy"] * (1 - report["accuracy"]) / n) ** 0.5
    lines += [
        "",
        f"{n} rows per split: a difference in {accuracy} below about {2 * se:.2f} (two standard errors) is within the "
        f"noise, and an ECE near {_ece_floor(np.full(n, report['mean_confidence'])):.2f} is what a perfectly calibrated "
        "model shows on this few rows. This run shows what the method does; whether it beats SFT needs several seeds "
        "and paired intervals (benchmarks/reproduce.py, benchmarks/README.md).",
    ]
    return "\n".join(lines)


def finish(trainer, tokenizer, splits, before, script_args, method):
    """
    Evaluate after training; save the model and its card (base and fine-tuned results side by side), the diagrams and
    `calibration.json`; print the before/after table and what was written.
    """
    after = evaluate_splits(trainer.model, tokenizer, splits, script_args)
    out = trainer.args.output_dir
    dataset = script_args.dataset_name or "default"
    names = {"eval": script_args.dataset_test_split, "ood": script_args.ood_split}
    written = []
    if trainer.is_world_process_zero():
        panels = {}
        for name in after:
            panels[f"base ({names[name]})"] = before[name][2]
            panels[f"{method} ({names[name]})"] = after[name][2]
            trainer.record_calibration(before[name][0], dataset, names[name], base=True)
        figure = os.path.join(out, "reliability_before_after.png")
        plot_reliability_diagrams(panels, path=figure, suptitle=f"{method}: before and after fine-tuning")
        for name in after:
            trainer.record_calibration(
                after[name][0], dataset, names[name], diagram=figure if name == "eval" else None
            )
        payload = {"name": method, "report": after["eval"][0], "reliability_diagram": after["eval"][2]}
        payload["before"] = before["eval"][0]
        payload["temperature_scaled"] = after["eval"][1]
        if "ood" in after:
            payload.update(ood=after["ood"][0], ood_before=before["ood"][0], ood_temperature_scaled=after["ood"][1])
        with open(os.path.join(out, "calibration.json"), "w") as f:
            json.dump(json_safe(payload), f, indent=2)
        written = [os.path.join(out, "calibration.json"), figure]
    trainer.save_model(out)  # the weights and the card (`save_model` writes it)
    trainer.create_model_card(dataset_name=dataset)  # the card again, naming the training dataset
    if trainer.is_world_process_zero():
        print("\n" + before_after_table(before, after, names, method))
        weights = [f for f in sorted(os.listdir(out)) if f.endswith(".safetensors") or f.startswith("pytorch_model")]
        print(f"\nWrote {out}: the model ({', '.join(weights)}), its card README.md, {', '.join(written)}")
