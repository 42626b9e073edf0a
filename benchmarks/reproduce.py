# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Reproduction benchmark: each method against standard SFT on the same evaluation rows, over several training seeds, in
two regimes, with paired bootstrap intervals, the temperature-scaling baseline and what calibration costs.

    python benchmarks/reproduce.py --mode cpu                          # 3 seeds, both regimes, on 2 CPU cores
    python benchmarks/reproduce.py --mode cpu --methods sft coecp_opt_b1 --seeds 0   # a part of the table
    python benchmarks/reproduce.py --mode cpu --table-only             # rebuild the table from the saved runs
    python benchmarks/reproduce.py --mode gpu                          # full scale on one GPU
    python benchmarks/reproduce.py --mode smoke                        # a tiny random model: checks the pipeline

Each (regime, seed, method) run is saved as soon as it finishes and skipped when it is already saved with the same
settings, so the table can be filled in parts (`--redo` runs saved ones again).

What a run measures, on the test split and on the out-of-domain subjects (the same rows for every method and seed):
- accuracy and ECE (10 equal-width bins), smooth ECE (no bins), class-wise ECE, Brier;
- `answer_mass`: the full-vocabulary probability of the option letters at the answer position (a calibration loss
  that flattens the whole vocabulary lowers it);
- `lm_nll`: the NLL of the evaluation prompts' own text (question and options), which no method trains on;
- the temperature `T` fitted on held-out calibration rows, and everything above after scaling by it ("+ TS", the
  post-hoc baseline a user would otherwise pick).

Seed `s` trains on its own rows of the train split (rows `s * n` to `(s + 1) * n`) in its own order. Known flags come
from one style-adapted probe per regime (on half of the calibration rows; threshold fitted on the other half), which
flags each seed's training rows. A method's difference from SFT is averaged over the seeds; its 95 % interval comes
from a paired bootstrap that resamples the evaluation rows (the same rows for the method and SFT) and the seeds.

Writes `benchmarks/results/reproduce_<mode>.json` (every run's per-row option logits, so that everything can be
recomputed) and the tables into `benchmarks/README.md` between the `reproduce:<mode>` markers.
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

import numpy as np
import torch
from common import RESULTS, save_json, write_readme_section

HERE = os.path.dirname(os.path.abspath(__file__))

REGIMES = {
    "short": dict(num_train_epochs=3, learning_rate=2e-5, batch_size=32),
    "overfit": dict(num_train_epochs=6, learning_rate=4e-5, batch_size=64),
}

MODES = {
    # rows per seed for training, rows of each evaluation split, calibration rows (half style adaptation, half
    # threshold; the temperature is fitted on `ts_rows` of them), epochs x epoch_scale, the optimizer batch of each
    # regime (None: the regime's), per-device batch, style adaptation, E-step rows, max_length, seeds
    "gpu": dict(
        train=None,
        eval=None,
        calibration=None,
        ts_rows=1000,
        epoch_scale=1.0,
        batch=None,
        per_device=32,
        style_steps=60,
        style_batch=64,
        estep_samples=1000,
        max_length=1024,
        seeds=(0, 1, 2),
    ),
    # 2 CPU cores (about 2.3 s per training row and epoch for SmolLM2 in float32, 0.5 s per scored row): 32 training
    # rows per seed with the regimes' epochs and learning rates and small batches (24 optimizer steps per regime);
    # about 7 (overfit) or 3.5 (short) minutes of training and 3 of scoring per run
    "cpu": dict(
        train=32,
        eval=150,
        calibration=200,
        ts_rows=100,
        epoch_scale=1.0,
        batch={"short": 4, "overfit": 8},
        per_device=8,
        style_steps=8,
        style_batch=16,
        estep_samples=32,
        max_length=None,
        seeds=(0, 1, 2),
    ),
    "smoke": dict(
        train=8,
        eval=12,
        calibration=12,
        ts_rows=6,
        epoch_scale=0.2,
        batch=None,
        per_device=4,
        style_steps=1,
        style_batch=4,
        estep_samples=10,
        max_length=256,
        seeds=(0, 1),
    ),
}

