# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
CogCalib: fine-tune with a calibration loss on the examples the model already knows.

With no arguments it runs on the embedded defaults, offline: SmolLM2-135M-Instruct learning the arithmetic task,
answered in words (96 training rows, 64 test and 64 out-of-domain rows); about 4 minutes on 2 CPU cores, in float32
(bf16 is used only where the accelerator supports it):

    python examples/sft_cogcalib.py
    python examples/sft_cogcalib.py --dataset_name arithmetic-mc    # the same rows as multiple choice
    python examples/sft_cogcalib.py --dataset_name mmlu              # MMLU, which this model answers at chance

Full scale, on a GPU (see examples/configs/cogcalib_full.yaml; flags override the file):

    accelerate launch examples/sft_cogcalib.py --config examples/configs/cogcalib_full.yaml
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/sft_cogcalib.py \
        --config examples/configs/cogcalib_full.yaml

Steps: (1) measure the base model's calibration on the evaluation and out-of-domain splits, before and after
temperature scaling; (2) train with `CalibSFTTrainer`, which flags the rows the model already knows before the first
step (or `--style_adaptation_steps N`: flag them here with `detect_known` after N steps of style adaptation); (3)
measure again, print the before/after table, write the model, its card, reliability diagrams and calibration.json.
"""

from __future__ import annotations

from example_utils import (
    CalibScriptArguments,
    add_calibration_callback,
    evaluate_splits,
    finish,
    load_splits,
    model_from_args,
)
from trl import ModelConfig, TrlParser, get_peft_config

from calib_trl import CalibSFTConfig, CalibSFTTrainer, detect_known


def main(script_args, training_args, model_args):
    model, tokenizer = model_from_args(model_args, training_args)
    splits = load_splits(script_args)
    before = evaluate_splits(model, tokenizer, splits, script_args)

    train = splits["train"]
    calibration = splits.get("calibration")
    detects = training_args.has_calibration_term and training_args.apply_to == "known"
    if detects and script_args.style_adaptation_steps > 0 and training_args.detection != "online":
        # CogCalib's precomputed detection: the trainer then reads the flags from the `known` column
        train, report = detect_known(
            model,
            tokenizer,
            train,
            calibration_dataset=calibration,
            batch_size=script_args.eval_batch_size,
            style_adaptation_steps=script_args.style_adaptation_steps,
            style_adaptation_kwargs={
                "learning_rate": script_args.style_adaptation_lr,
                "batch_size": script_args.style_adaptation_batch_size,
                "padding_free": training_args.padding_free,
                "max_length": training_args.max_length,
            },
            return_report=True,
        )
        if training_args.process_index == 0:
            print(f"\nKnowledge detection:\n{report}\n")

    trainer = CalibSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        calibration_dataset=calibration if training_args.detection == "online" else None,
    )
    add_calibration_callback(trainer, splits, script_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, tokenizer, splits, before, script_args, "CogCalib")


def make_parser():
    parser = TrlParser((CalibScriptArguments, CalibSFTConfig, ModelConfig))
    # A small run by default; every value can be overridden on the command line or in a --config file
    parser.set_defaults(
        output_dir="outputs/sft_cogcalib",
        num_train_epochs=2,
        learning_rate=4e-5,
        per_device_train_batch_size=8,
        activation_checkpointing=False,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        # Padding-free batches: no compute is spent on padding
        padding_free=True,
        max_length=None,
    )
    return parser


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
