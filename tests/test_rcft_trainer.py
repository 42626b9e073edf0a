"""
RCFTTrainer: CFT equals completion-only SFT; the ECE term matches a full-logits reference, in calib-trl's
normalisation and in the authors' objective; the E-step reads held-out rows when it has them; bad rows are refused.

Each departure from the paper and the authors' code that `RCFTConfig` lists is pinned here or in test_losses.py:
E-step rows (`test_estep_reads_heldout_rows_by_default`), L_ECE normalisation (`test_ece_term_matches_full_logits_
reference`, `test_estep_normalization_is_the_authors_objective`), the SFT term (`test_cft_equals_completion_only_sft`),
the target gradient (`test_estep_normalization_is_the_authors_objective`, `test_rcft_target_gradient_flows_only_when_
asked`), the bins (`test_top_bin_gets_the_term`, `test_estep_statistics_and_schedule`) and empty bins
(`test_empty_estep_bins`).
"""

import logging

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from helpers import make_mcq_dataset, make_model, make_tokenizer
from test_losses import authors_target, authors_target_torch
from trl import SFTConfig, SFTTrainer

from calib_trl import RCFTConfig, RCFTTrainer
from calib_trl.losses import rcft_ece_loss
from calib_trl.mcq import LETTERS
from calib_trl.metrics import equal_width_bins
from calib_trl.scoring import score_multiple_choice


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


def test_departures_defaults():
    # calib-trl's choices where it departs from the authors; each is tested for what it computes below
    args = RCFTConfig("out", report_to=[])
    assert args.ece_normalization == "batch" and args.ece_scale == 1.0 and args.ece_weight == 0.5
    assert args.ece_target_gradient is False
    assert args.sft_loss == "completion" and args.completion_only_loss is True
    assert args.estep_source == "auto" and args.bin_refresh == "epoch"


def test_small_scale_with_batch_normalization_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        RCFTConfig("out", report_to=[], ece_scale=1e-3)
    assert "`ece_scale=0.001` with `ece_normalization='batch'`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        RCFTConfig("out", report_to=[], ece_scale=1e-3, ece_normalization="estep")
    assert "ece_scale" not in caplog.text
    with pytest.raises(ValueError, match="`ece_normalization` must be one of"):
        RCFTConfig("out", report_to=[], ece_normalization="dataset")
    with pytest.raises(ValueError, match="`estep_source` must be one of"):
        RCFTConfig("out", report_to=[], estep_source="calibration")


def test_cft_equals_completion_only_sft(tmp_path):
    # also pins the SFT term: the default `sft_loss="completion"` is the answer-only loss (L_SFT1, the authors' code)
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


def reference_forward(model, batch, option_ids, num_items):
    """Full logits: the completion-only SFT loss, and each answer row's option probabilities, options and answer."""
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
    answers = torch.tensor([option_ids.index(t) for t in batch["input_ids"][rows, cols].tolist()])
    return sft, probs, ks, answers


def reference(model, batch, option_ids, bin_accuracy, args, num_items):
    """calib-trl's objective: each bin's term averaged over the batch's rows in the bin, the target detached."""
    sft, probs, ks, _ = reference_forward(model, batch, option_ids, num_items)
    bins = equal_width_bins(probs.max(-1).values, args.n_bins, one_apart=False)
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


