"""The example scripts run as documented: plain, with --config, and under `accelerate launch` with 2 processes."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
from datasets import load_from_disk
from helpers import make_tokenizer, reference_option_scores
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from calib_trl import calibration_report
from calib_trl.loading import MissingSplitError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from example_utils import CalibScriptArguments, load_splits  # noqa: E402

TINY = [
    "--max_train_samples",
    "8",
    "--max_eval_samples",
    "6",
    "--max_calibration_samples",
    "8",
    "--style_adaptation_steps",
    "1",
    "--style_adaptation_batch_size",
    "4",
    "--num_train_epochs",
    "1",
    "--per_device_train_batch_size",
    "4",
    "--eval_batch_size",
    "4",
    "--logging_steps",
    "1",
]


def run(args, tmp_path, timeout=600):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.path.join(ROOT, "tests"),
    }
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_outputs(out, tag, stdout, model_dir, dataset_dir):
    result = json.loads((out / "calibration.json").read_text())
    assert {"accuracy", "ece", "cw_ece", "brier"} <= set(result["report"])
    # "before": the base model on the evaluation rows (the first 6 of the test split), scored independently
    base = reference_option_scores(
        AutoModelForCausalLM.from_pretrained(model_dir),
        make_tokenizer(),
        load_from_disk(str(dataset_dir))["test"].select(range(6)),
    )
    expected = calibration_report(base["probs"], base["labels"])
    for key in ("accuracy", "ece", "brier", "mean_confidence"):
        assert result["before"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    # the before/after table: the key columns, which direction is better, the difference, what 6 rows can show
    header = "| split | model | rows | accuracy ↑ | AUROC ↑ | ECE ↓ | ECE after TS (T) ↓ | answer mass ↑ | LM NLL ↓ |"
    assert header in stdout and "| test | base | 6 |" in stdout and "| test | difference | |" in stdout
    assert "6 rows per split: a difference in accuracy below about" in stdout
    assert result["temperature_scaled"]["temperature"] > 0 and "ood_before" in result
    assert stdout.rstrip().splitlines()[-1].startswith(f"Wrote {out}: the model (model.safetensors), its card")
    assert (out / "reliability_before_after.png").stat().st_size > 1000
    card = ModelCard.load(out / "README.md")
    assert {"calib-trl", tag} <= set(card.data.tags)
    assert any(r.metric_type == "ece" for r in card.data.eval_results)
    # base and fine-tuned side by side; the model-index holds the fine-tuned model's results
    assert " / test / base |" in card.text and " / test / fine-tuned" in card.text
    ece = {r.dataset_split: r.metric_value for r in card.data.eval_results if r.metric_type == "ece"}
    assert ece["test"] == pytest.approx(result["report"]["ece"])
    assert ece["ood"] == pytest.approx(result["ood"]["ece"])


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, config", [("sft_cogcalib", "cogcalib_full.yaml"), ("rcft", "rcft_full.yaml")])
def test_example_arguments_use_current_names(name, config, tmp_path):
    # transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old name
    import yaml

    parser = load_example(name).make_parser()
    path = os.path.join(ROOT, "examples", "configs", config)
    with open(path) as f:
        written = yaml.safe_load(f)
    assert "gradient_checkpointing" not in written
    for argv in ([], ["--config", path, "--bf16", "false"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            script_args, training_args, _ = parser.parse_args_and_config([*argv, "--output_dir", str(tmp_path)])
        if argv:  # the file's settings reach the parsed arguments
            assert training_args.activation_checkpointing == written["activation_checkpointing"]
            assert script_args.dataset_name == written["dataset_name"]
            assert training_args.num_train_epochs == written["num_train_epochs"]


def test_a_missing_ood_split_is_an_error_unless_none(tiny_dataset_dir):
    small = dict(dataset_name=str(tiny_dataset_dir), max_train_samples=2, max_eval_samples=2)
    assert len(load_splits(CalibScriptArguments(**small))["ood"]) == 2
    with pytest.raises(MissingSplitError, match=r"--ood_split 'odd'.*--ood_split none"):
        load_splits(CalibScriptArguments(**small, ood_split="odd"))
    assert set(load_splits(CalibScriptArguments(**small, ood_split="none"))) == {"train", "eval", "calibration"}
    with pytest.raises(MissingSplitError, match="--dataset_train_split 'trian'"):
        load_splits(CalibScriptArguments(**small, dataset_train_split="trian"))
    # the calibration split is optional to the training examples (only detection needs one, and says so), required
    # by the detection example, which needs no `ood`
    assert "calibration" not in load_splits(CalibScriptArguments(**small, calibration_split="held_out"))
    detection = dict(keys=("train", "calibration"), optional=())
    assert set(load_splits(CalibScriptArguments(**small, ood_split="odd"), **detection)) == {"train", "calibration"}
    with pytest.raises(MissingSplitError, match="--calibration_split 'held_out'"):
        load_splits(CalibScriptArguments(**small, calibration_split="held_out"), **detection)


def test_sft_cogcalib_example(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "cogcalib"
    stdout = run(
        [
            sys.executable,
            "examples/sft_cogcalib.py",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(tiny_dataset_dir),
            "--output_dir",
            str(out),
            *TINY,
        ],
        tmp_path,
    )
    assert "| test | CogCalib | 6 |" in stdout and "| ood | CogCalib | 6 |" in stdout
    assert "Knowledge detection" in stdout and "detection accuracy" in stdout
    check_outputs(out, "cogcalib", stdout, tiny_model_dir, tiny_dataset_dir)


@pytest.mark.distributed
def test_sft_cogcalib_example_with_config_under_accelerate_launch(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "cogcalib2"
    stdout = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--cpu",
            "--main_process_port",
            str(free_port()),
            "examples/sft_cogcalib.py",
            "--config",
            "examples/configs/cogcalib_full.yaml",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(tiny_dataset_dir),
            "--output_dir",
            str(out),
            "--bf16",
            "false",
            "--activation_checkpointing",
            "false",
            "--detection",
            "online",
            "--calibration_eval_steps",
            "1",
            "--save_strategy",
            "no",
            *TINY,
        ],
        tmp_path,
    )
    assert stdout.count("| test | CogCalib |") == 1  # printed by the main process only
    check_outputs(out, "cogcalib", stdout, tiny_model_dir, tiny_dataset_dir)


def test_rcft_example(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "rcft"
    stdout = run(
        [
            sys.executable,
            "examples/rcft.py",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(tiny_dataset_dir),
            "--output_dir",
            str(out),
            "--estep_samples",
            "12",
            *TINY,
        ],
        tmp_path,
    )
    assert "| test | RCFT | 6 |" in stdout
    check_outputs(out, "rcft", stdout, tiny_model_dir, tiny_dataset_dir)


def test_detect_known_example(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "detect"
    stdout = run(
        [
            sys.executable,
            "examples/detect_known.py",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(tiny_dataset_dir),
            "--output_dir",
            str(out),
            "--max_train_samples",
            "8",
            "--max_calibration_samples",
            "8",
            "--style_adaptation_steps",
            "0",
        ],
        tmp_path,
    )
    assert "detection accuracy" in stdout
    report = json.loads((out / "detection.json").read_text())
    flagged = load_from_disk(str(out / "train"))
    assert len(flagged) == 8
    assert flagged["known"] == [nll <= report["threshold"] for nll in flagged["answer_nll"]]
    assert report["known_fraction"] == pytest.approx(sum(flagged["known"]) / 8)
