"""RCFTTrainer: CFT equals completion-only SFT; the ECE term matches a full-logits reference; bad rows are refused."""

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from helpers import make_mcq_dataset, make_model, make_tokenizer
from test_losses import authors_target
from trl import SFTConfig, SFTTrainer

from calib_trl import RCFTConfig, RCFTTrainer
from calib_trl.losses import confidence_bins
from calib_trl.mcq import LETTERS, score_multiple_choice


def config(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=False,
        shuffle_dataset=False,
        max_length=1024,
        estep_batch_size=8,
    )
    base.update(kwargs)
    return RCFTConfig(**base)


def test_cft_equals_completion_only_sft(tmp_path):
    tok = make_tokenizer()
    data = make_mcq_dataset(12, seed=4)
    rcft = RCFTTrainer(
        model=make_model(len(tok), seed=1),
        args=config(tmp_path / "a", ece_weight=0.0, max_steps=3),
        train_dataset=data,
        processing_class=tok,
    )
    sft = SFTTrainer(
        model=make_model(len(tok), seed=1),
        args=SFTConfig(
            str(tmp_path / "b"),
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            activation_checkpointing=False,
            shuffle_dataset=False,
            max_length=1024,
            max_steps=3,
            bf16=False,
            completion_only_loss=True,
        ),
        train_dataset=data,
        processing_class=tok,
    )
    rcft.train()
    sft.train()
    assert [h["loss"] for h in rcft.state.log_history if "loss" in h] == [
        h["loss"] for h in sft.state.log_history if "loss" in h
    ]
    for (n, a), (_, b) in zip(rcft.model.named_parameters(), sft.model.named_parameters()):
        assert torch.equal(a, b), n


def reference(model, batch, option_ids, bin_accuracy, args, num_items):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_num_choices")}
    logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sft = (nll * mask).sum() / num_items
    rows, cols = (batch["answer_num_choices"] > 0).nonzero(as_tuple=True)
    ks = batch["answer_num_choices"][rows, cols].long()
    option_logits = logits[rows, cols - 1][:, option_ids]
    probs = torch.stack(
        [
            torch.cat([option_logits[i, :k].softmax(-1), option_logits.new_zeros(len(option_ids) - k)])
            for i, k in enumerate(ks)
        ]
    )
    bins = confidence_bins(probs.max(-1).values, args.n_bins)
    # the reference loss of each K group, then summed per bin as in the paper
    ece = 0.0
    for b in range(args.n_bins):
        members = (bins == b).nonzero().flatten().tolist()
        if not members:
            continue
        total = 0.0
        for i in members:
            k = int(ks[i])
            p = probs[i, :k]
            acc = float(bin_accuracy[b])
            if acc != acc:  # an empty E-step bin: the row's own confidence is its target
                acc = float(p.detach().max())
            t = torch.tensor(authors_target(p.detach().tolist(), acc))
            total = total + ((p - t) ** 2).sum()
        ece = ece + total / len(members)
    return (1 - args.ece_weight) * sft + args.ece_weight * args.ece_scale * ece


@pytest.mark.parametrize("padding_free", [False, True])
def test_ece_term_matches_full_logits_reference(tmp_path, padding_free):
    tok = make_tokenizer()
    data = concatenate_datasets([make_mcq_dataset(6, seed=7), make_mcq_dataset(6, seed=8, num_choices=3)])
    data = data.shuffle(seed=0)
    args = config(
        tmp_path,
        ece_weight=0.6,
        ece_scale=3.0,
        bin_refresh="once",
        padding_free=padding_free,
        max_length=None if padding_free else 1024,
        per_device_train_batch_size=6,
    )
    trainer = RCFTTrainer(model=make_model(len(tok), seed=2), args=args, train_dataset=data, processing_class=tok)
    accuracy = torch.linspace(0.05, 0.95, args.n_bins)
    accuracy[3] = float("nan")  # an empty E-step bin: its rows keep their own confidence as target
    trainer._bin_stats = {"accuracy": accuracy, "estep_accuracy": 0.0, "estep_ece": 0.0, "estep_cw_ece": 0.0}
    trainer._estep_marker = 0
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["answer_num_choices"].shape == batch["input_ids"].shape
    assert sorted(batch["answer_num_choices"][batch["answer_num_choices"] > 0].tolist()) != []
    model = trainer.model
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = reference(model, batch, trainer._option_ids, accuracy, args, num_items)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_invalid_rows_raise_or_are_excluded(tmp_path):
    tok = make_tokenizer()
    data = make_mcq_dataset(8, seed=3).to_list()
    data[2]["completion"] = [{"role": "assistant", "content": LETTERS[(data[2]["answer"] + 1) % 4]}]
    data = Dataset.from_list(data)
    with pytest.raises(ValueError, match=r"Row 2 of the train dataset .* instead of the answer letter"):
        RCFTTrainer(model=make_model(len(tok)), args=config(tmp_path), train_dataset=data, processing_class=tok)
    trainer = RCFTTrainer(
        model=make_model(len(tok)),
        args=config(tmp_path, invalid_rows="exclude"),
        train_dataset=data,
        processing_class=tok,
    )
    assert trainer._excluded_rows == 1
    markers = [sum(1 for v in row if v > 0) for row in trainer.train_dataset["answer_num_choices"]]
    assert markers.count(0) == 1 and markers.count(1) == 7