def authors_reference(model, batch, option_ids, bin_accuracy, bin_counts, num_items):
    """
    The authors' `compute_loss` (github: ZhanliangAaronWang/RestoreLLMCalibration, train/Custom_Trainer.py) on full
    logits: `(1 - 0.5) * L_SFT + 0.5 * 1e-3 * sum_k (1 / N_k) sum_{i in k} [(m_i - acc_k)^2 + sum_j (q_ij - t_ij)^2]`,
    `N_k` the E-step's count, the gradient flowing through `t`; but with every bin, the top one included (their
    loop stops one short: a departure calib-trl keeps, see `test_top_bin_gets_the_term`).
    """
    sft, probs, ks, _ = reference_forward(model, batch, option_ids, num_items)
    bins = equal_width_bins(probs.max(-1).values, len(bin_accuracy), one_apart=False)
    ece = 0.0
    for i in range(len(probs)):
        p, acc = probs[i, : int(ks[i])], float(bin_accuracy[bins[i]])
        q, t = authors_target_torch(p, acc)
        ece = ece + ((p.max() - acc) ** 2 + ((q - t) ** 2).sum()) / float(bin_counts[bins[i]])
    return 0.5 * sft + 0.5 * 1e-3 * ece


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
    trainer._last_estep = {"epoch": 0, "step": 0}
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
    # the batch's own rows: accuracy and confidence at the answer positions, logged beside the losses
    _, probs, _, answers = reference_forward(model, batch, trainer._option_ids, num_items)
    metrics = trainer._metrics["train"]
    assert metrics["rcft/row_accuracy"][-1] == pytest.approx((probs.argmax(-1) == answers).float().mean().item())
    assert metrics["rcft/row_confidence"][-1] == pytest.approx(probs.max(-1).values.mean().item(), rel=1e-5)
    assert "rcft/accuracy_gap" not in metrics  # the E-step read the training rows


def test_estep_normalization_is_the_authors_objective(tmp_path):
    # The authors' setting: E-step on the whole training set, their normalisation, λ and target gradient
    tok = make_tokenizer()
    data = concatenate_datasets([make_mcq_dataset(10, seed=7), make_mcq_dataset(6, seed=8, num_choices=3)])
    args = config(
        tmp_path,
        ece_weight=0.5,
        ece_scale=1e-3,
        ece_normalization="estep",
        ece_target_gradient=True,
        estep_source="train",
        estep_samples=None,
        bin_refresh="once",
        per_device_train_batch_size=8,
    )
    trainer = RCFTTrainer(model=make_model(len(tok), seed=5), args=args, train_dataset=data, processing_class=tok)
    trainer._estep(trainer.model)
    stats = trainer._bin_stats
    assert stats["counts"].sum() == 16 and trainer.estep_source == "train"
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the E-step scored every training row, so each bin's count is the authors' `total_count`
    ref = authors_reference(model, batch, trainer._option_ids, stats["accuracy"], stats["counts"], num_items)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-8, msg=name)
    # ... which differs from calib-trl's default objective with the same λ
    model.zero_grad()
    assert abs(reference(model, batch, trainer._option_ids, stats["accuracy"], args, num_items) - ref) > 1e-6


