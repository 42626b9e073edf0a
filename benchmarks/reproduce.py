# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Reproduction benchmark: each method against standard SFT on the same evaluation rows, over several training seeds, with
paired bootstrap intervals, the temperature-scaling baseline, discrimination (AUROC) and what calibration costs.

Three tasks (`--task`):

- `arithmetic` (the default): the embedded arithmetic task answered in words (`calib_trl.defaults.arithmetic`), a task
  the embedded model learns; calibration of its greedy answers (`calib_trl.evaluation.generation`). Methods act on the
  whole vocabulary, as CogCalib does on open-ended data;
- `arithmetic-mc`: the same rows as multiple-choice questions (letter format); the option-space methods and RCFT;
- `mmlu`: the earlier table, on MMLU, where the embedded model answers at chance.

    python benchmarks/reproduce.py --task arithmetic --mode cpu        # 3 seeds on 2 CPU cores
    python benchmarks/reproduce.py --task arithmetic --mode gpu        # full scale on one GPU
    python benchmarks/reproduce.py --task mmlu --mode cpu --table-only # rebuild a table from the saved runs
    python benchmarks/reproduce.py --task arithmetic --mode smoke      # a tiny random model: checks the pipeline

Each (regime, seed, method) run is saved as soon as it finishes and skipped when it is already saved with the same
settings, so a table can be filled in parts (`--redo` runs saved ones again).

What a run measures, on the test split and on the out-of-domain split (the same rows for every method and seed):
- accuracy (for generated answers, the match rate) and ECE (10 equal-width bins), smooth ECE (no bins), AUROC of
  confidence against correctness, Brier;
- multiple choice: `answer_mass`, the full-vocabulary probability of the option letters at the answer position;
  generated answers: `entropy`, the mean next-token entropy at the answer's positions (what a temperature-1 sample
  draws from);
- `lm_nll`: the NLL of the evaluation prompts' own text, which no method trains on (the LM check);
- the temperature `T` fitted by NLL on held-out calibration rows (the option logits, or the token logits of the
  reference answers), and everything above after scaling by it ("+ TS", the post-hoc baseline a user would pick).

Seed `s` trains on its own rows of the train split (rows `s * n` to `(s + 1) * n`) in its own order. Known flags:
on MMLU, one style-adapted probe per regime (on half of the calibration rows; threshold fitted on the other half); on
the arithmetic task, the base model's own answers, as the trainer's default (`detection="auto"`) flags them. A
method's difference from SFT is averaged over the seeds; its 95 % interval comes from a paired bootstrap that
resamples the evaluation rows (the same rows for the method and SFT) and the seeds.

Writes `benchmarks/results/<stem>_<mode>.json` (every run's per-row values, so that everything can be recomputed) and
the tables into `benchmarks/README.md` between the `<stem>:<mode>` markers.
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
from dataclasses import dataclass

import numpy as np
import torch
from common import RESULTS, save_json, write_readme_section

HERE = os.path.dirname(os.path.abspath(__file__))

SPLITS = ("test", "ood")
N_BOOT = 1000


@dataclass
class Task:
    dataset: str  # an embedded dataset (calib_trl.defaults)
    kind: str  # "multiple_choice" or "generation"
    stem: str  # results file and README marker
    title: str
    regimes: dict
    modes: dict
    methods: dict  # name -> (trainer, config overrides, extra trainer arguments), in the order they run
    sweep: dict  # settings run only when named in --methods
    one_regime: dict  # methods measured in one regime only unless --all-regimes
    detection: str  # "style_adapted_threshold" or "own_answer"
    at_chance: bool = False  # the model answers at chance: the table judges no method, and says so


# ---------------------------------------------------------------------------------------------------------------------
# MMLU: the earlier table (the model answers at chance)
# ---------------------------------------------------------------------------------------------------------------------

MMLU_REGIMES = {
    "short": dict(num_train_epochs=3, learning_rate=2e-5, batch_size=32),
    "overfit": dict(num_train_epochs=6, learning_rate=4e-5, batch_size=64),
}

MMLU_MODES = {
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
    # 2 CPU cores: 32 training rows per seed with the regimes' epochs and learning rates and small batches (24
    # optimizer steps per regime)
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

# Every row names its settings in full, so that a saved run keeps its meaning when a default changes
MMLU_METHODS = {
    "sft": ("calib", dict(calibration_loss="none"), {}),
    "coecp_opt_b1": ("calib", dict(calibration_loss="ecp", ecp_beta=1.0, calibration_space="options"), {}),
    "coecp_vocab_b2": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0, calibration_space="vocabulary"), {}),
    "ecp_all_opt_b1": (
        "calib",
        dict(calibration_loss="ecp", ecp_beta=1.0, calibration_space="options", apply_to="all"),
        {},
    ),
    "coecp_opt_b4": ("calib", dict(calibration_loss="ecp", ecp_beta=4.0, calibration_space="options"), {}),
    "rcft_estep_train": ("rcft", dict(ece_weight=0.5), {}),
    "rcft_estep_heldout": ("rcft", dict(ece_weight=0.5), {"estep_dataset": "calibration"}),
}

