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

`--quick` measures time and memory in one process, in one pass, for `sft`, `ls`, `mbls`, `ecp`, `trl_label_smoothing`
and `full_logits` on the random data, and `ecp_options` (CoECP on the option letters) against `sft_mc` (SFTTrainer on the
same multiple-choice rows, whose loss is on the answer letter only): each variant's training steps alternate round after
round; peak memory is CUDA's `max_memory_allocated` during each variant's steps (reset before each), with the model's
weights shared by all variants and no optimizer state (`training_step` only). Each ratio is taken round by round against
its reference's step of the same round, and reported as the median with its range over the rounds. It finishes in
about a minute on one GPU for the Llama-3.2-1B shape at 8 x 2048 tokens:

    python benchmarks/overhead.py --quick --device cuda --shape llama-1b --batch 8 --seq 2048
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
    # a few-MB model of the same kind, to check the script itself
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
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
    for row in load_default_dataset("mmlu")["train"]:
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


QUICK_VARIANTS = ["sft", "ls", "mbls", "ecp", "trl_label_smoothing", "full_logits", "sft_mc", "ecp_options"]

# Words of the multiple-choice prompt besides the random "t<i>" tokens (the option letters are single tokens)
_MC_WORDS = ["A", "B", "C", "D", ".", ":", "Answer", "with", "only", "a", "single", "letter"]


def build_mcq(args):
    """
    Multiple-choice rows of random tokens for the option-space variants: a question of about `--seq` random tokens,
    four one-token options, the answer letter as the completion, in calib-trl's plain-text format
    (`calib_trl.mcq.make_mcq_example`), with a word-level tokenizer whose letters are single tokens.
    """
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from calib_trl.mcq import make_mcq_example

    config = LlamaConfig(max_position_embeddings=max(4096, args.seq + 64), **SHAPES[args.shape])
    words = [f"t{i}" for i in range(config.vocab_size - len(_MC_WORDS))] + _MC_WORDS
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1")
    g = torch.Generator().manual_seed(2)
    n = args.batch * (args.steps + args.warmup)
    rows = []
    for i in range(n):
        ids = torch.randint(2, config.vocab_size - len(_MC_WORDS), (args.seq - 30,), generator=g).tolist()
        choices = [f"t{j}" for j in torch.randint(2, 1000, (4,), generator=g).tolist()]
        rows.append({**make_mcq_example(" ".join(f"t{j}" for j in ids), choices, i % 4, conversational=False)})
    return tok, Dataset.from_list(rows)


def make_mc_trainer(variant, model, tok, data, args, output_dir):
    from trl import SFTConfig, SFTTrainer

    from calib_trl import CalibSFTConfig, CalibSFTTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + args.warmup,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=args.gc,
        bf16=args.dtype == "bfloat16",
        shuffle_dataset=False,
        max_length=None,
        learning_rate=1e-5,
        use_cpu=args.device == "cpu",
    )
    if variant == "sft_mc":
        cfg = SFTConfig(**common)
        return SFTTrainer(
            model=model, args=cfg, train_dataset=data.remove_columns(["choices", "answer"]), processing_class=tok
        )
    cfg = CalibSFTConfig(**common, calibration_loss="ecp", ecp_beta=4.0, calibration_space="options", apply_to="all")
    return CalibSFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)


def quick(args) -> list[dict]:
    """Time and peak memory of every variant in one process and one pass (see the module docstring)."""
    model, tok, data = build(args)
    model.to(args.device)
    cuda = args.device == "cuda"
    variants = [v for v in args.variants if v in QUICK_VARIANTS] if args.variants != VARIANTS else QUICK_VARIANTS
    trainers, batches = {}, {}
    for v in variants:
        if v in ("sft_mc", "ecp_options"):
            mc_tok, mc_data = build_mcq(args)
            trainers[v] = make_mc_trainer(v, model, mc_tok, mc_data, args, tempfile.mkdtemp())
        else:
            trainers[v] = make_trainer(v, model, tok, data, args, tempfile.mkdtemp())
        batches[v] = next(iter(trainers[v].get_train_dataloader()))
    times = {v: [] for v in trainers}
    peaks = {v: 0.0 for v in trainers}
    model.train()
    for round_ in range(args.warmup + args.steps):
        for v, trainer in trainers.items():
            batch = dict(batches[v])
            n_items = (batch["labels"][:, 1:] != -100).sum()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            trainer.training_step(model, batch, num_items_in_batch=n_items)
            if cuda:
                torch.cuda.synchronize()
                peaks[v] = max(peaks[v], torch.cuda.max_memory_allocated() / 2**30)
            if round_ >= args.warmup:
                times[v].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    if not cuda:
        peaks = {v: float("nan") for v in trainers}
    results = []
    for v in trainers:
        reference = "sft_mc" if v in ("sft_mc", "ecp_options") else "sft"
        ratios = [t / r for t, r in zip(times[v], times[reference])]
        results.append(
            {
                "variant": v,
                "reference": reference,
                "step_times_s": times[v],
                "step_time_s": statistics.median(times[v]),
                "time_ratio": statistics.median(ratios),
                "time_ratio_range": [min(ratios), max(ratios)],
                "peak_memory_gib": peaks[v],
                "memory_ratio": peaks[v] / peaks[reference],
                "tokens_per_s": args.batch * args.seq / statistics.median(times[v]),
            }
        )
    return results


def quick_table(args, results) -> str:
    lines = [
        f"Device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} cores'}), "
        f"shape {args.shape}, random weights and tokens, {args.dtype}, batch {args.batch} x {args.seq} tokens; "
        f"`--quick`: one process, {args.steps} alternating rounds after {args.warmup} warm-up; the ratio is the median "
        "of the per-round ratios to the reference's step of the same round, with their range; peak memory without "
        "optimizer state",
        "",
        "| variant | reference | step time (s) | x reference: median [min, max] | peak memory (GiB) | x reference | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["time_ratio_range"]
        lines.append(
            f"| {r['variant']} | {r['reference']} | {r['step_time_s']:.3f} | {r['time_ratio']:.3f} [{low:.3f}, "
            f"{high:.3f}] | {r['peak_memory_gib']:.2f} | {r['memory_ratio']:.3f} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


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
    parser.add_argument(
        "--quick", action="store_true", help="time and memory in one process and one pass (see the module docstring)"
    )
    parser.add_argument("--output-name", default=None, help="results file name (default: overhead_<device>[...])")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.weights == "default" and args.shape != "smollm2-135m":
        parser.error("--weights default is SmolLM2-135M-Instruct: use --shape smollm2-135m")

    if args.variant:  # child process
        print(json.dumps({"peak_memory_gib": peak_memory(args)}))
        return

    if args.quick:
        start = time.perf_counter()
        results = quick(args)
        table = quick_table(args, results)
        print("\n" + table)
        key = args.output_name or f"overhead_{args.device}_quick"
        settings = {k: getattr(args, k) for k in ("device", "shape", "dtype", "batch", "seq", "steps", "warmup", "gc")}
        payload = {"settings": settings, "torch": torch.__version__, "results": results, "table": table}
        payload["seconds"] = time.perf_counter() - start
        path = save_json(key, payload)
        print(f"\nWrote {path} ({payload['seconds']:.0f} s)")
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
