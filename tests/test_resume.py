"""Resuming from a checkpoint continues training exactly where it stopped.

Each case trains for `TOTAL_STEPS` steps without interruption, and again with a checkpoint every `stop_at` steps and a
stop right after the first one: in the middle of the first epoch (step 3) or at its end (step 4; 16 rows, 2 per
device, 2 accumulation steps: 4 steps per epoch). A new trainer, whose model starts from other random weights, then
resumes from that checkpoint. The resumed run must log the same losses and end with the same weights as the
uninterrupted one, with its calib-trl state (the online detection threshold, the RCFT bin statistics, the known flags
of `detection="auto"`) restored from the checkpoint's `trainer_state.json` (transformers' stateful callbacks) rather
than re-estimated at the resume step. A checkpoint whose save was interrupted is skipped, and a damaged state is named.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers import make_config, make_mcq_dataset, make_model, make_tokenizer
from transformers import TrainerCallback

from calib_trl import CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer
from calib_trl.core.state import checkpoint_state

TOTAL_STEPS = 6


class StopAt(TrainerCallback):
    """Interrupts training after step `step` (after its checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _args(config_cls, output_dir, **kwargs):
    """The runs of this file: 2 rows per device, 2 accumulation steps, `TOTAL_STEPS` steps, every step logged."""
    run = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=TOTAL_STEPS,
        learning_rate=5e-3,
        logging_steps=1,
        seed=0,
        data_seed=0,
    )
    return make_config(config_cls, output_dir, **{**run, **kwargs})


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _run_three_ways(tmp_path, build, stop_at):
    """
    `build(output_dir, model_seed, **args)` makes a trainer. Returns the uninterrupted trainer, the resumed one and the
    checkpoint folder.
    """
    full = build(tmp_path / "full", 5)
    full.train()
    first = build(tmp_path / "split", 5, save_strategy="steps", save_steps=stop_at)
    first.add_callback(StopAt(stop_at))
    first.train()
    assert first.state.global_step == stop_at
    checkpoint = tmp_path / "split" / f"checkpoint-{stop_at}"
    assert checkpoint_state(str(checkpoint))  # inside trainer_state.json, the last file of the checkpoint
    resumed = build(tmp_path / "split", 99, save_strategy="steps", save_steps=stop_at)
    return full, resumed, checkpoint


def _assert_same_run(full, resumed):
    assert resumed.state.global_step == full.state.global_step == TOTAL_STEPS
    want, got = _losses(full), _losses(resumed)
    assert sorted(want) == list(range(1, TOTAL_STEPS + 1))
    assert sorted(got) == sorted(want)
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-6, abs_tol=1e-7), (step, got[step], want[step])
    # calib-trl's logged state (thresholds, E-step statistics, known fractions) step for step
    logged = {
        run: {
            h["step"]: {k: v for k, v in h.items() if k.startswith(("calib/", "rcft/"))} for h in t.state.log_history
        }
        for run, t in (("full", full), ("resumed", resumed))
    }
    for step in want:
        assert logged["resumed"][step].keys() == logged["full"][step].keys(), step
        for key, value in logged["full"][step].items():
            assert math.isclose(logged["resumed"][step][key], value, rel_tol=1e-6, abs_tol=1e-7), (step, key)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def _spy(obj, method, calls, record):
    original = getattr(obj, method)

    def wrapper(*args, **kwargs):
        calls.append(record())
        return original(*args, **kwargs)

    setattr(obj, method, wrapper)


@pytest.mark.parametrize("stop_at", [3, 4])
def test_online_detection_resumes_with_its_threshold(tmp_path, stop_at):
    tok = make_tokenizer()
    train, calibration = make_mcq_dataset(16, seed=6), make_mcq_dataset(16, seed=3)

    def build(output_dir, model_seed, **kwargs):
        args = _args(
            CalibSFTConfig,
            output_dir,
            calibration_loss="ls",
            ls_epsilon=0.3,
            detection="online",
            online_refit_steps=2,
            online_batch_size=8,
            **kwargs,
        )
        trainer = CalibSFTTrainer(
            model=make_model(len(tok), seed=model_seed),
            args=args,
            train_dataset=train,
            processing_class=tok,
            calibration_dataset=calibration,
        )
        trainer.refits = []
        _spy(trainer.detector, "refit", trainer.refits, lambda: trainer.state.global_step)
        return trainer

    full, resumed, checkpoint = _run_three_ways(tmp_path, build, stop_at)
    assert full.refits == [0, 2, 4]
    saved = checkpoint_state(str(checkpoint))["cogcalib"]["online_detector"]
    assert saved["last_refit_step"] == 2  # the re-fit "at step 4" runs at the start of the fifth step
    assert saved["threshold"] == full.detector.history[1]["threshold"]

    resumed.train(resume_from_checkpoint=str(checkpoint))
    # the threshold comes from the checkpoint: no re-fit at step 3; the one due at step 4 runs once
    assert resumed.refits == [4]
    assert [h["step"] for h in resumed.detector.history] == [0, 2, 4]
    assert resumed.detector.history == full.detector.history
    thresholds = {h["step"]: h["calib/threshold"] for h in full.state.log_history if "calib/threshold" in h}
    assert thresholds[4] == saved["threshold"]  # the fourth step still uses the threshold of the step-2 re-fit
    assert {h["step"]: h["calib/threshold"] for h in resumed.state.log_history if "calib/threshold" in h} == thresholds
    fractions = [h["calib/known_fraction"] for h in full.state.log_history if "loss" in h]
    assert any(0 < f < 1 for f in fractions[stop_at:]), fractions  # the flags matter after the resume
    _assert_same_run(full, resumed)


