"""The `calib-trl` command: `detect`, `evaluate` and `report`.

    calib-trl evaluate --model default --dataset default --split test
    calib-trl detect   --model default --dataset default --split train --calibration-split calibration --output flags
    calib-trl report   runs/base/calibration.json runs/cogcalib/calibration.json --output report.md

Everything runs offline: `--model default` and `--dataset default` are the embedded SmolLM2-135M-Instruct and MMLU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .utils import json_safe


def load_mcq_dataset(dataset: str, split: str, max_samples: int | None = None, seed: int = 0):
    """
    A multiple-choice split: `default` (the embedded MMLU, see `calib_trl.defaults.load_default_dataset`), a directory
    written by `datasets.save_to_disk` (a `DatasetDict` or a `Dataset`), or a `.json`/`.jsonl` file. Rows need
    `prompt`, `choices` and `answer`; rows with `question` instead of `prompt` are formatted with
    `calib_trl.mcq.make_mcq_example`.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    from .mcq import make_mcq_example

    if dataset == "default":
        from .defaults import load_default_dataset

        splits = load_default_dataset(seed=seed)
        if split not in splits:
            raise ValueError(f"The default dataset has splits {list(splits)}; got --split {split!r}.")
        data = splits[split]
    elif os.path.isdir(dataset):
        data = load_from_disk(dataset)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"{dataset} has splits {list(data)}; got --split {split!r}.")
            data = data[split]
    elif os.path.isfile(dataset) and dataset.endswith((".json", ".jsonl")):
        data = load_dataset("json", data_files=dataset, split="train")
    else:
        raise FileNotFoundError(
            f"Dataset {dataset!r} is neither 'default', a directory saved with `save_to_disk`, nor a .json/.jsonl file."
        )
    if not isinstance(data, Dataset):
        raise ValueError(f"{dataset} did not load as a `datasets.Dataset`.")
    if "prompt" not in data.column_names and "question" in data.column_names:
        missing = [c for c in ("choices", "answer") if c not in data.column_names]
        if missing:
            raise ValueError(f"{dataset}: rows with `question` also need {missing}.")
        data = data.map(lambda row: make_mcq_example(row["question"], row["choices"], row["answer"]))
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    return data


