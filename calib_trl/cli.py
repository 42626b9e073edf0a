"""The `calib-trl` command: `detect`, `evaluate` and `report`.

    calib-trl evaluate --model default --dataset default --split test
    calib-trl detect   --model default --dataset default --split train --calibration-split calibration --output flags
    calib-trl report   runs/base/calibration.json runs/cogcalib/calibration.json --output report.md
    calib-trl report   --lm-eval lm_eval_out/base lm_eval_out/cogcalib      (lm_eval ... --log_samples)

Everything runs offline: `--model default` and `--dataset default` are the embedded SmolLM2-135M-Instruct and MMLU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .evaluation.reports import REPORT_METRICS, format_table, json_safe, path_inside, safe_filename
from .loading import has_splits, load_model, load_split


def _temperature(args, model, tokenizer) -> float | None:
    """`--temperature`: `auto` fits it on `--calibration-split`, a number is taken as it is."""
    from .evaluation.evaluate import fit_temperature_on
    from .evaluation.temperature_scaling import describe_temperature

    if args.temperature is None:
        return None
    if args.temperature == "auto":
        held_out = load_split(args.dataset, args.calibration_split, args.max_calibration_samples, args.seed)
        temperature = fit_temperature_on(model, tokenizer, held_out, batch_size=args.batch_size)
        print(
            f"Temperature fitted on {args.calibration_split} ({len(held_out)} rows): {describe_temperature(temperature)}"
        )
        return temperature
    try:
        temperature = float(args.temperature)
    except ValueError:
        raise ValueError(f"--temperature must be `auto` or a number > 0, got {args.temperature!r}.") from None
    if not temperature > 0:
        raise ValueError(f"--temperature must be `auto` or a number > 0, got {args.temperature!r}.")
    return temperature


def cmd_evaluate(args) -> dict:
    from .evaluation.evaluate import evaluate_calibration, row_kind
    from .evaluation.plotting import plot_reliability_diagram
    from .metrics import calibration_gaps, reliability_diagram_data

    data = load_split(args.dataset, args.split, args.max_samples, args.seed)
    # A file (or a saved single `Dataset`) has no splits: the rows are labelled by the file, not by `--split`
    split = args.split if has_splits(args.dataset) else None
    part = split if split is not None else os.path.basename(os.path.normpath(args.dataset))
    kind = row_kind(data)
    work = "answering greedily" if kind == "generation" else "scoring the option letters of"
    extra = f", then the {args.train_split} split" if args.train_split else ""
    fit = f"; fitting the temperature on {args.calibration_split} first" if args.temperature == "auto" else ""
    print(f"{work.capitalize()} {len(data)} rows of {part}{extra}{fit} (--max-samples bounds the rows).")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    temperature = _temperature(args, model, tokenizer)
    options = dict(batch_size=args.batch_size, n_bins=args.n_bins, max_new_tokens=args.max_new_tokens)
    result = evaluate_calibration(model, tokenizer, data, temperature=temperature, desc=f"Scoring {part}", **options)
    report = result.report
    rows = {f"{args.model} / {part}": report}
    if result.scaled_report is not None:
        rows[f"{args.model} / {part}, T={temperature:.3g}"] = result.scaled_report
    train_report = None
    if args.train_split is not None:
        train = load_split(args.dataset, args.train_split, args.max_samples, args.seed)
        train_report = evaluate_calibration(
            model, tokenizer, train, lm_check=False, desc=f"Scoring {args.train_split}", **options
        ).report
    gaps = calibration_gaps(report, train_report)
    os.makedirs(args.output_dir, exist_ok=True)
    diagram = os.path.join(args.output_dir, "reliability_diagram.png")
    data_rd = reliability_diagram_data(result.confidences, result.correct, n_bins=args.n_bins)
    title = f"{args.model} on {args.dataset}" + (f"/{split}" if split is not None else "")
    plot_reliability_diagram(data=data_rd, title=title, path=diagram)
    out = {
        "model": args.model,
        "dataset": args.dataset,
        "split": split,
        "kind": kind,
        "n": len(data),
        "report": report,
        "gaps": gaps,
        "reliability_diagram": data_rd,
    }
    if temperature is not None:
        out["temperature_scaled"] = {
            "temperature": temperature,
            "fitted_on": args.calibration_split if args.temperature == "auto" else None,
            "report": result.scaled_report,
            "reliability_diagram": reliability_diagram_data(result.scaled_confidences, result.correct, args.n_bins),
        }
    written = [os.path.join(args.output_dir, "calibration.json"), diagram]
    with open(written[0], "w") as f:
        json.dump(json_safe(out), f, indent=2)
    if kind == "generation":  # what the model answered, row by row
        written.append(os.path.join(args.output_dir, "answers.jsonl"))
        scores = result.scores
        with open(written[-1], "w") as f:
            for i, (answer, reference) in enumerate(zip(scores.answers, scores.references)):
                row = {"row": i, "answer": answer, "reference": reference, "correct": bool(scores.correct[i])}
                row["confidence"] = float(result.confidences[i])
                f.write(json.dumps(row) + "\n")
    print(format_table(rows))
    if temperature is not None:
        from .evaluation.temperature_scaling import at_temperature_bound, describe_temperature

        if at_temperature_bound(temperature):
            print(f"\n{describe_temperature(temperature)}.")
    print(f"\nconfidence gap |accuracy - mean confidence| = {gaps['confidence_gap']:.4f} (a lower bound on the ECE)")
    if train_report is not None:
        print(f"{args.train_split} accuracy {gaps['train_accuracy']:.4f}: {gaps['accuracy_gap']:+.4f} over {part}")
    print(f"\nWrote {', '.join(written)}")
    return out


def cmd_detect(args):
    from .cogcalib.knowledge import detect_known

    data = load_split(args.dataset, args.split, args.max_samples, args.seed)
    calibration = None
    if args.threshold is None:
        calibration = load_split(args.dataset, args.calibration_split, args.max_calibration_samples, args.seed)
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


# The reports a calibration.json holds besides its main `report`, and how `report` labels their rows
SUB_REPORTS = (
    ("before", "base"),
    ("ood", "ood"),
    ("ood_before", "ood, base"),
    ("temperature_scaled", "TS"),
    ("ood_temperature_scaled", "ood, TS"),
)


def read_calibration_json(path: str) -> dict:
    """A `calibration.json` written by `evaluate` or the examples, checked: a `ValueError` names the file and the key."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable calibration.json ({err}).") from None
    if not isinstance(run, dict) or not isinstance(run.get("report"), dict):
        raise ValueError(
            f"{path}: expected a JSON object with a `report` object (as `calib-trl evaluate` writes), got "
            f"{type(run).__name__ if not isinstance(run, dict) else 'no `report` object'}."
        )
    for key, _ in (("report", ""), *SUB_REPORTS):
        report = run.get(key)
        if isinstance(report, dict) and isinstance(report.get("report"), dict):  # {"temperature": ..., "report": ...}
            report = report["report"]
        if report is None:
            continue
        if not isinstance(report, dict):
            raise ValueError(f"{path}: `{key}` must be a report object, got {type(report).__name__}.")
        for metric in REPORT_METRICS:
            value = report.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}: `{key}.{metric}` must be a number, got {value!r:.40}.")
    return run


