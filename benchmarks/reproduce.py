# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Reproduction benchmark: every method on the same data and step budget, evaluated in-domain and out-of-domain.

    python benchmarks/reproduce.py --mode cpu              # small budget on a CPU (about 90 minutes on 2 cores)
    python benchmarks/reproduce.py --mode gpu              # full scale (MMLU train split) on one GPU
    python benchmarks/reproduce.py --mode smoke            # a few steps of a tiny random model: checks the pipeline
    python benchmarks/reproduce.py --mode cpu --resume --methods ls_all coecp_b1   # add rows to a saved run
    python benchmarks/reproduce.py --mode cpu --resume --redo base                 # run a saved row again

Methods: the base model, standard SFT, label smoothing on all data, CoLS, CoMbLS, CoECP (precomputed and online
detection), CFT, RCFT, and CogCalib (CoECP) combined with RCFT. Two regimes, because they behave differently:
`short` (3 epochs, lr 2e-5, batch 32) and `overfit` (6 epochs, lr 4e-5, batch 64), where standard SFT becomes badly
overconfident. The CPU mode shrinks the data and the batches (see MODES) and keeps the epochs and learning rates.

Known flags are fitted once per regime (after style adaptation) on the calibration split and shared by the
precomputed methods. Reports accuracy, ECE, class-wise ECE and Brier on the test split and on the out-of-domain
subjects; writes `benchmarks/results/reproduce_<mode>.json` and the markdown table into `benchmarks/README.md`
(between the `reproduce:<mode>` markers).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch
from common import RESULTS, save_json, write_readme_section

HERE = os.path.dirname(os.path.abspath(__file__))

REGIMES = {
    "short": dict(num_train_epochs=3, learning_rate=2e-5, batch_size=32),
    "overfit": dict(num_train_epochs=6, learning_rate=4e-5, batch_size=64),
}

MODES = {
    # rows of each split (None: all), epochs x epoch_scale, the optimizer batch of each regime (None: the regime's),
    # per-device batch, style-adaptation steps and batch, E-step rows, max_length
    "gpu": dict(
        train=None,
        eval=None,
        calibration=None,
        epoch_scale=1.0,
        batch=None,
        per_device=32,
        style_steps=60,
        style_batch=64,
        estep_samples=1000,
        max_length=1024,
    ),
    # 2 CPU cores (about 2.3 s per training row and epoch for SmolLM2 in float32): 32 training rows with the regimes'
    # epochs and learning rates, and small batches so that each regime still takes a couple of dozen optimizer steps;
    # about 9 minutes per trained method
    "cpu": dict(
        train=32,
        eval=120,
        calibration=200,
        epoch_scale=1.0,
        batch={"short": 4, "overfit": 8},
        per_device=8,
        style_steps=8,
        style_batch=16,
        estep_samples=32,
        max_length=None,
    ),
    "smoke": dict(
        train=16,
        eval=12,
        calibration=12,
        epoch_scale=0.2,
        batch=None,
        per_device=4,
        style_steps=1,
        style_batch=4,
        estep_samples=16,
        max_length=256,
    ),
}

# name -> (trainer, config overrides)
# (in the order they run: the default CogCalib setting and the RCFT pair first, so that a cut-short run has them).
# The CogCalib rows name their β so that a saved row keeps its meaning when a default changes.
METHODS = {
    "base": (None, {}),
    "sft": ("calib", dict(calibration_loss="none")),
    "coecp": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0)),
    "cft": ("rcft", dict(ece_weight=0.0)),
    "rcft": ("rcft", dict(ece_weight=0.5)),
    "coecp_rcft": ("rcft", dict(ece_weight=0.5, calibration_loss="ecp", ecp_beta=2.0)),
    "cols": ("calib", dict(calibration_loss="ls", ls_epsilon=0.5)),
    "combls": ("calib", dict(calibration_loss="mbls", mbls_margin=10.0, mbls_lambda=0.1)),
    "ls_all": ("calib", dict(calibration_loss="ls", ls_epsilon=0.5, apply_to="all")),
    "coecp_online": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0, detection="online")),
}