def load_model(name_or_path: str, dtype: str = "float32", device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .defaults import resolve_model_name_or_path

    path = resolve_model_name_or_path(name_or_path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


def format_table(
    rows: dict[str, dict],
    keys=("accuracy", "mean_confidence", "ece", "ece_equal_mass", "cw_ece", "mce", "brier", "nll", "auroc"),
) -> str:
    """A markdown table: one row per named report."""
    header = "| | " + " | ".join(keys) + " |"
    lines = [header, "|---" * (len(keys) + 1) + "|"]
    for name, report in rows.items():
        cells = []
        for key in keys:
            value = report.get(key)
            cells.append("" if value is None else f"{value:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_evaluate(args) -> dict:
    from .mcq import score_multiple_choice
    from .metrics import calibration_gaps, calibration_report, reliability_diagram_data
    from .plotting import plot_reliability_diagram

    data = load_mcq_dataset(args.dataset, args.split, args.max_samples, args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    scores = score_multiple_choice(model, tokenizer, data, batch_size=args.batch_size, desc=f"Scoring {args.split}")
    report = calibration_report(scores.probs, scores.labels, n_bins=args.n_bins)
    train_report = None
    if args.train_split is not None:
        train = load_mcq_dataset(args.dataset, args.train_split, args.max_samples, args.seed)
        train_scores = score_multiple_choice(
            model, tokenizer, train, args.batch_size, desc=f"Scoring {args.train_split}"
        )
        train_report = calibration_report(train_scores.probs, train_scores.labels, n_bins=args.n_bins)
    gaps = calibration_gaps(report, train_report)
    os.makedirs(args.output_dir, exist_ok=True)
    diagram = os.path.join(args.output_dir, "reliability_diagram.png")
    data_rd = reliability_diagram_data(scores.confidences, scores.correct, n_bins=args.n_bins)
    plot_reliability_diagram(data=data_rd, title=f"{args.model} on {args.dataset}/{args.split}", path=diagram)
    out = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "n": len(data),
        "report": report,
        "gaps": gaps,
        "reliability_diagram": data_rd,
    }
    path = os.path.join(args.output_dir, "calibration.json")
    with open(path, "w") as f:
        json.dump(json_safe(out), f, indent=2)
    print(format_table({f"{args.model} / {args.split}": report}))
    print(f"\nconfidence gap |accuracy - mean confidence| = {gaps['confidence_gap']:.4f} (a lower bound on the ECE)")
    if train_report is not None:
        print(
            f"{args.train_split} accuracy {gaps['train_accuracy']:.4f}: {gaps['accuracy_gap']:+.4f} over {args.split}"
        )
    print(f"\nWrote {path} and {diagram}")
    return out


def cmd_detect(args):
    from .knowledge import detect_known

    data = load_mcq_dataset(args.dataset, args.split, args.max_samples, args.seed)
    calibration = None
    if args.threshold is None:
        calibration = load_mcq_dataset(args.dataset, args.calibration_split, args.max_calibration_samples, args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    style = {"learning_rate": args.style_adaptation_lr, "batch_size": args.style_adaptation_batch_size}
    flagged, report = detect_known(
        model,
        tokenizer,
        data,
        calibration_dataset=calibration,
        threshold=args.threshold,
        batch_size=args.batch_size,
        style_adaptation_steps=args.style_adaptation_steps,
        style_adaptation_kwargs=style,
        return_report=True,
    )
    if args.output.endswith((".jsonl", ".json")):
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        flagged.to_json(args.output)
    else:
        flagged.save_to_disk(args.output)
    if report is not None:
        print(report)
        with open(os.path.splitext(args.output.rstrip("/"))[0] + "_detection.json", "w") as f:
            json.dump(json_safe(report.to_dict()), f, indent=2)
    print(f"Known: {sum(flagged['known'])} of {len(flagged)} rows. Wrote {args.output}")


def cmd_report(args):
    from .plotting import plot_reliability_diagrams

    runs = {}
    panels = {}
    for path in args.inputs:
        with open(path) as f:
            run = json.load(f)
        name = run.get("name") or os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        runs[name] = run["report"]
        if "reliability_diagram" in run:
            panels[name] = run["reliability_diagram"]
    table = format_table(runs)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    if args.figure and panels:
        plot_reliability_diagrams(panels, path=args.figure)
        print(f"Wrote {args.figure}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calib-trl", description="Calibration-aware fine-tuning tools for TRL.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="default", help="Model directory, or `default` (SmolLM2-135M-Instruct).")
        p.add_argument(
            "--dataset", default="default", help="`default` (MMLU), a save_to_disk directory or a JSON(L) file."
        )
        p.add_argument("--max-samples", type=int, default=None, help="Use only the first N rows.")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
        p.add_argument("--seed", type=int, default=0, help="Seed of the default dataset's splits.")

    ev = sub.add_parser("evaluate", help="Accuracy, ECE, class-wise ECE, Brier, ... and a reliability diagram.")
    common(ev)
    ev.add_argument("--split", default="test")
    ev.add_argument("--n-bins", type=int, default=10)
    ev.add_argument(
        "--train-split",
        default=None,
        help="Also score the training rows of this split: their accuracy gap to --split.",
    )
    ev.add_argument("--output-dir", default="outputs/evaluate")
    ev.set_defaults(func=cmd_evaluate)

    de = sub.add_parser("detect", help="Flag known examples (CogCalib's knowledge-bias detection).")
    common(de)
    de.add_argument("--split", default="train")
    de.add_argument("--calibration-split", default="calibration")
    de.add_argument("--max-calibration-samples", type=int, default=None)
    de.add_argument("--threshold", type=float, default=None, help="Skip fitting; use this NLL threshold.")
    de.add_argument("--style-adaptation-steps", type=int, default=0)
    de.add_argument("--style-adaptation-lr", type=float, default=4e-5)
    de.add_argument("--style-adaptation-batch-size", type=int, default=64)
    de.add_argument("--output", required=True, help="A directory (save_to_disk) or a .jsonl file.")
    de.set_defaults(func=cmd_detect)

    rp = sub.add_parser("report", help="Compare calibration.json files written by `evaluate` or the examples.")
    rp.add_argument("inputs", nargs="+")
    rp.add_argument("--output", default=None, help="Write the markdown table here.")
    rp.add_argument("--figure", default=None, help="Write side-by-side reliability diagrams here (PNG).")
    rp.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as err:
        print(f"calib-trl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
