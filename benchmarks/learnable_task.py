# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
The arithmetic task on the embedded model, in both forms, before and after the reproduction's SFT budget: what the model
knows, how well its confidence tells right from wrong, and how well each detection path finds the known rows.

    python benchmarks/learnable_task.py --mode cpu      # about 30 minutes on 2 CPU cores
    python benchmarks/learnable_task.py --mode smoke    # a tiny random model: checks the pipeline

For each form (open-ended, letter) and model (base, after plain SFT with `reproduce.py`'s budget, seed 0):
- accuracy (open-ended: the match rate of the greedy answers), mean confidence, ECE and AUROC on the test split and the
  out-of-domain split, and the accuracy of each difficulty level;
- open-ended: both candidate confidences of a generated answer (`sequence`, the length-normalised probability of its
  tokens; `first_token`, the probability of its first content token), to choose the default by AUROC and ECE.
Detection, on the base model, against its own answers (the ground truth of "known"):
- `own answer`: the trainer's default path without a `calibration_dataset` (`detection="auto"`), exact by construction;
- `threshold`: the answer-NLL threshold fitted (Youden's J) on half of the calibration rows, and its detection
  accuracy on those rows;
- `threshold after style adaptation`: the same after `style_steps` SFT steps on the task's format, on the other half
  (CogCalib's fix for unfamiliar wording), as `detect_known` runs it.

Writes `benchmarks/results/learnable_task_<mode>.json` and a table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import time

import numpy as np
import torch
from common import save_json, write_readme_section
from reproduce import SPLITS, TASKS, load_data, load_model, train_method, training_rows

FORMS = {"open-ended": "arithmetic", "letter": "arithmetic-mc"}
STYLE_STEPS = {"cpu": 12, "gpu": 40, "smoke": 1}


def measure(task, model, tok, data, mode, batch_size) -> dict:
    from calib_trl.evaluation.evaluate import evaluate_calibration

    out = {}
    for split in SPLITS:
        result = evaluate_calibration(
            model,
            tok,
            data[split],
            batch_size=batch_size,
            max_new_tokens=mode.get("max_new_tokens", 32),
            progress=False,
        )
        entry = {"report": result.report, "levels": {}}
        subjects = np.asarray(data[split]["subject"]) if "subject" in data[split].column_names else None
        if subjects is not None:
            for level in sorted(set(subjects)):
                entry["levels"][level] = float(result.correct[subjects == level].mean())
        if task.kind == "generation":
            entry["first_token"] = result.scores.report(confidence="first_token")
        out[split] = entry
    return out


def detection(task, model, tok, data, mode, batch_size, style_steps) -> dict:
    from calib_trl import detect_known
    from calib_trl.cogcalib.knowledge import detection_report, fit_knowledge_rule, youden_threshold
    from calib_trl.evaluation.scoring import score_answers

    calibration = data["calibration"]
    halves = calibration.train_test_split(test_size=0.5, seed=0, shuffle=True)
    out = {}
    rows = len(halves["test"])
    start = time.time()
    rule = fit_knowledge_rule(model, tok, halves["test"], max_new_tokens=mode.get("max_new_tokens", 32))
    known = rule.flag(model, tok, halves["test"], batch_size=batch_size, progress=False)
    out["own answer"] = {
        "path": rule.path,
        "known_fraction": float(known.mean()),
        "model_accuracy": float(known.mean()),  # known = answered correctly, exactly
        "detection_accuracy": 1.0,
        "seconds_per_row": (time.time() - start) / rows,
    }
    # the threshold path, fitted and measured on the same half (which no style adaptation below sees)
    start = time.time()
    nll, correct = score_answers(model, tok, halves["test"], batch_size, check_correct=True, progress=False)
    seconds = (time.time() - start) / rows
    t, j, tpr, tnr = youden_threshold(nll, correct)
    report = detection_report(nll, correct, t, j, tpr, tnr)
    out["threshold"] = {
        "threshold": t,
        "youden_j": report.youden_j,
        "detection_accuracy": report.detection_accuracy,
        "known_fraction": float((nll <= t).mean()),
        "model_accuracy": float(correct.mean()),
        "seconds_per_row": seconds,
    }
    # after style adaptation: `detect_known` adapts on one half of the calibration rows and fits on the other
    flagged, report = detect_known(
        model,
        tok,
        halves["test"],
        calibration_dataset=calibration,
        batch_size=batch_size,
        style_adaptation_steps=style_steps,
        style_adaptation_kwargs={"learning_rate": 4e-5, "batch_size": 16, "per_device_batch_size": 8},
        progress=False,
        return_report=True,
    )
    out["threshold after style adaptation"] = {
        "style_steps": style_steps,
        "threshold": report.threshold,
        "youden_j": report.youden_j,
        "detection_accuracy": report.detection_accuracy,
        "known_fraction": report.known_fraction,
        "model_accuracy": report.calibration_accuracy,
    }
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"{s['device']}, SmolLM2-135M-Instruct, mode `{s['mode']}`: {s['sizes']['test']} test rows, {s['sizes']['ood']} "
        f"out-of-domain rows (capitals); SFT = plain SFT with the reproduction's budget ({s['sft']}, seed 0). Greedy "
        f"answers of up to {s['max_new_tokens']} tokens.",
        "",
        "| form | model | split | accuracy | mean confidence | ECE | AUROC | accuracy by level |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for form in FORMS:
        for model in ("base", "sft"):
            for split in SPLITS:
                e = results[form][model][split]
                r = e["report"]
                levels = ", ".join(f"{k} {v:.2f}" for k, v in e["levels"].items())
                lines.append(
                    f"| {form} | {model} | {split} | {r['accuracy']:.3f} | {r['mean_confidence']:.3f} | {r['ece']:.3f} "
                    f"| {r['auroc']:.3f} | {levels} |"
                )
    lines += [
        "",
        "Confidence of a generated answer, open-ended form: `sequence` (the length-normalised probability of the "
        "answer's tokens) against `first_token` (the probability of its first content token).",
        "",
        "| model | split | sequence: ECE / AUROC | first token: ECE / AUROC |",
        "|---|---|---|---|",
    ]
    for model in ("base", "sft"):
        for split in SPLITS:
            e = results["open-ended"][model][split]
            r, f = e["report"], e["first_token"]
            lines.append(
                f"| {model} | {split} | {r['ece']:.3f} / {r['auroc']:.3f} | {f['ece']:.3f} / {f['auroc']:.3f} |"
            )
    lines += [
        "",
        "Detection on the base model, against its own answers, on half of the calibration rows:",
        "",
        "| form | path | detection accuracy | Youden's J | known fraction | model accuracy | seconds per row |",
        "|---|---|---|---|---|---|---|",
    ]
    for form in FORMS:
        for path, d in results[form]["detection"].items():
            j = d.get("youden_j")
            lines.append(
                f"| {form} | {path} | {d['detection_accuracy']:.3f}"
                + (" (by construction)" if path == "own answer" else "")
                + f" | {'' if j is None else f'{j:.3f}'} | {d['known_fraction']:.3f} | "
                f"{d.get('model_accuracy', float('nan')):.3f} | "
                + (f"{d['seconds_per_row']:.2f} |" if "seconds_per_row" in d else "|")
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode", choices=["gpu", "cpu", "smoke"], default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    smoke = args.mode == "smoke"
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    dtype = torch.bfloat16 if args.mode == "gpu" else torch.float32
    base, tok = load_model(smoke, dtype)
    base.to(device)
    results = {}
    for form, name in FORMS.items():
        task = TASKS[name]
        mode = task.modes[args.mode]
        data = load_data(task, mode, smoke)
        regime = next(iter(task.regimes))
        start = time.time()
        entry = {"base": measure(task, base, tok, data, mode, args.eval_batch_size)}
        entry["detection"] = detection(task, base, tok, data, mode, args.eval_batch_size, STYLE_STEPS[args.mode])
        train = training_rows(data["train"], mode, 0)
        model, seconds, steps = train_method(
            task, "sft", copy.deepcopy(base), tok, train, train, data, regime, mode, 0
        )
        entry["sft"] = measure(task, model, tok, data, mode, args.eval_batch_size)
        entry["sft_train_time_s"], entry["seconds"] = seconds, time.time() - start
        results[form] = entry
        print(f"{form}: {entry['seconds']:.0f} s", flush=True)
        del model
        gc.collect()
        sizes = {k: len(v) for k, v in data.items() if k != "train"}
    r = TASKS["arithmetic"].regimes["sft"]
    mode = TASKS["arithmetic"].modes[args.mode]
    results["settings"] = {
        "mode": args.mode,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "platform": platform.platform(),
        "sizes": sizes,
        "max_new_tokens": mode["max_new_tokens"],
        "sft": f"{mode['train']} rows, {r['num_train_epochs']} epochs, lr {r['learning_rate']}",
        "style_steps": STYLE_STEPS[args.mode],
    }
    path = save_json(f"learnable_task_{args.mode}", results)
    table = markdown(results)
    print(table)
    print(f"Wrote {path}")
    if not args.no_readme and not smoke:
        write_readme_section("learnable_task", args.mode, table)


if __name__ == "__main__":
    main()
