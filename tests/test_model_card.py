"""Model cards: tags, both citations, calibration results as model-index entries; push_to_hub writes the card."""

import pytest
from helpers import make_mcq_dataset, make_model, make_tokenizer
from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled

from calib_trl import CalibrationCallback, CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer


def common(tmp_path, **kwargs):
    return dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=False,
        **kwargs,
    )


def test_cogcalib_card_has_tags_citations_and_results(tmp_path):
    tok = make_tokenizer()
    trainer = CalibSFTTrainer(
        model=make_model(len(tok)),
        args=CalibSFTConfig(**common(tmp_path), calibration_loss="ls"),
        train_dataset=make_mcq_dataset(8, known=True),
        processing_class=tok,
    )
    callback = CalibrationCallback(trainer, make_mcq_dataset(8, seed=5), name="toy-mcq", split="test", on_epoch=False)
    trainer.add_callback(callback)
    trainer.train()
    trainer.create_model_card(model_name="toy-cogcalib")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"calib-trl", "cogcalib", "sft", "trl"} <= set(card.data.tags)
    assert "wang2025objective" in card.text and "xiao2025restoring" in card.text
    assert "## Calibration" in card.text and "`calibration_loss=ls`" in card.text and "`ls_epsilon=" in card.text
    report = callback.history[-1]
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("toy-mcq", "test", "ece")] == pytest.approx(report["ece"])
    assert results[("toy-mcq", "test", "accuracy")] == pytest.approx(report["accuracy"])
    assert results[("toy-mcq", "test", "brier")] == pytest.approx(report["brier"])
    assert f"{report['ece']:.4f}" in card.text
    assert "calibration/reliability_toy-mcq_test_step2.png" in card.text
    assert "model-index" in (tmp_path / "README.md").read_text()


def test_rcft_card_without_results(tmp_path):
    tok = make_tokenizer()
    trainer = RCFTTrainer(
        model=make_model(len(tok)),
        args=RCFTConfig(**common(tmp_path), estep_samples=None),
        train_dataset=make_mcq_dataset(8),
        processing_class=tok,
    )
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    assert {"calib-trl", "rcft"} <= set(card.data.tags) and "cogcalib" not in card.data.tags
    assert "No calibration results were recorded" in card.text and "`ece_weight=0.5`" in card.text
    assert card.text.index("xiao2025restoring") < card.text.index("wang2025objective")


def test_checkpoint_saves_write_the_card_on_the_main_process(tmp_path):
    tok = make_tokenizer()
    args = CalibSFTConfig(**{**common(tmp_path), "save_strategy": "steps"}, save_steps=1, calibration_loss="ecp")
    trainer = CalibSFTTrainer(
        model=make_model(len(tok)), args=args, train_dataset=make_mcq_dataset(8, known=True), processing_class=tok
    )
    trainer.train()
    assert "cogcalib" in ModelCard.load(tmp_path / "README.md").data.tags
    assert (tmp_path / "checkpoint-2" / "calib_trl_state.json").exists()


def test_push_to_hub_writes_the_card_with_the_hub_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = make_tokenizer()
    trainer = CalibSFTTrainer(
        model=make_model(len(tok)),
        args=CalibSFTConfig(**common(tmp_path), calibration_loss="ecp"),
        train_dataset=make_mcq_dataset(8, known=True),
        processing_class=tok,
    )
    trainer.record_calibration({"accuracy": 0.5, "ece": 0.1, "brier": 0.6}, "toy", "test")
    trainer.hub_model_id = "someone/toy-cogcalib"
    with pytest.raises(OfflineModeIsEnabled):  # the upload itself cannot reach the hub
        trainer.push_to_hub()
    card = ModelCard.load(tmp_path / "README.md")
    assert "cogcalib" in card.data.tags
    assert any(r.metric_type == "ece" and r.metric_value == 0.1 for r in card.data.eval_results)
