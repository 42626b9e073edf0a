"""Calibration read from lm-evaluation-harness per-sample logs: against a real, offline `lm_eval` run, and on hand-made
logs for the cases one run does not show (skipped tasks, malformed files, variable option counts, WinoGrande)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_mcq_dataset, make_model, make_tokenizer
from huggingface_hub import ModelCard

from calib_trl import CalibSFTConfig, CalibSFTTrainer, calibration_report, from_lm_eval, record_lm_eval
from calib_trl.cli import main
from calib_trl.defaults import load_mmlu_rows
from calib_trl.evaluation.lm_eval_logs import read_lm_eval

LETTERS = "ABCD"
TASK_YAML = """\
task: mmlu_local
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{[answer_a, answer_b, answer_c, answer_d]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_TASK_YAML = """\
task: mmlu_local_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{question.strip()}}}}\\nAnswer:"
doc_to_target: "{{{{correct_answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 2
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, tiny_model_dir):
    """
    `lm_eval` itself, offline, on 40 MMLU questions (a multiple-choice task, and a generation task over 4 of them),
    with the tiny model. Returns (output directory, the rows).
    """
    root = tmp_path_factory.mktemp("lm_eval")
    # spread over the file, hence over subjects; short enough for the tiny model's 512 positions (one per character)
    rows = [row for row in load_mmlu_rows()[::50] if len(row["question"] + "".join(row.values())) < 400][:40]
    data, gen_data = root / "mmlu.jsonl", root / "mmlu_gen.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    gen_data.write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    (root / "tasks").mkdir()
    (root / "tasks" / "mmlu_local.yaml").write_text(TASK_YAML.format(data=data))
    (root / "tasks" / "mmlu_local_gen.yaml").write_text(GEN_TASK_YAML.format(data=gen_data))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_model_dir},dtype=float32",
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--include_path",
        str(root / "tasks"),
        "--tasks",
        "mmlu_local,mmlu_local_gen",
        "--output_path",
        str(root / "out"),
        "--log_samples",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out", rows


def lm_eval_results(out):
    (path,) = out.rglob("results_*.json")
    return json.loads(path.read_text())


def test_report_reproduces_lm_eval_acc_and_acc_norm(lm_eval_run, tmp_path, capsys):
    out, rows = lm_eval_run
    report_dir = tmp_path / "report"
    assert main(["report", "--lm-eval", str(out), "--output-dir", str(report_dir)]) == 0
    printed = capsys.readouterr().out
    own = lm_eval_results(out)["results"]["mmlu_local"]
    written = json.loads((report_dir / "calibration.json").read_text())
    (run,) = written.values()
    task = run["tasks"]["mmlu_local"]
    for convention in ("acc", "acc_norm"):
        report = task["conventions"][convention]["report"]
        assert report["accuracy"] == own[f"{convention},none"]  # exactly lm-eval's number
        assert task["lm_eval"][convention] == own[f"{convention},none"]
        assert report["n"] == len(rows)
        header = [cell.strip() for cell in printed.splitlines()[0].split("|")[2:-1]]
        line = next(line for line in printed.splitlines() if line.startswith(f"| mmlu_local {convention} |"))
        cells = dict(zip(header, (cell.strip() for cell in line.split("|")[2:-1])))
        assert cells["accuracy"] == cells["lm_eval"] == f"{own[f'{convention},none']:.4f}"
        assert cells["n"] == str(len(rows))
        assert (report_dir / f"reliability_mmlu_local_{convention}.png").stat().st_size > 1000
    assert task["verified_against_lm_eval"] == ["acc", "acc_norm"]
    assert "acc_norm" in printed.splitlines()[3]
    # the generation task is listed as skipped, with the reason
    assert "mmlu_local_gen" not in run["tasks"]
    assert "generate_until" in run["skipped"]["mmlu_local_gen"]
    assert "Skipped mmlu_local_gen" in printed and "generate_until" in printed
    # because lm-eval's generation log holds the answer text and the verdict, and no probability of the answer
    (gen_log,) = out.rglob("samples_mmlu_local_gen_*.jsonl")
    for line in gen_log.read_text().splitlines():
        sample = json.loads(line)
        assert all(isinstance(resp, str) for resp in sample["filtered_resps"])
        assert not any("logprob" in key or "loglikelihood" in key for key in sample)


def test_ece_is_calibration_report_on_the_logged_probabilities(lm_eval_run):
    """The probabilities rebuilt independently: the options' texts and the label from the MMLU rows themselves."""
    out, rows = lm_eval_run
    reports = from_lm_eval(next(out.iterdir()))
    assert set(reports) == {"mmlu_local"}
    (samples_file,) = out.rglob("samples_mmlu_local_2*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    lls = np.array([[float(resp[0]) for resp in s["filtered_resps"]] for s in samples])
    lengths = np.array([[len(row[f"answer_{c}"]) for c in "abcd"] for row in rows], dtype=float)
    labels = [LETTERS.index(row["correct_answer"]) for row in rows]
    for convention, scores in (("acc", lls), ("acc_norm", lls / lengths)):
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        expected = calibration_report(probs, labels)
        got = reports["mmlu_local"][convention]
        assert got["ece"] == expected["ece"]
        for key, value in expected.items():
            assert (math.isnan(value) and math.isnan(got[key])) or got[key] == pytest.approx(value, rel=1e-12)
        # lm-eval's own per-sample verdicts agree with these labels
        assert [float(np.argmax(row) == y) for row, y in zip(scores, labels)] == [s[convention] for s in samples]


# ---------------------------------------------------------------------------------------------------------------------
# Hand-made logs
# ---------------------------------------------------------------------------------------------------------------------

DATE = "2026-01-02T03-04-05.678901"


def mc_sample(doc_id, lls, choices, target, context="Q?", delimiter=" ", metrics=("acc", "acc_norm"), **logged):
    """A multiple-choice line as lm-eval writes it; `acc`/`acc_norm` computed as lm-eval does unless given."""
    gold = int(target) if str(target).isdigit() else choices.index(target)
    verdicts = {
        "acc": float(np.argmax(lls) == gold),
        "acc_norm": float(np.argmax(np.array(lls) / np.array([float(len(c)) for c in choices])) == gold),
    }
    return {
        "doc_id": doc_id,
        "doc": {"question": context},
        "target": str(target),
        "arguments": {f"gen_args_{i}": {"arg_0": context, "arg_1": delimiter + c} for i, c in enumerate(choices)},
        "resps": [[[str(ll), "False"]] for ll in lls],
        "filtered_resps": [[str(ll), "False"] for ll in lls],
        "filter": "none",
        "metrics": list(metrics),
        **{m: verdicts[m] for m in metrics if m in verdicts},
        **logged,
    }


def write_log(directory, task, samples, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"samples_{task}_{DATE}.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    if config is not None:
        results = {"results": {task: {}}, "configs": {task: config}, "model_name": directory.name}
        (directory / f"results_{DATE}.json").write_text(json.dumps(results))
    return path


def test_variable_option_counts_and_text_targets(tmp_path):
    samples = [
        mc_sample(0, [-1.0, -2.5, -0.7], ["red", "green", "blue sky"], "blue sky"),
        mc_sample(1, [-3.0, -1.0, -2.0, -4.0, -0.5], ["a", "bb", "ccc", "dddd", "eeeee"], "1"),
        mc_sample(2, [-2.0, -2.2, -9.0, -1.0], ["one", "two", "three", "four"], "two"),
    ]
    samples[2]["target"] = " two"  # as the class-based MultipleChoiceTask logs it
    reports = from_lm_eval(write_log(tmp_path, "arc_like", samples))["arc_like"]
    lengths = [[3, 5, 8], [1, 2, 3, 4, 5], [3, 3, 5, 4]]
    lls = [[-1.0, -2.5, -0.7], [-3.0, -1.0, -2.0, -4.0, -0.5], [-2.0, -2.2, -9.0, -1.0]]
    for convention in ("acc", "acc_norm"):
        probs = np.zeros((3, 5))  # fewer options: zero-probability padding
        for i, (row, length) in enumerate(zip(lls, lengths)):
            scores = np.array(row) / (np.array(length, dtype=float) if convention == "acc_norm" else 1.0)
            probs[i, : len(row)] = np.exp(scores) / np.exp(scores).sum()
        assert reports[convention] == pytest.approx(calibration_report(probs, [2, 1, 1]), nan_ok=True)
        assert reports[convention]["accuracy"] == np.mean([s[convention] for s in samples])


def test_delimiter_from_the_results_config(tmp_path):
    """
    A task whose target_delimiter is empty and whose options start with a space (as under a chat template): the
    options' lengths are the continuations' own. Without the results JSON, stripping lm-eval's default " " would give
    another acc_norm prediction, and the check against lm-eval's logged acc_norm says so.
    """
    sample = mc_sample(0, [-3.0, -4.2], [" ab", " abc"], "0", delimiter="")
    assert sample["acc_norm"] == 1.0  # -3.0/3 > -4.2/4, while -3.0/2 < -4.2/3
    path = write_log(tmp_path, "nodelim", [sample])
    with pytest.raises(ValueError, match="lm-eval logged acc_norm = 1.0, but the logged log-likelihoods give 0.0"):
        from_lm_eval(path)
    write_log(tmp_path, "nodelim", [sample], config={"output_type": "multiple_choice", "target_delimiter": ""})
    assert from_lm_eval(path)["nodelim"]["acc_norm"]["accuracy"] == 1.0


def test_two_option_multiple_input_task_takes_the_label_from_lm_evals_acc(tmp_path):
    """WinoGrande: the options are in the contexts, the continuation is shared and the target is its text."""

    def sample(doc_id, lls, acc):
        contexts = ["The trophy did not fit: the trophy", "The trophy did not fit: the suitcase"]
        return {
            "doc_id": doc_id,
            "target": "was too big.",
            "arguments": {f"gen_args_{i}": {"arg_0": c, "arg_1": " was too big."} for i, c in enumerate(contexts)},
            "filtered_resps": [[str(ll), "False"] for ll in lls],
            "filter": "none",
            "metrics": ["acc"],
            "acc": acc,
        }

    samples = [sample(0, [-1.0, -2.0], 1.0), sample(1, [-1.0, -2.0], 0.0), sample(2, [-3.0, -0.5], 1.0)]
    reports = from_lm_eval(write_log(tmp_path, "winogrande", samples))["winogrande"]
    assert set(reports) == {"acc"}  # no option texts in the log: no acc_norm
    probs = [np.exp(row) / np.exp(row).sum() for row in ([-1.0, -2.0], [-1.0, -2.0], [-3.0, -0.5])]
    assert reports["acc"] == pytest.approx(calibration_report(np.array(probs), [0, 1, 1]))


def test_mutual_info_layout_uses_the_conditional_half(tmp_path):
    sample = mc_sample(0, [-1.0, -3.0], ["yes", "no"], "0", metrics=("acc", "acc_mutual_info"), acc_mutual_info=1.0)
    sample["arguments"].update(
        {"gen_args_2": {"arg_0": "", "arg_1": " yes"}, "gen_args_3": {"arg_0": "", "arg_1": " no"}}
    )
    sample["filtered_resps"] += [["-5.0", "False"], ["-0.1", "False"]]
    report = from_lm_eval(write_log(tmp_path, "mi", [sample]))["mi"]["acc"]
    assert report["n"] == 1 and report["mean_confidence"] == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_each_filter_is_a_task_of_its_own(tmp_path):
    first = mc_sample(0, [-1.0, -2.0], ["a", "b"], "0")
    second = {**mc_sample(0, [-2.0, -1.0], ["a", "b"], "0"), "filter": "strict"}
    reports = from_lm_eval(write_log(tmp_path, "two_filters", [first, second]))
    assert set(reports) == {"two_filters,none", "two_filters,strict"}
    assert (
        reports["two_filters,none"]["acc"]["accuracy"] == 1.0
        and reports["two_filters,strict"]["acc"]["accuracy"] == 0.0
    )


def test_non_multiple_choice_tasks_are_skipped_with_the_reason(tmp_path, capsys):
    generation = {
        "doc_id": 0,
        "target": "Paris",
        "arguments": {"gen_args_0": {"arg_0": "Capital of France?", "arg_1": {"until": ["\n"]}}},
        "filtered_resps": ["Paris"],
        "filter": "none",
        "metrics": ["exact_match"],
        "exact_match": 1.0,
    }
    perplexity = {**generation, "arguments": {"gen_args_0": {"arg_0": "Some text."}}, "filtered_resps": ["-12.5"]}
    write_log(tmp_path / "m", "gen_task", [generation])  # no results JSON: told from the samples
    write_log(tmp_path / "m", "ppl_task", [perplexity], config={"output_type": "loglikelihood_rolling"})
    write_log(tmp_path / "m", "mcq", [mc_sample(0, [-1.0, -2.0], ["x", "y"], "0")])
    out = tmp_path / "report"
    assert main(["report", "--lm-eval", str(tmp_path / "m"), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Skipped gen_task (m): not multiple choice: its samples are generated text; lm-eval logs" in printed
    assert "no token probabilities" in printed
    assert "Skipped ppl_task (m): output_type is 'loglikelihood_rolling'" in printed
    (run,) = json.loads((out / "calibration.json").read_text()).values()
    assert set(run["tasks"]) == {"mcq"} and set(run["skipped"]) == {"gen_task", "ppl_task"}


def test_several_right_options_are_skipped(tmp_path):
    sample = mc_sample(0, [-1.0, -2.0, -3.0], ["a", "b", "c"], "0", metrics=())
    sample["target"] = "[0, 2]"
    runs = read_lm_eval(write_log(tmp_path, "mt", [sample]), progress=False)
    assert "multiple_target" in runs[0].skipped["mt"] and not runs[0].tasks


def test_several_models_side_by_side(tmp_path, capsys):
    for model, lls in (("base", [-1.0, -1.2]), ("tuned", [-0.2, -3.0])):
        write_log(
            tmp_path / model,
            "mcq",
            [mc_sample(0, lls, ["yes", "no"], "0")],
            config={"output_type": "multiple_choice", "target_delimiter": " "},
        )
    out = tmp_path / "report"
    assert (
        main(["report", "--lm-eval", str(tmp_path / "base"), str(tmp_path / "tuned"), "--output-dir", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "| mcq acc · base |" in printed and "| mcq acc · tuned |" in printed
    assert set(json.loads((out / "calibration.json").read_text())) == {"base", "tuned"}
    with pytest.raises(ValueError, match="2 models"):
        from_lm_eval(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"doc_id": 0, "target": "0", "argum', "line 2: not valid JSON"),
        ('{"doc_id": 1, "target": "0", "arguments": {}}', r"line 2: no \['filtered_resps'\] field"),
        (
            '{"doc_id": 1, "target": "7", "arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": " a"}, "gen_args_1": '
            '{"arg_0": "Q", "arg_1": " b"}}, "filtered_resps": [["-1.0", "False"], ["-2.0", "False"]]}',
            r"line 2 \(doc_id 1\): target 7 is out of range for 2 options",
        ),
        (
            '{"doc_id": 1, "target": "0", "arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": " a"}, "gen_args_1": '
            '{"arg_0": "Q", "arg_1": " b"}}, "filtered_resps": [["-1.0", "False"], ["oops", "False"]]}',
            r"line 2 \(doc_id 1\): `filtered_resps` must be \(log-likelihood, is_greedy\) pairs",
        ),
        (
            '{"doc_id": 1, "target": "1", "arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": " a"}, "gen_args_1": '
            '{"arg_0": "Q", "arg_1": " b"}}, "filtered_resps": [["-1.0", "False"], ["-2.0", "False"]], "acc": 1.0}',
            r"line 2 \(doc_id 1\): lm-eval logged acc = 1.0, but the logged log-likelihoods give 0.0",
        ),
    ],
)
def test_malformed_file_names_the_file_and_the_problem(tmp_path, capsys, line, message):
    path = write_log(tmp_path, "broken", [mc_sample(0, [-1.0, -2.0], ["a", "b"], "0")])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        from_lm_eval(path)
    assert str(path) in str(err.value)
    assert main(["report", "--lm-eval", str(path), "--output-dir", str(tmp_path / "r")]) == 2
    assert str(path) in capsys.readouterr().err


def test_paths_that_hold_no_samples(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--lm-eval", str(tmp_path / "empty")]) == 2
    assert "--log_samples" in capsys.readouterr().err
    other = tmp_path / "results.jsonl"
    other.write_text("{}\n")
    with pytest.raises(ValueError, match="not an lm-eval samples file"):
        from_lm_eval(other)
    assert main(["report"]) == 2 and "--lm-eval PATH" in capsys.readouterr().err


def test_record_lm_eval_puts_the_tasks_in_the_model_card(tmp_path):
    write_log(
        tmp_path / "lm_eval",
        "mcq",
        [mc_sample(0, [-1.0, -1.5], ["yes", "no"], "0"), mc_sample(1, [-1.0, -0.5], ["yes", "no"], "0")],
        config={"output_type": "multiple_choice", "target_delimiter": " ", "test_split": "test"},
    )
    tok = make_tokenizer()
    trainer = CalibSFTTrainer(
        model=make_model(len(tok)),
        args=CalibSFTConfig(str(tmp_path / "out"), report_to=[], save_strategy="no", calibration_loss="ls"),
        train_dataset=make_mcq_dataset(4, known=True),
        processing_class=tok,
    )
    assert record_lm_eval(trainer, tmp_path / "lm_eval", convention="acc_norm") == ["mcq"]
    trainer.create_model_card(model_name="toy")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    expected = from_lm_eval(tmp_path / "lm_eval")["mcq"]["acc_norm"]
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("mcq", "test (acc_norm)", "ece")] == pytest.approx(expected["ece"])
    assert results[("mcq", "test (acc_norm)", "accuracy")] == 0.5
    with pytest.raises(ValueError, match="`convention` must be one of"):
        record_lm_eval(trainer, tmp_path / "lm_eval", convention="acc_bytes")


def test_names_from_the_logs_cannot_write_outside_the_output_directory(tmp_path, capsys):
    """A filter (or task) name is a file-name component only: `..` and `/` in it cannot leave `--output-dir`."""
    crafted = {**mc_sample(0, [-1.0, -2.0], ["a", "b"], "0"), "filter": "x/../../../../PWNED"}
    write_log(tmp_path / "logs", "t", [crafted, mc_sample(0, [-1.0, -2.0], ["a", "b"], "0")])
    out = tmp_path / "deep" / "out"
    assert main(["report", "--lm-eval", str(tmp_path / "logs"), "--output-dir", str(out)]) == 0
    written = sorted(p for p in tmp_path.rglob("*.png"))
    assert len(written) == 4 and all(p.parent == out for p in written)
    assert not list(tmp_path.rglob("PWNED*")) or all(out in p.parents for p in tmp_path.rglob("PWNED*"))
    # each task and filter keeps a diagram of its own
    assert len({p.name for p in written}) == 4


def test_names_from_the_logs_are_escaped_in_tables_and_cards(tmp_path, capsys):
    """A split or filter name from an lm-eval log cannot break the markdown table or put markup in the model card."""
    crafted = {**mc_sample(0, [-1.0, -2.0], ["a", "b"], "0"), "filter": "f|<script>alert(1)</script>"}
    config = {
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        "test_split": "te|st\n[x](javascript:alert(1))",
    }
    path = write_log(tmp_path / "m", "inj", [crafted], config=config)
    assert main(["report", "--lm-eval", str(path), "--output-dir", str(tmp_path / "r")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    unescaped_pipes = [len(re.findall(r"(?<!\\)\|", line)) for line in table]
    assert len(set(unescaped_pipes)) == 1 and "<script>" not in "\n".join(table)

    tok = make_tokenizer()
    trainer = CalibSFTTrainer(
        model=make_model(len(tok)),
        args=CalibSFTConfig(str(tmp_path / "out"), report_to=[], calibration_loss="none", max_steps=1),
        train_dataset=make_mcq_dataset(4),
        processing_class=tok,
    )
    assert record_lm_eval(trainer, path) == ["inj"]
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "out" / "README.md").text  # the body; the YAML metadata quotes its values
    assert "<script>" not in text and not re.search(r"(?<!\\)\]\(javascript:", text)
    row = next(line for line in text.splitlines() if line.startswith("| inj /"))
    header = next(line for line in text.splitlines() if line.startswith("| Dataset / split / model"))
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", header))


def test_a_results_file_whose_configs_is_a_list_is_named(tmp_path, capsys):
    path = write_log(tmp_path, "t", [mc_sample(0, [-1.0, -2.0], ["a", "b"], "0")])
    results = tmp_path / f"results_{DATE}.json"
    results.write_text(json.dumps({"results": {"t": {}}, "configs": [{"task": "t"}]}))
    with pytest.raises(ValueError, match="`configs` must be an object"):
        from_lm_eval(path)
    assert main(["report", "--lm-eval", str(path), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(results) in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_log_likelihood_names_the_file_and_line(tmp_path, value):
    sample = mc_sample(0, [-1.0, -2.0], ["a", "b"], "0")
    sample["filtered_resps"][1][0] = value
    path = write_log(tmp_path, "t", [mc_sample(1, [-1.0, -2.0], ["a", "b"], "0"), sample])
    with pytest.raises(ValueError, match=r"line 2 \(doc_id 0\): a log-likelihood in `filtered_resps` is not finite"):
        from_lm_eval(path)


def test_a_samples_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = write_log(tmp_path, "t", [mc_sample(0, [-1.0, -2.0], ["a", "b"], "0")])
    path.write_bytes(path.read_bytes() + b"\xff\xfe\n")
    assert main(["report", "--lm-eval", str(path), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text" in err and "Traceback" not in err
