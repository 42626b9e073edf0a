"""The `calib-trl` command: evaluate, detect, report, and its errors."""

import json

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from helpers import make_mcq_dataset, make_tokenizer, reference_option_scores
from transformers import AutoModelForCausalLM

from calib_trl import calibration_report
from calib_trl.cli import main
from calib_trl.cogcalib.knowledge import youden_threshold
from calib_trl.evaluation.reports import json_safe


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
    assert printed.startswith("Scoring the option letters of 12 rows of test")  # before the long pass, what it does
    header = next(line for line in printed.splitlines() if line.startswith("|"))
    assert "accuracy" in header and "| ece |" in header and "| auroc |" in header
    result = json.loads((out / "calibration.json").read_text())
    # the numbers of the split scored independently, from the full logits
    data = load_from_disk(str(tiny_dataset_dir))["test"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scores = reference_option_scores(model, make_tokenizer(), data)
    expected = calibration_report(scores["probs"], scores["labels"])
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
    test = reference_option_scores(model, make_tokenizer(), data["test"])
    train = reference_option_scores(model, make_tokenizer(), data["train"])
    assert gaps["confidence_gap"] == pytest.approx(abs(test["correct"].mean() - test["confidences"].mean()))
    assert gaps["train_accuracy"] == pytest.approx(train["correct"].mean())
    assert gaps["accuracy_gap"] == pytest.approx(train["correct"].mean() - test["correct"].mean())
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
    report = json.loads((tmp_path / "flags_detection.json").read_text())
    # scored independently: each row's answer NLL is the full softmax's at its answer letter, and the threshold is
    # the Youden threshold of the calibration split's NLLs against the model's own answers there
    data = load_from_disk(str(tiny_dataset_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    train, calibration = (reference_option_scores(model, make_tokenizer(), data[s]) for s in ("train", "calibration"))
    nll = {name: answer_nll(scores) for name, scores in (("train", train), ("calibration", calibration))}
    np.testing.assert_allclose(flagged["answer_nll"], nll["train"], rtol=1e-4)
    threshold = youden_threshold(nll["calibration"], calibration["correct"])[0]
    assert report["threshold"] == pytest.approx(threshold, rel=1e-4)
    known = nll["train"] <= threshold
    assert 0 < known.sum() < len(known) and flagged["known"] == known.tolist()
    assert report["known_fraction"] == pytest.approx(known.mean())
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


def answer_nll(scores):
    """The NLL of each row's answer letter under the full softmax: its share of the options times their mass."""
    p = scores["probs"][np.arange(len(scores["labels"])), scores["labels"]]
    return -np.log(scores["answer_mass"] * p)


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


def test_report_shows_n_and_the_columns_of_evaluate(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    headers = []
    for split, rows in (("test", 12), ("ood", 5)):
        argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--split", split]
        assert main([*argv, "--max-samples", str(rows), "--output-dir", str(tmp_path / split)]) == 0
        headers.append(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("|")))
    assert headers[0] == headers[1] and headers[0].startswith("|  | n | accuracy |")
    paths = [str(tmp_path / split / "calibration.json") for split in ("test", "ood")]
    assert main(["report", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == headers[0]
    assert lines[2].startswith("| test | 12 | ") and lines[3].startswith("| ood | 5 | ")


def test_evaluate_labels_a_file_by_its_name(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "my_questions.jsonl"
    make_mcq_dataset(6, seed=3).to_json(str(data))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| {tiny_model_dir} / my_questions.jsonl | 6 |" in printed and "/ test" not in printed
    result = json.loads((out / "calibration.json").read_text())
    assert result["split"] is None and result["dataset"] == str(data) and result["n"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--model", "./no/such/model"], "does not exist"),
        (["evaluate", "--dataset", "/no/such/data.jsonl"], "neither an embedded dataset"),
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


def test_evaluate_with_temperature_scaling(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    from calib_trl.evaluation.temperature_scaling import apply_temperature, fit_temperature

    out = tmp_path / "ts"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--output-dir", str(out)]
    assert main([*argv, "--temperature", "auto"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "calibration.json").read_text())
    data = load_from_disk(str(tiny_dataset_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # the temperature fitted on the calibration split's option logits, scored independently from the full logits
    held_out = reference_option_scores(model, make_tokenizer(), data["calibration"])
    t = fit_temperature(held_out["logits"], held_out["labels"])
    scaled = result["temperature_scaled"]
    assert scaled["temperature"] == pytest.approx(t) and scaled["fitted_on"] == "calibration"
    test = reference_option_scores(model, make_tokenizer(), data["test"])
    checks = {"answer_mass": test["answer_mass"].mean(), "lm_nll": test["lm_nll"]}
    expected = {
        **calibration_report(apply_temperature(test["logits"], t), test["labels"]),
        **checks,
        "temperature": t,
        "temperature_at_bound": False,
    }
    assert scaled["report"].keys() == expected.keys()
    for key, value in expected.items():
        assert scaled["report"][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
    for key, value in checks.items():  # the same for the unscaled model: scaling changes the option softmax only
        assert result["report"][key] == pytest.approx(value, rel=1e-5), key
    assert f"T={t:.3g}" in printed and "answer_mass" in printed and "lm_nll" in printed
    assert main([*argv, "--temperature", "0.5"]) == 0
    assert json.loads((out / "calibration.json").read_text())["temperature_scaled"]["temperature"] == 0.5
    capsys.readouterr()
    assert main([*argv, "--temperature", "warm"]) == 2
    assert "--temperature must be `auto` or a number > 0, got 'warm'" in capsys.readouterr().err


def one_line_error(capsys, *fragments):
    """The command failed with one line on stderr that names each fragment, and no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("", ["is empty"]),
        (
            '{"question": "Q?", "choices": ["a", "b"], "answer": 0}\n{"question": "Q?", "choi\n',
            ["not a readable JSON"],
        ),
        ('{"question": "Q?", "choices": "a,b", "answer": 0}\n', ["`choices` (row 0)", "list of option texts"]),
        ('{"question": "Q?", "choices": ["a", null], "answer": 0}\n', ["`choices` (row 0)", "None"]),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": 2}\n', ["`answer` (row 0)"]),
    ],
)
def test_evaluate_refuses_malformed_files_in_one_line(tiny_model_dir, tmp_path, capsys, content, fragments):
    data = tmp_path / "rows.jsonl"
    data.write_text(content)
    assert main(["evaluate", "--model", str(tiny_model_dir), "--dataset", str(data)]) == 2
    one_line_error(capsys, str(data), *fragments)


def test_scoring_refuses_choices_that_do_not_match_the_prompt():
    """A `choices` list shorter than the options the prompt shows would score another question: refused by row."""
    from calib_trl.mcq import validate_mcq_dataset

    rows = make_mcq_dataset(3).to_list()
    rows[2]["choices"] = rows[2]["choices"][:3]  # the prompt still shows A-D
    with pytest.raises(ValueError, match=r"`prompt` \(row 2\) shows 4 lettered options \(A, B, C, D\) but `choices`"):
        validate_mcq_dataset(Dataset.from_list(rows))


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"name": "a", "report": {"ece": 0.1', ["not a readable calibration.json"]),
        ("[1, 2]", ["expected a JSON object with a `report` object"]),
        ('{"name": "a", "report": {"ece": "low"}}', ["`report.ece` must be a number"]),
        ('{"name": "a", "report": {"ece": 0.1}, "before": {"accuracy": [1]}}', ["`before.accuracy` must be a number"]),
        (b"\xff\xfe{", ["not a readable calibration.json"]),
    ],
)
def test_report_refuses_malformed_files_in_one_line(tmp_path, capsys, content, fragments):
    path = tmp_path / "calibration.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["report", str(path)]) == 2
    one_line_error(capsys, str(path), *fragments)


def test_report_keeps_runs_of_the_same_name_and_their_other_rows(tmp_path, capsys):
    """Two runs of one example carry the same name: both stay, told apart by path, with their before/ood/TS rows."""
    paths = []
    for run, ece in (("a", 0.2), ("b", 0.1)):
        path = tmp_path / run / "calibration.json"
        path.parent.mkdir()
        payload = {
            "name": "CogCalib",
            "report": {"n": 10, "ece": ece},
            "before": {"n": 10, "ece": 0.3},
            "ood": {"n": 8, "ece": ece + 0.05},
            "temperature_scaled": {"temperature": 2.0, "report": {"n": 10, "ece": ece / 2}},
        }
        path.write_text(json.dumps(payload))
        paths.append(str(path))
    assert main(["report", *paths]) == 0
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [
        f"CogCalib ({paths[0]})",
        f"CogCalib ({paths[0]}) · base",
        f"CogCalib ({paths[0]}) · ood",
        f"CogCalib ({paths[0]}) · TS",
        f"CogCalib ({paths[1]})",
        f"CogCalib ({paths[1]}) · base",
        f"CogCalib ({paths[1]}) · ood",
        f"CogCalib ({paths[1]}) · TS",
    ]


def test_evaluate_measures_the_calibration_of_generated_answers(tiny_model_dir, tmp_path, capsys):
    """Open-ended rows: greedy answers, their match with the reference, and their confidence, as a greedy loop on full
    logits gives them; the table shows AUROC beside ECE, and answers.jsonl what the model said."""
    from helpers import make_open_ended_dataset, reference_greedy_answers

    from calib_trl.metrics import confidence_report

    rows = make_open_ended_dataset(8)
    data = tmp_path / "open.jsonl"
    rows.to_json(str(data))
    out = tmp_path / "gen"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out)]
    assert main([*argv, "--max-new-tokens", "5", "--temperature", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Answering greedily 8 rows of open.jsonl" in printed
    header = next(line for line in printed.splitlines() if line.startswith("|  |"))
    assert "| auroc |" in header and "| entropy |" in header and "| ece |" in header
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = make_tokenizer()
    reference = reference_greedy_answers(model, tok, rows, max_new_tokens=5)
    scaled = reference_greedy_answers(model, tok, rows, max_new_tokens=5, temperature=2.0)
    correct = [row["completion"][0]["content"] in a.split() for a, row in zip(reference["answers"], rows)]
    result = json.loads((out / "calibration.json").read_text())
    assert result["kind"] == "generation"
    for got, confidences in ((result["report"], reference), (result["temperature_scaled"]["report"], scaled)):
        expected = json_safe(confidence_report(confidences["sequence"], correct))  # as written: NaN is null
        for key, value in expected.items():
            assert got[key] == (None if value is None else pytest.approx(value, rel=1e-4)), key
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answers] == reference["answers"]


def test_a_temperature_at_its_search_bound_is_flagged(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--max-samples", "6"]
    assert main([*argv, "--output-dir", str(tmp_path), "--temperature", "100"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "T=100" in line)
    assert row.rstrip().endswith("100.0000 (search bound) |")
    assert "T = 100 (search bound): confidence carries no information about correctness on these rows" in printed
    scaled = json.loads((tmp_path / "calibration.json").read_text())["temperature_scaled"]["report"]
    assert scaled["temperature_at_bound"] is True
    assert main([*argv, "--output-dir", str(tmp_path), "--temperature", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "(search bound)" not in printed


def test_evaluate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("(default: test)", "(default: outputs/evaluate)", "(default: None)", "(default: 32)"):
        assert fragment in text
