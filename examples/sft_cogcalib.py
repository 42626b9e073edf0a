# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
CogCalib: fine-tune with calibration losses on the examples the model already knows.

With no arguments it runs on the embedded defaults (SmolLM2-135M-Instruct and MMLU, offline), on a small subset that
finishes in about 10 minutes on 2 CPU cores, in float32 (bf16 is used only where the accelerator supports it):

    python examples/sft_cogcalib.py

Full scale, on a GPU (see examples/configs/cogcalib_full.yaml; flags override the file):

    accelerate launch examples/sft_cogcalib.py --config examples/configs/cogcalib_full.yaml
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/sft_cogcalib.py \
        --config examples/configs/cogcalib_full.yaml

Steps: (1) measure the base model's calibration on the evaluation split; (2) flag known training examples
(`detect_known`, after a short style adaptation), or let the trainer detect them online; (3) train with
`CalibSFTTrainer`; (4) measure again, print a before/after table, write reliability diagrams, the model and its card.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser, get_peft_config

from calib_trl import CalibSFTConfig, CalibSFTTrainer, detect_known
from calib_trl.scripts import (
    CalibScriptArguments,
    add_calibration_callback,
    evaluate_splits,
    finish,
    load_splits,
    model_from_args,
)


def main(script_args, training_args, model_args):
    model, tokenizer = model_from_args(model_args, training_args)
    splits = load_splits(script_args)
    before = evaluate_splits(model, tokenizer, splits, script_args.eval_batch_size)

    train = splits["train"]
    calibration = splits.get("calibration")
    # Flags computed here, after a short style adaptation; `detection="auto"` (the default) then reads them from the
    # `known` column. Without this step the trainer would detect them itself, without style adaptation.
    if (
        training_args.has_calibration_term
        and training_args.apply_to == "known"
        and training_args.detection != "online"
    ):
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
        calibration_dataset=calibration,
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
        # Padding-free batches: no compute is spent on padding (MMLU prompts range from 60 to 800 tokens)
        padding_free=True,
        max_length=None,
    )
    return parser


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
