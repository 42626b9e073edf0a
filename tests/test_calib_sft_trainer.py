"""CalibSFTTrainer: losses and gradients against a full-logits reference, in padded, padding-free and packed batches."""

import copy
import logging

import pytest
import torch
from helpers import (
    NOT_INPUTS,
    QUIET,
    first_batch,
    grads,
    letter_ids,
    make_mcq_dataset,
    make_model,
    mixed_choices_dataset,
    option_reference_loss,
    reference_loss,
    trainer_loss_and_grads,
)
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from trl import SFTConfig, SFTTrainer

from calib_trl.cogcalib.calib_sft_config import DEFAULT_LS_EPSILON
from calib_trl.core.columns import ANSWER_TOKEN_COLUMN, NUM_CHOICES_COLUMN

MODES = {
    "padded": dict(max_length=1024),
    "padding_free": dict(padding_free=True, max_length=None),
    "packed": dict(packing=True, max_length=160),
}


def run_both(make_trainer, mode, peft=False, virtual_tokens=0, model=None, **kwargs):
    """The trainer's loss and gradients, and those of the vocabulary-space reference (the option space has its own)."""
    kwargs.setdefault("calibration_space", "vocabulary")
    data = make_mcq_dataset(12, seed=1, known=True)
    if peft is True:
        peft = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = make_trainer(data, model=model, model_seed=3, peft_config=peft or None, **MODES[mode], **kwargs)
    args = trainer.args
    batch = first_batch(trainer)
    if args.apply_to == "known":
        assert batch["known"].shape == batch["input_ids"].shape
    else:  # nothing to carry
        assert "known" not in batch
    model = trainer.model
    loss, fused, num_items = trainer_loss_and_grads(trainer, batch)
    ref = reference_loss(model, batch, args, num_items, virtual_tokens)
    ref.backward()
    reference = grads(model)
    model.zero_grad()
    return loss, ref, fused, reference, batch


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", ["ls", "mbls", "ecp"])
def test_loss_and_gradients_match_full_logits_reference(make_trainer, mode, method):
    # mbls with a margin small enough that many logits are inside and outside it
    loss, ref, fused, reference, batch = run_both(
        make_trainer,
        mode,
        calibration_loss=method,
        mbls_margin=2.0,
        ls_epsilon=0.3,
        ecp_beta=0.7,
        calibration_weight=0.8,
    )
    known = batch["known"][:, 1:][batch["labels"][:, 1:] != -100]
    assert 0 < known.sum() < known.numel(), "the batch must mix known and unknown tokens"
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert fused.keys() == reference.keys()
    assert "model.embed_tokens.weight" in fused  # the (tied) LM head receives gradient
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ls", "mbls", "ecp"])
def test_lora_gradients_match_reference(make_trainer, method):
    loss, ref, fused, reference, _ = run_both(
        make_trainer, "padded", peft=True, calibration_loss=method, mbls_margin=2.0
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    lora = [n for n in fused if "lora_" in n]
    assert lora, "LoRA parameters must receive gradient"
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


PROMPT_LEARNING = {
    "prompt_tuning": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), 5),
    "p_tuning": (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16), 3),
    "prefix_tuning": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), 0),  # in the attention cache
}