MMLU_SWEEP = {
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

# ---------------------------------------------------------------------------------------------------------------------
# The arithmetic task
# ---------------------------------------------------------------------------------------------------------------------

ARITHMETIC_REGIMES = {"sft": dict(num_train_epochs=3, learning_rate=4e-5, batch_size=8)}

ARITHMETIC_MODES = {
    # the same keys as MMLU's, and `max_new_tokens`, the longest greedy answer (long enough for a sentence)
    "gpu": dict(
        train=500,
        eval=None,
        calibration=None,
        ts_rows=300,
        epoch_scale=1.0,
        batch={"sft": 32},
        per_device=32,
        style_steps=0,
        style_batch=0,
        estep_samples=300,
        max_length=None,
        max_new_tokens=32,
        seeds=(0, 1, 2),
    ),
    # 2 CPU cores: 96 training rows per seed, 3 epochs (36 optimizer steps of 8 rows); 300 test rows, every capital
    "cpu": dict(
        train=96,
        eval=300,
        calibration=100,
        ts_rows=100,
        epoch_scale=1.0,
        batch=None,
        per_device=8,
        style_steps=0,
        style_batch=0,
        estep_samples=100,
        max_length=None,
        max_new_tokens=32,
        seeds=(0, 1, 2),
    ),
    "smoke": dict(
        train=8,
        eval=10,
        calibration=10,
        ts_rows=6,
        epoch_scale=0.2,
        batch=None,
        per_device=4,
        style_steps=0,
        style_batch=0,
        estep_samples=10,
        max_length=None,
        max_new_tokens=6,
        seeds=(0, 1),
    ),
}


def _vocab(loss: str, apply_to: str = "known", **weights) -> tuple:
    return ("calib", dict(calibration_loss=loss, calibration_space="vocabulary", apply_to=apply_to, **weights), {})


ARITHMETIC_METHODS = {
    "sft": ("calib", dict(calibration_loss="none"), {}),
    # today's default for open-ended rows: CoECP over the vocabulary, beta 2, on the known rows
    "coecp_vocab_b2": _vocab("ecp", ecp_beta=2.0),
    "coecp_vocab_b0.5": _vocab("ecp", ecp_beta=0.5),
    "cols_vocab_e0.1": _vocab("ls", ls_epsilon=0.1),
    "cols_vocab_e0.5": _vocab("ls", ls_epsilon=0.5),
    "combls_vocab": _vocab("mbls", mbls_margin=10.0, mbls_lambda=0.1),
    # the same terms on every row: does the known/unknown split help?
    "ecp_all_vocab_b2": _vocab("ecp", "all", ecp_beta=2.0),
    "ls_all_vocab_e0.1": _vocab("ls", "all", ls_epsilon=0.1),
}

ARITHMETIC_SWEEP = {
    "ecp_all_vocab_b0.5": _vocab("ecp", "all", ecp_beta=0.5),
    "mbls_all_vocab": _vocab("mbls", "all", mbls_margin=10.0, mbls_lambda=0.1),
}

LETTER_METHODS = {
    "sft": ("calib", dict(calibration_loss="none"), {}),
    "coecp_opt_b4": ("calib", dict(calibration_loss="ecp", ecp_beta=4.0, calibration_space="options"), {}),
    "rcft_estep_heldout": ("rcft", dict(ece_weight=0.5), {"estep_dataset": "calibration"}),
}

LETTER_SWEEP = {
    "coecp_vocab_b2": ("calib", dict(calibration_loss="ecp", ecp_beta=2.0, calibration_space="vocabulary"), {}),
    "cols_opt_e0.5": ("calib", dict(calibration_loss="ls", ls_epsilon=0.5, calibration_space="options"), {}),
}

TASKS = {
    "arithmetic": Task(
        "arithmetic",
        "generation",
        "reproduce_arithmetic",
        "The arithmetic task, answered in words",
        ARITHMETIC_REGIMES,
        ARITHMETIC_MODES,
        ARITHMETIC_METHODS,
        ARITHMETIC_SWEEP,
        {},
        "own_answer",
    ),
    "arithmetic-mc": Task(
        "arithmetic-mc",
        "multiple_choice",
        "reproduce_arithmetic-mc",
        "The arithmetic task, letter format",
        ARITHMETIC_REGIMES,
        ARITHMETIC_MODES,
        LETTER_METHODS,
        LETTER_SWEEP,
        {},
        "own_answer",
        at_chance=True,  # learnable_task.py: accuracy 0.28-0.31 on 4 options and AUROC 0.48-0.53, before and after SFT
    ),
    "mmlu": Task(
        "mmlu",
        "multiple_choice",
        "reproduce",
        "MMLU",
        MMLU_REGIMES,
        MMLU_MODES,
        MMLU_METHODS,
        MMLU_SWEEP,
        {"rcft_estep_train": "short", "rcft_estep_heldout": "short"},
        "style_adapted_threshold",
        at_chance=True,
    ),
}


def all_methods(task: Task) -> dict:
    return {**task.methods, **task.sweep}  # the table's row order


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def load_data(task: Task, mode: dict, smoke: bool):
    """The train split (rows for every seed), and the calibration, test and out-of-domain rows."""
    if smoke:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from helpers import make_mcq_dataset, make_open_ended_dataset

        n = mode["train"] * len(mode["seeds"])
        if task.kind == "generation":
            rows = make_open_ended_dataset(n + 2 * mode["eval"] + mode["calibration"])
            cuts = np.cumsum([n, mode["calibration"], mode["eval"]])
            return {
                "train": rows.select(range(cuts[0])),
                "calibration": rows.select(range(cuts[0], cuts[1])),
                "test": rows.select(range(cuts[1], cuts[2])),
                "ood": rows.select(range(cuts[2], len(rows))),
            }
        return {
            "train": make_mcq_dataset(n, seed=1),
            "calibration": make_mcq_dataset(mode["calibration"], seed=2),
            "test": make_mcq_dataset(mode["eval"], seed=3),
            "ood": make_mcq_dataset(mode["eval"], seed=4),
        }
    from calib_trl.defaults import load_default_dataset

    data = load_default_dataset(task.dataset)
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
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from helpers import make_model, make_tokenizer

        tok = make_tokenizer()
        return make_model(len(tok), seed=0), tok
    from calib_trl.defaults import load_default_model, load_default_tokenizer

    return load_default_model(dtype=dtype), load_default_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------------


def measure(task: Task, model, tok, data, mode, batch_size) -> dict:
    """
    Per-row values on the evaluation splits, and the fitted temperature: the option logits, answer mass and prompt-text
    NLL (multiple choice); correctness, both confidences at T = 1 and at the fitted T, entropy and prompt-text NLL
    (generated answers).
    """
    from calib_trl.evaluation.evaluate import fit_temperature_on
    from calib_trl.evaluation.generation import score_generations
    from calib_trl.evaluation.scoring import score_multiple_choice

    held_out = data["calibration"].select(range(min(mode["ts_rows"], len(data["calibration"]))))
    out = {"temperature": fit_temperature_on(model, tok, held_out, batch_size=batch_size, progress=False)}
    for split in SPLITS:
        if task.kind == "multiple_choice":
            s = score_multiple_choice(model, tok, data[split], batch_size=batch_size, progress=False, lm_check=True)
            out[split] = {
                "logits": np.round(s.logits, 5).tolist(),
                "answer_mass": np.round(s.answer_mass, 6).tolist(),
                "lm_nll_sum": np.round(s.lm_nll_sum, 5).tolist(),
                "lm_tokens": s.lm_tokens.tolist(),
            }
            continue
        s = score_generations(
            model,
            tok,
            data[split],
            batch_size=batch_size,
            max_new_tokens=mode["max_new_tokens"],
            temperatures=[out["temperature"]],
            progress=False,
        )
        out[split] = {
            "answers": s.answers,
            "correct": s.correct.astype(int).tolist(),
            **{f"confidence_{k}": np.round(v, 6).tolist() for k, v in s.confidence.items()},
            **{f"confidence_{k}_ts": np.round(v, 6).tolist() for (k, _), v in s.scaled.items()},
            "entropy": np.round(s.entropy, 5).tolist(),
            "lm_nll_sum": np.round(s.lm_nll_sum, 5).tolist(),
            "lm_tokens": s.lm_tokens.tolist(),
        }
    return out


def train_method(task: Task, name, model, tok, train, flagged, data, regime, mode, seed):
    from calib_trl import CalibRCFTConfig, CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer

    kind, overrides, extra = all_methods(task)[name]
    r = task.regimes[regime]
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


def flag_rows(task: Task, base_model, tok, train, data, mode, regime, batch_size, probe_cache: dict):
    """
    The known flags of a seed's training rows: the base model's own answers on the arithmetic task (the trainer's
    default path), a style-adapted probe's threshold on MMLU. Returns the flagged rows and the detection's record.
    """
    from calib_trl import detect_known
    from calib_trl.cogcalib.knowledge import fit_knowledge_rule

    if task.detection == "own_answer":
        rule = fit_knowledge_rule(base_model, tok, train, max_new_tokens=mode["max_new_tokens"])
        known = rule.flag(base_model, tok, train, batch_size=batch_size, progress=False)
        return train.add_column("known", known.tolist()), {"path": rule.path, "known_fraction": float(known.mean())}
    if "probe" not in probe_cache:
        flagged, report, probe = detect_known(
            base_model,
            tok,
            train,
            calibration_dataset=data["calibration"],
            batch_size=batch_size,
            style_adaptation_steps=mode["style_steps"],
            style_adaptation_kwargs={
                "learning_rate": task.regimes[regime]["learning_rate"],
                "batch_size": mode["style_batch"],
                "per_device_batch_size": min(mode["per_device"], mode["style_batch"]),
                "padding_free": mode["max_length"] is None,
                "max_length": mode["max_length"],
            },
            keep_adapted=True,
            progress=False,
            return_report=True,
        )
        probe_cache.update(probe=probe, threshold=report.threshold, report=report.to_dict())
        return flagged, {**report.to_dict(), "known_fraction": float(np.mean(flagged["known"]))}
    flagged = detect_known(
        probe_cache["probe"], tok, train, threshold=probe_cache["threshold"], batch_size=batch_size, progress=False
    )
    return flagged, {"known_fraction": float(np.mean(flagged["known"]))}


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


def side_key(task: Task) -> str:
    """The per-row side measure a table shows beside the LM check: answer mass (multiple choice) or entropy."""
    return "answer_mass" if task.kind == "multiple_choice" else "entropy"


def per_row(task: Task, run: dict, split: str, labels: np.ndarray, ts: bool = False, confidence: str = "sequence"):
    """Confidence, correctness and the side measure of each evaluation row (`ts`: after the run's temperature)."""
    part = run[split]
    if task.kind == "multiple_choice":
        p = probs_of(part, run["temperature"] if ts else None)
        return p.max(1), (p.argmax(1) == labels).astype(float), np.asarray(part["answer_mass"])
    key = f"confidence_{confidence}_ts" if ts else f"confidence_{confidence}"
    return np.asarray(part[key]), np.asarray(part["correct"], dtype=float), np.asarray(part["entropy"])


def split_metrics(task: Task, run: dict, split: str, labels: np.ndarray, ts: bool = False) -> dict:
    from calib_trl.metrics import calibration_gaps, calibration_report, confidence_report

    if task.kind == "multiple_choice":
        report = calibration_report(probs_of(run[split], run["temperature"] if ts else None), labels)
    else:
        conf, correct, _ = per_row(task, run, split, labels, ts)
        report = confidence_report(conf, correct)
    report.update(calibration_gaps(report))  # |accuracy - mean confidence|, a lower bound on the ECE
    report[side_key(task)] = float(np.mean(run[split][side_key(task)]))
    tokens = np.asarray(run[split]["lm_tokens"])
    report["lm_nll"] = float(np.sum(run[split]["lm_nll_sum"]) / max(tokens.sum(), 1))
    return report


def paired_bootstrap(
    task: Task, method_runs: list, sft_runs: list, split: str, labels, ts=(False, False), seed=0
) -> dict:
    """
    Mean over seeds of (method - SFT) for ECE, accuracy, the side measure and the LM check, with 95 % percentile
    intervals from `N_BOOT` replicates that resample the evaluation rows (paired: the same rows for both) and the seeds.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    s = len(method_runs)
    rows = rng.integers(0, n, (N_BOOT, n))
    seeds = rng.integers(0, s, (N_BOOT, s))
    side = side_key(task)
    keys = ("ece", "accuracy", side, "lm_nll")
    diffs = {k: np.zeros((N_BOOT, s)) for k in keys}
    point = {k: [] for k in keys}

    def lm(run, index):
        total, tokens = np.asarray(run[split]["lm_nll_sum"]), np.asarray(run[split]["lm_tokens"])
        return total[index].sum(-1) / np.maximum(tokens[index].sum(-1), 1)

    for j, (m, b) in enumerate(zip(method_runs, sft_runs)):
        cm, am, mm = per_row(task, m, split, labels, ts[0])
        cb, ab, mb = per_row(task, b, split, labels, ts[1])
        diffs["ece"][:, j] = binned_ece(cm[rows], am[rows]) - binned_ece(cb[rows], ab[rows])
        diffs["accuracy"][:, j] = am[rows].mean(1) - ab[rows].mean(1)
        diffs[side][:, j] = mm[rows].mean(1) - mb[rows].mean(1)
        diffs["lm_nll"][:, j] = lm(m, rows) - lm(b, rows)
        point["ece"].append(binned_ece(cm[None], am[None])[0] - binned_ece(cb[None], ab[None])[0])
        point["accuracy"].append(am.mean() - ab.mean())
        point[side].append(mm.mean() - mb.mean())
        point["lm_nll"].append(float(lm(m, np.arange(n)) - lm(b, np.arange(n))))
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


def labels_of(results: dict, task: Task) -> dict:
    if task.kind == "multiple_choice":
        return {split: np.asarray(results["labels"][split]) for split in SPLITS}
    return {split: np.asarray(results["base"][split]["correct"]) for split in SPLITS}  # (row counts only)


def summarize(task: Task, results: dict) -> dict:
    """Per regime and method: means over seeds, the paired differences from SFT, and the same after TS."""
    from calib_trl.evaluation.temperature_scaling import at_temperature_bound

    labels = labels_of(results, task)
    base = results["base"]
    summary = {"base": {split: split_metrics(task, base, split, labels[split]) for split in SPLITS}}
    summary["base_ts"] = {split: split_metrics(task, base, split, labels[split], ts=True) for split in SPLITS}
    summary["base_temperature"] = base["temperature"]
    summary["floor"] = {split: ece_floor(per_row(task, base, split, labels[split])[0]) for split in SPLITS}
    methods_of = all_methods(task)
    for regime, methods in results["runs"].items():
        sft = methods.get("sft", {})
        table = summary.setdefault("regimes", {}).setdefault(regime, {})
        for name in methods_of:
            runs = methods.get(name)
            if not runs:
                continue
            for ts in (False, True):
                key = f"{name} + TS" if ts else name
                seeds = sorted(set(runs) & set(sft), key=int) if name != "sft" or ts else sorted(runs, key=int)
                row = {"seeds": len(runs), "split": {}}
                for split in SPLITS:
                    per_seed = [split_metrics(task, runs[s], split, labels[split], ts) for s in sorted(runs, key=int)]
                    mean = {
                        k: float(np.nanmean([m[k] for m in per_seed])) for k in per_seed[0] if k not in ("n", "n_bins")
                    }
                    mean["n"] = per_seed[0]["n"]
                    if ts:
                        temperatures = [runs[s]["temperature"] for s in runs]
                        mean["temperature"] = float(np.mean(temperatures))
                        mean["temperatures_at_bound"] = int(sum(at_temperature_bound(t) for t in temperatures))
                    if seeds and (name != "sft" or ts):
                        mean["vs_sft"] = paired_bootstrap(
                            task, [runs[s] for s in seeds], [sft[s] for s in seeds], split, labels[split], (ts, False)
                        )
                        mean["paired_seeds"] = len(seeds)
                    if seeds and not ts:  # the post-hoc baseline a user would pick instead
                        mean["vs_sft_ts"] = paired_bootstrap(
                            task,
                            [runs[s] for s in seeds],
                            [sft[s] for s in seeds],
                            split,
                            labels[split],
                            (False, True),
                        )
                    if seeds and ts and name != "sft":  # method + TS against SFT + TS
                        mean["ts_vs_sft_ts"] = paired_bootstrap(
                            task, [runs[s] for s in seeds], [sft[s] for s in seeds], split, labels[split], (True, True)
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


def _temperature(m: dict) -> str:
    bound = m.get("temperatures_at_bound", 0)
    return f"{m['temperature']:.2f}" + (f", {bound} at the search bound" if bound else "")


def markdown(task: Task, results: dict, summary: dict) -> str:
    s = results["settings"]
    side = side_key(task)
    side_name = {"answer_mass": "answer mass", "entropy": "entropy"}[side]
    # the seeds some run was trained on (a seed whose runs were cut short is not in the table)
    trained = sorted({int(seed) for methods in results["runs"].values() for runs in methods.values() for seed in runs})
    lines = [
        f"Mode `{s['mode']}` on {s['device']}: {s['mode_settings']['train'] or 'all'} training rows per seed, seeds "
        f"{', '.join(map(str, trained))}; {s['sizes']['test']} test and {s['sizes']['ood']} out-of-domain rows; "
        f"temperature fitted on {min(s['mode_settings']['ts_rows'], s['sizes']['calibration'])} calibration rows "
        f"(`python benchmarks/reproduce.py --task {s['task']} --mode {s['mode']}`).",
        "",
    ]
    if task.at_chance:
        lines += [
            "**At chance: no method can be judged on this table.** The model answers these questions at chance "
            "(accuracy near 1/4, AUROC of confidence against correctness near 0.5), so the best-calibrated answer is "
            "a near-uniform one: a lower ECE here says nothing about what a model knows, and no default is chosen "
            "from it (the T column says where temperature scaling ran to its search bound).",
            "",
        ]
    lines += [
        f"ECE floor (a perfectly calibrated model with the base model's confidences, on as many rows): test "
        f"{summary['floor']['test']:.3f}, out-of-domain {summary['floor']['ood']:.3f}. Differences are method - SFT "
        "(or - SFT + TS), averaged over the seeds, with 95 % paired-bootstrap intervals (rows and seeds resampled); `*` "
        "marks an interval that excludes 0. `ECE + TS` is the method's own ECE after temperature scaling (mean T in "
        "brackets, and how many seeds' T sit at the search bound); "
        + (
            "`answer mass` is the full-vocabulary probability of the option letters at the answer position; "
            if side == "answer_mass"
            else "`acc` is the match rate of the greedy answers; `entropy` the mean next-token entropy (nats) at the "
            "answers' positions; "
        )
        + "`LM NLL` the NLL per token of the evaluation prompts' text.",
        "",
    ]
    base = summary["base"]
    for regime, table in summary.get("regimes", {}).items():
        r = task.regimes[regime]
        batch = (s["mode_settings"]["batch"] or {}).get(regime, r["batch_size"])
        lines += [
            f"**{regime}** ({r['num_train_epochs']} epochs, lr {r['learning_rate']}, optimizer batch {batch})",
            "",
        ]
        for split, title in (("test", "test (in-domain)"), ("ood", "out-of-domain")):
            lines += [
                f"*{title}*",
                "",
                "| method | seeds | acc | Δacc vs SFT | ECE | ΔECE vs SFT | ΔECE vs SFT + TS | ECE + TS (T) | "
                f"ΔECE + TS vs SFT + TS | smooth ECE | AUROC | {side_name} | Δ {side_name} vs SFT | LM NLL | "
                "Δ LM NLL vs SFT |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            b, bts = base[split], summary["base_ts"][split]
            lines.append(
                f"| base | - | {b['accuracy']:.3f} | | {b['ece']:.3f} | | | {bts['ece']:.3f} "
                f"({summary['base_temperature']:.2f}) | | {b['smooth_ece']:.3f} | {b['auroc']:.3f} | "
                f"{b[side]:.3f} | | {b['lm_nll']:.3f} | |"
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
                    f"{m['ece']:.3f}" + (f" (T {_temperature(m)})" if name == "sft + TS" else ""),
                    _interval(vs["ece"]) if vs else "",
                    _interval(m["vs_sft_ts"]["ece"]) if "vs_sft_ts" in m else "",
                    f"{scaled['ece']:.3f} ({_temperature(scaled)})" if scaled and name != "sft + TS" else "",
                    _interval(scaled["ts_vs_sft_ts"]["ece"]) if scaled and "ts_vs_sft_ts" in scaled else "",
                    f"{m['smooth_ece']:.3f}",
                    f"{m['auroc']:.3f}",
                    f"{m[side]:.3f}",
                    _interval(vs[side]) if vs else "",
                    f"{m['lm_nll']:.3f}",
                    _interval(vs["lm_nll"]) if vs else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    if not task.at_chance:
        lines += selection(task, summary)
    return "\n".join(lines)


def selection(task: Task, summary: dict) -> list[str]:
    """
    The default rule, among CogCalib's settings on the known rows (`apply_to="known"`; the all-rows settings answer
    another question: does the split help?):

    - multiple choice: the lowest mean ECE (test and out-of-domain, every regime) among the settings whose accuracy is
      at least SFT's - 1 point and whose answer mass is at least 0.9 x SFT's;
    - generated answers: the lowest mean ECE among the settings whose match rate is at least SFT's - 1 point and whose
      LM check stays within its interval of SFT's (the interval of the LM NLL difference includes 0); and only if
      some setting's ECE is distinguishably below SFT's: otherwise no calibration term.

    Each condition is judged with the paired intervals: a setting is out when the interval lies wholly beyond the bound.
    """
    regimes = summary.get("regimes", {})
    if not regimes or not all("sft" in t for t in regimes.values()):
        return []
    candidates = [
        n
        for n, (kind, o, _) in all_methods(task).items()
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
                vs = m["vs_sft"]
                if vs["accuracy"]["high"] < -0.01:
                    why.append(f"acc {regime}/{split} {_interval(vs['accuracy'])}")
                if task.kind == "multiple_choice" and vs["answer_mass"]["high"] < -0.1 * ref["answer_mass"]:
                    why.append(f"mass {regime}/{split} {m['answer_mass']:.3f} < {0.9 * ref['answer_mass']:.3f}")
                if task.kind == "generation" and not vs["lm_nll"]["low"] <= 0 <= vs["lm_nll"]["high"]:
                    why.append(f"LM NLL {regime}/{split} {_interval(vs['lm_nll'])}")
                if vs["ece"]["high"] < 0:
                    distinct.append(f"{regime}/{split} lower")
                elif vs["ece"]["low"] > 0:
                    distinct.append(f"{regime}/{split} higher")
        rows.append((float(np.mean(eces)), name, why, distinct))
    rows.sort()
    if task.kind == "multiple_choice":
        rule = (
            "the lowest mean ECE (test and out-of-domain, every regime measured) among the CogCalib settings whose "
            "accuracy is at least SFT's - 1 point and whose answer mass is at least 0.9 x SFT's"
        )
    else:
        rule = (
            "the lowest mean ECE (test and out-of-domain) among the CogCalib settings whose match rate is at least "
            "SFT's - 1 point and whose LM check stays within its interval of SFT's; if no eligible setting lowers ECE "
            "distinguishably, no calibration term"
        )
    lines = [
        f"**Default rule**: {rule}; a setting is out when the interval of its difference from SFT lies wholly beyond "
        "the bound.",
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
    if task.kind == "generation":
        chosen = next((name for ece, name, why, distinct in rows if not why and "lower" in " ".join(distinct)), None)
        lines += [
            "",
            f"Chosen: {chosen}."
            if chosen
            else "Chosen: no calibration term (no eligible setting lowers ECE distinguishably).",
        ]
    if partial:  # a setting judged on fewer regimes than the others would not be judged by the same rule
        lines += ["", f"Not judged (not measured in every regime): {', '.join(partial)}."]
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def results_path(args, task: Task) -> str:
    return args.output or os.path.join(RESULTS, f"{task.stem}_{args.mode}.json")


def load_saved(settings: dict, args, task: Task) -> dict | None:
    path = results_path(args, task)
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


def write(task: Task, results: dict, args, smoke: bool, final: bool) -> None:
    path = results_path(args, task)
    if args.output:
        with open(path, "w") as f:
            json.dump(results, f)
    else:
        save_json(f"{task.stem}_{args.mode}", results, indent=None)
    if not final:
        return
    summary = summarize(task, results)
    table = markdown(task, results, summary)
    print("\n" + table)
    summary_path = os.path.splitext(path)[0] + "_summary.json"
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Wrote {path} and {summary_path}")
    if not args.no_readme and not smoke:
        write_readme_section(task.stem, args.mode, table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="arithmetic")
    parser.add_argument(
        "--mode", choices=["gpu", "cpu", "smoke"], default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--regimes", nargs="+", default=None, help="default: the task's regimes")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the task's main methods (sweep: by name)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the mode's seeds")
    parser.add_argument("--redo", action="store_true", help="run the selected runs again even if they are saved")
    parser.add_argument("--all-regimes", action="store_true", help="run the one-regime methods in every regime too")
    parser.add_argument("--fresh", action="store_true", help="start a new results file instead of adding to it")
    parser.add_argument("--table-only", action="store_true", help="rebuild the tables from the saved runs")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--output", default=None)
    parser.add_argument("--no-readme", action="store_true", help="do not write the tables into benchmarks/README.md")
    args = parser.parse_args()
    task = TASKS[args.task]
    regimes = args.regimes or list(task.regimes)
    methods = args.methods or list(task.methods)
    unknown = [m for m in methods if m not in all_methods(task)] + [r for r in regimes if r not in task.regimes]
    if unknown:
        parser.error(f"not a method or regime of task {args.task}: {unknown}")
    mode = task.modes[args.mode]
    smoke = args.mode == "smoke"
    seeds = args.seeds if args.seeds is not None else list(mode["seeds"])
    dtype = torch.bfloat16 if args.mode == "gpu" else torch.float32
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"

    data = load_data(task, mode, smoke)
    settings = {
        "task": args.task,
        "mode": args.mode,
        "mode_settings": mode,
        "regimes": task.regimes,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seeds": sorted(seeds),
        "sizes": {k: len(v) for k, v in data.items() if k != "train"},
    }
    saved = None if args.fresh else load_saved(settings, args, task)
    results = saved or {"settings": settings, "runs": {}, "detection": {}}
    results["settings"].setdefault("task", args.task)
    results["settings"]["seeds"] = sorted(set(results["settings"].get("seeds", [])) | set(seeds))
    if args.table_only:
        if saved is None:
            parser.error(f"--table-only: no saved results at {results_path(args, task)}")
        write(task, results, args, smoke, final=True)
        return

    from calib_trl.mcq import answer_index

    if task.kind == "multiple_choice":
        results["labels"] = {
            split: [answer_index(a, len(c)) for a, c in zip(data[split]["answer"], data[split]["choices"])]
            for split in SPLITS
        }
    base_model, tok = load_model(smoke, dtype)
    base_model.to(device)
    if "base" not in results or args.redo:
        start = time.time()
        results["base"] = measure(task, base_model, tok, data, mode, args.eval_batch_size)
        print(f"base measured in {time.time() - start:.0f} s", flush=True)
        write(task, results, args, smoke, final=False)
    labels = labels_of(results, task)
    for regime in regimes:
        runs = results["runs"].setdefault(regime, {})
        chosen = [m for m in methods if args.all_regimes or task.one_regime.get(m, regime) == regime]
        todo = [(s, m) for s in seeds for m in chosen if args.redo or str(s) not in runs.get(m, {})]
        if not todo:
            continue
        probe_cache: dict = {}
        for seed in sorted({s for s, _ in todo}):
            train = training_rows(data["train"], mode, seed)
            flagged, record = flag_rows(
                task, base_model, tok, train, data, mode, regime, args.eval_batch_size, probe_cache
            )
            results["detection"].setdefault(regime, {})[str(seed)] = record
            print(f"[{regime} seed {seed}] detection: {record}", flush=True)
            for name in [m for s, m in todo if s == seed]:
                model = copy.deepcopy(base_model)
                model, seconds, steps = train_method(task, name, model, tok, train, flagged, data, regime, mode, seed)
                start = time.time()
                run = measure(task, model, tok, data, mode, args.eval_batch_size)
                run.update(train_time_s=seconds, steps=steps, measure_time_s=time.time() - start)
                runs.setdefault(name, {})[str(seed)] = run
                conf, correct, _ = per_row(task, run, "test", labels["test"])
                print(
                    f"[{regime} seed {seed}] {name:<20} acc {correct.mean():.3f} ECE "
                    f"{binned_ece(conf[None], correct[None])[0]:.3f} T {run['temperature']:.2f} ({steps} steps, "
                    f"{seconds:.0f} s training, {run['measure_time_s']:.0f} s measuring)",
                    flush=True,
                )
                del model
                gc.collect()
                write(task, results, args, smoke, final=False)  # after every run, so an interrupted run keeps it
        probe_cache.clear()
        gc.collect()
    write(task, results, args, smoke, final=True)


if __name__ == "__main__":
    main()
