"""Shared pieces of the example scripts: script arguments, model and data loading, before/after evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, ScriptArguments

from .evaluation.callbacks import CalibrationCallback
from .evaluation.evaluate import evaluate_calibration
from .evaluation.plotting import plot_reliability_diagrams
from .evaluation.reports import format_table, json_safe
from .loading import MissingSplitError, load_model, load_split
from .metrics import reliability_diagram_data


@dataclass
class CalibScriptArguments(ScriptArguments):
    """Data and evaluation settings of the calib-trl examples (on top of TRL's `ScriptArguments`)."""

    dataset_name: str | None = field(
        default="default",
        metadata={"help": "`default` (the embedded MMLU), a `save_to_disk` directory or a JSON(L) file."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str = field(default="test", metadata={"help": "Evaluation split (before/after table)."})
    calibration_split: str = field(
        default="calibration", metadata={"help": "Split the detection threshold is fitted on."}
    )
    ood_split: str | None = field(
        default="ood",
        metadata={
            "help": "Out-of-domain split also evaluated; `none` for none (a name the dataset lacks is an error)."
        },
    )
    max_train_samples: int | None = field(default=48, metadata={"help": "Training rows used (0: all)."})
    max_eval_samples: int | None = field(
        default=64, metadata={"help": "Evaluation rows used, per evaluation split (0: all)."}
    )
    max_calibration_samples: int | None = field(default=80, metadata={"help": "Calibration rows used (0: all)."})
    style_adaptation_steps: int = field(default=3, metadata={"help": "Style-adaptation steps before detection."})
    style_adaptation_lr: float = field(default=4e-5, metadata={"help": "Style-adaptation learning rate."})
    style_adaptation_batch_size: int = field(default=16, metadata={"help": "Style-adaptation batch size."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the calibration evaluations."})
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


def evaluate_splits(model, tokenizer, splits, batch_size):
    """Calibration report and diagram data of the model on the evaluation and out-of-domain splits."""
    return {name: evaluate(model, tokenizer, splits[name], batch_size) for name in ("eval", "ood") if name in splits}


def evaluate(model, tokenizer, data, batch_size):
    result = evaluate_calibration(model, tokenizer, data, batch_size=batch_size, desc="Evaluating", shard=True)
    return result.report, reliability_diagram_data(result.confidences, result.correct)


def load_splits(script_args, keys=("train", "eval", "calibration", "ood"), optional=("calibration",)):
    """
    The splits `keys` (of `train`, `eval`, `calibration`, `ood`) that the arguments name. Each must exist, except
    those in `optional`, which are left out when missing (by default the calibration split, which only detection
    needs, and asks for when it does); `--ood_split none` skips `ood`.
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
            )
        )


def finish(trainer, tokenizer, splits, before, script_args, method):
    """
    Evaluate after training; print the before/after table, write the diagrams, `calibration.json`, the model and its
    card (base and fine-tuned results side by side).
    """
    model = trainer.model
    after = evaluate_splits(model, tokenizer, splits, script_args.eval_batch_size)
    out = trainer.args.output_dir
    dataset = script_args.dataset_name or "default"
    if trainer.is_world_process_zero():
        rows, panels = {}, {}
        for name in after:
            split = script_args.dataset_test_split if name == "eval" else script_args.ood_split
            rows[f"base / {split}"] = before[name][0]
            rows[f"{method} / {split}"] = after[name][0]
            panels[f"base ({split})"] = before[name][1]
            panels[f"{method} ({split})"] = after[name][1]
        print("\n" + format_table(rows))
        figure = os.path.join(out, "reliability_before_after.png")
        plot_reliability_diagrams(panels, path=figure, suptitle=f"{method}: before and after fine-tuning")
        for name, (report, _) in after.items():
            split = script_args.dataset_test_split if name == "eval" else script_args.ood_split
            trainer.record_calibration(before[name][0], dataset, split, base=True)
            trainer.record_calibration(report, dataset, split, diagram=figure if name == "eval" else None)
        with open(os.path.join(out, "calibration.json"), "w") as f:
            json.dump(
                json_safe(
                    {
                        "name": method,
                        "report": after["eval"][0],
                        "reliability_diagram": after["eval"][1],
                        "before": before["eval"][0],
                        "ood": after.get("ood", (None,))[0],
                    }
                ),
                f,
                indent=2,
            )
        print(f"Wrote {figure}, {out}/calibration.json and the model card {out}/README.md")
    trainer.save_model(out)
    trainer.create_model_card(dataset_name=dataset)  # the card `save_model` wrote, with the training dataset