# name -> (trainer, config overrides, extra trainer arguments), in the order they run. Every row names its settings in
# full, so that a saved run keeps its meaning when a default changes.
METHODS = {
    "sft": ("calib", dict(calibration_loss="none"), {}),
    "coecp_opt_b1": ("calib", dict(calibration_loss="ecp", ecp_beta=1.0, calibration_space="options"), {}),
    # the default before this table: CoECP on the whole vocabulary
    "coecp_vocab_b2": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0, calibration_space="vocabulary"), {}),
    # the entropy bonus on every row's options: does the known/unknown split help?
    "ecp_all_opt_b1": (
        "calib",
        dict(calibration_loss="ecp", ecp_beta=1.0, calibration_space="options", apply_to="all"),
        {},
    ),
    # a stronger option-space penalty: the entropy over K options is at most ln K, so β must be larger than in the
    # vocabulary (seed 0 of the short regime moved no more with β = 2 than with β = 1)
    "coecp_opt_b4": ("calib", dict(calibration_loss="ecp", ecp_beta=4.0, calibration_space="options"), {}),
    # RCFT's E-step on the training rows, and on held-out rows (the calibration split)
    "rcft_estep_train": ("rcft", dict(ece_weight=0.5), {}),
    "rcft_estep_heldout": ("rcft", dict(ece_weight=0.5), {"estep_dataset": "calibration"}),
}

# Settings run only when named in --methods: other weights, and the vocabulary-space label smoothing of the paper
SWEEP = {
    # run on seed 0 of the short regime only (a screen): no better than β = 1 there
    "coecp_opt_b2": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0, calibration_space="options"), {}),
    "cols_opt_e0.5": ("calib", dict(calibration_loss="ls", ls_epsilon=0.5, calibration_space="options"), {}),
    "coecp_opt_b0.5": ("calib", dict(calibration_loss="ecp", ecp_beta=0.5, calibration_space="options"), {}),
    "cols_opt_e0.2": ("calib", dict(calibration_loss="ls", ls_epsilon=0.2, calibration_space="options"), {}),
    "cols_vocab_e0.5": ("calib", dict(calibration_loss="ls", ls_epsilon=0.5, calibration_space="vocabulary"), {}),
    "coecp_vocab_b1": ("calib", dict(calibration_loss="ecp", ecp_beta=1.0, calibration_space="vocabulary"), {}),
    "coecp_rcft_opt_b1": (
        "rcft",
        dict(ece_weight=0.5, calibration_loss="ecp", ecp_beta=1.0, calibration_space="options"),
        {"estep_dataset": "calibration"},
    ),
}

# Methods measured in one regime only unless --all-regimes: RCFT's E-step question arose in the short regime, and
# its overfit runs would cost another hour on 2 cores
ONE_REGIME = {"rcft_estep_train": "short", "rcft_estep_heldout": "short"}

ALL_METHODS = {**METHODS, **SWEEP}  # the table's row order

SPLITS = ("test", "ood")
N_BOOT = 1000


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def load_data(mode: dict, smoke: bool):
    """The train split (rows for every seed), and the calibration, test and out-of-domain rows."""
    if smoke:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from helpers import make_mcq_dataset

        n = mode["train"] * len(mode["seeds"])
        return {
            "train": make_mcq_dataset(n, seed=1),
            "calibration": make_mcq_dataset(mode["calibration"], seed=2),
            "test": make_mcq_dataset(mode["eval"], seed=3),
            "ood": make_mcq_dataset(mode["eval"], seed=4),
        }
    from calib_trl.defaults import load_default_dataset

    data = load_default_dataset()
    caps = {"calibration": mode["calibration"], "test": mode["eval"], "ood": mode["eval"]}
    out = {k: data[k] if caps[k] is None else data[k].select(range(min(caps[k], len(data[k])))) for k in caps}
    out["train"] = data["train"]
    return out


def training_rows(train, mode: dict, seed: int):
    """Seed `s`'s own rows of the (already shuffled) train split; all of it when the mode trains on everything."""
    n = mode["train"]
    if n is None:
        return train
    return train.select(range(seed * n, (seed + 1) * n))


