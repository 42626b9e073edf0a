# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Detection accuracy of each path `detection="auto"` can take, on the embedded defaults, and what a fit costs.

    python benchmarks/auto_detection.py                        # CPU, 16 minutes on 2 shared cores
    python benchmarks/auto_detection.py --fit 1000 --flag 1000  # GPU

The rows flagged are `--flag` rows of MMLU's calibration split (they stand for training rows without a `known`
column); their ground truth is whether the base model's argmax over the options is right (CogCalib's definition on
multiple-choice data). `--fit` other calibration rows stand for a `calibration_dataset`. Each path goes through the
functions the trainer calls (`calib_trl.cogcalib.knowledge.fit_knowledge_rule`, `KnowledgeRule.flag`, `answer_rows`):

- `calibration_dataset`: an answer-NLL threshold fitted on the `--fit` rows;
- `multiple_choice` (no calibration_dataset): the model's own answer; equal to the ground truth by construction;
- `stream` (an `IterableDataset`, no calibration_dataset): a threshold fitted on the first `--sample` rows, here
  the first rows of the flagged set, whose letter NLLs are those a training step computes at step 0;
- `training_sample` (open-ended rows, no calibration_dataset): the same rows without `choices`/`answer`, so that
  the completion (the letter) is scored as an open-ended answer: a threshold on the mean completion NLL, fitted on
  `--sample` random rows whose ground truth is a normalised match of the greedy answer. Reported against both
  ground truths, and against the greedy one on the rows left out of the sample.

