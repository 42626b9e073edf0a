# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Step time and peak memory of calib-trl's losses against plain `SFTTrainer` on the same run.

    python benchmarks/overhead.py                         # CPU: SmolLM2-135M shape, 2 x 256 tokens
    python benchmarks/overhead.py --device cuda --shape llama-1b --batch 8 --seq 2048 --dtype bfloat16
    python benchmarks/overhead.py --weights default --variants sft ls mbls ecp mbls_all   # trained logits, MMLU text

All variants train the same model on the same data (every token a completion token, half of the examples flagged
known): by default a randomly initialised model of the shape on random tokens; with `--weights default` the embedded
SmolLM2-135M-Instruct on MMLU text. The two differ for MbLS only: its cost depends on how many logits lie within the
margin of the max, which a random initialisation (all of them) and random tokens (tens of thousands) make unlike a
trained model on real text (hundreds). Step time: one process holds a trainer per variant around one shared model and times their
`training_step` (forward + backward) in alternation, round after round, so that a drift of the machine hits every
variant alike; the table reports the median over `--steps` rounds after `--warmup`. Peak memory: each variant trains
`--warmup + 2` steps in a process of its own (CUDA: `max_memory_allocated`; CPU: the process's peak RSS, which includes
the Python runtime, model, gradients and optimizer state, so it is a coarse measure). Ratios are against
`SFTTrainer`. Results go to `benchmarks/results/overhead_<device>[_default_weights].json` and the table into
benchmarks/README.md.

Variants: `sft` (TRL's SFTTrainer), `none` (CalibSFTTrainer with calibration_loss="none"), `ls`/`mbls`/`ecp` on known
examples, `ls_all`/`mbls_all`/`ecp_all` on every example, `trl_label_smoothing` (SFTConfig.label_smoothing_factor),
and `full_logits` (a hand-written LS + entropy loss on the full `[B, T, V]` logits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import save_json, write_readme_section

VARIANTS = ["sft", "none", "ls", "mbls", "ecp", "ls_all", "mbls_all", "ecp_all", "trl_label_smoothing", "full_logits"]

SHAPES = {
    # SmolLM2-135M
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}


def build(args):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if args.weights == "default":
        return build_default(args)
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(4096, args.seq), **SHAPES[args.shape])
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(dtype)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
    g = torch.Generator().manual_seed(1)
    n = args.batch * (args.steps + args.warmup)
    ids = torch.randint(2, config.vocab_size, (n, args.seq), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "known": [i % 2 == 0 for i in range(n)]})
    return model, tok, data


def build_default(args):
    """The embedded SmolLM2-135M-Instruct on MMLU text: the logit distributions of a trained model on real data."""
    from datasets import Dataset

    from calib_trl.defaults import load_default_dataset, load_default_model, load_default_tokenizer

    model = load_default_model(dtype=getattr(torch, args.dtype))
    tok = load_default_tokenizer()
    n = args.batch * (args.steps + args.warmup)
    rows, stream = [], []
    for row in load_default_dataset()["train"]:
        stream += tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
        while len(stream) >= args.seq and len(rows) < n:
            rows.append(stream[: args.seq])
            stream = stream[args.seq :]
        if len(rows) == n:
            break
    return model, tok, Dataset.from_dict({"input_ids": rows, "known": [i % 2 == 0 for i in range(n)]})


def make_trainer(variant, model, tok, data, args, output_dir):
    from trl import SFTConfig, SFTTrainer

    from calib_trl import CalibSFTConfig, CalibSFTTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + args.warmup,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        activation_checkpointing=args.gc,
        bf16=args.dtype == "bfloat16",
        shuffle_dataset=False,
        max_length=None,
        dataloader_num_workers=0,
        learning_rate=1e-5,
        use_cpu=args.device == "cpu",
    )
    if variant in ("sft", "trl_label_smoothing", "full_logits"):
        cls = _full_logits_trainer() if variant == "full_logits" else SFTTrainer
        cfg = SFTConfig(**common, label_smoothing_factor=0.1 if variant == "trl_label_smoothing" else 0.0)
        return cls(model=model, args=cfg, train_dataset=data.remove_columns("known"), processing_class=tok)
    method, _, scope = variant.partition("_")
    cfg = CalibSFTConfig(
        **common, calibration_loss=method, apply_to="all" if scope == "all" else "known", ls_epsilon=0.1, ecp_beta=0.1
    )
    return CalibSFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)