def load_model(smoke: bool, dtype):
    if smoke:
        from helpers import make_model, make_tokenizer

        tok = make_tokenizer()
        return make_model(len(tok), seed=0), tok
    from calib_trl.defaults import load_default_model, load_default_tokenizer

    return load_default_model(dtype=dtype), load_default_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------------


def score(model, tok, rows, batch_size, lm_check=True):
    from calib_trl.evaluation.scoring import score_multiple_choice

    return score_multiple_choice(model, tok, rows, batch_size=batch_size, progress=False, lm_check=lm_check)


def measure(model, tok, data, mode, batch_size) -> dict:
    """Per-row option logits, answer mass and prompt-text NLL on the evaluation splits, and the fitted temperature."""
    from calib_trl.evaluation.temperature_scaling import fit_temperature

    out = {}
    for split in SPLITS:
        s = score(model, tok, data[split], batch_size)
        out[split] = {
            "logits": np.round(s.logits, 5).tolist(),
            "answer_mass": np.round(s.answer_mass, 6).tolist(),
            "lm_nll_sum": np.round(s.lm_nll_sum, 5).tolist(),
            "lm_tokens": s.lm_tokens.tolist(),
        }
    held_out = data["calibration"].select(range(min(mode["ts_rows"], len(data["calibration"]))))
    fit = score(model, tok, held_out, batch_size, lm_check=False)
    out["temperature"] = fit_temperature(fit.logits, fit.labels)
    return out


def train_method(name, model, tok, train, flagged, data, regime, mode, seed):
    from calib_trl import CalibRCFTConfig, CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer

    kind, overrides, extra = ALL_METHODS[name]
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
        seed=seed,
        max_length=mode["max_length"],
        padding_free=mode["max_length"] is None,  # no compute spent on padding
    )
    uses_flags = overrides.get("calibration_loss", "none") != "none" and overrides.get("apply_to", "known") == "known"
    rows = flagged if uses_flags and overrides.get("detection") != "online" else train
    kwargs = {k: data[v] for k, v in extra.items()}
    if kind == "rcft":
        config_class = CalibRCFTConfig if "calibration_loss" in overrides else RCFTConfig
        cfg = config_class(**common, estep_samples=mode["estep_samples"], **overrides)
        trainer = RCFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok, **kwargs)
    else:
        cfg = CalibSFTConfig(**common, **overrides)
        trainer = CalibSFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok, **kwargs)
    start = time.time()
    trainer.train()
    return trainer.model, time.time() - start, trainer.state.global_step


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------


def probs_of(run_split: dict, temperature: float | None = None) -> np.ndarray:
    z = torch.tensor(run_split["logits"], dtype=torch.float64)
    return (z / (temperature or 1.0)).softmax(-1).numpy()


def binned_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """ECE of each row of `[B, N]` confidences, with the bins of `calib_trl.metrics` (a confidence of 1 on its own)."""
    edges = np.arange(n_bins + 1) / n_bins
    index = np.searchsorted(edges, conf, side="right") - 1  # bucketize(right=True) - 1
    b, n = conf.shape
    flat = index + (n_bins + 1) * np.arange(b)[:, None]
    size = (n_bins + 1) * b
    gap = np.bincount(flat.ravel(), (conf - correct).ravel(), minlength=size).reshape(b, n_bins + 1)
    return np.abs(gap).sum(1) / n


def split_metrics(run: dict, split: str, labels: np.ndarray, temperature: float | None = None) -> dict:
    from calib_trl.metrics import calibration_gaps, calibration_report

    p = probs_of(run[split], temperature)
    report = calibration_report(p, labels)
    report.update(calibration_gaps(report))  # |accuracy - mean confidence|, a lower bound on the ECE
    tokens = np.asarray(run[split]["lm_tokens"])
    report["answer_mass"] = float(np.mean(run[split]["answer_mass"]))
    report["lm_nll"] = float(np.sum(run[split]["lm_nll_sum"]) / max(tokens.sum(), 1))
    return report


def per_row(run: dict, split: str, labels: np.ndarray, temperature: float | None = None):
    """Confidence, correctness and answer mass of each evaluation row."""
    p = probs_of(run[split], temperature)
    return p.max(1), (p.argmax(1) == labels).astype(float), np.asarray(run[split]["answer_mass"])


