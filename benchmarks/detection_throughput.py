# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
Throughput of a knowledge-detection pass against a bare batched forward pass over the same data.

    python benchmarks/detection_throughput.py                  # CPU: 256 rows of the MMLU train split
    python benchmarks/detection_throughput.py --rows 0         # the whole train split (GPU)

Three timings over the same rows of the default MMLU train split, with the default model:

- `detect`: `calib_trl.evaluation.scoring.score_answers`, i.e. what `detect_known` runs per row (tokenization included,
  answer NLL and option probabilities out);
- `bare`: the strictest baseline: the already-tokenized prompts, in the same length-sorted left-padded batches, through
  `model(input_ids, attention_mask, position_ids, logits_to_keep=1)` and nothing else;
- `naive`: what a hand-written loop does: batches in dataset order, right-padded, full logits.

Prints a table (rows/s, prompt tokens/s, ratio to `bare`) and writes `benchmarks/results/detection_throughput_<device>.json`.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import save_json, write_readme_section


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="rows of the train split (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from calib_trl.defaults import load_default_dataset, load_default_model, load_default_tokenizer
    from calib_trl.evaluation.scoring import ScoringPass, next_token_logits, score_answers
    from calib_trl.tokenization import tokenize_prompt

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load_default_model(dtype=dtype).to(args.device).eval()
    tok = load_default_tokenizer()
    data = load_default_dataset("mmlu")["train"]
    if args.rows:
        data = data.select(range(min(args.rows, len(data))))
    encoded = [tokenize_prompt(tok, p) for p in data["prompt"]]
    n_tokens = sum(len(e) for e in encoded)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def bare():
        sequences = dict(enumerate(encoded))
        scoring = ScoringPass(len(encoded), progress=False)
        for _, *inputs in scoring.batches(model, sequences, args.batch_size, tok.pad_token_id, "bare", "q"):
            next_token_logits(model, *inputs)

    @torch.no_grad()
    def naive():
        for s in range(0, len(encoded), args.batch_size):
            batch = encoded[s : s + args.batch_size]
            width = max(len(b) for b in batch)
            ids = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch], device=args.device)
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch], device=args.device)
            _ = model(input_ids=ids, attention_mask=mask).logits

    def detect():
        score_answers(model, tok, data, batch_size=args.batch_size, progress=False, shard=False)

    timings = {}
    bare()  # warm-up
    for name, fn in (("bare", bare), ("detect", detect), ("naive", naive)):
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
        print(f"  {name:<7} {best:.1f} s", flush=True)

    lines = [
        f"{len(data)} rows ({n_tokens} prompt tokens) of the MMLU train split, SmolLM2-135M-Instruct, {args.device}, "
        f"{dtype}, batch {args.batch_size}",
        "",
        "| pass | seconds | rows/s | tokens/s | throughput vs bare |",
        "|---|---|---|---|---|",
    ]
    for name in ("bare", "detect", "naive"):
        t = timings[name]
        lines.append(f"| {name} | {t:.1f} | {len(data) / t:.1f} | {n_tokens / t:.0f} | {timings['bare'] / t:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    path = save_json(
        f"detection_throughput_{args.device}",
        {
            "rows": len(data),
            "prompt_tokens": n_tokens,
            "device": args.device,
            "dtype": str(dtype),
            "batch_size": args.batch_size,
            "seconds": timings,
            "detect_vs_bare": timings["bare"] / timings["detect"],
            "table": table,
        },
    )
    write_readme_section("detection_throughput", args.device, table)
    print(f"\nWrote {path} and the table in benchmarks/README.md")


if __name__ == "__main__":
    main()
