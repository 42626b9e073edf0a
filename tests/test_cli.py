"""The `calib-trl` command: evaluate, detect, report, and its errors."""

import json

import numpy as np
import pytest
from datasets import load_from_disk
from helpers import make_tokenizer
from transformers import AutoModelForCausalLM

from calib_trl import calibration_report
from calib_trl.cli import main
from calib_trl.mcq import score_multiple_choice


def test_evaluate_writes_table_json_and_diagram(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(tiny_dataset_dir),
                "--split",
                "test",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "accuracy" in printed.splitlines()[0] and "| ece |" in printed.splitlines()[0]
    result = json.loads((out / "calibration.json").read_text())
    # the same numbers as scoring the split directly
    data = load_from_disk(str(tiny_dataset_dir))["test"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scores = score_multiple_choice(model, make_tokenizer(), data, progress=False)
    expected = calibration_report(scores.probs, scores.labels)
    for key in ("accuracy", "ece", "brier", "cw_ece"):
        assert result["report"][key] == pytest.approx(expected[key])
    assert f"{expected['ece']:.4f}" in printed
    assert (out / "reliability_diagram.png").stat().st_size > 1000


def test_evaluate_reports_the_confidence_and_accuracy_gaps(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--output-dir", str(out)]
    assert main([*argv, "--split", "test", "--train-split", "train"]) == 0
    printed = capsys.readouterr().out
    gaps = json.loads((out / "calibration.json").read_text())["gaps"]
    data = load_from_disk(str(tiny_dataset_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    test = score_multiple_choice(model, make_tokenizer(), data["test"], progress=False)
    train = score_multiple_choice(model, make_tokenizer(), data["train"], progress=False)
    assert gaps["confidence_gap"] == pytest.approx(abs(test.correct.mean() - test.confidences.mean()))
    assert gaps["train_accuracy"] == pytest.approx(train.correct.mean())
    assert gaps["accuracy_gap"] == pytest.approx(train.correct.mean() - test.correct.mean())
    assert f"= {gaps['confidence_gap']:.4f} (a lower bound on the ECE)" in printed
    assert f"train accuracy {gaps['train_accuracy']:.4f}: {gaps['accuracy_gap']:+.4f} over test" in printed


def test_detect_saves_flags(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "flags"
    assert (
        main(
            [
                "detect",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(tiny_dataset_dir),
                "--split",
                "train",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    flagged = load_from_disk(str(out))
    assert len(flagged) == 24 and set(flagged["known"]) <= {True, False}
    report = json.loads((tmp_path / "flags_detection.json").read_text())
    assert np.mean(flagged["known"]) == pytest.approx(report["known_fraction"])
    jsonl = tmp_path / "flags.jsonl"
    assert (
        main(
            [
                "detect",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(tiny_dataset_dir),
                "--threshold",
                "3.0",
                "--output",
                str(jsonl),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["known"] for r in rows] == [r["answer_nll"] <= 3.0 for r in rows]


def test_report_compares_runs(tmp_path, capsys):
    paths = []
    for name, ece in (("base", 0.2), ("tuned", 0.05)):
        report = {"accuracy": 0.3, "ece": ece}
        diagram = {
            "bin_edges": [0, 0.5, 1],
            "bin_counts": [1, 1],
            "bin_accuracy": [0.0, 1.0],
            "bin_confidence": [0.3, 0.8],
            "ece": ece,
            "n_bins": 2,
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "report": report, "reliability_diagram": diagram}))
        paths.append(str(path))
    assert main(["report", *paths, "--output", str(tmp_path / "t.md"), "--figure", str(tmp_path / "f.png")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| base |" in table and "0.0500" in table
    assert (tmp_path / "f.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--model", "./no/such/model"], "does not exist"),
        (["evaluate", "--dataset", "/no/such/data.jsonl"], "neither 'default'"),
        (["evaluate", "--split", "nope"], "splits"),
    ],
)
def test_errors_name_the_problem(argv, message, capsys, tiny_model_dir):
    if "--model" not in argv:
        argv = argv + ["--model", str(tiny_model_dir)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_hub_id_offline_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", "--model", "someone/some-model", "--max-samples", "2"]) == 2
    assert "offline" in capsys.readouterr().err
