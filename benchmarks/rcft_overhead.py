# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
RCFT's step time against CFT's (completion-only SFT) on the same MMLU rows, and the cost of one E-step.

    python benchmarks/rcft_overhead.py                     # CPU: 8 x 6 steps of 8 rows
    python benchmarks/rcft_overhead.py --rows 2048 --batch 32 --steps 20

The ECE term projects only the K option rows of the LM head at the answer positions, so a training step of RCFT
should cost about as much as one of CFT. The E-step (scoring `estep_samples` rows without gradient) runs once per
epoch by default; its time is reported separately, and as a fraction of an epoch of training on the default
`train` split. Steps alternate between the two trainers (CFT, RCFT, CFT, RCFT, ...) so that drifts of the machine
hit both alike. Writes `benchmarks/results/rcft_overhead_<device>.json` and the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import save_json, write_readme_section


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds; each times one step of each")
    parser.add_argument("--estep-samples", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from calib_trl import RCFTConfig, RCFTTrainer
    from calib_trl.defaults import (
        DEFAULT_SPLIT_SIZES,
        load_default_dataset,
        load_default_model,
        load_default_tokenizer,
    )

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tok = load_default_tokenizer()
    data = load_default_dataset("mmlu")["train"].select(range(args.rows))
    trainers = {}
    for name, weight in (("cft", 0.0), ("rcft", 0.5)):
        cfg = RCFTConfig(
            tempfile.mkdtemp(),
            ece_weight=weight,
            per_device_train_batch_size=args.batch,
            max_steps=10_000,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            activation_checkpointing=False,
            bf16=dtype == torch.bfloat16,
            padding_free=True,
            max_length=None,
            estep_samples=args.estep_samples,
            bin_refresh="once",
            logging_steps=10_000,
        )
        model = load_default_model(dtype=dtype).to(args.device)
        trainer = RCFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        trainers[name] = trainer

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    # E-step cost (and it fills RCFT's bin statistics, so that no training step below runs one)
    sync()
    start = time.perf_counter()
    trainers["rcft"]._estep(trainers["rcft"].model)
    sync()
    estep_seconds = time.perf_counter() - start

    batches = {name: iter(t.get_train_dataloader()) for name, t in trainers.items()}
    times = {name: [] for name in trainers}
    for round_ in range(args.rounds + 1):
        for name, trainer in trainers.items():
            try:
                batch = next(batches[name])
            except StopIteration:
                batches[name] = iter(trainer.get_train_dataloader())
                batch = next(batches[name])
            trainer.model.train()
            n_items = (batch["labels"][:, 1:] != -100).sum()
            sync()
            start = time.perf_counter()
            loss = trainer.training_step(trainer.model, batch, num_items_in_batch=n_items)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            sync()
            if round_ > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
            assert torch.isfinite(loss)

    cft, rcft = statistics.median(times["cft"]), statistics.median(times["rcft"])
    rows_per_s = args.batch / cft
    epoch_seconds = DEFAULT_SPLIT_SIZES["train"] / rows_per_s
    table = "\n".join(
        [
            f"{args.device}, {dtype}, SmolLM2-135M-Instruct, {args.batch} MMLU rows per step (padding-free), median of "
            f"{args.rounds} alternating steps",
            "",
            "| | seconds | x CFT |",
            "|---|---|---|",
            f"| CFT step | {cft:.3f} | 1.000 |",
            f"| RCFT step | {rcft:.3f} | {rcft / cft:.3f} |",
            f"| E-step ({args.estep_samples} rows) | {estep_seconds:.1f} | {estep_seconds / cft:.1f} steps, "
            f"{100 * estep_seconds / epoch_seconds:.1f} % of an epoch on the {DEFAULT_SPLIT_SIZES['train']}-row train split |",
        ]
    )
    print("\n" + table)
    path = save_json(
        f"rcft_overhead_{args.device}",
        {
            "device": args.device,
            "dtype": str(dtype),
            "batch": args.batch,
            "rounds": args.rounds,
            "cft_step_s": times["cft"],
            "rcft_step_s": times["rcft"],
            "ratio": rcft / cft,
            "estep_samples": args.estep_samples,
            "estep_s": estep_seconds,
            "table": table,
        },
    )
    write_readme_section("rcft_overhead", args.device, table)
    print(f"\nWrote {path} and the table in benchmarks/README.md")


if __name__ == "__main__":
    main()