def test_truncated_answer_position_is_refused(tmp_path):
    tok = make_tokenizer()
    data = make_mcq_dataset(4, seed=3)  # prompts of 95 to 109 tokens
    # the loss on the prompt keeps the truncated rows, whose answer position is gone
    with pytest.raises(ValueError, match=r"answer position \(10\d\) is outside the 100 tokens kept .*cuts it off"):
        RCFTTrainer(
            model=make_model(len(tok)),
            args=config(tmp_path, max_length=100, sft_loss="prompt_and_completion"),
            train_dataset=data,
            processing_class=tok,
        )
    # completion-only loss: TRL drops the rows left without completion tokens; RCFT says so
    with pytest.raises(ValueError, match="2 of the 4 rows of the train dataset have prompts too long"):
        RCFTTrainer(
            model=make_model(len(tok)), args=config(tmp_path, max_length=100), train_dataset=data, processing_class=tok
        )


def test_estep_statistics_and_schedule(tmp_path):
    tok = make_tokenizer()
    data = make_mcq_dataset(16, seed=9)
    trainer = RCFTTrainer(
        model=make_model(len(tok), seed=4),
        args=config(tmp_path, bin_refresh="2", max_steps=5, estep_samples=None),
        train_dataset=data,
        processing_class=tok,
    )
    stats = trainer.estimate_bins()
    scores = score_multiple_choice(trainer.model, tok, data, progress=False)
    bins = confidence_bins(torch.tensor(scores.confidences), 10)
    for b in range(10):
        members = (bins == b).numpy()
        assert stats["counts"][b] == members.sum()
        if members.any():
            assert abs(stats["accuracy"][b].item() - scores.correct[members].mean()) < 1e-6
        else:
            assert torch.isnan(stats["accuracy"][b])
    calls = []
    original = trainer.estimate_bins
    trainer.estimate_bins = lambda model=None: calls.append(trainer.state.global_step) or original(model)
    trainer.train()
    assert calls == [0, 2, 4]


def test_answer_positions_follow_trls_tokenization_with_chat_template_kwargs(tmp_path):
    # A template that renders a per-row note: SFTTrainer passes the row's `chat_template_kwargs`, so the answer must be
    # located in SFTTrainer's tokens, not in a re-tokenization that leaves the note out
    from helpers import CHAT_TEMPLATE

    from calib_trl.mcq import LETTERS
    from calib_trl.trainer_utils import ANSWER_COLUMN

    tok = make_tokenizer()
    tok.chat_template = "{% if note is defined %}{{ '[' + note + ']\n' }}{% endif %}" + CHAT_TEMPLATE
    data = make_mcq_dataset(6, seed=3)
    data = data.add_column("chat_template_kwargs", [{"note": "x" * (5 + 7 * i)} for i in range(len(data))])
    trainer = RCFTTrainer(
        model=make_model(len(tok)), args=config(tmp_path, max_steps=1), train_dataset=data, processing_class=tok
    )
    letters = {LETTERS[k]: tok.convert_tokens_to_ids(LETTERS[k]) for k in range(4)}
    prepared = trainer.train_dataset
    for i, row in enumerate(prepared):
        marks = [p for p, k in enumerate(row[ANSWER_COLUMN]) if k]
        assert marks == [row["labels"].index(next(t for t in row["labels"] if t != -100))]
        assert row["input_ids"][marks[0]] == letters[LETTERS[data[i]["answer"]]]
        assert "[" + "x" * (5 + 7 * i) + "]" in tok.decode(row["input_ids"])  # the note is in the trained tokens
    trainer.train()
