# Copyright 2026 The calib-trl authors. Licensed under the Apache License, Version 2.0.
"""
How strong RCFT's ECE term is against the SFT term, under calib-trl's per-batch normalisation of L_ECE and under the
authors' E-step normalisation, for their λ (1e-3) and calib-trl's (1).

    python benchmarks/rcft_normalization.py                  # CPU: 4 batches of 8 MMLU rows, 10-20 minutes
    python benchmarks/rcft_normalization.py --batches 20 --batch 32
    python benchmarks/rcft_normalization.py --render         # the table again, from the saved JSON

For each batch, one forward pass of SmolLM2-135M-Instruct gives the completion-only SFT loss and the option
probabilities at the answer positions; the parameter gradient of each term is then taken separately from the same
graph (one backward pass each):

- `sft`: L_SFT (token mean over the answer tokens, as SFTTrainer computes it);
- `batch`: L_ECE with each bin's sum divided by the bin's rows in this batch (calib-trl's `ece_normalization="batch"`);
- `estep_N`: L_ECE with each bin's sum divided by the bin's expected number of training rows, `N` training rows in
  all (`ece_normalization="estep"`, the authors' objective), for `N` = 9,689 (the default train split) and `N` = 32
  (the CPU reproduction's training set). The E-step's bin fractions come from held-out rows of the calibration split.

The authors' gradient through the target (`ece_target_gradient=True`) is compared with the detached target on the
option logits at the answer positions, where both terms act (exact, and without another backward pass through the
model): the norm ratio and the cosine of the two gradients.

What decides whether the ECE term does anything is its share of the update: `r = α λ |∇L_ECE| / ((1 - α) |∇L_SFT|)`,
with α = 0.5. With Adam the update follows the direction of the summed gradient, so a term with `r` of 1e-6 changes
nothing. Between measurements the model takes one AdamW step (lr 2e-5) on calib-trl's default objective (batch
normalisation, λ = 1), so the later batches see a model that has started to move. Writes
`benchmarks/results/rcft_normalization_<device>.json` and the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from common import RESULTS, save_json, write_readme_section

ALPHA = 0.5
TRAIN_ROWS = {"default train split": 9689, "CPU reproduction": 32}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--estep-rows", type=int, default=128, help="held-out calibration rows scored by the E-step")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--render", action="store_true", help="rebuild the table from the saved JSON, and stop")
    args = parser.parse_args()
    if args.render:
        return rerender(args.device)

    from trl import SFTTrainer

    from calib_trl import RCFTConfig, RCFTTrainer
    from calib_trl.core.capture import hidden_for_outputs, shifted
    from calib_trl.core.columns import ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN
    from calib_trl.defaults import MMLU_SPLIT_SIZES, load_default_dataset, load_default_model, load_default_tokenizer
    from calib_trl.losses import rcft_ece_loss
    from calib_trl.rcft.loss import option_softmax

    assert TRAIN_ROWS["default train split"] == MMLU_SPLIT_SIZES["train"]
    start = time.time()
    tok = load_default_tokenizer()
    data = load_default_dataset("mmlu")
    train = data["train"].select(range(args.batches * args.batch))
    cfg = RCFTConfig(
        tempfile.mkdtemp(),
        ece_weight=ALPHA,
        ece_scale=1.0,
        per_device_train_batch_size=args.batch,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        bf16=False,
        padding_free=True,
        max_length=None,
        shuffle_dataset=False,
        estep_samples=args.estep_rows,
        bin_refresh="once",
    )
    model = load_default_model(dtype=torch.float32).to(args.device)
    trainer = RCFTTrainer(
        model=model, args=cfg, train_dataset=train, processing_class=tok, calibration_dataset=data["calibration"]
    )
    part = trainer.part("rcft")
    part.bin_stats = stats = trainer.estimate_bins()  # on held-out rows
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    def estep_counts(bins, n_rows):
        # the trainer's own `"estep"` counts, for `n_rows` training rows
        part.args.ece_normalization, part._ece_rows = "estep", n_rows
        try:
            return part.ece_bin_counts(trainer, bins)
        finally:
            part.args.ece_normalization, part._ece_rows = "batch", None

    rows = []
    for step, batch in enumerate(trainer.get_train_dataloader()):
        t0 = time.time()
        inputs = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        answers, options = inputs.pop(ANSWER_TOKEN_COLUMN), inputs.pop(NUM_CHOICES_COLUMN)
        n_items = (inputs["labels"][:, 1:] != -100).sum()
        with trainer._capture.capture():
            sft = SFTTrainer.compute_loss(trainer, model, inputs, num_items_in_batch=n_items)
            hidden = trainer._capture.hidden
            at = shifted(answers, inputs) > 0
            num_choices = shifted(options, inputs)[at].long()
            probs = option_softmax(trainer.option_logits(model, hidden_for_outputs(hidden, inputs)[at]), num_choices)
        bins, accuracy = part.row_bins(probs)
        terms = {"sft": sft}
        terms["batch"] = rcft_ece_loss(probs, bins, accuracy, cfg.n_bins, num_choices)
        # the target gradient, on the option logits z: dL/dz = p * (dL/dp - <p, dL/dp>) (softmax's Jacobian)
        by_logits = []
        for flow in (False, True):
            loss = rcft_ece_loss(probs, bins, accuracy, cfg.n_bins, num_choices, target_gradient=flow)
            g = torch.autograd.grad(loss, probs, retain_graph=True)[0]
            by_logits.append((probs * (g - (probs * g).sum(-1, keepdim=True))).detach().flatten().double())
        for n_rows in TRAIN_ROWS.values():
            counts = estep_counts(bins, n_rows)
            terms[f"estep_{n_rows}"] = rcft_ece_loss(probs, bins, accuracy, cfg.n_bins, num_choices, bin_counts=counts)
        grads, row = {}, {"step": step, "rows": int(len(probs))}
        names = list(terms)
        for i, name in enumerate(names):
            g = torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1)
            row[f"{name}_loss"] = terms[name].item()
            row[f"{name}_grad_norm"] = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).item()
            if name in ("sft", "batch"):
                grads[name] = g
        dot = sum((x.double() * y.double()).sum() for x, y in zip(grads["batch"], grads["sft"])).item()
        row["cos_batch_sft"] = dot / (row["batch_grad_norm"] * row["sft_grad_norm"])
        detached, flowing = by_logits
        row["target_gradient_norm_ratio"] = (flowing.norm() / detached.norm()).item()
        row["target_gradient_cos"] = torch.nn.functional.cosine_similarity(flowing, detached, dim=0).item()
        row["bins_in_batch"] = int(torch.unique(bins).numel())
        row["mean_confidence"] = probs.detach().max(-1).values.mean().item()
        # one step of calib-trl's default objective
        for p, gs, ge in zip(params, grads["sft"], grads["batch"]):
            p.grad = (1 - ALPHA) * gs + ALPHA * ge
        optimizer.step()
        optimizer.zero_grad()
        row["seconds"] = time.time() - t0
        rows.append(row)
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del grads, terms, probs, hidden, sft

    payload = {
        "device": args.device,
        "batch": args.batch,
        "alpha": ALPHA,
        "lr": args.lr,
        "estep_rows": len(part.estep_rows),
        "estep_counts": stats["counts"].tolist(),
        "estep_accuracy": stats["estep_accuracy"],
        "rows": rows,
        "seconds": time.time() - start,
    }
    payload["table"] = render(payload)
    print("\n" + payload["table"])
    path = save_json(f"rcft_normalization_{args.device}", payload)
    write_readme_section("rcft_normalization", args.device, payload["table"])
    print(f"\nWrote {path} and the table in benchmarks/README.md")


SETTINGS = [  # normalisation, λ, measured term, note
    ("batch", 1.0, "batch", "calib-trl default"),
    ("batch", 1e-3, "batch", ""),
    ("estep", 1e-3, f"estep_{TRAIN_ROWS['default train split']}", "the authors' objective, 9,689 training rows"),
    ("estep", 1.0, f"estep_{TRAIN_ROWS['default train split']}", ""),
    ("estep", 1e-3, f"estep_{TRAIN_ROWS['CPU reproduction']}", "the authors' objective, 32 training rows"),
    ("estep", 1.0, f"estep_{TRAIN_ROWS['CPU reproduction']}", ""),
]


def render(payload: dict) -> str:
    """The markdown table of a run (`--render` rebuilds it from the saved JSON)."""
    rows, alpha = payload["rows"], payload["alpha"]

    def spread(values, digits=2):
        return f"{statistics.median(values):.{digits}g} ({min(values):.{digits}g}-{max(values):.{digits}g})"

    table = [
        f"{payload['device']}, float32, SmolLM2-135M-Instruct, {len(rows)} batches of {payload['batch']} MMLU train "
        f"rows (completion-only SFT, α = {alpha}); E-step on {payload['estep_rows']} held-out calibration rows "
        f"(accuracy {payload['estep_accuracy']:.3f}); one AdamW step (lr {payload['lr']}) of the default objective "
        f"between batches; {payload['seconds'] / 60:.0f} minutes. Median (min-max) over the batches.",
        "",
        "| normalisation | λ | training rows | α λ L_ECE / (1 - α) L_SFT | gradient ratio r | |",
        "|---|---|---|---|---|---|",
    ]
    for norm, lam, key, note in SETTINGS:
        loss_ratio = [alpha * lam * r[f"{key}_loss"] / ((1 - alpha) * r["sft_loss"]) for r in rows]
        grad_ratio = [alpha * lam * r[f"{key}_grad_norm"] / ((1 - alpha) * r["sft_grad_norm"]) for r in rows]
        n_rows = "any" if norm == "batch" else f"{int(key.split('_')[1]):,}"
        table.append(f"| {norm} | {lam:g} | {n_rows} | {spread(loss_ratio)} | {spread(grad_ratio)} | {note} |")
    table += [
        "",
        "Target gradient (`ece_target_gradient=True`), on the option logits: norm of the ECE term's gradient against "
        f"the detached target's {spread([r['target_gradient_norm_ratio'] for r in rows], 3)}, cosine "
        f"{spread([r['target_gradient_cos'] for r in rows], 3)}. Cosine of the ECE and SFT parameter gradients: "
        f"{spread([r['cos_batch_sft'] for r in rows])}. Bins per batch: {spread([r['bins_in_batch'] for r in rows])}; "
        f"mean confidence {rows[0]['mean_confidence']:.3f} -> {rows[-1]['mean_confidence']:.3f}; SFT loss "
        f"{rows[0]['sft_loss']:.2f} -> {rows[-1]['sft_loss']:.2f}.",
    ]
    return "\n".join(table)


def rerender(device: str) -> None:
    path = os.path.join(RESULTS, f"rcft_normalization_{device}.json")
    with open(path) as f:
        payload = json.load(f)
    payload["table"] = render(payload)
    print(payload["table"])
    save_json(f"rcft_normalization_{device}", payload)
    write_readme_section("rcft_normalization", device, payload["table"])


if __name__ == "__main__":
    main()