def _sub_report(run: dict, key: str) -> dict | None:
    report = run.get(key)
    if isinstance(report, dict) and isinstance(report.get("report"), dict):
        temperature = report.get("temperature")
        return {**report["report"], **({"temperature": temperature} if temperature is not None else {})}
    return report


def cmd_export(args):
    """Write an embedded dataset's splits as JSON-lines files that `datasets.load_dataset(folder)` reads offline."""
    from .defaults import load_default_dataset, resolve_dataset_name

    name = resolve_dataset_name(args.dataset)
    splits = load_default_dataset(name, seed=args.seed)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for split, data in splits.items():
        if args.max_samples is not None:
            data = data.select(range(min(args.max_samples, len(data))))
        # `load_dataset` reads train/validation/test files as those splits; calibration rows are the validation split
        path = os.path.join(args.output, f"{EXPORT_NAMES.get(split, split)}.jsonl")
        data.to_json(path)
        written.append(f"{path} ({len(data)} rows)")
    print(f"Wrote the {name} dataset: {', '.join(written)}.")
    print(f"`datasets.load_dataset({args.output!r})` reads train, validation (the calibration rows) and test.")


# The file each split of an embedded dataset is written to by `export`: the names `datasets.load_dataset` reads
EXPORT_NAMES = {"calibration": "validation"}


def cmd_model_path(args):
    """The directory of the embedded default model as a plain checkpoint (converted once), for `from_pretrained`."""
    from .defaults import default_model_path

    print(default_model_path())