@pytest.mark.parametrize("peft", list(PROMPT_LEARNING))
@pytest.mark.parametrize("method", ["ls", "mbls", "ecp"])
def test_prompt_learning_matches_reference(make_trainer, method, peft):
    # The virtual tokens shift the fused head's outputs against the batch's labels and flags
    peft_config, virtual_tokens = PROMPT_LEARNING[peft]
    loss, ref, fused, reference, batch = run_both(
        make_trainer,
        "padded",
        peft=copy.deepcopy(peft_config),
        virtual_tokens=virtual_tokens,
        calibration_loss=method,
        mbls_margin=2.0,
    )
    known = batch["known"][:, 1:][batch["labels"][:, 1:] != -100]
    assert 0 < known.sum() < known.numel()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert fused and fused.keys() == reference.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_apply_to_all_matches_reference(make_trainer):
    loss, ref, fused, reference, _ = run_both(make_trainer, "padding_free", calibration_loss="ls", apply_to="all")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_calibration_loss_none_reproduces_sft_trainer_exactly(make_trainer, tok, tmp_path, mode):
    data = make_mcq_dataset(12, seed=2, known=True)
    calib = make_trainer(
        data,
        model_seed=5,
        output_dir=tmp_path / "a",
        calibration_loss="none",
        max_steps=3,
        logging_steps=1,
        **MODES[mode],
    )
    sft = SFTTrainer(
        model=make_model(len(tok), seed=5),
        args=SFTConfig(
            str(tmp_path / "b"), **QUIET, per_device_train_batch_size=4, max_steps=3, logging_steps=1, **MODES[mode]
        ),
        train_dataset=data.remove_columns("known"),
        processing_class=tok,
    )
    calib.train()
    sft.train()
    losses_a = [h["loss"] for h in calib.state.log_history if "loss" in h]
    losses_b = [h["loss"] for h in sft.state.log_history if "loss" in h]
    assert len(losses_a) == 3 and losses_a == losses_b
    for (n, a), (_, b) in zip(calib.model.named_parameters(), sft.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("case", ["no_known_example", "zero_weight"])
def test_no_calibration_term_equals_plain_cross_entropy(make_trainer, case):
    # no example is known, or the known ones get the term with weight 0
    if case == "no_known_example":
        with pytest.warns(UserWarning, match="No example of the train dataset is known"):
            trainer = make_trainer(make_mcq_dataset(12, seed=2, known=False), calibration_loss="ecp")
    else:
        trainer = make_trainer(
            make_mcq_dataset(12, seed=2, known=True), calibration_loss="ecp", calibration_weight=0.0
        )
    batch = first_batch(trainer)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "known")}
    logits = trainer.model(**inputs).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(loss, ce / num_items, rtol=1e-5, atol=1e-6)


def test_softcapped_head_falls_back_to_exact_chunked_terms(make_trainer, tok):
    # With final-logit soft-capping the LS identity does not hold: the exact chunked path must agree with the reference
    for method in ("ls", "mbls"):
        loss, ref, fused, reference, _ = run_both(
            make_trainer,
            "padded",
            model=_softcap(make_model(len(tok), seed=3)),
            calibration_loss=method,
            mbls_margin=1.0,
        )
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for name in fused:
            torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6)


def _softcap(model):
    model.config.final_logit_softcapping = 3.0
    forward = model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = capped
    return model