def paired_bootstrap(method_runs: list, sft_runs: list, split: str, labels, ts=(False, False), seed=0) -> dict:
    """
    Mean over seeds of (method - SFT) for ECE, accuracy and answer mass, with 95 % percentile intervals from
    `N_BOOT` replicates that resample the evaluation rows (paired: the same rows for both) and the seeds.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    s = len(method_runs)
    rows = rng.integers(0, n, (N_BOOT, n))
    seeds = rng.integers(0, s, (N_BOOT, s))
    diffs = {"ece": np.zeros((N_BOOT, s)), "accuracy": np.zeros((N_BOOT, s)), "answer_mass": np.zeros((N_BOOT, s))}
    point = {k: [] for k in diffs}
    for j, (m, b) in enumerate(zip(method_runs, sft_runs)):
        cm, am, mm = per_row(m, split, labels, m["temperature"] if ts[0] else None)
        cb, ab, mb = per_row(b, split, labels, b["temperature"] if ts[1] else None)
        diffs["ece"][:, j] = binned_ece(cm[rows], am[rows]) - binned_ece(cb[rows], ab[rows])
        diffs["accuracy"][:, j] = am[rows].mean(1) - ab[rows].mean(1)
        diffs["answer_mass"][:, j] = mm[rows].mean(1) - mb[rows].mean(1)
        point["ece"].append(binned_ece(cm[None], am[None])[0] - binned_ece(cb[None], ab[None])[0])
        point["accuracy"].append(am.mean() - ab.mean())
        point["answer_mass"].append(mm.mean() - mb.mean())
    out = {}
    for key, d in diffs.items():
        boot = np.take_along_axis(d, seeds, axis=1).mean(1)
        out[key] = {
            "diff": float(np.mean(point[key])),
            "low": float(np.percentile(boot, 2.5)),
            "high": float(np.percentile(boot, 97.5)),
        }
    return out


def ece_floor(conf: np.ndarray, seed: int = 0, draws: int = 200) -> float:
    """Mean ECE of a perfectly calibrated model with these confidences on this many rows (binned ECE's bias)."""
    rng = np.random.default_rng(seed)
    correct = rng.uniform(size=(draws, len(conf))) < conf[None, :]
    return float(binned_ece(np.broadcast_to(conf, correct.shape), correct.astype(float)).mean())


def summarize(results: dict) -> dict:
    """Per regime and method: means over seeds, the paired differences from SFT, and the same after TS."""
    labels = {split: np.asarray(results["labels"][split]) for split in SPLITS}
    summary = {"base": {split: split_metrics(results["base"], split, labels[split]) for split in SPLITS}}
    summary["floor"] = {split: ece_floor(per_row(results["base"], split, labels[split])[0]) for split in SPLITS}
    for regime, methods in results["runs"].items():
        sft = methods.get("sft", {})
        table = summary.setdefault("regimes", {}).setdefault(regime, {})
        for name in ALL_METHODS:
            runs = methods.get(name)
            if not runs:
                continue
            for ts in (False, True):
                key = f"{name} + TS" if ts else name
                seeds = sorted(set(runs) & set(sft), key=int) if name != "sft" or ts else sorted(runs, key=int)
                row = {"seeds": len(runs), "split": {}}
                for split in SPLITS:
                    per_seed = [
                        split_metrics(runs[s], split, labels[split], runs[s]["temperature"] if ts else None)
                        for s in sorted(runs, key=int)
                    ]
                    mean = {
                        k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0] if k not in ("n", "n_bins")
                    }
                    mean["n"] = per_seed[0]["n"]
                    if ts:
                        mean["temperature"] = float(np.mean([runs[s]["temperature"] for s in runs]))
                    if seeds and (name != "sft" or ts):
                        mean["vs_sft"] = paired_bootstrap(
                            [runs[s] for s in seeds], [sft[s] for s in seeds], split, labels[split], ts=(ts, False)
                        )
                        mean["paired_seeds"] = len(seeds)
                    if seeds and not ts:  # the post-hoc baseline a user would pick instead
                        mean["vs_sft_ts"] = paired_bootstrap(
                            [runs[s] for s in seeds], [sft[s] for s in seeds], split, labels[split], ts=(False, True)
                        )
                    row["split"][split] = mean
                table[key] = row
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def _interval(d: dict, scale: float = 1.0, fmt: str = "{:+.3f}") -> str:
    mark = "" if d["low"] <= 0 <= d["high"] else " *"
    return f"{fmt.format(d['diff'] * scale)} [{fmt.format(d['low'] * scale)}, {fmt.format(d['high'] * scale)}]{mark}"


