"""CalibSFTTrainer: losses and gradients against a full-logits reference, in padded, padding-free and packed batches."""

import copy

import pytest
import torch
from helpers import make_mcq_dataset, make_model, make_tokenizer
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from trl import SFTConfig, SFTTrainer

from calib_trl import CalibSFTConfig, CalibSFTTrainer
from calib_trl.trainer_mixin import ANSWER_COLUMN

MODES = {
    "padded": dict(max_length=1024),
    "padding_free": dict(padding_free=True, max_length=None),
    "packed": dict(packing=True, max_length=160),
}


def config(tmp_path, mode="padded", **kwargs):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=False,
        shuffle_dataset=False,
    )
    base.update(MODES[mode])
    base.update(kwargs)
    return CalibSFTConfig(**base)


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v for k, v in batch.items()}


def reference_loss(model, batch, args, num_items, virtual_tokens=0):
    """
    The CogCalib loss from the full `[B, T, V]` logits, written literally from the method definitions. With
    prompt-learning PEFT, the logits also cover the `virtual_tokens` positions it prepends, whose labels are -100.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "known")}
    logits = model(**inputs, use_cache=False).logits.float()[:, :-1]
    labels = batch["labels"]
    known = batch["known"] if "known" in batch else torch.zeros_like(labels, dtype=torch.float)
    if virtual_tokens:
        labels = torch.cat([labels.new_full((labels.shape[0], virtual_tokens), -100), labels], dim=1)
        known = torch.cat([known.new_zeros((known.shape[0], virtual_tokens)), known], dim=1)
    assert logits.shape[1] == labels.shape[1] - 1
    labels = labels[:, 1:]
    mask = labels != -100
    known = known[:, 1:] > 0.5
    selected = mask & (known if args.apply_to == "known" else torch.ones_like(mask))
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if args.calibration_loss == "ls":
        eps = args.ls_epsilon
        method = (1 - eps) * nll + eps * (-logp).mean(-1)
    elif args.calibration_loss == "mbls":
        top = logits.max(-1, keepdim=True).values
        method = nll + args.mbls_lambda * (top - logits - args.mbls_margin).clamp(min=0).mean(-1)
    elif args.calibration_loss == "ecp":
        entropy = -(logp.exp() * logp).sum(-1)
        method = nll - args.ecp_beta * entropy
    else:
        method = nll
    per_token = torch.where(selected, nll + args.calibration_weight * (method - nll), nll)
    return (per_token * mask).sum() / num_items


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def run_both(tmp_path, mode, peft=False, virtual_tokens=0, **kwargs):
    tok = make_tokenizer()
    data = make_mcq_dataset(12, seed=1, known=True)
    model = make_model(len(tok), seed=3)
    args = config(tmp_path, mode, **kwargs)
    if peft is True:
        peft = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = CalibSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft or None,
    )
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


def trainer_loss_and_grads(trainer, batch):
    """The trainer's loss on one batch (normalised by its completion tokens) and the gradients it gives."""
    model = trainer.model
    model.train()
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    loss.backward()
    fused = grads(model)
    model.zero_grad()
    return loss, fused, num_items


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", ["ls", "mbls", "ecp"])
def test_loss_and_gradients_match_full_logits_reference(tmp_path, mode, method):
    # mbls with a margin small enough that many logits are inside and outside it
    loss, ref, fused, reference, batch = run_both(
        tmp_path, mode, calibration_loss=method, mbls_margin=2.0, ls_epsilon=0.3, ecp_beta=0.7, calibration_weight=0.8
    )
    known = batch["known"][:, 1:][batch["labels"][:, 1:] != -100]
    assert 0 < known.sum() < known.numel(), "the batch must mix known and unknown tokens"
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert fused.keys() == reference.keys()
    assert "model.embed_tokens.weight" in fused  # the (tied) LM head receives gradient
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ls", "mbls", "ecp"])
def test_lora_gradients_match_reference(tmp_path, method):
    loss, ref, fused, reference, _ = run_both(tmp_path, "padded", peft=True, calibration_loss=method, mbls_margin=2.0)
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
def test_prompt_learning_matches_reference(tmp_path, method, peft):
    # The virtual tokens shift the fused head's outputs against the batch's labels and flags
    peft_config, virtual_tokens = PROMPT_LEARNING[peft]
    loss, ref, fused, reference, batch = run_both(
        tmp_path,
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


def test_apply_to_all_matches_reference(tmp_path):
    loss, ref, fused, reference, _ = run_both(tmp_path, "padding_free", calibration_loss="ls", apply_to="all")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_calibration_loss_none_reproduces_sft_trainer_exactly(tmp_path, mode):
    tok = make_tokenizer()
    data = make_mcq_dataset(12, seed=2, known=True)
    calib = CalibSFTTrainer(
        model=make_model(len(tok), seed=5),
        args=config(tmp_path / "a", mode, calibration_loss="none", max_steps=3),
        train_dataset=data,
        processing_class=tok,
    )
    kwargs = dict(
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=False,
        shuffle_dataset=False,
        max_steps=3,
        bf16=False,
        **MODES[mode],
    )
    sft = SFTTrainer(
        model=make_model(len(tok), seed=5),
        args=SFTConfig(str(tmp_path / "b"), **kwargs),
        train_dataset=data.remove_columns("known"),
        processing_class=tok,
    )
    calib.train()
    sft.train()
    losses_a = [h["loss"] for h in calib.state.log_history if "loss" in h]
    losses_b = [h["loss"] for h in sft.state.log_history if "loss" in h]
    assert losses_a == losses_b
    for (n, a), (_, b) in zip(calib.model.named_parameters(), sft.model.named_parameters()):
        assert torch.equal(a, b), n


def test_no_known_examples_equals_plain_cross_entropy(tmp_path):
    tok = make_tokenizer()
    data = make_mcq_dataset(12, seed=2, known=False)
    with pytest.warns(UserWarning, match="No example of the train dataset is known"):
        trainer = CalibSFTTrainer(
            model=make_model(len(tok)),
            args=config(tmp_path, calibration_loss="ecp"),
            train_dataset=data,
            processing_class=tok,
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


def test_softcapped_head_falls_back_to_exact_chunked_terms(tmp_path, monkeypatch):
    # With final-logit soft-capping the LS identity does not hold: the exact chunked path must agree with the reference
    import helpers

    original = helpers.make_model
    monkeypatch.setattr(helpers, "make_model", lambda *a, **k: _softcap(original(*a, **k)))
    globals()["make_model"] = helpers.make_model
    try:
        for method in ("ls", "mbls"):
            loss, ref, fused, reference, _ = run_both(tmp_path, "padded", calibration_loss=method, mbls_margin=1.0)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            for name in fused:
                torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6)
    finally:
        globals()["make_model"] = original


def _softcap(model):
    model.config.final_logit_softcapping = 3.0
    forward = model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = capped
    return model


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    # The hidden states are read from the backbone's output, outside the checkpointed layers
    results = []
    for checkpointing in (False, True):
        tok = make_tokenizer()
        trainer = CalibSFTTrainer(
            model=make_model(len(tok), seed=3),
            args=config(tmp_path / str(checkpointing), calibration_loss="ls", activation_checkpointing=checkpointing),
            train_dataset=make_mcq_dataset(12, seed=1, known=True),
            processing_class=tok,
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


def test_evaluate_reports_the_calibrated_loss(tmp_path):
    tok = make_tokenizer()
    evaluation = make_mcq_dataset(8, seed=9, known=True)
    args = config(tmp_path, calibration_loss="ecp", ecp_beta=0.7, per_device_eval_batch_size=8)
    trainer = CalibSFTTrainer(
        model=make_model(len(tok), seed=3),
        args=args,
        train_dataset=make_mcq_dataset(8, known=True),
        eval_dataset=evaluation,
        processing_class=tok,
    )
    metrics = trainer.evaluate()
    batch = next(iter(trainer.get_eval_dataloader()))
    with torch.no_grad():
        num_items = int((batch["labels"][:, 1:] != -100).sum())
        ref = reference_loss(trainer.model.eval(), batch, args, num_items)
    assert metrics["eval_loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert 0 < metrics["eval_calib/known_fraction"] < 1


# ---------------------------------------------------------------------------------------------------------------------
# calibration_space="options": the terms on the softmax over the option letters at the answer token
# ---------------------------------------------------------------------------------------------------------------------


def option_reference_loss(model, batch, args, num_items, option_ids, known=None):
    """
    The option-space loss from the full `[B, T, V]` logits: cross-entropy on every token, plus, at the answer token of
    each selected example, `calibration_weight * (L_method - NLL)` on the softmax over that row's option letters.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "known", ANSWER_COLUMN)}
    logits = model(**inputs, use_cache=False).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits.log_softmax(-1)
    per_token = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    answers = batch[ANSWER_COLUMN][:, 1:]
    if known is None:
        known = batch["known"][:, 1:] > 0.5 if args.apply_to == "known" else torch.ones_like(mask)
    picked = (answers > 0) & known & mask
    assert picked.any()
    terms = []
    for r, t in picked.nonzero().tolist():
        k = int(answers[r, t])
        z = logits[r, t, option_ids[:k]]
        y = option_ids.index(int(labels[r, t]))
        lp = z.log_softmax(-1)
        if args.calibration_loss == "ls":
            method = (1 - args.ls_epsilon) * -lp[y] + args.ls_epsilon * (-lp).mean()
            term = method - -lp[y]
        elif args.calibration_loss == "mbls":
            term = args.mbls_lambda * (z.max() - z - args.mbls_margin).clamp(min=0).mean()
        else:
            term = args.ecp_beta * (lp.exp() * lp).sum()
        terms.append(((r, t), term))
    extra = torch.zeros_like(per_token)
    for (r, t), term in terms:
        extra = extra.index_put((torch.tensor([r]), torch.tensor([t])), term.reshape(1), accumulate=True)
    per_token = per_token + args.calibration_weight * extra
    return (per_token * mask).sum() / num_items


def mixed_choices_dataset(n=12, seed=1):
    """Rows with 4 options and rows with 3, so that the softmax over each row's own options is exercised."""
    from datasets import concatenate_datasets

    return concatenate_datasets(
        [
            make_mcq_dataset(n // 2, seed=seed, known=True),
            make_mcq_dataset(n - n // 2, seed=seed + 50, num_choices=3, known=True),
        ]
    ).shuffle(seed=seed)


def run_options(tmp_path, mode, peft=False, online=False, **kwargs):
    tok = make_tokenizer()
    data = mixed_choices_dataset()
    model = make_model(len(tok), seed=3)
    if online:
        kwargs.update(detection="online")
    kwargs.setdefault("per_device_train_batch_size", 8)  # enough rows to mix known and unknown, 3 and 4 options
    args = config(tmp_path, mode, calibration_space="options", **kwargs)
    trainer = CalibSFTTrainer(
        model=model,
        args=args,
        train_dataset=data.remove_columns("known") if online else data,
        processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if peft else None,
        calibration_dataset=make_mcq_dataset(16, seed=7) if online else None,
    )
    batch = first_batch(trainer)
    assert batch[ANSWER_COLUMN].shape == batch["input_ids"].shape
    model = trainer.model
    loss, fused, num_items = trainer_loss_and_grads(trainer, batch)
    known = None
    if online:  # the flags online detection gives: the answer letter's NLL against the fitted threshold
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k not in ("labels", ANSWER_COLUMN)}
            logp = model(**inputs, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
        labels = batch["labels"][:, 1:]
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        answers = batch[ANSWER_COLUMN][:, 1:] > 0
        known = answers & (nll <= trainer.detector.threshold)
        assert 0 < known.sum() < answers.sum(), "online detection must flag some answers known and some not"
    ref = option_reference_loss(model, batch, args, num_items, list(trainer._option_ids), known=known)
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
def test_option_space_loss_and_gradients_match_full_logits_reference(tmp_path, mode, method):
    loss, ref, fused, reference, batch = run_options(
        tmp_path, mode, calibration_loss=method, mbls_margin=0.5, ls_epsilon=0.3, ecp_beta=0.7, calibration_weight=0.8
    )
    answers = batch[ANSWER_COLUMN] > 0
    known = batch["known"][answers]
    assert 0 < known.sum() < known.numel(), "the batch must mix known and unknown answers"
    assert {3, 4} <= set(batch[ANSWER_COLUMN][answers].long().tolist()), "rows with 3 and 4 options"
    assert "model.embed_tokens.weight" in fused
    assert_matches(loss, ref, fused, reference)


@pytest.mark.parametrize("apply_to", ["known", "all"])
def test_option_space_with_lora_and_apply_to(tmp_path, apply_to):
    assert_matches(*run_options(tmp_path, "padded", peft=True, calibration_loss="ecp", apply_to=apply_to)[:4])


def test_option_space_with_online_detection(tmp_path):
    # threshold fitted on a small calibration set of the same (tiny, random) model
    assert_matches(*run_options(tmp_path, "padding_free", online=True, calibration_loss="ls")[:4])


def test_option_space_leaves_the_letters_share_of_the_vocabulary_to_cross_entropy(tmp_path):
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


def test_option_space_needs_multiple_choice_data(tmp_path):
    from datasets import Dataset

    tok = make_tokenizer()
    data = Dataset.from_list([{"prompt": "2+2=", "completion": " 4", "known": True}] * 4)
    with pytest.raises(ValueError, match=r"`calibration_space='options'` .* needs multiple-choice rows"):
        CalibSFTTrainer(
            model=make_model(len(tok)),
            args=config(tmp_path, calibration_space="options"),
            train_dataset=data,
            processing_class=tok,
        )
    auto = CalibSFTTrainer(
        model=make_model(len(tok)),
        args=config(tmp_path, calibration_space="auto"),
        train_dataset=data,
        processing_class=tok,
    )
    assert auto._space == "vocabulary"