@pytest.mark.parametrize("stop_at", [3, 4])
@pytest.mark.parametrize("bin_refresh, esteps", [("epoch", [0, 4]), ("2", [0, 2, 4])])
def test_rcft_resumes_with_its_bin_statistics(tmp_path, bin_refresh, esteps, stop_at):
    tok = make_tokenizer()
    train = make_mcq_dataset(16, seed=2)

    def build(output_dir, model_seed, **kwargs):
        args = _args(
            RCFTConfig,
            output_dir,
            ece_weight=0.5,
            ece_scale=5.0,
            bin_refresh=bin_refresh,
            estep_batch_size=8,
            estep_samples=None,
            **kwargs,
        )
        trainer = RCFTTrainer(
            model=make_model(len(tok), seed=model_seed), args=args, train_dataset=train, processing_class=tok
        )
        trainer.esteps = []
        _spy(trainer, "estimate_bins", trainer.esteps, lambda: trainer.state.global_step)
        return trainer

    full, resumed, checkpoint = _run_three_ways(tmp_path, build, stop_at)
    assert full.esteps == esteps
    last = checkpoint_state(str(checkpoint))["rcft"]["last_estep"]
    assert (last["epoch"] if bin_refresh == "epoch" else last["step"]) == (0 if bin_refresh == "epoch" else 2)

    resumed.train(resume_from_checkpoint=str(checkpoint))
    # the bins come from the checkpoint: no E-step at the resume itself when none is due (mid-epoch, or between two
    # refresh steps); the next one (the new epoch's, the one due at step 4) runs once
    assert resumed.esteps == [s for s in esteps if s >= stop_at] == [4]
    # the per-bin statistics are not logged (only their summaries are): compared on the trainers themselves
    for key in ("counts", "accuracy", "confidence"):
        torch.testing.assert_close(resumed._bin_stats[key], full._bin_stats[key], equal_nan=True, rtol=1e-6, atol=0)
    _assert_same_run(full, resumed)


def _edit_state(checkpoint, edit) -> None:
    """Apply `edit` to the calib-trl state inside a checkpoint's trainer_state.json (`None` removes the entry)."""
    path = checkpoint / "trainer_state.json"
    content = json.loads(path.read_text())
    entry = content["stateful_callbacks"]["CalibrationState"]
    edited = edit(entry["attributes"]["calib_trl"])
    if edited is None:
        del content["stateful_callbacks"]["CalibrationState"]
    else:
        entry["attributes"]["calib_trl"] = edited
    path.write_text(json.dumps(content))


def _rcft_runs(tmp_path, tok, train, **more):
    settings = dict(bin_refresh="once", estep_batch_size=8, estep_samples=None, gradient_accumulation_steps=1)
    trainer = RCFTTrainer(
        model=make_model(len(tok), seed=1),
        args=_args(RCFTConfig, tmp_path, **{**settings, **more}),
        train_dataset=train,
        processing_class=tok,
    )
    trainer.esteps = []
    _spy(trainer, "estimate_bins", trainer.esteps, lambda: trainer.state.global_step)
    return trainer


def test_resume_restores_the_state_the_checkpoint_holds(tmp_path, caplog):
    """The state is read at `train(resume_from_checkpoint=...)`, including `True` (the last checkpoint)."""
    tok = make_tokenizer()
    train = make_mcq_dataset(8, seed=2)
    _rcft_runs(tmp_path, tok, train, max_steps=2, save_strategy="steps", save_steps=1).train()

    def edit(state):
        state["skipped_steps"] = 7
        state["rcft"]["bins"]["estep_accuracy"] = 0.125
        return state

    _edit_state(tmp_path / "checkpoint-2", edit)
    # one more step, logged: what it logs comes from the state the checkpoint holds
    more = dict(max_steps=3, save_strategy="no", nonfinite_loss="skip")
    again = _rcft_runs(tmp_path, tok, train, **more)
    again.train(resume_from_checkpoint=True)
    assert again.esteps == []  # the bins come from the checkpoint ("once": no E-step after it)
    (logged,) = [h for h in again.state.log_history if h.get("step") == 3 and "loss" in h]
    assert logged["calib/skipped_steps"] == 7 and logged["rcft/estep_accuracy"] == 0.125
    # a checkpoint without calib-trl's state (written by another trainer) resumes with a fresh state, and says so
    _edit_state(tmp_path / "checkpoint-2", lambda state: None)
    fresh = _rcft_runs(tmp_path, tok, train, **more)
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        fresh.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "holds no calib-trl state (it was written by another trainer): the calib-trl state starts afresh" in (
        caplog.text
    )
    assert fresh.esteps == [2]  # no bins to resume with: a new E-step
    (logged,) = [h for h in fresh.state.log_history if h.get("step") == 3 and "loss" in h]
    assert logged["calib/skipped_steps"] == 0