# Settings swept around the defaults (not run unless named in --methods): the entropy weight, CoECP on every token
# (is the known/unknown split what helps?), the gentler label smoothing of the paper and a stronger RCFT
SWEEP = {
    "coecp_b0.5": ("calib", dict(calibration_loss="ecp", ecp_beta=0.5)),
    "coecp_b1": ("calib", dict(calibration_loss="ecp", ecp_beta=1.0)),
    "coecp_rcft_b1": ("rcft", dict(ece_weight=0.5, calibration_loss="ecp", ecp_beta=1.0)),
    "coecp_online_b1": ("calib", dict(calibration_loss="ecp", ecp_beta=1.0, detection="online")),
    "ecp_all": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0, apply_to="all")),
    "ecp_all_b1": ("calib", dict(calibration_loss="ecp", ecp_beta=1.0, apply_to="all")),
    "cols_e0.1": ("calib", dict(calibration_loss="ls", ls_epsilon=0.1)),
    "rcft_a1": ("rcft", dict(ece_weight=1.0)),
}

ALL_METHODS = {**METHODS, **SWEEP}  # the table's row order


def load_data(mode: dict, smoke: bool):
    if smoke:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from helpers import make_mcq_dataset

        return {
            "train": make_mcq_dataset(mode["train"], seed=1),
            "calibration": make_mcq_dataset(mode["calibration"], seed=2),
            "test": make_mcq_dataset(mode["eval"], seed=3),
            "ood": make_mcq_dataset(mode["eval"], seed=4),
        }
    from calib_trl.defaults import load_default_dataset

    data = load_default_dataset()
    caps = {"train": mode["train"], "calibration": mode["calibration"], "test": mode["eval"], "ood": mode["eval"]}
    return {k: data[k] if caps[k] is None else data[k].select(range(min(caps[k], len(data[k])))) for k in caps}


def load_model(smoke: bool, dtype):
    if smoke:
        from helpers import make_model, make_tokenizer

        tok = make_tokenizer()
        return make_model(len(tok), seed=0), tok
    from calib_trl.defaults import load_default_model, load_default_tokenizer

    return load_default_model(dtype=dtype), load_default_tokenizer()


def ece_uncertainty(probs, labels, n_resamples=1000, seed=0):
    """How far a measured ECE can be trusted at this sample size.

    `ece_se`: bootstrap standard error of the ECE (rows resampled with replacement). `ece_floor`: the mean ECE that a
    perfectly calibrated model with the same confidences would show on this many rows (its correctness drawn from its
    own probabilities) — binned ECE is biased upwards on small sets, so values near the floor are as good as the set
    can tell.
    """
    from calib_trl.metrics import expected_calibration_error

    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    conf, pred = probs.max(-1)
    correct = pred == labels
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    boot = [expected_calibration_error(conf[i], correct[i]) for i in torch.randint(n, (n_resamples, n), generator=gen)]
    drawn = torch.multinomial(probs, 200, replacement=True, generator=gen) == pred[:, None]
    floor = [expected_calibration_error(conf, drawn[:, d]) for d in range(drawn.shape[1])]
    return {"ece_se": float(torch.tensor(boot).std()), "ece_floor": float(torch.tensor(floor).mean())}


def evaluate(model, tok, data, batch_size):
    from calib_trl import calibration_report
    from calib_trl.mcq import score_multiple_choice

    out = {}
    for split in ("test", "ood"):
        scores = score_multiple_choice(model, tok, data[split], batch_size=batch_size, progress=False)
        out[split] = {
            **calibration_report(scores.probs, scores.labels),
            **ece_uncertainty(scores.probs, scores.labels),
        }
    return out


