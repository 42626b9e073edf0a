# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Knowledge-bias detection alone (CogCalib, step 1): flag the training examples the model already knows.

    python examples/detect_known.py                                   # embedded defaults, small subset, CPU
    python examples/detect_known.py --max_train_samples 0 --max_calibration_samples 0 \
        --style_adaptation_steps 60 --style_adaptation_batch_size 64  # the whole train split (GPU)
    accelerate launch examples/detect_known.py ...                    # each process scores a share

Fits the NLL threshold on the calibration split (Youden's J), prints the detection report (threshold, detection
accuracy on the calibration split, known fraction), and saves the flagged split with `known` and `answer_nll`
columns (`save_to_disk`), ready for `CalibSFTTrainer`.
"""

import json
import os
from dataclasses import dataclass, field

from example_utils import CalibScriptArguments, load_splits, model_from_args
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from calib_trl import detect_known
from calib_trl.core.config import bf16_supported


@dataclass
class DetectArguments(CalibScriptArguments):
    output_dir: str = field(default="outputs/detect_known", metadata={"help": "Where the flagged dataset goes."})


def main(script_args, model_args):
    args = TrainingArguments(output_dir=script_args.output_dir, bf16=bf16_supported(), report_to=[])
    model, tokenizer = model_from_args(model_args, args)
    splits = load_splits(script_args, keys=("train", "calibration"), optional=())
    flagged, report = detect_known(
        model,
        tokenizer,
        splits["train"],
        calibration_dataset=splits["calibration"],
        batch_size=script_args.eval_batch_size,
        style_adaptation_steps=script_args.style_adaptation_steps,
        style_adaptation_kwargs={
            "learning_rate": script_args.style_adaptation_lr,
            "batch_size": script_args.style_adaptation_batch_size,
        },
        return_report=True,
    )
    if args.process_index == 0:
        print(f"\n{report}")
        os.makedirs(script_args.output_dir, exist_ok=True)
        flagged.save_to_disk(os.path.join(script_args.output_dir, "train"))
        with open(os.path.join(script_args.output_dir, "detection.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"Wrote {script_args.output_dir}/train and detection.json")


if __name__ == "__main__":
    parser = TrlParser((DetectArguments, ModelConfig))
    script_args, model_args = parser.parse_args_and_config()
    main(script_args, model_args)