def test_activation_checkpointing_gives_the_same_loss_and_gradients(make_trainer, tmp_path):
    # The hidden states are read from the backbone's output, outside the checkpointed layers
    results = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            make_mcq_dataset(12, seed=1, known=True),
            model_seed=3,
            output_dir=tmp_path / str(checkpointing),
            calibration_loss="ls",
            activation_checkpointing=checkpointing,
        )
        if checkpointing:  # as `Trainer.train` does before its first step
            trainer.model.activation_checkpointing_enable()
        assert trainer.model.is_activation_checkpointing == checkpointing
        batch = first_batch(trainer)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        results.append((loss.detach(), grads(trainer.model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_evaluate_reports_the_calibrated_loss(make_trainer):
    evaluation = make_mcq_dataset(8, seed=9, known=True)
    trainer = make_trainer(
        make_mcq_dataset(8, known=True),
        model_seed=3,
        eval_dataset=evaluation,
        calibration_loss="ecp",
        ecp_beta=0.7,
        calibration_space="vocabulary",  # the reference below is the vocabulary-space loss
        per_device_eval_batch_size=8,
    )
    metrics = trainer.evaluate()
    batch = next(iter(trainer.get_eval_dataloader()))
    labels = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        ref = reference_loss(trainer.model.eval(), batch, trainer.args, int(labels.sum()))
    assert metrics["eval_loss"] == pytest.approx(ref.item(), rel=1e-5)
    # the share of the evaluation loss tokens that get the term: those of the known rows
    known = (batch["known"][:, 1:] > 0.5) & labels
    assert 0 < known.sum() < labels.sum()
    assert metrics["eval_calib/known_fraction"] == pytest.approx((known.sum() / labels.sum()).item())


# ---------------------------------------------------------------------------------------------------------------------
# calibration_space="options": the terms on the softmax over the option letters at the answer token
# ---------------------------------------------------------------------------------------------------------------------


def run_options(make_trainer, mode, peft=False, online=False, **kwargs):
    data = mixed_choices_dataset()
    if online:
        kwargs.update(detection="online", calibration_dataset=make_mcq_dataset(16, seed=7))
    kwargs.setdefault("per_device_train_batch_size", 8)  # enough rows to mix known and unknown, 3 and 4 options
    trainer = make_trainer(
        data.remove_columns("known") if online else data,
        model_seed=3,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if peft else None,
        calibration_space="options",
        **MODES[mode],
        **kwargs,
    )
    batch = first_batch(trainer)
    assert batch[ANSWER_TOKEN_COLUMN].shape == batch[NUM_CHOICES_COLUMN].shape == batch["input_ids"].shape
    model = trainer.model
    loss, fused, num_items = trainer_loss_and_grads(trainer, batch)
    known = None
    if online:  # the flags online detection gives: the answer letter's NLL against the fitted threshold
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
            logp = model(**inputs, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
        labels = batch["labels"][:, 1:]
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        answers = batch[ANSWER_TOKEN_COLUMN][:, 1:] > 0
        # `compute_loss` was called outside `train()`, so nothing reached the logs: the threshold the detector fitted
        # (in that call) is read off the detector itself
        known = answers & (nll <= trainer.detector.threshold)
        assert 0 < known.sum() < answers.sum(), "online detection must flag some answers known and some not"
    ref = option_reference_loss(model, batch, trainer.args, num_items, letter_ids(trainer.processing_class), known)
    ref.backward()
    reference = grads(model)
    model.zero_grad()
    return loss, ref, fused, reference, batch


def assert_matches(loss, ref, fused, reference):
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert fused.keys() == reference.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", ["ls", "mbls", "ecp"])
def test_option_space_loss_and_gradients_match_full_logits_reference(make_trainer, mode, method):
    loss, ref, fused, reference, batch = run_options(
        make_trainer,
        mode,
        calibration_loss=method,
        mbls_margin=0.5,
        ls_epsilon=0.3,
        ecp_beta=0.7,
        calibration_weight=0.8,
    )
    answers = batch[ANSWER_TOKEN_COLUMN] > 0
    known = batch["known"][answers]
    assert 0 < known.sum() < known.numel(), "the batch must mix known and unknown answers"
    assert {3, 4} <= set(batch[NUM_CHOICES_COLUMN][answers].long().tolist()), "rows with 3 and 4 options"
    assert "model.embed_tokens.weight" in fused
    assert_matches(loss, ref, fused, reference)


@pytest.mark.parametrize("apply_to", ["known", "all"])
def test_option_space_with_lora_and_apply_to(make_trainer, apply_to):
    assert_matches(*run_options(make_trainer, "padded", peft=True, calibration_loss="ecp", apply_to=apply_to)[:4])


def test_option_space_with_online_detection(make_trainer):
    # threshold fitted on a small calibration set of the same (tiny, random) model
    assert_matches(*run_options(make_trainer, "padding_free", online=True, calibration_loss="ls")[:4])


def test_option_space_leaves_the_letters_share_of_the_vocabulary_to_cross_entropy():
    # Adding the same constant to every option logit changes no option-space term: their gradient along the
    # direction "all option rows of the LM head together" is zero, so they cannot move mass off the letters.
    from calib_trl.losses import option_calibration_term

    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([4, 4, 3, 3, 2, 4])
    y = torch.tensor([0, 3, 1, 2, 1, 2])
    for method in ("ls", "mbls", "ecp"):
        term = option_calibration_term(method, z, k, y, ls_epsilon=0.4, mbls_margin=0.5, mbls_lambda=0.3, ecp_beta=1.5)
        (grad,) = torch.autograd.grad(term.sum(), z)
        valid = torch.arange(4)[None, :] < k[:, None]
        torch.testing.assert_close((grad * valid).sum(-1), torch.zeros(6, dtype=torch.float64), msg=method)
        assert (grad[~valid] == 0).all(), method  # options a row does not have get nothing


def test_auto_space_takes_the_options_where_it_can_and_says_why_not_elsewhere(make_trainer, caplog):
    from datasets import IterableDataset

    mcq = make_mcq_dataset(8, known=True)
    with caplog.at_level(logging.INFO, logger="calib_trl"):
        assert make_trainer(mcq).calibration_space == "options"  # the default is "auto"
    assert (
        "calibration_space='auto': the calibration term acts on the option letters at the answer token" in caplog.text
    )
    rows = mcq.to_list()
    cannot = {
        "an `IterableDataset` cannot be searched": (
            IterableDataset.from_generator(lambda: iter(rows)),
            {"max_steps": 2},
        ),
        "they are not prompt/completion rows": (
            mcq.map(lambda r: {"messages": r["prompt"] + r["completion"]}, remove_columns=["prompt", "completion"]),
            {},
        ),
        "`packing_strategy='wrapped'` can cut a question off its answer": (
            mcq,
            dict(packing=True, packing_strategy="wrapped", max_length=128),
        ),
    }
    for why, (data, settings) in cannot.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="calib_trl"):
            trainer = make_trainer(data, **settings)
        assert trainer.calibration_space == "vocabulary", why
        assert f"calibration_space='auto': the rows are multiple choice, but {why}" in caplog.text
        assert "watch `answer_mass`" in caplog.text


def test_option_space_needs_multiple_choice_data(make_trainer, caplog):
    from datasets import Dataset

    data = Dataset.from_list([{"prompt": "2+2=", "completion": " 4", "known": k} for k in (True, False) * 2])
    with pytest.raises(ValueError, match=r"`calibration_space='options'` .* needs multiple-choice rows"):
        make_trainer(data, calibration_space="options")
    # "vocabulary": the papers' loss over the whole vocabulary
    vocabulary = make_trainer(data, calibration_space="vocabulary", calibration_loss="ls")
    batch = first_batch(vocabulary)
    assert ANSWER_TOKEN_COLUMN not in batch
    loss, _, num_items = trainer_loss_and_grads(vocabulary, batch)
    ref = reference_loss(vocabulary.model, batch, vocabulary.args, num_items)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # "auto" with the defaults: the vocabulary, and the rule's choice there (CoLS, ε 0.1), written into the run's args
    with caplog.at_level(logging.INFO, logger="calib_trl"):
        auto = make_trainer(data, calibration_space="auto")
    assert "calibration_space='auto': the calibration term acts on the whole vocabulary" in caplog.text
    assert auto.calibration_space == "vocabulary" and auto.adds_terms
    assert (
        (auto.args.calibration_loss, auto.args.ls_epsilon) == ("ls", DEFAULT_LS_EPSILON["vocabulary"]) == ("ls", 0.1)
    )
    auto_batch = first_batch(auto)
    loss, _, num_items = trainer_loss_and_grads(auto, auto_batch)
    torch.testing.assert_close(
        loss, reference_loss(auto.model, auto_batch, auto.args, num_items), rtol=1e-5, atol=1e-5
    )
    plain = copy.copy(auto.args)
    plain.calibration_loss = "none"
    assert not torch.allclose(loss, reference_loss(auto.model, auto_batch, plain, num_items))  # the term is on
    # the model card names the loss and weight the run used
    auto.create_model_card()
    text = open(f"{auto.args.output_dir}/README.md").read()
    assert "| calibration_loss | ls |" in text and "| ls_epsilon | 0.1 |" in text
