"""CalibrationCallback: logs the calibration metrics through the trainer's loggers, saves diagrams, feeds the card."""

import pytest
from helpers import make_mcq_dataset, reference_option_scores
from transformers import TrainerCallback

from calib_trl import CalibrationCallback, calibration_report


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_callback_logs_saves_and_records(make_trainer, tok, tmp_path):
    train, evaluation = make_mcq_dataset(16, seed=1, known=True), make_mcq_dataset(10, seed=2)
    trainer = make_trainer(train, calibration_loss="ecp", max_steps=4, logging_steps=1)
    recorder = Recorder()
    trainer.add_callback(recorder)
    callback = CalibrationCallback(
        trainer, evaluation, name="toy", split="test", eval_steps=2, on_epoch=False, at_start=True
    )
    trainer.add_callback(callback)
    trainer.train()
    # before training, at steps 2 and 4 (the end of training falls on step 4: not repeated)
    assert [h["step"] for h in callback.history] == [0, 2, 4]
    logged = [log for log in recorder.logs if "calibration/toy/ece" in log]
    assert len(logged) == 3
    # the last logged values are those of the final model, scored independently from its full logits
    scores = reference_option_scores(trainer.model, tok, evaluation)
    final = calibration_report(scores["probs"], scores["labels"])
    for key in ("accuracy", "ece", "cw_ece", "brier", "mean_confidence"):
        assert logged[-1][f"calibration/toy/{key}"] == pytest.approx(final[key])
    # regular training logs are untouched by the callback's entries
    assert all(
        "loss" in log for log in recorder.logs if "calibration/toy/ece" not in log and "train_runtime" not in log
    )
    for step in (0, 2, 4):
        assert (tmp_path / "calibration" / f"reliability_toy_test_step{step}.png").stat().st_size > 1000
    # for the model card: the report at step 0 as the base model's, the last one as the fine-tuned model's
    base, tuned = sorted(trainer.calibration_results, key=lambda r: r["step"])
    assert base["base"] and base["step"] == 0
    assert base["report"]["ece"] == pytest.approx(callback.history[0]["ece"])
    assert not tuned["base"] and tuned["step"] == 4 and tuned["report"]["ece"] == pytest.approx(final["ece"])
    assert tuned["diagram"] == str(tmp_path / "calibration" / "reliability_toy_test_step4.png")


def test_callback_rejects_bad_dataset(make_trainer):
    trainer = make_trainer(make_mcq_dataset(4), calibration_loss="none", max_steps=1)
    with pytest.raises(ValueError, match="missing the column"):
        CalibrationCallback(trainer, make_mcq_dataset(4).remove_columns("answer"))
    with pytest.raises(ValueError, match="eval_steps"):
        CalibrationCallback(trainer, make_mcq_dataset(4), eval_steps=0)


def test_callback_measures_generated_answers_on_open_ended_rows(make_trainer, tok, tmp_path):
    from helpers import make_open_ended_dataset, reference_greedy_answers

    from calib_trl.metrics import confidence_report

    train, evaluation = make_open_ended_dataset(8), make_open_ended_dataset(6)
    trainer = make_trainer(train, calibration_loss="ecp", apply_to="all", max_steps=2, logging_steps=1)
    recorder = Recorder()
    trainer.add_callback(recorder)
    callback = CalibrationCallback(trainer, evaluation, name="open", split="test", on_epoch=False, max_new_tokens=4)
    trainer.add_callback(callback)
    trainer.train()
    (logged,) = [log for log in recorder.logs if "calibration/open/ece" in log]
    reference = reference_greedy_answers(trainer.model, tok, evaluation, max_new_tokens=4)
    correct = [row["completion"][0]["content"] in a.split() for a, row in zip(reference["answers"], evaluation)]
    expected = confidence_report(reference["sequence"], correct)
    for key in ("accuracy", "ece", "brier", "mean_confidence", "smooth_ece"):
        assert logged[f"calibration/open/{key}"] == pytest.approx(expected[key], rel=1e-4)
    assert logged["calibration/open/entropy"] == pytest.approx(reference["entropy"].mean(), rel=1e-4)
    assert (tmp_path / "calibration" / "reliability_open_test_step2.png").stat().st_size > 1000
    (record,) = trainer.calibration_results
    assert record["report"]["kind"] == "generation"