def cmd_report(args):
    from .evaluation.plotting import plot_reliability_diagrams

    if args.lm_eval:
        if args.inputs or args.figure:
            raise ValueError(
                "`--lm-eval` reads lm-eval's logs; pass calibration.json files (and --figure) in a separate call."
            )
        return cmd_report_lm_eval(args)
    if not args.inputs:
        raise ValueError("Pass calibration.json files to compare, or `--lm-eval PATH` for lm-eval's per-sample logs.")
    loaded = [(path, read_calibration_json(path)) for path in args.inputs]
    names = [
        run.get("name") or os.path.basename(os.path.dirname(os.path.abspath(path))) or path for path, run in loaded
    ]
    if len(set(names)) < len(names):  # runs of the same name (two runs of one example): tell them apart by path
        names = [f"{name} ({path})" if names.count(name) > 1 else name for name, (path, _) in zip(names, loaded)]
    runs, panels = {}, {}
    for name, (_, run) in zip(names, loaded):
        runs[name] = {"n": run.get("n"), **run["report"]}  # `n` of files whose report lacks it
        for key, label in SUB_REPORTS:
            report = _sub_report(run, key)
            if report is not None:
                runs[f"{name} · {label}"] = report
        if isinstance(run.get("reliability_diagram"), dict):
            panels[name] = run["reliability_diagram"]
    table = format_table(runs)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    if args.figure and panels:
        plot_reliability_diagrams(panels, path=args.figure)
        print(f"Wrote {args.figure}")