def test_empty_estep_bins(tmp_path):
    # The authors give an empty E-step bin accuracy 0, and divide by its zero count. calib-trl: the row's own
    # confidence is its top target, and the `"estep"` count is at least the batch's rows in the bin.
    tok = make_tokenizer()
    trainer = RCFTTrainer(
        model=make_model(len(tok)),
        args=config(tmp_path, ece_normalization="estep"),
        train_dataset=make_mcq_dataset(10, seed=3),
        processing_class=tok,
    )
    accuracy = torch.linspace(0.05, 0.95, 10)
    accuracy[3] = float("nan")
    counts = torch.tensor([0, 1, 2, 0, 3, 2, 1, 0, 1, 0], dtype=torch.float64)
    trainer._bin_stats = {"accuracy": accuracy, "counts": counts}
    probs = torch.tensor([[0.35, 0.3, 0.2, 0.15], [0.55, 0.25, 0.1, 0.1], [0.32, 0.3, 0.2, 0.18]])
    bins, row_accuracy = trainer._row_bins(probs)
    assert bins.tolist() == [3, 5, 3]
    torch.testing.assert_close(row_accuracy, torch.tensor([0.35, accuracy[5].item(), 0.32]))
    n_b = trainer._ece_bin_counts(bins)
    # 10 training rows: bin b holds counts[b] / 10 of them; bin 3 is empty in the E-step but holds 2 batch rows
    torch.testing.assert_close(n_b, torch.maximum(counts.float(), torch.tensor([0, 0, 0, 2, 0, 1, 0, 0, 0, 0.0])))
    t = authors_target([0.35, 0.3, 0.2, 0.15], 0.35)
    loss = rcft_ece_loss(probs, bins, row_accuracy, 10, bin_counts=n_b)
    want = sum((p - x) ** 2 for p, x in zip([0.35, 0.3, 0.2, 0.15], t)) / 2
    want += sum((p - x) ** 2 for p, x in zip([0.32, 0.3, 0.2, 0.18], authors_target([0.32, 0.3, 0.2, 0.18], 0.32))) / 2
    want += (
        sum(
            (p - x) ** 2
            for p, x in zip([0.55, 0.25, 0.1, 0.1], authors_target([0.55, 0.25, 0.1, 0.1], accuracy[5].item()))
        )
        / 2
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_estep_reads_heldout_rows_by_default(tmp_path, caplog):
    tok = make_tokenizer()
    train, heldout, other = make_mcq_dataset(8, seed=3), make_mcq_dataset(6, seed=11), make_mcq_dataset(5, seed=12)

    def build(**kwargs):
        args = kwargs.pop("args", {})
        return RCFTTrainer(
            model=make_model(len(tok), seed=6),
            args=config(tmp_path, estep_samples=None, **args),
            train_dataset=train,
            processing_class=tok,
            **kwargs,
        )

    with caplog.at_level(logging.INFO, logger="calib_trl"):
        trainer = build(calibration_dataset=heldout)
    assert trainer.estep_source == "heldout" and trainer._estep_rows["prompt"] == heldout["prompt"]
    assert "only used by online detection" not in caplog.text and "E-step reads the training rows" not in caplog.text
    stats = trainer.estimate_bins()
    scores = score_multiple_choice(trainer.model, tok, heldout, progress=False)
    assert stats["counts"].sum() == 6 and stats["estep_accuracy"] == pytest.approx(scores.correct.mean())
    assert stats["estep_confidence_gap"] == pytest.approx(abs(scores.correct.mean() - scores.confidences.mean()))
    assert trainer._card_settings()["estep_rows"] == "heldout"
    # `estep_dataset` wins over `calibration_dataset`; `estep_source="train"` keeps the training rows
    assert build(calibration_dataset=heldout, estep_dataset=other)._estep_rows["prompt"] == other["prompt"]
    kept = build(calibration_dataset=heldout, args={"estep_source": "train"})
    assert kept.estep_source == "train" and kept._estep_rows["prompt"] == train["prompt"]
    with pytest.raises(
        ValueError, match=r"`estep_source='heldout'` needs held-out .* `estep_dataset=` or `calibration_dataset=`"
    ):
        build(args={"estep_source": "heldout"})
    with pytest.raises(ValueError, match=r"The calibration_dataset is missing the column\(s\) \['choices'\]"):
        build(calibration_dataset=heldout.remove_columns("choices"))
    # without held-out rows: one warning, however many E-steps run
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer = build(args={"bin_refresh": "1", "max_steps": 2, "logging_steps": 1})
        trainer.train()
    assert trainer.estep_source == "train" and trainer._estep_rows["prompt"] == train["prompt"]
    assert caplog.text.count("RCFT's E-step reads the training rows") == 1


def test_logs_training_against_heldout_accuracy(tmp_path):
    tok = make_tokenizer()
    trainer = RCFTTrainer(
        model=make_model(len(tok), seed=6),
        args=config(tmp_path, max_steps=2, logging_steps=1, bin_refresh="once"),
        train_dataset=make_mcq_dataset(8, seed=3),
        processing_class=tok,
        calibration_dataset=make_mcq_dataset(6, seed=11),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rcft/row_accuracy" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["rcft/accuracy_gap"] == pytest.approx(h["rcft/row_accuracy"] - h["rcft/estep_accuracy"])
        assert h["rcft/estep_confidence_gap"] == pytest.approx(trainer._bin_stats["estep_confidence_gap"])


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
    bins = equal_width_bins(torch.tensor(scores.confidences), 10, one_apart=False)
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
    from calib_trl.trainer_mixin import ANSWER_COLUMN

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