def peak_memory(args) -> float:
    """Child process: train one variant for `warmup + 2` steps; its peak memory in GiB."""
    model, tok, data = build(args)
    model.to(args.device)
    args.steps = 2
    trainer = make_trainer(args.variant, model, tok, data, args, tempfile.mkdtemp())
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def step_times(args) -> dict[str, list[float]]:
    """Alternating `training_step` timings of every variant around one shared model."""
    model, tok, data = build(args)
    model.to(args.device)
    trainers = {v: make_trainer(v, model, tok, data, args, tempfile.mkdtemp()) for v in args.variants}
    batches = {v: next(iter(t.get_train_dataloader())) for v, t in trainers.items()}
    times = {v: [] for v in trainers}
    model.train()
    for round_ in range(args.warmup + args.steps):
        for v, trainer in trainers.items():
            batch = dict(batches[v])
            n_items = (batch["labels"][:, 1:] != -100).sum()
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.training_step(model, batch, num_items_in_batch=n_items)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[v].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return times


def _full_logits_trainer():
    from trl import SFTTrainer

    class FullLogitsTrainer(SFTTrainer):
        """LS (eps 0.1) + entropy bonus (beta 0.1) written on the full logits, as one would without calib-trl."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
            labels = labels[:, 1:]
            mask = labels != -100
            logp = logits.log_softmax(-1)
            nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            ls = 0.9 * nll + 0.1 * (-logp).mean(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            per_token = (ls - 0.1 * entropy) * mask
            n = mask.sum() if num_items_in_batch is None else num_items_in_batch
            return per_token.sum() / n

    return FullLogitsTrainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gc", action="store_true", help="activation (gradient) checkpointing")
    parser.add_argument(
        "--weights",
        default="random",
        choices=["random", "default"],
        help="`random`: a randomly initialised model of `--shape` on random tokens; `default`: the "
        "embedded SmolLM2-135M-Instruct on MMLU text (trained logits, where MbLS's near sets are "
        "realistic)",
    )
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.weights == "default" and args.shape != "smollm2-135m":
        parser.error("--weights default is SmolLM2-135M-Instruct: use --shape smollm2-135m")

    if args.variant:  # child process
        print(json.dumps({"peak_memory_gib": peak_memory(args)}))
        return

    if "sft" not in args.variants:
        args.variants = ["sft", *args.variants]
    results = []
    for variant in args.variants:
        cmd = (
            [sys.executable, __file__, "--variant", variant]
            + [f"--{k}={getattr(args, k)}" for k in ("device", "shape", "dtype", "batch", "seq", "warmup", "weights")]
            + (["--gc"] if args.gc else [])
        )
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        results.append({"variant": variant, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(f"  {variant:<20} peak memory {results[-1]['peak_memory_gib']:.2f} GiB", flush=True)
    times = step_times(args)
    for r in results:
        r["step_times_s"] = times[r["variant"]]
        r["step_time_s"] = statistics.median(times[r["variant"]])
        r["tokens_per_s"] = args.batch * args.seq / r["step_time_s"]

    base = next(r for r in results if r["variant"] == "sft")
    lines = [
        f"Device {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} cores'}), "
        f"{'SmolLM2-135M-Instruct weights on MMLU text' if args.weights == 'default' else f'shape {args.shape}, random weights and tokens'}, "
        f"{args.dtype}, batch {args.batch} x {args.seq} tokens; step time = forward + backward, "
        f"median of {args.steps} alternating rounds",
        "",
        "| variant | step time (s) | x SFTTrainer | peak memory (GiB) | x SFTTrainer | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        r["time_ratio"] = r["step_time_s"] / base["step_time_s"]
        r["memory_ratio"] = r["peak_memory_gib"] / base["peak_memory_gib"]
        lines.append(
            f"| {r['variant']} | {r['step_time_s']:.3f} | {r['time_ratio']:.3f} | {r['peak_memory_gib']:.2f} | "
            f"{r['memory_ratio']:.3f} | {r['tokens_per_s']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    payload = {
        "settings": {
            k: getattr(args, k)
            for k in ("device", "shape", "dtype", "batch", "seq", "steps", "warmup", "gc", "weights")
        },
        "torch": torch.__version__,
        "results": results,
        "table": table,
    }
    key = args.device if args.weights == "random" else f"{args.device}_default_weights"
    path = save_json(f"overhead_{key}", payload)
    write_readme_section("overhead", key, table)
    print(f"\nWrote {path} and the table in benchmarks/README.md")


if __name__ == "__main__":
    main()
