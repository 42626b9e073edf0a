"""
`detection="auto"`, the default: where the known flags come from for a TRL script that has never heard of calib-trl;
online detection's edge cases (conversational rows, no fitted threshold, progress); what the trainers accept as
`args` and as a training dataset.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from helpers import (
    TRAINING_CHAT_TEMPLATE,
    make_mcq_dataset,
    make_model,
    make_open_ended_dataset,
    make_tokenizer,
    memorize,
    reference_greedy_answers,
    reference_option_scores,
)
from transformers import TrainingArguments
from trl import SFTConfig
from trl.trainer.utils import get_config_model_id

from calib_trl import CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer
from calib_trl.cogcalib.calib_sft_config import DEFAULT_ECP_BETA, DEFAULT_LOSS, DEFAULT_LS_EPSILON
from calib_trl.cogcalib.knowledge import youden_threshold
from calib_trl.evaluation.scoring import answer_rows, score_answers


@pytest.fixture(scope="module")
def knowing():
    """A tiny model trained on the first 8 of 16 open-ended rows: it answers those correctly, and only those."""
    tok = make_tokenizer()
    rows = make_open_ended_dataset(16)
    model = memorize(make_model(len(tok), seed=0), tok, rows.select(range(8)))
    _, correct = score_answers(model, tok, rows, check_correct=True, progress=False)
    assert correct.tolist() == [True] * 8 + [False] * 8
    return model


def detection_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Knowledge detection")]


# -- the paths of detection="auto" -----------------------------------------------------------------------------------


def test_multiple_choice_rows_are_flagged_by_the_models_own_answer_inside_train(make_trainer, tok, caplog):
    model = make_model(len(tok), seed=4)
    train, evaluation = make_mcq_dataset(12, seed=1), make_mcq_dataset(6, seed=2)
    expected = reference_option_scores(model, tok, train)["correct"]
    expected_eval = reference_option_scores(model, tok, evaluation)["correct"]
    assert 0 < expected.sum() < len(expected)
    # one step on all 12 rows, so that the logged known fraction is that of the whole train dataset
    trainer = make_trainer(
        train, model=model, eval_dataset=evaluation, per_device_train_batch_size=12, max_steps=1, logging_steps=1
    )
    assert trainer.args.detection == "auto"
    assert "known" not in trainer.train_dataset.column_names  # nothing is scored before `train()`
    with caplog.at_level(logging.INFO, logger="calib_trl"):
        trainer.train()
    assert trainer.train_dataset["known"] == expected.tolist()
    assert trainer.eval_dataset["known"] == expected_eval.tolist()  # the evaluation rows, by the same rule
    (line,) = detection_lines(caplog)
    assert "the model's own answer (multiple-choice rows, no calibration_dataset)" in line
    assert f"train {expected.mean():.3f} of 12 rows, eval {expected_eval.mean():.3f} of 6 rows" in line
    assert trainer.detection_summary["path"] == "multiple_choice"
    # before the scoring pass: how many rows, and how to avoid it
    costs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Detecting known rows")]
    assert len(costs) == 2  # the train rows, then the evaluation rows
    assert "one forward pass over each of the 12 rows of the train dataset" in costs[0]
    assert "one forward pass over each of the 6 rows of the eval dataset" in costs[1]
    assert "calib_trl.detect_known" in costs[0] and "detection='online'" in costs[0]
    # the share of the loss tokens (each row's answer letter and end of turn) that get the term
    loss_tokens = [sum(label != -100 for label in labels[1:]) for labels in trainer.train_dataset["labels"]]
    known_tokens = sum(n for n, known in zip(loss_tokens, expected) if known)
    (logged,) = [h["calib/known_fraction"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(known_tokens / sum(loss_tokens))


def test_a_calibration_dataset_gives_a_threshold_fitted_on_it(make_trainer, tok):
    model = make_model(len(tok), seed=4)
    train, calibration = make_mcq_dataset(12, seed=1), make_mcq_dataset(24, seed=3)
    nll, correct = score_answers(model, tok, calibration, check_correct=True, progress=False)
    threshold = youden_threshold(nll, correct)[0]
    assert math.isfinite(threshold)
    train_nll, _ = score_answers(model, tok, train, progress=False)
    trainer = make_trainer(train, model=model, max_steps=1, calibration_dataset=calibration)
    trainer.train()
    assert trainer.detection_summary["path"] == "calibration_dataset"
    assert trainer.detection_summary["rule"]["threshold"] == pytest.approx(threshold)
    assert trainer.train_dataset["known"] == (train_nll <= threshold).tolist()


def test_open_ended_rows_are_flagged_by_the_models_own_greedy_answer(make_trainer, knowing, tok, caplog):
    rows = make_open_ended_dataset(16)
    reference = reference_greedy_answers(knowing, tok, rows, max_new_tokens=32)
    words = [row["completion"][0]["content"] for row in rows]
    expected = [word in answer.split() for answer, word in zip(reference["answers"], words)]
    assert expected == [True] * 8 + [False] * 8
    trainer = make_trainer(rows, model=copy.deepcopy(knowing), max_steps=1)
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer.train()
    summary = trainer.detection_summary
    assert summary["path"] == "generation" and summary["rule"]["threshold"] is None
    assert trainer.train_dataset["known"] == expected
    (line,) = detection_lines(caplog)
    assert "the model's own greedy answer (open-ended rows, no calibration_dataset)" in line
    assert "known fraction: train 0.500 of 16 rows" in line
    (cost,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Detecting known rows")]
    assert "a greedy answer of each of the 16 rows of the train dataset" in cost


def test_a_model_that_answers_no_open_ended_row_flags_every_row_unknown(make_trainer, caplog):
    rows = make_open_ended_dataset(8)  # a random model answers none of them
    trainer = make_trainer(rows, max_steps=1, detection_max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer.train()
    assert trainer.detection_summary["path"] == "generation"
    assert trainer.train_dataset["known"] == [False] * 8
    (line,) = detection_lines(caplog)
    assert "known fraction: train 0.000 of 8 rows" in line


def test_rows_without_an_answer_get_the_term_on_every_token(make_trainer, caplog):
    text = Dataset.from_list([{"text": row["prompt"][0]["content"]} for row in make_mcq_dataset(8, seed=5)])
    losses = []
    for kwargs in (dict(), dict(apply_to="all")):
        with caplog.at_level(logging.WARNING, logger="calib_trl"):
            trainer = make_trainer(text, model_seed=6, max_steps=2, logging_steps=1, **kwargs)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    (line,) = detection_lines(caplog)
    assert "have no answer to score" in line and "the calibration term goes to every token" in line


def test_a_stream_gets_one_threshold_fitted_before_the_first_step(make_trainer, caplog):
    rows = make_mcq_dataset(12, seed=1).to_list()
    stream = IterableDataset.from_generator(lambda: iter(rows))
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer = make_trainer(stream, model_seed=4, max_steps=3, auto_detection_samples=10)
    trainer.train()
    assert [h["step"] for h in trainer.detector.history] == [0]  # fitted once, never re-fitted
    assert trainer.detector.last_report.n_calibration == 10
    (line,) = detection_lines(caplog)
    assert "`IterableDataset`" in line and "the first 10 rows of the stream" in line


def test_a_known_column_is_used_as_it_is(make_trainer, tok, caplog):
    train = make_mcq_dataset(8, seed=1, known=True)
    with caplog.at_level(logging.INFO, logger="calib_trl"):
        trainer = make_trainer(train, max_steps=2)
        trainer.train()
    assert trainer.detection_summary["path"] == "column" and "rule" not in trainer.detection_summary  # nothing scored
    assert trainer.train_dataset["known"] == train["known"]
    (line,) = detection_lines(caplog)
    assert "from the `known` column of every dataset" in line
    # an evaluation dataset without the column is flagged by the rule, inside `train()`
    evaluation = make_mcq_dataset(6, seed=2)
    trainer = make_trainer(train, eval_dataset=evaluation, max_steps=2)
    expected = reference_option_scores(trainer.model, tok, evaluation)["correct"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="calib_trl"):
        trainer.train()
    assert trainer.train_dataset["known"] == train["known"] and trainer.eval_dataset["known"] == expected.tolist()
    (line,) = detection_lines(caplog)
    assert "the train dataset's from its `known` column; the others' by the model's own answer" in line


def test_answer_rows():
    sharegpt = Dataset.from_list(
        [{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}], "answer": 1}]
    )
    rows = answer_rows(sharegpt)
    assert rows.column_names == ["answer", "prompt", "completion"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Yo"}]
    assert answer_rows(Dataset.from_list([{"text": "plain"}])) is None
    with pytest.raises(ValueError, match=r"A conversational row has no assistant message.*\['user'\]"):
        answer_rows(Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}]}]))


# -- online detection ------------------------------------------------------------------------------------------------


def test_online_detection_on_conversational_messages(make_trainer, tok, knowing):
    tok.chat_template = TRAINING_CHAT_TEMPLATE
    messages = make_open_ended_dataset(16, messages=True)
    # the loss of a `messages` row covers the whole conversation: no answer NLL to compare with the threshold
    with pytest.raises(
        ValueError,
        match=r"the train dataset's rows \(\['messages'\]\) have no separate answer.*Convert conversational rows to "
        r"prompt/completion .*or set `assistant_only_loss=True`",
    ):
        make_trainer(messages, model=copy.deepcopy(knowing), detection="online", calibration_dataset=messages)
    # with the loss on the assistant's messages, calibration and training rows in `messages` form both work
    trainer = make_trainer(
        messages,
        model=copy.deepcopy(knowing),
        detection="online",
        assistant_only_loss=True,
        per_device_train_batch_size=16,
        max_steps=1,
        logging_steps=1,
        calibration_dataset=messages,
    )
    trainer.train()
    assert trainer.detector.last_report.n_calibration == 16
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["calib/threshold_fitted"] == 1.0 and logged["calib/detection_accuracy"] == 1.0
    # one batch of all 16 rows: the known fraction of its loss tokens (each answer and its end-of-turn token) is that
    # of the first 8 rows, the ones the model knows
    lengths = [len(m[-1]["content"]) + 1 for m in messages["messages"]]
    assert logged["calib/known_fraction"] == pytest.approx(sum(lengths[:8]) / sum(lengths))


def test_online_detection_without_a_fitted_threshold_says_so(make_trainer, knowing, caplog):
    unknown = make_open_ended_dataset(16).select(range(8, 16))  # the model answers none of them
    trainer = make_trainer(
        make_open_ended_dataset(16),
        model=copy.deepcopy(knowing),
        detection="online",
        max_steps=2,
        logging_steps=1,
        calibration_dataset=unknown,
    )
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["calib/threshold_fitted"] for h in logs] == [0.0, 0.0]
    assert all(math.isnan(h["calib/detection_accuracy"]) for h in logs)  # not 1.0: there is no detector
    assert all(h["calib/known_fraction"] == 0.0 for h in logs)
    assert (
        "NO KNOWLEDGE THRESHOLD. Online detection at step 0: no threshold fitted (the model answers 0% of the 8 "
        "calibration items correctly): every example is flagged unknown. So no example gets the calibration term: "
        "training is plain cross-entropy (standard SFT)."
    ) in caplog.text
    trainer = make_trainer(
        make_open_ended_dataset(16),
        model=copy.deepcopy(knowing),
        detection="online",
        unfitted_threshold="raise",
        max_steps=2,
        calibration_dataset=unknown,
    )
    with pytest.raises(ValueError, match=r"So no example gets the calibration term.*`unfitted_threshold='warn'`"):
        trainer.train()


def test_online_refit_shows_a_progress_bar(make_trainer, capfd):
    trainer = make_trainer(
        make_mcq_dataset(4, seed=1),
        detection="online",
        max_steps=1,
        disable_tqdm=False,
        calibration_dataset=make_mcq_dataset(6, seed=2),
    )
    capfd.readouterr()
    trainer.train()
    assert "Re-fitting the known threshold: 100%" in capfd.readouterr().err


# -- what the trainers accept -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_class", [CalibSFTTrainer, RCFTTrainer])
def test_an_empty_training_dataset_is_named(tmp_path, tok, trainer_class):
    empty = make_mcq_dataset(2).select([])
    for dataset in (empty, IterableDataset.from_generator(lambda: iter([]), features=empty.features)):
        with pytest.raises(ValueError, match=r"The train dataset is empty: there is nothing to train on"):
            trainer_class(model=make_model(len(tok)), train_dataset=dataset, processing_class=tok)


@pytest.mark.parametrize("source", [TrainingArguments, SFTConfig])
def test_training_arguments_and_sft_configs_are_converted(tmp_path, tok, caplog, source):
    args = source(str(tmp_path), learning_rate=1e-3, max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer = CalibSFTTrainer(
            model=make_model(len(tok)), args=args, train_dataset=make_mcq_dataset(4), processing_class=tok
        )
    assert type(trainer.args) is CalibSFTConfig
    assert (trainer.args.learning_rate, trainer.args.max_steps) == (1e-3, 1)
    defaults = {f.name: f.default for f in dataclasses.fields(CalibSFTConfig)}
    # `calibration_loss=None` by default: the run's args hold the resolved space's term (multiple choice: the options')
    assert defaults["calibration_loss"] is None and trainer.calibration_space == "options"
    assert (
        (trainer.args.calibration_loss, trainer.args.detection) == (DEFAULT_LOSS["options"], "auto") == ("ecp", "auto")
    )
    assert f"`args` is a `{source.__name__}`: converted to a `CalibSFTConfig`" in caplog.text
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    # RCFT: a loss on the whole sequence becomes `sft_loss="prompt_and_completion"`
    rcft = RCFTTrainer(
        model=make_model(len(tok)),
        args=SFTConfig(str(tmp_path), completion_only_loss=False, report_to=[], use_cpu=True),
        train_dataset=make_mcq_dataset(4),
        processing_class=tok,
    )
    assert type(rcft.args) is RCFTConfig and rcft.args.sft_loss == "prompt_and_completion"


def test_no_args_gives_the_default_config_and_trains(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_model(len(tok))
    # built first: a new config resets the accelerator state that a trainer holds
    expected = CalibSFTConfig(f"{get_config_model_id(model.config).split('/')[-1]}-CalibSFT").to_dict()
    trainer = CalibSFTTrainer(model=model, train_dataset=make_mcq_dataset(8), processing_class=tok)
    # the settings the trainer fills in: the defaults of the space it resolved (multiple-choice rows: the options)
    resolved = {
        "calibration_loss": DEFAULT_LOSS["options"],
        "ls_epsilon": DEFAULT_LS_EPSILON["options"],
        "ecp_beta": DEFAULT_ECP_BETA["options"],
    }
    assert all(expected[name] is None for name in resolved) and trainer.calibration_space == "options"
    assert trainer.args.to_dict() == {**expected, **resolved}
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step > 0 and math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert np.isclose(trainer.state.epoch, trainer.args.num_train_epochs)
