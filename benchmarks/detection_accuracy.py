# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Detection accuracy on the calibration split against the length of style adaptation.

    python benchmarks/detection_accuracy.py                                   # CPU: a small sweep
    python benchmarks/detection_accuracy.py --steps 0 20 60 100 --batch 64 --calibration 1000 --train 0   # GPU

For each number of style-adaptation steps, `detect_known` adapts a copy of the default model on one half of the
calibration rows, fits the NLL threshold (Youden's J) on the other half, and flags the training rows. Reported:
the threshold, J, the detection accuracy (how often `answer_nll <= threshold` agrees with whether the adapted model
answers the held-out calibration row correctly), the adapted model's accuracy, and the known fraction of the
training rows. Writes `benchmarks/results/detection_accuracy_<device>.json` and the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import save_json, write_readme_section


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 4, 12])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--calibration", type=int, default=400, help="calibration rows (0: all 1,000)")
    parser.add_argument("--train", type=int, default=200, help="train rows flagged (0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from calib_trl import detect_known
    from calib_trl.defaults import load_default_dataset, load_default_model, load_default_tokenizer

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load_default_model(dtype=dtype).to(args.device)
    tok = load_default_tokenizer()
    data = load_default_dataset("mmlu")
    calibration = data["calibration"] if not args.calibration else data["calibration"].select(range(args.calibration))
    train = data["train"] if not args.train else data["train"].select(range(args.train))
    rows = []
    for steps in args.steps:
        start = time.perf_counter()
        style = {
            "learning_rate": args.lr,
            "batch_size": args.batch,
            "per_device_batch_size": min(args.batch, 16),
            "bf16": dtype == torch.bfloat16,
        }
        if args.device == "cpu":
            style.update(padding_free=True, max_length=None)
        _, report = detect_known(
            model,
            tok,
            train,
            calibration_dataset=calibration,
            batch_size=32,
            style_adaptation_steps=steps,
            style_adaptation_kwargs=style,
            progress=False,
            return_report=True,
        )
        rows.append({"steps": steps, "seconds": time.perf_counter() - start, **report.to_dict()})
        r = rows[-1]
        print(
            f"  {steps:>4} steps: detection accuracy {r['detection_accuracy']:.3f}, J {r['youden_j']:.3f}, "
            f"model accuracy {r['calibration_accuracy']:.3f}, known {r['known_fraction']:.3f}",
            flush=True,
        )

    n_fit = rows[-1]["n_calibration"]
    lines = [
        f"{args.device}, {dtype}: style adaptation at lr {args.lr}, batch {args.batch}, on half of {len(calibration)} "
        f"calibration rows; threshold fitted and detection accuracy measured on the other half ({n_fit} rows when "
        f"adapting, all {len(calibration)} without); {len(train)} train rows flagged.",
        "",
        "| style steps | threshold (NLL) | Youden's J | detection accuracy | model accuracy | known fraction (train) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['threshold']:.3f} | {r['youden_j']:.3f} | {r['detection_accuracy']:.3f} | "
            f"{r['calibration_accuracy']:.3f} | {r['known_fraction']:.3f} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    path = save_json(f"detection_accuracy_{args.device}", {"settings": vars(args), "rows": rows, "table": table})
    write_readme_section("detection_accuracy", args.device, table)
    print(f"\nWrote {path} and the table in benchmarks/README.md")


if __name__ == "__main__":
    main()