def cmd_report_lm_eval(args) -> list:
    """Calibration of every multiple-choice task in lm-eval's logs; several models side by side."""
    from tqdm.auto import tqdm

    from .evaluation.lm_eval_logs import CONVENTIONS, read_lm_eval
    from .evaluation.plotting import plot_reliability_diagrams

    runs = [run for path in args.lm_eval for run in read_lm_eval(path, n_bins=args.n_bins)]
    names = [run.model for run in runs]
    if len(set(names)) < len(names):  # the same model evaluated twice: tell the runs apart by directory
        names = [run.path for run in runs]
    rows, panels = {}, {}
    tasks = sorted({task for run in runs for task in run.tasks})
    for task in tasks:
        for convention in CONVENTIONS:
            for name, run in zip(names, runs):
                entry = run.tasks.get(task)
                if entry is None or convention not in entry.reports:
                    continue
                label = f"{task} {convention}" + (f" · {name}" if len(runs) > 1 else "")
                rows[label] = {**entry.reports[convention], "lm_eval": entry.lm_eval.get(convention)}
                panels.setdefault((task, convention), {})[name] = entry.diagrams[convention]

    if rows:
        table = format_table(rows)
        print(table)
        entries = [entry for run in runs for entry in run.tasks.values()]
        checked = sum(bool(entry.verified) for entry in entries)
        print(
            "\nlm_eval: lm-eval's own value of the metric, from its results JSON. Accuracy checked sample by sample "
            f"against lm-eval's logged acc/acc_norm for {checked} of {len(entries)} task(s)."
        )
    else:
        table = ""
        print("No multiple-choice task in the lm-eval logs.")
    for name, run in zip(names, runs):
        for task, reason in run.skipped.items():
            print(f"Skipped {task} ({name}): {reason}.")

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "calibration.json")
    with open(path, "w") as f:
        json.dump({name: run.to_dict() for name, run in zip(names, runs)}, f, indent=2)
    used = set()  # task and filter names come from the logs: each becomes a safe, distinct file name inside the folder
    for (task, convention), panel in tqdm(panels.items(), desc="Reliability diagrams", disable=len(panels) < 10):
        name = safe_filename(f"reliability_{task}_{convention}", used) + ".png"
        plot_reliability_diagrams(panel, path=path_inside(args.output_dir, name), suptitle=f"{task} ({convention})")
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    print(f"\nWrote {path} and {len(panels)} reliability diagram(s) in {args.output_dir}")
    return runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calib-trl", description="Calibration-aware fine-tuning tools for TRL.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="default", help="Model directory, or `default` (SmolLM2-135M-Instruct).")
        p.add_argument(
            "--dataset",
            default="default",
            help="An embedded dataset (`default` = `arithmetic`, `arithmetic-mc`, `mmlu`), a save_to_disk directory or "
            "a JSON(L) file: multiple-choice rows (`prompt`, `choices`, `answer`) or open-ended ones (`prompt`, "
            "`completion`).",
        )
        p.add_argument(
            "--max-samples", type=int, default=None, help="Use only the first N rows (all of them when unset)."
        )
        p.add_argument("--batch-size", type=int, default=16, help="Rows per forward pass or `generate` call.")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="Model dtype.")
        p.add_argument("--device", default=None, help="cuda if available, else cpu, when unset.")
        p.add_argument("--seed", type=int, default=0, help="Seed of the embedded datasets' splits.")

    ev = sub.add_parser(
        "evaluate",
        help="Accuracy, ECE, AUROC, Brier, ... and a reliability diagram, of multiple-choice or generated answers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common(ev)
    ev.add_argument(
        "--max-new-tokens", type=int, default=32, help="Open-ended rows: the longest generated answer, in tokens."
    )
    ev.add_argument(
        "--split", default="test", help="Split of an embedded dataset or of a saved DatasetDict (a file has none)."
    )
    ev.add_argument("--n-bins", type=int, default=10, help="Equal-width bins of the ECE and the diagram.")
    ev.add_argument(
        "--temperature",
        default=None,
        help="Also report calibration after temperature scaling: `auto` fits T on --calibration-split (by NLL), a "
        "number applies that T.",
    )
    ev.add_argument("--calibration-split", default="calibration", help="Split `--temperature auto` is fitted on.")
    ev.add_argument(
        "--max-calibration-samples", type=int, default=None, help="Rows of --calibration-split used (all when unset)."
    )
    ev.add_argument(
        "--train-split",
        default=None,
        help="Also score the training rows of this split: their accuracy gap to --split.",
    )
    ev.add_argument("--output-dir", default="outputs/evaluate", help="Where calibration.json and the diagram go.")
    ev.set_defaults(func=cmd_evaluate)

    de = sub.add_parser(
        "detect",
        help="Flag known examples (CogCalib's knowledge-bias detection).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common(de)
    de.add_argument("--split", default="train", help="Split whose rows are flagged.")
    de.add_argument("--calibration-split", default="calibration", help="Split the threshold is fitted on.")
    de.add_argument(
        "--max-calibration-samples", type=int, default=None, help="Rows of --calibration-split used (all when unset)."
    )
    de.add_argument("--threshold", type=float, default=None, help="Skip fitting; use this NLL threshold.")
    de.add_argument("--style-adaptation-steps", type=int, default=0, help="SFT steps on the task's format first.")
    de.add_argument("--style-adaptation-lr", type=float, default=4e-5, help="Learning rate of style adaptation.")
    de.add_argument("--style-adaptation-batch-size", type=int, default=64, help="Rows per style-adaptation step.")
    de.add_argument("--output", required=True, help="A directory (save_to_disk) or a .jsonl file.")
    de.set_defaults(func=cmd_detect)

    rp = sub.add_parser(
        "report",
        help="Compare calibration.json files written by `evaluate` or the examples, or lm-eval's logs (--lm-eval).",
    )
    rp.add_argument("inputs", nargs="*", help="calibration.json files.")
    rp.add_argument(
        "--lm-eval",
        nargs="+",
        metavar="PATH",
        help="lm-eval output directories (`lm_eval ... --log_samples --output_path PATH`) or samples_*.jsonl files: "
        "the calibration of every multiple-choice task, in lm-eval's acc and acc_norm conventions; several models "
        "side by side.",
    )
    rp.add_argument("--output", default=None, help="Write the markdown table here.")
    rp.add_argument("--figure", default=None, help="Write side-by-side reliability diagrams here (PNG).")
    rp.add_argument(
        "--output-dir",
        default="outputs/lm_eval_calibration",
        help="With --lm-eval: where calibration.json and one reliability diagram per task and convention go.",
    )
    rp.add_argument("--n-bins", type=int, default=10, help="With --lm-eval: bins of the ECE and the diagrams.")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser(
        "export",
        help="Write an embedded dataset as JSON-lines files (train, validation = calibration, test, ood), offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("--dataset", default="default", help="`default` = `arithmetic`, `arithmetic-mc` or `mmlu`.")
    ex.add_argument("--output", required=True, help="The folder the files go to.")
    ex.add_argument("--max-samples", type=int, default=None, help="At most N rows per split (all when unset).")
    ex.add_argument("--seed", type=int, default=0, help="Seed of the embedded datasets' splits.")
    ex.set_defaults(func=cmd_export)

    mp = sub.add_parser("model-path", help="Print the directory of the embedded default model (converted once).")
    mp.set_defaults(func=cmd_model_path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, KeyError, ImportError) as err:  # one line, no traceback; a bug still shows one
        print(f"calib-trl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