def train_method(name, model, tok, data, flagged, regime, mode, args):
    from calib_trl import CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer

    kind, overrides = ALL_METHODS[name]
    r = REGIMES[regime]
    batch = (mode["batch"] or {}).get(regime, r["batch_size"])
    per_device = min(mode["per_device"], batch)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"reproduce-{name}-"),
        num_train_epochs=r["num_train_epochs"] * mode["epoch_scale"],
        learning_rate=r["learning_rate"],
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=max(1, batch // per_device),
        lr_scheduler_type="linear",
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=args.seed,
        max_length=mode["max_length"],
        padding_free=mode["max_length"] is None,  # no compute spent on padding
    )
    uses_flags = overrides.get("calibration_loss", "none") != "none" and overrides.get("apply_to", "known") == "known"
    online = overrides.get("detection") == "online"
    train = flagged if uses_flags and not online else data["train"]
    if kind == "rcft":
        cfg = RCFTConfig(**common, estep_samples=mode["estep_samples"], **overrides)
        trainer = RCFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    else:
        cfg = CalibSFTConfig(**common, **overrides)
        trainer = CalibSFTTrainer(
            model=model,
            args=cfg,
            train_dataset=train,
            processing_class=tok,
            calibration_dataset=data["calibration"] if online else None,
        )
    start = time.time()
    trainer.train()
    return trainer.model, time.time() - start, trainer.state.global_step


def markdown(results, mode_name):
    keys = ("accuracy", "ece", "cw_ece", "brier")
    lines = []
    for regime, rows in results["regimes"].items():
        sft = rows.get("sft", {}).get("eval")
        lines += [
            f"**{regime}** ({results['settings']['regimes'][regime]})",
            "",
            "| method | acc | ECE | cw-ECE | Brier | ECE vs SFT | OOD acc | OOD ECE | OOD cw-ECE | OOD Brier | OOD ECE vs SFT |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = list(ALL_METHODS)
        for name, row in sorted(rows.items(), key=lambda item: order.index(item[0])):
            cells = []
            for split in ("test", "ood"):
                rep = row["eval"][split]
                cells += [
                    f"{rep[k]:.3f}" + (f" ± {rep['ece_se']:.3f}" if k == "ece" and "ece_se" in rep else "")
                    for k in keys
                ]
                if sft and name not in ("sft",):
                    base = sft[split]["ece"]
                    cells.append(f"{100 * (rep['ece'] - base) / base:+.0f} %" if base > 0 else "")
                else:
                    cells.append("")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--regimes", nargs="+", default=None, choices=list(REGIMES), help="default: both on a GPU, `overfit` on a CPU"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(ALL_METHODS),
        help="default: every method of the issue's list; the sweep settings run only when named",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Keep the rows of the saved results of this mode (same settings and seed) and run only "
        "the methods they lack; detection is re-run and checked against the saved one.",
    )
    parser.add_argument(
        "--redo",
        nargs="+",
        default=[],
        choices=list(ALL_METHODS),
        help="With --resume: run these methods again even though the saved results have them.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--output", default=None)
    parser.add_argument("--no-readme", action="store_true", help="Do not write the table into benchmarks/README.md.")
    args = parser.parse_args()
    mode = MODES[args.mode]
    smoke = args.mode == "smoke"
    if args.regimes is None:
        args.regimes = ["overfit"] if args.mode == "cpu" else list(REGIMES)
    dtype = torch.bfloat16 if args.mode == "gpu" else torch.float32
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"

    from calib_trl import detect_known

    data = load_data(mode, smoke)
    base_model, tok = load_model(smoke, dtype)
    base_model.to(device)
    results = {
        "settings": {
            "mode": args.mode,
            "mode_settings": mode,
            "regimes": {r: REGIMES[r] for r in args.regimes},
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "platform": platform.platform(),
            "sizes": {k: len(v) for k, v in data.items()},
            "seed": args.seed,
        },
        "regimes": {},
    }
    if args.redo and not args.resume:
        parser.error("--redo needs --resume")
    args.methods += [m for m in args.redo if m not in args.methods]
    saved = load_saved(results, args) if args.resume else None
    if saved is not None:
        results["regimes"] = {
            r: {m: row for m, row in rows.items() if m not in args.redo} for r, rows in saved["regimes"].items()
        }
        results["detection"] = saved.get("detection", {})
    needs_base = "base" in args.methods and any("base" not in results["regimes"].get(r, {}) for r in args.regimes)
    base_eval = evaluate(base_model, tok, data, args.eval_batch_size) if needs_base else None
    for regime in args.regimes:
        rows = results["regimes"].setdefault(regime, {})
        todo = [m for m in args.methods if m != "base" and m not in rows]
        if base_eval is not None and "base" not in rows:
            rows["base"] = {"eval": base_eval, "train_time_s": 0.0, "steps": 0}
        if not todo:
            continue
        flagged, report = detect_known(
            base_model,
            tok,
            data["train"],
            calibration_dataset=data["calibration"],
            batch_size=args.eval_batch_size,
            style_adaptation_steps=mode["style_steps"],
            style_adaptation_kwargs={
                "learning_rate": REGIMES[regime]["learning_rate"],
                "batch_size": mode["style_batch"],
                "per_device_batch_size": min(mode["per_device"], mode["style_batch"]),
                "padding_free": mode["max_length"] is None,
                "max_length": mode["max_length"],
            },
            progress=False,
            return_report=True,
        )
        previous = results.setdefault("detection", {}).get(regime)
        if previous is not None and (
            abs(previous["threshold"] - report.threshold) > 1e-4
            or abs(previous["known_fraction"] - report.known_fraction) > 1e-9
        ):
            print(
                f"[{regime}] WARNING: detection differs from the saved run (threshold {previous['threshold']:.4f} -> "
                f"{report.threshold:.4f}, known {previous['known_fraction']:.3f} -> {report.known_fraction:.3f}); "
                "the new rows use the new flags",
                flush=True,
            )
            results["detection"][f"{regime}_resumed"] = report.to_dict()
        else:
            results["detection"][regime] = report.to_dict()
        print(
            f"[{regime}] detection: {report.detection_accuracy:.3f} accurate, {report.known_fraction:.3f} known",
            flush=True,
        )
        for name in todo:
            model = copy.deepcopy(base_model)
            model, seconds, steps = train_method(name, model, tok, data, flagged, regime, mode, args)
            rows[name] = {
                "eval": evaluate(model, tok, data, args.eval_batch_size),
                "train_time_s": seconds,
                "steps": steps,
            }
            r = rows[name]["eval"]
            print(
                f"[{regime}] {name:<13} acc {r['test']['accuracy']:.3f} ECE {r['test']['ece']:.3f} | OOD acc "
                f"{r['ood']['accuracy']:.3f} ECE {r['ood']['ece']:.3f}  ({steps} steps, {seconds:.0f} s)",
                flush=True,
            )
            del model
            gc.collect()
            # Written after every method, so that an interrupted run keeps what it measured
            write_results(results, args, smoke, done=False)
    write_results(results, args, smoke, done=True)


