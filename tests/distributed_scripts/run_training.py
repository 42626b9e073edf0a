"""Short training runs of every calib-trl trainer configuration, and knowledge detection, with their results.

`tests/test_distributed.py` prepares a work directory (a tiny model, its tokenizer and the datasets, saved to disk),
launches this script on 2 CPU processes with `accelerate launch` (per-device batch `B`, no gradient accumulation),
and calls `run_all` itself in one process with gradient accumulation 2: both see the same global batches, so every
logged loss, final weight, detection threshold and RCFT bin statistic must agree.

Usage: `accelerate launch --multi_gpu --num_processes 2 run_training.py WORKDIR` (with `use_cpu=True` the processes
form a gloo group on the CPU). Each process writes `WORKDIR/out/rank{R}.json` and `WORKDIR/out/rank{R}.pt`.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

PER_DEVICE_BATCH = 2
MAX_STEPS = 3

# name -> trainer kind, training dataset and settings. The loss over whole sequences (`completion_only_loss=False`,
# `sft_loss="prompt_and_completion"`) gives the micro-batches different token counts, which the loss normalisation
# across processes and accumulation steps must handle.
CONFIGS = {
    "ls": dict(
        trainer="calib",
        data="mcq_known",
        calibration_loss="ls",
        ls_epsilon=0.3,
        calibration_weight=0.8,
        completion_only_loss=False,
    ),
    "mbls": dict(
        trainer="calib",
        data="mcq_known",
        calibration_loss="mbls",
        mbls_margin=2.0,
        mbls_lambda=0.5,
        completion_only_loss=False,
    ),
    "ecp": dict(
        trainer="calib", data="mcq_known", calibration_loss="ecp", ecp_beta=0.5, padding_free=True, max_length=None
    ),
    "online": dict(
        trainer="calib",
        data="mcq_online",
        calibration_loss="ls",
        ls_epsilon=0.3,
        detection="online",
        online_refit_steps=2,
        online_batch_size=4,
    ),
    "ecp_options": dict(
        trainer="calib",
        data="mcq_known",
        calibration_loss="ecp",
        ecp_beta=0.7,
        calibration_space="options",
        completion_only_loss=False,
    ),
    "rcft_ls_options": dict(
        trainer="rcft",
        data="mcq_known",
        calibration_loss="ls",
        ls_epsilon=0.4,
        calibration_space="options",
        ece_weight=0.5,
        ece_scale=5.0,
        estep_batch_size=4,
        estep_samples=None,
    ),
    # `detection="auto"`: the rows have no `known` column, so each process scores its share of them (the model's own
    # answers) before the first step, and every process must end up with the flags of a single-process run
    "auto": dict(trainer="calib", data="mcq_online", calibration_loss="ecp", ecp_beta=0.5),
    "rcft": dict(
        trainer="rcft",
        data="mcq_train",
        ece_weight=0.5,
        ece_scale=5.0,
        bin_refresh="2",
        estep_batch_size=4,
        estep_samples=None,
        sft_loss="prompt_and_completion",
    ),
}


def _load(workdir):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "model"), dtype=torch.float32)
    data_dir = os.path.join(workdir, "data")
    datasets = {name: load_from_disk(os.path.join(data_dir, name)) for name in os.listdir(data_dir)}
    return model, tokenizer, datasets


def _clean(value):
    """JSON-safe floats (NaN / inf as strings) in nested lists and dicts."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if torch.is_tensor(value):
        return _clean(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def train_one(name: str, workdir: str, grad_accum: int, run_dir: str) -> tuple[dict, dict]:
    """Train configuration `name` for `MAX_STEPS` optimizer steps; return its record and its final state dict."""
    from calib_trl import CalibRCFTConfig, CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer

    settings = dict(CONFIGS[name])
    kind, data = settings.pop("trainer"), settings.pop("data")
    model, tokenizer, datasets = _load(workdir)
    common = dict(
        output_dir=os.path.join(run_dir, name),
        per_device_train_batch_size=PER_DEVICE_BATCH,
        gradient_accumulation_steps=grad_accum,
        max_steps=MAX_STEPS,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=False,
        dataloader_pin_memory=False,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
        seed=0,
        max_length=1024,
        use_cpu=True,
        bf16=False,
    )
    common.update({k: settings.pop(k) for k in ("max_length",) if k in settings})
    record = {}
    if kind == "rcft":
        config_class = CalibRCFTConfig if "calibration_loss" in settings else RCFTConfig
        args = config_class(**common, **settings)
        trainer = RCFTTrainer(model=model, args=args, train_dataset=datasets[data], processing_class=tokenizer)
        esteps = record["esteps"] = []
        estimate = trainer.estimate_bins

        def recording_estep(model=None):
            stats = estimate(model)
            esteps.append(
                {
                    "step": trainer.state.global_step,
                    "counts": stats["counts"],
                    "accuracy": stats["accuracy"],
                    "confidence": stats["confidence"],
                }
            )
            return stats

        trainer.estimate_bins = recording_estep
    else:
        args = CalibSFTConfig(**common, **settings)
        extra = {"calibration_dataset": datasets["mcq_calibration"]} if args.detection == "online" else {}
        trainer = CalibSFTTrainer(
            model=model, args=args, train_dataset=datasets[data], processing_class=tokenizer, **extra
        )
    trainer.train()
    record["num_processes"] = trainer.accelerator.num_processes
    record["logs"] = [h for h in trainer.state.log_history if "loss" in h]
    if trainer.detector is not None:
        record["detector"] = trainer.detector.history
    if kind == "calib" and args.detection == "auto":
        record["known"] = list(trainer.train_dataset[args.known_column])
    if kind == "rcft":
        record["final_bins"] = {k: trainer._bin_stats[k] for k in ("counts", "accuracy", "confidence")}
    record["skipped_steps"] = trainer._skipped_steps
    weights = {
        k: v.detach().cpu().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    return _clean(record), weights


def detect(workdir: str) -> dict:
    """`detect_known` on a multiple-choice and an open-ended dataset (odd sizes, so that the shards are padded)."""
    from calib_trl import detect_known

    model, tokenizer, datasets = _load(workdir)
    out = {}
    for name, train, calibration in (
        ("mcq", "mcq_detect", "mcq_calibration"),
        ("open", "open_detect", "open_calibration"),
    ):
        flagged, report = detect_known(
            model,
            tokenizer,
            datasets[train],
            calibration_dataset=datasets[calibration],
            batch_size=4,
            progress=False,
            return_report=True,
        )
        out[name] = {
            "answer_nll": list(flagged["answer_nll"]),
            "known": list(flagged["known"]),
            "threshold": report.threshold,
            "detection_accuracy": report.detection_accuracy,
        }
    return _clean(out)


def run_all(workdir: str, grad_accum: int, run_dir: str) -> tuple[dict, dict]:
    records, weights = {"detect": detect(workdir)}, {}
    for name in CONFIGS:
        records[name], weights[name] = train_one(name, workdir, grad_accum, run_dir)
    return records, weights


def main():
    import warnings

    from accelerate import PartialState

    warnings.simplefilter("ignore")
    workdir = sys.argv[1]
    state = PartialState(cpu=True)
    records, weights = run_all(workdir, grad_accum=1, run_dir=os.path.join(workdir, f"runs-{state.num_processes}"))
    records["num_processes"] = state.num_processes
    out = os.path.join(workdir, "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
        json.dump(records, f)
    torch.save(weights, os.path.join(out, f"rank{state.process_index}.pt"))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