def test_an_interrupted_checkpoint_save_is_skipped_on_resume(tmp_path, caplog):
    """
    A kill inside a checkpoint save leaves `checkpoint-N` without its trainer_state.json (the last file written):
    `resume_from_checkpoint=True` resumes from the last complete checkpoint instead, and the run goes on exactly as
    the uninterrupted one.
    """
    tok = make_tokenizer()
    train = make_mcq_dataset(16, seed=2)

    def build(output_dir, model_seed, **kwargs):
        args = _args(
            RCFTConfig, output_dir, ece_weight=0.5, bin_refresh="2", estep_batch_size=8, estep_samples=None, **kwargs
        )
        return RCFTTrainer(
            model=make_model(len(tok), seed=model_seed), args=args, train_dataset=train, processing_class=tok
        )

    full, resumed, checkpoint = _run_three_ways(tmp_path, build, 3)
    interrupted = tmp_path / "split" / "checkpoint-5"  # what a kill during the next save leaves
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Skipping {interrupted}: its trainer_state.json is missing (an interrupted save)" in caplog.text
    _assert_same_run(full, resumed)
    # named explicitly, it is refused with what to do
    with pytest.raises(
        ValueError, match=r"checkpoint-5/trainer_state.json is missing: the save of .* was interrupted"
    ):
        build(tmp_path / "split", 99).train(resume_from_checkpoint=str(interrupted))


def test_a_damaged_state_is_named_and_replaced_by_a_fresh_estimate(tmp_path, caplog):
    tok = make_tokenizer()
    train = make_mcq_dataset(8, seed=2)
    _rcft_runs(tmp_path, tok, train, max_steps=2, save_strategy="steps", save_steps=1).train()
    checkpoint = tmp_path / "checkpoint-2"
    # a truncated trainer_state.json: the checkpoint is incomplete, and says which file
    path = checkpoint / "trainer_state.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"checkpoint-2/trainer_state.json is not readable JSON"):
        _rcft_runs(tmp_path, tok, train, max_steps=3).train(resume_from_checkpoint=str(checkpoint))
    path.write_text(text)
    # a state without the last E-step's position: named, and a fresh E-step replaces the saved bins
    _edit_state(checkpoint, lambda state: {**state, "rcft": {"bins": state["rcft"]["bins"]}})
    again = _rcft_runs(tmp_path, tok, train, max_steps=3, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert again.esteps == [2] and "holds no RCFT bin statistics: a new E-step runs" in caplog.text
    _edit_state(checkpoint, lambda state: {**state, "rcft": {"bins": {"counts": [1.0]}, "last_estep": {}}})
    again = _rcft_runs(tmp_path, tok, train, max_steps=3, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert again.esteps == [2] and "calib-trl's saved RCFT bin statistics are damaged" in caplog.text


@pytest.mark.parametrize("stop_at", [3])
def test_automatic_detection_resumes_with_its_flags(tmp_path, stop_at):
    """
    `detection="auto"` flags the rows with the model it starts from. A resumed run trains on the flags of the run it
    continues, restored from the checkpoint, even when the resuming trainer is given the checkpoint's own weights
    (which answer other rows correctly): the same known fractions and losses, step for step.
    """
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    train = make_mcq_dataset(16, seed=6)
    models = {}

    def build(output_dir, model_seed, **kwargs):
        args = _args(CalibSFTConfig, output_dir, calibration_loss="ecp", calibration_space="options", **kwargs)
        model = models.get(model_seed) or make_model(len(tok), seed=model_seed)
        return CalibSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)

    full = build(tmp_path / "full", 5)
    full.train()
    first = build(tmp_path / "split", 5, save_strategy="steps", save_steps=stop_at)
    first.add_callback(StopAt(stop_at))
    first.train()
    checkpoint = tmp_path / "split" / f"checkpoint-{stop_at}"
    models[99] = AutoModelForCausalLM.from_pretrained(checkpoint)  # the checkpoint's own weights
    resumed = build(tmp_path / "split", 99, save_strategy="steps", save_steps=stop_at)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.train_dataset["known"] == full.train_dataset["known"]
    assert "restored from" in resumed.detection_summary["description"]
    fractions = [h["calib/known_fraction"] for h in full.state.log_history if "loss" in h]
    assert any(0 < f < 1 for f in fractions[stop_at:])
    _assert_same_run(full, resumed)