def results_path(args) -> str:
    """Where `write_results` saves (`save_json`'s path unless --output), which is where --resume reads."""
    return args.output or os.path.join(RESULTS, f"reproduce_{args.mode}.json")


def load_saved(results, args):
    """The saved results of the same mode, settings and seed, or None when there are none."""
    path = results_path(args)
    if not os.path.exists(path):
        print(f"--resume: no saved results at {path}; starting afresh", flush=True)
        return None
    with open(path) as f:
        saved = json.load(f)
    mine, theirs = results["settings"], saved.get("settings", {})
    for key in ("mode", "mode_settings", "sizes", "seed"):
        if json.loads(json.dumps(mine[key])) != theirs.get(key):
            raise ValueError(
                f"--resume: the saved results in {path} were made with another `{key}` "
                f"({theirs.get(key)!r}, now {mine[key]!r}); run without --resume or pass --output."
            )
    regimes = {**theirs.get("regimes", {}), **mine["regimes"]}
    results["settings"]["regimes"] = regimes
    return saved


def write_results(results, args, smoke, done):
    table = markdown(results, args.mode)
    if done:
        print("\n" + table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        path = args.output
    else:
        path = save_json(f"reproduce_{args.mode}", results)
    if done:
        print(f"Wrote {path}")
    if not args.no_readme and not smoke:
        s = results["settings"]
        header = (
            f"Mode `{args.mode}` on {s['device']}: {s['sizes']['train']} training rows, {s['sizes']['test']} test "
            f"and {s['sizes']['ood']} out-of-domain rows (`python benchmarks/reproduce.py --mode {args.mode}`)."
        )
        write_readme_section("reproduce", args.mode, header + "\n\n" + table)


if __name__ == "__main__":
    main()