def markdown(results: dict, summary: dict) -> str:
    s = results["settings"]
    lines = [
        f"Mode `{s['mode']}` on {s['device']}: {s['mode_settings']['train'] or 'all'} training rows per seed, seeds "
        f"{', '.join(map(str, s['seeds']))}; {s['sizes']['test']} test and {s['sizes']['ood']} out-of-domain rows; "
        f"temperature fitted on {min(s['mode_settings']['ts_rows'], s['sizes']['calibration'])} calibration rows "
        f"(`python benchmarks/reproduce.py --mode {s['mode']}`).",
        "",
        f"ECE floor (a perfectly calibrated model with the base model's confidences, on as many rows): test "
        f"{summary['floor']['test']:.3f}, out-of-domain {summary['floor']['ood']:.3f}. Differences are method - SFT "
        "(or - SFT + TS), averaged over the seeds, with 95 % paired-bootstrap intervals (rows and seeds resampled); `*` "
        "marks an interval that excludes 0. `ECE + TS` is the method's own ECE after temperature scaling (mean T in "
        "brackets); `answer mass` is the full-vocabulary probability of the option letters at the answer position; "
        "`LM NLL` the NLL per token of the evaluation prompts' text.",
        "",
    ]
    base = summary["base"]
    for regime, table in summary.get("regimes", {}).items():
        r = REGIMES[regime]
        batch = (s["mode_settings"]["batch"] or {}).get(regime, r["batch_size"])
        lines += [
            f"**{regime}** ({r['num_train_epochs']} epochs, lr {r['learning_rate']}, optimizer batch {batch})",
            "",
        ]
        for split, title in (("test", "test (in-domain)"), ("ood", "out-of-domain")):
            lines += [
                f"*{title}*",
                "",
                "| method | seeds | acc | Δacc vs SFT | ECE | ΔECE vs SFT | ΔECE vs SFT + TS | ECE + TS (T) | smooth ECE | "
                "answer mass | Δ mass vs SFT | LM NLL |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            b = base[split]
            lines.append(
                f"| base | - | {b['accuracy']:.3f} | | {b['ece']:.3f} | | | | {b['smooth_ece']:.3f} | "
                f"{b['answer_mass']:.3f} | | {b['lm_nll']:.3f} |"
            )
            for name, row in table.items():
                if name.endswith(" + TS") and name != "sft + TS":
                    continue
                m = row["split"][split]
                vs = m.get("vs_sft")
                scaled = table.get(f"{name} + TS", {}).get("split", {}).get(split)
                cells = [
                    name,
                    str(row["seeds"]),
                    f"{m['accuracy']:.3f}",
                    _interval(vs["accuracy"]) if vs else "",
                    f"{m['ece']:.3f}",
                    _interval(vs["ece"]) if vs else "",
                    _interval(m["vs_sft_ts"]["ece"]) if "vs_sft_ts" in m else "",
                    f"{scaled['ece']:.3f} ({scaled['temperature']:.2f})" if scaled and name != "sft + TS" else "",
                    f"{m['smooth_ece']:.3f}",
                    f"{m['answer_mass']:.3f}",
                    _interval(vs["answer_mass"]) if vs else "",
                    f"{m['lm_nll']:.3f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines += selection(summary)
    return "\n".join(lines)


def selection(summary: dict) -> list[str]:
    """
    The default rule: among the CogCalib settings whose accuracy is at least SFT's - 1 point and whose answer mass is
    at least 0.9 x SFT's (test and out-of-domain, every regime measured), the lowest mean ECE over test and
    out-of-domain and the regimes. Both conditions are judged with the paired intervals: a setting is out when the
    interval of its difference from SFT lies wholly below the bound (it is shown to cost more than that), not when a
    point estimate does, since at this scale an accuracy difference of a few points is within the noise.
    """
    regimes = summary.get("regimes", {})
    if not regimes or not all("sft" in t for t in regimes.values()):
        return []
    candidates = [  # CogCalib's own settings: `apply_to="all"` answers another question (does the split help?)
        n
        for n, (kind, o, _) in ALL_METHODS.items()
        if kind == "calib" and o.get("calibration_loss") != "none" and o.get("apply_to", "known") == "known"
    ]
    rows, partial = [], []
    for name in candidates:
        if not all(name in t and "vs_sft" in t[name]["split"][SPLITS[0]] for t in regimes.values()):
            if any(name in t for t in regimes.values()):
                partial.append(name)
            continue
        why, eces, distinct = [], [], []
        for regime, table in regimes.items():
            for split in SPLITS:
                m, ref = table[name]["split"][split], table["sft"]["split"][split]
                eces.append(m["ece"])
                acc, mass, ece = m["vs_sft"]["accuracy"], m["vs_sft"]["answer_mass"], m["vs_sft"]["ece"]
                if acc["high"] < -0.01:
                    why.append(f"acc {regime}/{split} {_interval(acc)}")
                if mass["high"] < -0.1 * ref["answer_mass"]:
                    why.append(f"mass {regime}/{split} {m['answer_mass']:.3f} < {0.9 * ref['answer_mass']:.3f}")
                if ece["high"] < 0:
                    distinct.append(f"{regime}/{split} lower")
                elif ece["low"] > 0:
                    distinct.append(f"{regime}/{split} higher")
        rows.append((float(np.mean(eces)), name, why, distinct))
    rows.sort()
    lines = [
        "**Default rule**: the lowest mean ECE (test and out-of-domain, every regime measured) among the CogCalib "
        "settings whose accuracy is at least SFT's - 1 point and whose answer mass is at least 0.9 x SFT's, in every "
        "regime and split; a setting is out when the interval of its difference from SFT lies wholly below the bound.",
        "",
        "| setting | mean ECE | eligible | why not | ECE vs SFT, where the interval excludes 0 |",
        "|---|---|---|---|---|",
    ]
    sft_ece = float(np.mean([t["sft"]["split"][split]["ece"] for t in regimes.values() for split in SPLITS]))
    lines.append(f"| sft (reference) | {sft_ece:.3f} | | | |")
    lines += [
        f"| {name} | {ece:.3f} | {'yes' if not why else 'no'} | {'; '.join(why)} | "
        f"{', '.join(distinct) or 'not distinguishable'} |"
        for ece, name, why, distinct in rows
    ]
    if partial:  # a setting judged on fewer regimes than the others would not be judged by the same rule
        lines += ["", f"Not judged (not measured in every regime): {', '.join(partial)}."]
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def results_path(args) -> str:
    return args.output or os.path.join(RESULTS, f"reproduce_{args.mode}.json")


def load_saved(settings: dict, args) -> dict | None:
    path = results_path(args)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    theirs = saved.get("settings", {})
    for key in ("mode", "mode_settings", "sizes"):
        if json.loads(json.dumps(settings[key])) != theirs.get(key):
            raise ValueError(
                f"The saved results in {path} were made with another `{key}` ({theirs.get(key)!r}, now "
                f"{settings[key]!r}); pass --output to start a new file, or --fresh to replace it."
            )
    return saved


def write(results: dict, args, smoke: bool, final: bool) -> None:
    path = results_path(args)
    if args.output:
        with open(path, "w") as f:
            json.dump(results, f)
    else:
        save_json(f"reproduce_{args.mode}", results, indent=None)
    if not final:
        return
    summary = summarize(results)
    table = markdown(results, summary)
    print("\n" + table)
    summary_path = os.path.splitext(path)[0] + "_summary.json"
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Wrote {path} and {summary_path}")
    if not args.no_readme and not smoke:
        write_readme_section("reproduce", args.mode, table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(ALL_METHODS),
        help="default: the main methods; the sweep settings run only when named",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the mode's seeds")
    parser.add_argument("--redo", action="store_true", help="run the selected runs again even if they are saved")
    parser.add_argument("--all-regimes", action="store_true", help="run the ONE_REGIME methods in every regime too")
    parser.add_argument("--fresh", action="store_true", help="start a new results file instead of adding to it")
    parser.add_argument("--table-only", action="store_true", help="rebuild the tables from the saved runs")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--output", default=None)
    parser.add_argument("--no-readme", action="store_true", help="do not write the tables into benchmarks/README.md")
    args = parser.parse_args()
    mode = MODES[args.mode]
    smoke = args.mode == "smoke"
    seeds = args.seeds if args.seeds is not None else list(mode["seeds"])
    dtype = torch.bfloat16 if args.mode == "gpu" else torch.float32
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"

    data = load_data(mode, smoke)
    settings = {
        "mode": args.mode,
        "mode_settings": mode,
        "regimes": {r: REGIMES[r] for r in REGIMES},
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seeds": sorted(seeds),
        "sizes": {k: len(v) for k, v in data.items() if k != "train"},
    }
    saved = None if args.fresh else load_saved(settings, args)
    results = saved or {"settings": settings, "runs": {}, "detection": {}}
    results["settings"]["seeds"] = sorted(set(results["settings"].get("seeds", [])) | set(seeds))
    if args.table_only:
        if saved is None:
            parser.error(f"--table-only: no saved results at {results_path(args)}")
        write(results, args, smoke, final=True)
        return

    from calib_trl import detect_known
    from calib_trl.mcq import answer_index

    results["labels"] = {
        split: [answer_index(a, len(c)) for a, c in zip(data[split]["answer"], data[split]["choices"])]
        for split in SPLITS
    }
    base_model, tok = load_model(smoke, dtype)
    base_model.to(device)
    if "base" not in results or args.redo:
        results["base"] = measure(base_model, tok, data, mode, args.eval_batch_size)
        write(results, args, smoke, final=False)
    for regime in args.regimes:
        runs = results["runs"].setdefault(regime, {})
        methods = [m for m in args.methods if args.all_regimes or ONE_REGIME.get(m, regime) == regime]
        todo = [(s, m) for s in seeds for m in methods if args.redo or str(s) not in runs.get(m, {})]
        if not todo:
            continue
        probe = threshold = None
        for seed in sorted({s for s, _ in todo}):
            train = training_rows(data["train"], mode, seed)
            if probe is None:
                flagged, report, probe = detect_known(
                    base_model,
                    tok,
                    train,
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
                    keep_adapted=True,
                    progress=False,
                    return_report=True,
                )
                threshold = report.threshold
                results["detection"][regime] = report.to_dict()
                print(
                    f"[{regime}] detection: threshold {threshold:.3f}, {report.detection_accuracy:.3f} accurate on "
                    f"{report.n_calibration} held-out rows",
                    flush=True,
                )
            else:
                flagged = detect_known(
                    probe, tok, train, threshold=threshold, batch_size=args.eval_batch_size, progress=False
                )
            results["detection"].setdefault(f"{regime}_known_fraction", {})[str(seed)] = float(
                np.mean(flagged["known"])
            )
            for name in [m for s, m in todo if s == seed]:
                model = copy.deepcopy(base_model)
                model, seconds, steps = train_method(name, model, tok, train, flagged, data, regime, mode, seed)
                run = measure(model, tok, data, mode, args.eval_batch_size)
                run.update(train_time_s=seconds, steps=steps)
                runs.setdefault(name, {})[str(seed)] = run
                labels = np.asarray(results["labels"]["test"])
                print(
                    f"[{regime} seed {seed}] {name:<20} acc {np.mean(per_row(run, 'test', labels)[1]):.3f} ECE "
                    f"{binned_ece(*[x[None] for x in per_row(run, 'test', labels)[:2]])[0]:.3f} mass "
                    f"{np.mean(run['test']['answer_mass']):.3f} T {run['temperature']:.2f} ({steps} steps, "
                    f"{seconds:.0f} s)",
                    flush=True,
                )
                del model
                gc.collect()
                write(results, args, smoke, final=False)  # after every run, so an interrupted run keeps it
        del probe
        gc.collect()
    write(results, args, smoke, final=True)


if __name__ == "__main__":
    main()
