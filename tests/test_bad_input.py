"""Bad inputs get a clear error or warning that names the problem and the way out."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset, IterableDataset
from helpers import make_config, make_mcq_dataset, make_model
from transformers import TrainerCallback

import calib_trl.cogcalib.loss
import calib_trl.rcft.loss
from calib_trl import CalibRCFTConfig, CalibSFTConfig, CalibSFTTrainer, RCFTConfig, RCFTTrainer
from calib_trl.evaluation.scoring import score_multiple_choice
from calib_trl.mcq import make_mcq_example, validate_mcq_dataset
from calib_trl.tokenization import option_token_ids


def with_known(values, seed=0):
    return make_mcq_dataset(len(values), seed=seed).add_column("known", values)


# -- the `known` column (precomputed detection) -----------------------------------------------------------------------


def test_missing_known_column(make_trainer):
    with pytest.raises(
        ValueError,
        match=r"The train dataset has no `known` column, which `detection='precomputed'` "
        r"needs\. Run `calib_trl\.detect_known",
    ):
        make_trainer(make_mcq_dataset(4), detection="precomputed")
    # an evaluation dataset is checked too
    with pytest.raises(ValueError, match="The eval dataset has no `known` column"):
        make_trainer(with_known([1, 0]), eval_dataset=make_mcq_dataset(2), detection="precomputed")
    # another column name, set in the config
    with pytest.raises(ValueError, match="has no `is_known` column"):
        make_trainer(with_known([1, 0]), known_column="is_known", detection="precomputed")


@pytest.mark.parametrize(
    "values, error, message",
    [
        (
            ["yes", "no", "yes", "no"],
            TypeError,
            r"The `known` column must hold booleans or numbers .*got str: 'yes'\. \(row 0 of the train dataset\)",
        ),
        (
            [[1, 0], [1], [0], [1]],
            TypeError,
            r"`known` \(row 0\) of the train dataset is a list; it must hold one boolean per example",
        ),
        (
            [1.0, float("nan"), 0.0, 1.0],
            ValueError,
            r"The `known` column holds NaN; every example needs a value .*\(row 1 of the train dataset\)",
        ),
        ([0, 1, 2, 0], ValueError, r"`known` \(row 2\) of the train dataset is 2; it must be True/False or 0/1"),
        ([0.0, 0.5, 1.0, 0.0], ValueError, r"`known` \(row 1\) of the train dataset is 0\.5; it must be True/False"),
        ([0, -1, 1, 0], ValueError, r"`known` \(row 1\) of the train dataset is -1; it must be True/False or 0/1"),
    ],
    ids=["strings", "lists", "nan", "two", "half", "negative"],
)
def test_invalid_known_values(make_trainer, values, error, message):
    with pytest.raises(error, match=message):
        make_trainer(with_known(values))


@pytest.mark.parametrize("known", [[False] * 4, [0] * 4])
def test_no_known_example_warns_what_the_loss_becomes(make_trainer, known):
    with pytest.warns(
        UserWarning,
        match=r"No example of the train dataset is known: with `apply_to='known'` the loss "
        r"is plain cross-entropy \(standard SFT\)",
    ):
        make_trainer(with_known(known))


@pytest.mark.parametrize("known", [[True] * 4, [1] * 4])
def test_every_example_known_warns_what_the_loss_becomes(make_trainer, known):
    with pytest.warns(
        UserWarning,
        match=r"Every example of the train dataset is known: the loss is the calibration "
        r"loss on all data \(`apply_to='all'`\)",
    ):
        make_trainer(with_known(known))


def test_packing_an_iterable_dataset_with_flags_is_refused(make_trainer):
    rows = with_known([1, 0, 1, 0]).to_list()
    data = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(
        ValueError,
        match=r"Packing an `IterableDataset` would drop its `known` column; pack a "
        r"`datasets\.Dataset`, or disable packing",
    ):
        make_trainer(data, packing=True, max_length=300, max_steps=1)


# -- multiple-choice rows ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answers, message",
    [
        ([0, 5, 1], r"`answer` \(row 1\) is 5, which is not among the 4 choices \(A, B, C, D\)"),
        ([0, -1, 1], r"`answer` \(row 1\) is -1, which is not among the 4 choices"),
        (["A", "E", "B"], r"`answer` \(row 1\) is 'E', which is not among the 4 choices \(A, B, C, D\)"),
        (["A", "AB", "B"], r"`answer` \(row 1\) must be an option index or a single letter, got 'AB'"),
        ([0, None, 1], r"`answer` \(row 1\) must be an option index or a letter, got None"),
        ([0.0, 1.5, 1.0], r"`answer` \(row 0\) must be an option index or a letter, got 0\.0"),
    ],
    ids=["index-too-large", "negative-index", "letter-too-large", "two-letters", "none", "float"],
)
def test_answer_not_among_the_options(make_trainer, answers, message):
    data = make_mcq_dataset(3).remove_columns("answer").add_column("answer", answers)
    with pytest.raises(ValueError, match=message):
        validate_mcq_dataset(data, name="train dataset")
    with pytest.raises(ValueError, match=message):
        make_trainer(data, RCFTTrainer)


def test_too_few_choices():
    rows = make_mcq_dataset(2).to_list()
    rows[0]["choices"] = ["only one"]
    with pytest.raises(ValueError, match=r"`choices` \(row 0\) must hold 2 to 26 options, got 1"):
        validate_mcq_dataset(Dataset.from_list(rows))


def test_option_letters_split_over_several_tokens(make_trainer, tok):
    # A plain prompt ending in "Answer:" with the completion " B": the character-level tokenizer makes " " and "B" two
    # tokens, so the answer position holds a space, not a letter
    data = make_mcq_dataset(4, seed=1, conversational=False)
    assert data[0]["prompt"].endswith("Answer:") and data[0]["completion"].startswith(" ")
    message = (
        r"The option letter 'A' is not a single token at the answer position: the tokens after the prompt "
        r"decode to \[' ', 'A'\].* make the completion the bare letter"
    )
    with pytest.raises(ValueError, match=message):
        option_token_ids(tok, data[0]["prompt"], 4, completion=data[0]["completion"])
    with pytest.raises(ValueError, match=message):
        score_multiple_choice(make_model(len(tok)), tok, data, progress=False)
    with pytest.raises(ValueError, match=message):
        make_trainer(data, RCFTTrainer)
    # the fix the message suggests works: the space ends the prompt, the completion is the bare letter
    fixed = Dataset.from_list(
        [{**row, "prompt": row["prompt"] + " ", "completion": row["completion"].strip()} for row in data]
    )
    ids = option_token_ids(tok, fixed[0]["prompt"], 4, completion=fixed[0]["completion"])
    assert [tok.decode([i]) for i in ids] == ["A", "B", "C", "D"]


def test_option_letter_merging_with_the_prompt(tok):
    # a tokenizer that merges "A" with the character before it: the prompt has no answer position
    class Merging:
        def __call__(self, text):
            ids = tok(text=text)["input_ids"]
            if text.endswith("\nA") or text.endswith("\nB"):
                ids = ids[:-2] + [1000 + ids[-1]]
            return {"input_ids": ids}

        def decode(self, ids):
            return tok.decode(ids)

    with pytest.raises(
        ValueError,
        match=r"The option letter 'A' merges with the end of the prompt .* End the prompt "
        r"on a token boundary",
    ):
        option_token_ids(Merging(), "Question?\n", 2, completion="A")


def test_prompts_that_truncation_would_cut_off(make_trainer, tok, caplog):
    data = make_mcq_dataset(4, seed=3)  # prompts of 95 to 109 tokens
    with pytest.raises(
        ValueError,
        match=r"The prompt of row 0 is \d+ tokens long, over `max_length`=50: truncating it "
        r"would cut off the answer position",
    ):
        score_multiple_choice(make_model(len(tok)), tok, data, max_length=50, progress=False)
    # RCFT, loss on the answer only: TRL would silently drop the rows left without completion tokens
    with pytest.raises(
        ValueError,
        match=r"2 of the 4 rows of the train dataset have prompts too long for "
        r"`max_length=100`: truncation cuts off their answer position",
    ):
        make_trainer(data, RCFTTrainer, max_length=100)
    # RCFT, loss on the whole sequence: the rows are kept, without their answer position
    with pytest.raises(
        ValueError,
        match=r"Row \d of the train dataset cannot get RCFT's ECE term: its answer position "
        r"\(\d+\) is outside the 100 tokens kept \(`max_length=100` cuts it off\)",
    ):
        make_trainer(data, RCFTTrainer, max_length=100, sft_loss="prompt_and_completion")
    # `invalid_rows="exclude"` trains them with the SFT loss only, and says how many
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer = make_trainer(data, RCFTTrainer, max_length=100, invalid_rows="exclude", max_steps=1, logging_steps=1)
    assert "2 of the 4 rows of the train dataset were dropped" in caplog.text
    assert len(trainer.train_dataset) == 2
    trainer.train()
    assert [h["rcft/excluded_rows"] for h in trainer.state.log_history if "loss" in h] == [2]
    # CogCalib: the dropped rows are reported too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        make_trainer(data.add_column("known", [1, 0, 1, 0]), max_length=100)
    assert (
        "2 of the 4 rows of the train dataset were dropped: `max_length=100` truncation left them without any "
        "completion token" in caplog.text
    )


def test_rcft_needs_a_dataset_with_choices(make_trainer):
    rows = make_mcq_dataset(4).to_list()
    iterable = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(
        ValueError,
        match=r"RCFT needs a `datasets\.Dataset` \(an `IterableDataset` cannot be scored by "
        r"the E-step\)",
    ):
        make_trainer(iterable, RCFTTrainer)
    with pytest.raises(
        ValueError,
        match=r"The train dataset is missing the column\(s\) \['choices'\]; a "
        r"multiple-choice dataset needs \['prompt', 'choices', 'answer', 'completion'\]",
    ):
        make_trainer(make_mcq_dataset(4).remove_columns("choices"), RCFTTrainer)
    with pytest.raises(ValueError, match=r"`train_dataset` is required"):
        make_trainer(None, RCFTTrainer)


# -- online detection -------------------------------------------------------------------------------------------------


def test_online_detection_needs_a_calibration_dataset(make_trainer):
    message = (
        r"Online detection \(`detection='online'`\) needs a non-empty `calibration_dataset` passed to the trainer"
    )
    for calibration in (None, make_mcq_dataset(2).select([])):
        with pytest.raises(ValueError, match=message):
            make_trainer(make_mcq_dataset(4), detection="online", calibration_dataset=calibration)


def test_online_detection_with_another_kind_of_calibration_data(make_trainer, caplog):
    open_ended = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"Say {w}"}], "completion": [{"role": "assistant", "content": w}]}
            for w in ("cat", "dog")
        ]
    )
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        make_trainer(make_mcq_dataset(4), detection="online", calibration_dataset=open_ended)
    assert (
        "Online detection compares the training NLL (answer letter) with a threshold fitted on open-ended "
        "calibration rows"
    ) in caplog.text


# -- set-ups the terms cannot follow ----------------------------------------------------------------------------------


@pytest.fixture
def parallelism(monkeypatch):
    """
    Makes the accelerator of the next trainer report `parallelism["config"]`: accelerate's `ParallelismConfig` with
    context or sequence parallelism needs several processes to set up, but the trainers only read it.
    """
    from accelerate import Accelerator
    from transformers import Trainer

    chosen = {}
    reported = Accelerator.parallelism_config
    monkeypatch.setattr(
        Accelerator,
        "parallelism_config",
        property(lambda self: self.__dict__.get("_test_parallelism") or reported.fget(self)),
    )
    create = Trainer.create_accelerator_and_postprocess

    def create_and_report(self):
        create(self)
        self.accelerator._test_parallelism = chosen.get("config")

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_and_report)
    return chosen


@pytest.mark.parametrize("sharding", [dict(cp_size=2), dict(sp_size=2)], ids=["context", "sequence"])
def test_context_and_sequence_parallelism_are_refused(make_trainer, parallelism, sharding):
    from accelerate.parallelism_config import ParallelismConfig

    parallelism["config"] = ParallelismConfig(**sharding)
    message = (
        r"Context and sequence parallelism shard each sequence across processes, and calib-trl's per-token flags "
        r"\(known, answer positions\) and per-example answer NLLs are not sharded with it"
    )
    for trainer_class, data, settings in (
        (CalibSFTTrainer, make_mcq_dataset(4, known=True), {}),  # per-token known flags
        (CalibSFTTrainer, make_mcq_dataset(4), dict(detection="online", calibration_dataset=make_mcq_dataset(4))),
        (RCFTTrainer, make_mcq_dataset(4), {}),  # per-token answer positions
    ):
        with pytest.raises(NotImplementedError, match=message):
            make_trainer(data, trainer_class, **settings)
    # without the calibration terms nothing is carried per token: `SFTTrainer`'s own set-up
    trainer = make_trainer(make_mcq_dataset(4, known=True), calibration_loss="none")
    assert trainer.accelerator.parallelism_config is parallelism["config"]


def test_prompt_learning_that_the_terms_cannot_follow_is_refused(make_trainer):
    from peft import CPTConfig, PrefixTuningConfig, PromptTuningConfig

    data = make_mcq_dataset(4, known=True)
    with pytest.raises(
        ValueError,
        match=r"CPT trains on the context tokens it prepends to each sequence, which have no known flags; calib-trl's "
        r"calibration terms support prompt tuning, p-tuning and prefix tuning",
    ):
        make_trainer(data, peft_config=CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7]))
    make_trainer(data, calibration_loss="none", peft_config=CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7]))
    # RCFT's ECE term with virtual tokens before the answer positions
    with pytest.raises(
        ValueError,
        match=r"RCFT's ECE term reads the option-letter logits at each answer position, which prompt-learning virtual "
        r"tokens shift; it is not aligned with them yet\. Use LoRA, prefix tuning, or `ece_weight=0` \(CFT\)",
    ):
        make_trainer(data, RCFTTrainer, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    # the ways out the message names
    make_trainer(
        data, RCFTTrainer, ece_weight=0.0, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    make_trainer(data, RCFTTrainer, peft_config=PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


@pytest.mark.parametrize("strategy", ["wrapped", "bfd_split"])
def test_packing_that_cuts_examples_is_refused_where_examples_must_stay_whole(make_trainer, strategy):
    packing = dict(packing=True, packing_strategy=strategy, max_length=160)
    with pytest.raises(
        ValueError,
        match=rf"Online detection needs each example's tokens together; `packing_strategy='{strategy}'` cuts examples "
        r"across packed rows\. Use `packing_strategy='bfd'`, or precomputed detection",
    ):
        make_trainer(make_mcq_dataset(8), detection="online", calibration_dataset=make_mcq_dataset(4), **packing)
    message = (
        rf"Reading option-letter logits needs each question whole: `packing_strategy='{strategy}'` can cut a question "
        r"off its answer\. Use `packing_strategy='bfd'`"
    )
    with pytest.raises(ValueError, match=message):
        make_trainer(make_mcq_dataset(8), RCFTTrainer, **packing)
    with pytest.raises(ValueError, match=message):
        make_trainer(make_mcq_dataset(8, known=True), calibration_space="options", **packing)
    # what needs no whole example packs with any strategy: precomputed flags on the vocabulary
    make_trainer(make_mcq_dataset(8, known=True), **packing)


# -- non-finite losses ------------------------------------------------------------------------------------------------


class ParameterSnapshots(TrainerCallback):
    def __init__(self):
        self.after_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def _nan_at_call(monkeypatch, module, name, bad_calls):
    """Make `module.name` return NaN on the given (0-based) calls."""
    original = getattr(module, name)
    calls = []

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(None)
        return out * float("nan") if len(calls) - 1 in bad_calls else out

    monkeypatch.setattr(module, name, patched)


def test_nonfinite_loss_raises_by_default(make_trainer, monkeypatch):
    _nan_at_call(monkeypatch, calib_trl.cogcalib.loss, "calibration_term", {1})
    trainer = make_trainer(
        make_mcq_dataset(6), per_device_train_batch_size=2, max_steps=3, apply_to="all", calibration_space="vocabulary"
    )
    with pytest.raises(
        FloatingPointError,
        match=r"The train loss is nan at step 1 \(on this or another process\)\. Lower the learning rate, check the "
        r"data, or set `nonfinite_loss='skip'`",
    ):
        trainer.train()


def _infinite_norm(model):
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    return model


def test_nonfinite_loss_from_an_infinite_weight(make_trainer, tok):
    trainer = make_trainer(
        make_mcq_dataset(4, known=True),
        model=_infinite_norm(make_model(len(tok))),
        per_device_train_batch_size=2,
        max_steps=1,
        calibration_loss="ecp",
    )
    with pytest.raises(FloatingPointError, match=r"The train loss is nan at step 0"):
        trainer.train()


@pytest.mark.parametrize(
    "trainer_class,settings",
    [
        (CalibSFTTrainer, dict(calibration_loss="none")),  # plain SFT: the early path of the loss
        (CalibSFTTrainer, dict(apply_to="none")),
        (RCFTTrainer, dict(ece_weight=0.0)),  # CFT
    ],
)
def test_nonfinite_loss_is_caught_with_calibration_off(make_trainer, tok, trainer_class, settings):
    trainer = make_trainer(
        make_mcq_dataset(4),
        trainer_class,
        model=_infinite_norm(make_model(len(tok))),
        per_device_train_batch_size=2,
        max_steps=1,
        **settings,
    )
    with pytest.raises(FloatingPointError, match=r"The train loss is nan at step 0"):
        trainer.train()


def test_nonfinite_guard_runs_once_per_micro_batch_when_rcft_and_cogcalib_combine(make_trainer, monkeypatch):
    calls = []
    guard = RCFTTrainer._guard_nonfinite

    def counting(self, loss, model):
        calls.append(self.state.global_step)
        return guard(self, loss, model)

    monkeypatch.setattr(RCFTTrainer, "_guard_nonfinite", counting)
    trainer = make_trainer(
        make_mcq_dataset(8, known=True),
        RCFTTrainer,
        per_device_train_batch_size=2,
        max_steps=2,
        gradient_accumulation_steps=2,
        calibration_loss="ecp",
    )
    trainer.train()
    assert calls == [0, 0, 1, 1]  # 2 steps of 2 micro-batches


def test_nonfinite_rcft_loss_raises_or_is_skipped(make_trainer, monkeypatch):
    _nan_at_call(monkeypatch, calib_trl.rcft.loss, "rcft_ece_loss", {0, 1})  # each trainer's first step
    trainer = make_trainer(make_mcq_dataset(4), RCFTTrainer, per_device_train_batch_size=2, max_steps=1)
    with pytest.raises(FloatingPointError, match=r"The train loss is nan at step 0"):
        trainer.train()
    trainer = make_trainer(
        make_mcq_dataset(4),
        RCFTTrainer,
        per_device_train_batch_size=2,
        max_steps=2,
        nonfinite_loss="skip",
        logging_steps=1,
    )
    trainer.train()
    assert [h["calib/skipped_steps"] for h in trainer.state.log_history if "loss" in h] == [1, 1]


def test_nonfinite_loss_skip_leaves_the_parameters_unchanged(make_trainer, monkeypatch):
    _nan_at_call(monkeypatch, calib_trl.cogcalib.loss, "calibration_term", {1})
    snapshots = ParameterSnapshots()
    # plain SGD: an update is exactly the step's gradient, so a skipped step leaves every parameter as it was
    trainer = make_trainer(
        make_mcq_dataset(8),
        callbacks=[snapshots],
        per_device_train_batch_size=2,
        max_steps=4,
        nonfinite_loss="skip",
        optim="sgd",
        learning_rate=0.1,
        logging_steps=1,
        apply_to="all",
        calibration_space="vocabulary",  # the NaN is put into the vocabulary-space term
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 4
    after = snapshots.after_step

    def changed(a, b):
        return any(not torch.equal(a[n], b[n]) for n in a)

    assert changed(before, after[1])
    assert not changed(after[1], after[2])  # the NaN step
    assert changed(after[2], after[3]) and changed(after[3], after[4])  # training goes on
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["calib/skipped_steps"] for h in logs] == [0, 1, 1, 1]
    assert all(math.isfinite(h["loss"]) for h in logs)


# -- hyperparameters --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ls_epsilon=1.0), r"`ls_epsilon` must be in \[0\.0, 1\.0\), got 1\.0"),
        (dict(ls_epsilon=-0.1), r"`ls_epsilon` must be in \[0\.0, 1\.0\), got -0\.1"),
        (dict(ls_epsilon=float("nan")), r"`ls_epsilon` must be in \[0\.0, 1\.0\), got nan"),
        (dict(mbls_margin=-1.0), r"`mbls_margin` must be >= 0\.0, got -1\.0"),
        (dict(mbls_lambda=-0.1), r"`mbls_lambda` must be >= 0\.0, got -0\.1"),
        (dict(ecp_beta=-1.0), r"`ecp_beta` must be >= 0\.0, got -1\.0"),
        (dict(calibration_weight=1.5), r"`calibration_weight` must be in \[0\.0, 1\.0\], got 1\.5"),
        (dict(calibration_weight=-0.1), r"`calibration_weight` must be in \[0\.0, 1\.0\], got -0\.1"),
        (
            dict(calibration_loss="focal"),
            r"`calibration_loss` must be one of \['ls', 'mbls', 'ecp', 'none'\], got 'focal'",
        ),
        (dict(apply_to="some"), r"`apply_to` must be one of \['known', 'all', 'none'\], got 'some'"),
        (dict(detection="always"), r"`detection` must be one of \['auto', 'precomputed', 'online'\], got 'always'"),
        (dict(unfitted_threshold="ignore"), r"`unfitted_threshold` must be one of \['raise', 'warn'\], got 'ignore'"),
        (dict(auto_detection_samples=1), r"`auto_detection_samples` must be >= 2, got 1"),
        (dict(answer_nll="last"), r"`answer_nll` must be one of \['auto', 'first', 'mean'\], got 'last'"),
        (dict(nonfinite_loss="ignore"), r"`nonfinite_loss` must be one of \['raise', 'skip'\], got 'ignore'"),
        (dict(online_refit_steps=0), r"`online_refit_steps` must be >= 1, got 0"),
        (dict(online_calibration_samples=1), r"`online_calibration_samples` must be >= 2 \(or unset\), got 1"),
    ],
)
def test_invalid_calib_sft_hyperparameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibSFTConfig(str(tmp_path), report_to=[], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_bins=1), r"`n_bins` must be an integer >= 2, got 1"),
        (dict(n_bins=0), r"`n_bins` must be an integer >= 2, got 0"),
        (dict(ece_weight=1.5), r"`ece_weight` must be in \[0\.0, 1\.0\], got 1\.5"),
        (dict(ece_weight=-0.5), r"`ece_weight` must be in \[0\.0, 1\.0\], got -0\.5"),
        (dict(ece_scale=-1.0), r"`ece_scale` must be >= 0\.0, got -1\.0"),
        (
            dict(bin_refresh="sometimes"),
            r"`bin_refresh` must be 'once', 'epoch' or a positive number of steps, got "
            r"'sometimes'",
        ),
        (dict(bin_refresh="0"), r"`bin_refresh` must be .* a positive number of steps, got '0'"),
        (dict(bin_refresh=-5), r"`bin_refresh` must be .* a positive number of steps, got '-5'"),
        (dict(bin_refresh=2.5), r"`bin_refresh` must be .* a positive number of steps, got '2\.5'"),
        (dict(bin_refresh=""), r"`bin_refresh` must be .* a positive number of steps, got ''"),
        (dict(sft_loss="all"), r"`sft_loss` must be one of \['completion', 'prompt_and_completion'\], got 'all'"),
        (dict(invalid_rows="drop"), r"`invalid_rows` must be one of \['raise', 'exclude'\], got 'drop'"),
        (dict(estep_samples=5), r"`estep_samples` must be at least `n_bins` \(10\), got 5"),
        (
            dict(sft_loss="completion", completion_only_loss=False),
            r"`sft_loss='completion'` contradicts `completion_only_loss=False`",
        ),
    ],
)
def test_invalid_rcft_hyperparameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RCFTConfig(str(tmp_path), report_to=[], **kwargs)


def test_valid_edge_values_are_accepted(tmp_path):
    # the ends of each range are valid (no error); what a zero calibration weight trains is tested in
    # test_calib_sft_trainer.py
    CalibSFTConfig(str(tmp_path), report_to=[], ls_epsilon=0.0, mbls_margin=0.0, calibration_weight=1.0)
    CalibSFTConfig(str(tmp_path), report_to=[], calibration_weight=0.0)
    config = RCFTConfig(str(tmp_path), report_to=[], n_bins=2, ece_weight=1.0, bin_refresh=7, estep_samples=None)
    assert config.bin_refresh == "7"  # a number of steps, as `bin_refresh="7"` gives it


def test_wrong_config_class_and_incompatible_sft_options(make_trainer, tmp_path):
    with pytest.raises(
        TypeError,
        match=r"`args` must be an instance of `CalibSFTConfig`, `trl\.SFTConfig` or `TrainingArguments`, got dict",
    ):
        make_trainer(with_known([1, 0]), args={"output_dir": str(tmp_path)})
    with pytest.raises(
        TypeError,
        match=r"`args` must be an instance of `RCFTConfig`, got CalibSFTConfig, which configures another calib-trl "
        r"trainer",
    ):
        make_trainer(make_mcq_dataset(2), RCFTTrainer, args=make_config(CalibSFTConfig, tmp_path))
    with pytest.raises(
        ValueError,
        match=r"`label_smoothing_factor` and `compute_loss_func` replace the fused LM head's "
        r"loss and cannot be combined with a calibration loss",
    ):
        make_trainer(with_known([1, 0]), label_smoothing_factor=0.1)


def test_formatting_func_is_refused_by_rcft(make_trainer):
    with pytest.raises(
        ValueError,
        match=r"RCFT needs prompt/completion rows to find the answer position; a "
        r"`formatting_func` turns them into plain text",
    ):
        make_trainer(
            make_mcq_dataset(2),
            RCFTTrainer,
            sft_loss="prompt_and_completion",
            formatting_func=lambda row: row["prompt"][0]["content"],
        )


def test_mcq_example_with_bad_answer():
    with pytest.raises(ValueError, match=r"`answer` is 'Z', which is not among the 3 choices \(A, B, C\)"):
        make_mcq_example("Which?", ["a", "b", "c"], "Z")
    with pytest.raises(ValueError, match=r"`choices` must hold 2 to 26 options, got 1"):
        make_mcq_example("Which?", ["a"], 0)


def test_rcft_config_shows_rcft_and_the_combined_config_both(tmp_path):
    # RCFTConfig has RCFT's parameters only; CogCalib's come with CalibRCFTConfig, validated as in CalibSFTConfig
    with pytest.raises(TypeError, match="calibration_weight"):
        RCFTConfig(str(tmp_path), calibration_weight=0.5)
    # no CogCalib field is attached to RCFTConfig (nor read from it): RCFTTrainer holds CogCalib's part only with them
    assert not any(hasattr(RCFTConfig(str(tmp_path)), name) for name in ("calibration_loss", "has_calibration_term"))
    with pytest.raises(ValueError, match=r"`calibration_weight` must be in \[0\.0, 1\.0\], got 2\.0"):
        CalibRCFTConfig(str(tmp_path), calibration_weight=2.0)
    with pytest.raises(ValueError, match=r"`ece_weight` must be in \[0\.0, 1\.0\], got 1\.5"):
        CalibRCFTConfig(str(tmp_path), ece_weight=1.5)
    both = CalibRCFTConfig(str(tmp_path), calibration_loss="ls", ece_weight=0.25)
    assert both.has_calibration_term and (both.calibration_loss, both.ece_weight) == ("ls", 0.25)