Also reported: seconds per row of each scoring pass, which is what an online re-fit costs per calibration row.
Writes `benchmarks/results/auto_detection_<device>.json` and the tables into benchmarks/README.md (`--from-json` rewrites
the tables from a saved file). On 2 shared CPU cores the default run took 16 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from common import save_json, write_readme_section


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", type=int, default=100, help="rows a calibration_dataset threshold is fitted on")
    parser.add_argument("--flag", type=int, default=150, help="other calibration rows flagged and measured")
    parser.add_argument("--sample", type=int, default=128, help="auto_detection_samples")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42, help="the trainer's `seed`, which draws the sample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--from-json", help="only rewrite the README tables from a saved results file")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        publish(saved["settings"], saved["rows"], saved["seconds"])
        return

    from calib_trl.cogcalib.knowledge import detection_report, fit_knowledge_rule, youden_threshold
    from calib_trl.defaults import load_default_dataset, load_default_model, load_default_tokenizer
    from calib_trl.evaluation.scoring import answer_rows, score_completions, score_multiple_choice

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load_default_model(dtype=dtype).to(args.device).eval()
    tok = load_default_tokenizer()
    calibration = load_default_dataset()["calibration"]
    if args.fit + args.flag > len(calibration):
        parser.error(f"--fit + --flag must be at most {len(calibration)}")
    flag_rows = calibration.select(range(args.flag))
    fit_rows = calibration.select(range(args.flag, args.flag + args.fit))
    seconds = {}

    def timed(name, n, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = {"seconds": time.perf_counter() - start, "rows": n}
        print(f"  {name}: {seconds[name]['seconds']:.0f} s for {n} rows", flush=True)
        return out

    # Ground truth, and the `multiple_choice` path (the same pass: the flags are the model's own answers)
    scores = timed(
        "multiple-choice scoring (prompt forward)",
        len(flag_rows),
        lambda: score_multiple_choice(model, tok, flag_rows, batch_size=args.batch, progress=False),
    )
    truth, letter_nll = scores.correct, scores.answer_nll
    rows = []

    def add(path, known, fit, reference=truth, note=""):
        rows.append(
            {
                "path": path,
                "threshold": fit.threshold if fit is not None else None,
                "fitted_on": fit.n_calibration if fit is not None else 0,
                "fit_detection_accuracy": fit.detection_accuracy if fit is not None else None,
                "detection_accuracy": float((np.asarray(known) == np.asarray(reference)).mean()),
                "known_fraction": float(np.mean(known)),
                "rows": int(len(known)),
                "note": note,
            }
        )

    add("multiple_choice", truth, None, note="exact by construction: the flags are the ground truth")

    rule = timed(
        "calibration_dataset fit (multiple-choice scoring)",
        len(fit_rows),
        lambda: fit_knowledge_rule(model, tok, flag_rows, fit_rows, batch_size=args.batch, progress=False),
    )
    # `rule.flag` scores the flagged rows' letter NLL, which the ground-truth pass above already computed
    add("calibration_dataset", letter_nll <= rule.threshold, rule.report)

    first = slice(0, min(args.sample, len(flag_rows)))
    t, j, tpr, tnr = youden_threshold(letter_nll[first], truth[first])
    add("stream", letter_nll <= t, detection_report(letter_nll[first], truth[first], t, j, tpr, tnr))

    open_ended = answer_rows(flag_rows.remove_columns(["choices", "answer"]))
    rule = timed(
        "training_sample fit (open-ended scoring + greedy answer)",
        min(args.sample, len(open_ended)),
        lambda: fit_knowledge_rule(
            model, tok, open_ended, sample_size=args.sample, seed=args.seed, batch_size=args.batch, progress=False
        ),
    )
    known = timed(
        "open-ended scoring (prompt + completion forward)",
        len(open_ended),
        lambda: rule.flag(model, tok, open_ended, batch_size=args.batch, progress=False),
    )
    add("training_sample", known, rule.report, note="against the multiple-choice ground truth")
    picked = np.sort(
        np.random.default_rng(args.seed).choice(len(open_ended), rule.report.n_calibration, replace=False)
    )
    held_out = np.setdiff1d(np.arange(len(open_ended)), picked)
    if len(held_out):
        _, greedy = timed(
            "greedy answers (held-out rows)",
            len(held_out),
            lambda: score_completions(
                model, tok, open_ended.select(held_out), batch_size=args.batch, check_correct=True, progress=False
            ),
        )
        add(
            "training_sample",
            known[held_out],
            rule.report,
            reference=greedy,
            note="against the greedy-answer ground truth, on the rows left out of the sample",
        )

    path = save_json(f"auto_detection_{args.device}", {"settings": vars(args), "rows": rows, "seconds": seconds})
    print(f"\nWrote {path}")
    publish(vars(args), rows, seconds)


def publish(settings: dict, rows: list[dict], seconds: dict) -> None:
    """Print the tables and write them into benchmarks/README.md."""
    accuracy = next(r["known_fraction"] for r in rows if r["path"] == "multiple_choice")
    dtype = "torch.bfloat16" if settings["device"] == "cuda" else "torch.float32"
    lines = [
        f"{settings['device']}, {dtype}, SmolLM2-135M-Instruct, no style adaptation. Flagged: {settings['flag']} rows "
        f"of the MMLU calibration split (ground truth: the model's argmax over the options; model accuracy "
        f"{accuracy:.3f}); a calibration_dataset threshold is fitted on {settings['fit']} other calibration rows; "
        f"`auto_detection_samples={settings['sample']}`, seed {settings['seed']}.",
        "",
        "| path | threshold fitted on | threshold (NLL) | detection accuracy there | detection accuracy | rows | "
        "known fraction | measured against |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fit = "-" if r["fitted_on"] == 0 else f"{r['fitted_on']} rows"
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        there = "-" if r["fit_detection_accuracy"] is None else f"{r['fit_detection_accuracy']:.3f}"
        detection = f"{r['detection_accuracy']:.3f}"
        if r["threshold"] is not None and not math.isfinite(r["threshold"]):
            # flags that are all alike detect nothing; their agreement with the truth is only the class balance
            there = "none: no threshold"
            detection = (
                f"none (every row flagged {'known' if r['threshold'] > 0 else 'unknown'}; agreement {detection})"
            )
        lines.append(
            f"| {r['path']} | {fit} | {threshold} | {there} | {detection} | {r['rows']} | {r['known_fraction']:.3f} | "
            f"{r['note'] or 'the multiple-choice ground truth'} |"
        )
    lines += ["", "| scoring pass | rows | seconds | seconds per row |", "|---|---|---|---|"]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s['rows']} | {s['seconds']:.0f} | {s['seconds'] / max(s['rows'], 1):.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    write_readme_section("auto_detection", settings["device"], table)
    print("\nWrote the tables in benchmarks/README.md")


if __name__ == "__main__":
    main()
