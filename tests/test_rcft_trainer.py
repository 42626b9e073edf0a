"""
RCFTTrainer: CFT equals completion-only SFT; the ECE term matches a full-logits reference, in calib-trl's
normalisation, in the authors' objective and combined with CogCalib's terms; the E-step reads held-out rows when it has
them; bad rows are refused.

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
from helpers import (
    NOT_INPUTS,
    QUIET,
    answer_marks,
    first_batch,
    grads,
    letter_ids,
    make_mcq_dataset,
    make_model,
    mixed_choices_dataset,
    option_reference_loss,
    reference_loss,
    reference_option_scores,
    trainer_loss_and_grads,
)
from test_losses import authors_target, authors_target_torch
from trl import SFTConfig, SFTTrainer

from calib_trl import RCFTConfig, RCFTTrainer
from calib_trl.losses import rcft_ece_loss
from calib_trl.mcq import LETTERS
from calib_trl.metrics import equal_width_bins


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


def test_cft_equals_completion_only_sft(make_trainer, tok, tmp_path):
    # also pins the SFT term: the default `sft_loss="completion"` is the answer-only loss (L_SFT1, the authors' code)
    data = make_mcq_dataset(12, seed=4)
    rcft = make_trainer(
        data, RCFTTrainer, model_seed=1, output_dir=tmp_path / "a", ece_weight=0.0, max_steps=3, logging_steps=1
    )
    sft = SFTTrainer(
        model=make_model(len(tok), seed=1),
        args=SFTConfig(
            str(tmp_path / "b"),
            **QUIET,
            per_device_train_batch_size=4,
            max_length=1024,
            max_steps=3,
            logging_steps=1,
            completion_only_loss=True,
        ),
        train_dataset=data,
        processing_class=tok,
    )
    rcft.train()
    sft.train()
    losses = [h["loss"] for h in sft.state.log_history if "loss" in h]
    assert len(losses) == 3 and [h["loss"] for h in rcft.state.log_history if "loss" in h] == losses
    for (n, a), (_, b) in zip(rcft.model.named_parameters(), sft.model.named_parameters()):
        assert torch.equal(a, b), n


def assert_matches(loss, ref, got, model):
    """`loss` equals the reference `ref`, and `got` (the trainer's gradients) the reference's gradients."""
    ref.backward()
    want = grads(model)
    model.zero_grad()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and "model.embed_tokens.weight" in got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def reference_forward(model, batch, option_ids, num_items):
    """Full logits: the completion-only SFT loss, and each answer row's option probabilities, options and answer."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sft = (nll * mask).sum() / num_items
    rows, cols = (answer_marks(batch) > 0).nonzero(as_tuple=True)
    ks = answer_marks(batch)[rows, cols].long()
    option_logits = logits[rows, cols - 1][:, option_ids]
    probs = torch.stack(
        [
            torch.cat([option_logits[i, :k].softmax(-1), option_logits.new_zeros(len(option_ids) - k)])
            for i, k in enumerate(ks)
        ]
    )
    answers = torch.tensor([option_ids.index(t) for t in batch["input_ids"][rows, cols].tolist()])
    return sft, probs, ks, answers


def reference(model, batch, option_ids, bin_accuracy, args, num_items, sft=None):
    """
    calib-trl's objective: each bin's term averaged over the batch's rows in the bin, the target detached. `sft`: the
    loss the ECE term is mixed with (CogCalib's, when combined), by default the completion-only SFT loss.
    """
    sft_loss, probs, ks, _ = reference_forward(model, batch, option_ids, num_items)
    sft = sft_loss if sft is None else sft
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
def test_ece_term_matches_full_logits_reference(make_trainer, tok, padding_free):
    data = concatenate_datasets([make_mcq_dataset(6, seed=7), make_mcq_dataset(6, seed=8, num_choices=3)])
    data = data.shuffle(seed=0)
    trainer = make_trainer(
        data,
        RCFTTrainer,
        model_seed=1,  # rows in two confidence bins (the tiny model's confidence follows a row's option count)
        ece_weight=0.6,
        ece_scale=3.0,
        bin_refresh="once",
        padding_free=padding_free,
        max_length=None if padding_free else 1024,
        per_device_train_batch_size=6,
    )
    args, model, option_ids = trainer.args, trainer.model, letter_ids(tok)
    batch = first_batch(trainer)
    marks = answer_marks(batch)
    assert marks.shape == batch["input_ids"].shape
    # one answer per row, marked with that row's number of options, and rows with 3 and with 4
    choices = {tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False): r["choices"] for r in data}
    if padding_free:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [marks.shape[1]]
        rows = [(0, s, e) for s, e in zip(starts[:-1], starts[1:])]
    else:
        rows = [(r, 0, int(n)) for r, n in enumerate(batch["attention_mask"].sum(-1))]
    assert len(rows) == 6
    counts = []
    for r, s, e in rows:
        (k,) = marks[r, s:e][marks[r, s:e] > 0].tolist()
        assert k == len(choices[tok.decode(batch["input_ids"][r, s:e])])
        counts.append(k)
    assert sorted(set(counts)) == [3, 4]
    # The bin accuracies are set by hand, with an empty E-step bin where a batch row falls (its rows keep their own
    # confidence as target): no public call sets them
    with torch.no_grad():
        _, probs, _, _ = reference_forward(model, batch, option_ids, 1)
    occupied = equal_width_bins(probs.max(-1).values, args.n_bins, one_apart=False)
    assert len(set(occupied.tolist())) >= 2  # rows in the empty bin and rows in estimated ones
    accuracy = torch.linspace(0.05, 0.95, args.n_bins)
    accuracy[occupied[0]] = float("nan")
    trainer.part("rcft").bin_stats = {
        "accuracy": accuracy,
        "estep_accuracy": 0.0,
        "estep_ece": 0.0,
        "estep_cw_ece": 0.0,
    }
    loss, got, num_items = trainer_loss_and_grads(trainer, batch)
    assert_matches(loss, reference(model, batch, option_ids, accuracy, args, num_items), got, model)
    # the batch's own rows: accuracy and confidence at the answer positions, logged beside the losses
    _, probs, _, answers = reference_forward(model, batch, option_ids, num_items)
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["rcft/row_accuracy"] == pytest.approx((probs.argmax(-1) == answers).float().mean().item())
    assert logged["rcft/row_confidence"] == pytest.approx(probs.max(-1).values.mean().item(), rel=1e-5)
    assert "rcft/accuracy_gap" not in logged  # the E-step read the training rows


@pytest.mark.parametrize("space", ["vocabulary", "options"])
@pytest.mark.parametrize("method", ["ecp", "ls"])
def test_cogcalib_and_rcft_combine(make_trainer, tok, method, space):
    # `(1 - ece_weight) * (SFT + CogCalib term) + ece_weight * ece_scale * L_ECE`, each part from the full logits
    trainer = make_trainer(
        mixed_choices_dataset(12, seed=1),
        RCFTTrainer,
        model_seed=1,
        calibration_loss=method,
        calibration_space=space,
        ecp_beta=0.7,
        ls_epsilon=0.3,
        calibration_weight=0.8,
        ece_weight=0.6,
        ece_scale=3.0,
        estep_source="train",
        bin_refresh="once",
        per_device_train_batch_size=8,
    )
    args, model, option_ids = trainer.args, trainer.model, letter_ids(tok)
    stats = trainer.estimate_bins()  # what the first step's E-step finds: the same model on the same rows
    assert (stats["counts"] > 0).sum() >= 2  # the rows spread over several bins
    batch = first_batch(trainer)
    answers = answer_marks(batch) > 0
    assert 0 < batch["known"][answers].sum() < answers.sum(), "the batch must mix known and unknown answers"
    assert {3, 4} <= set(answer_marks(batch)[answers].long().tolist())
    loss, got, num_items = trainer_loss_and_grads(trainer, batch)
    if space == "vocabulary":
        cogcalib = reference_loss(model, batch, args, num_items)
    else:
        cogcalib = option_reference_loss(model, batch, args, num_items, option_ids)
    ref = reference(model, batch, option_ids, stats["accuracy"], args, num_items, sft=cogcalib)
    # both parts weigh in: neither RCFT alone nor CogCalib alone is the loss
    assert abs(ref - reference(model, batch, option_ids, stats["accuracy"], args, num_items)) > 1e-3
    assert abs(ref - cogcalib) > 1e-3
    assert_matches(loss, ref, got, model)
    # the model card names both methods
    from huggingface_hub import ModelCard

    trainer.create_model_card()
    assert {"calib-trl", "cogcalib", "rcft"} <= set(ModelCard.load(f"{args.output_dir}/README.md").data.tags)


def test_estep_normalization_is_the_authors_objective(make_trainer, tok):
    # The authors' setting: E-step on the whole training set, their normalisation, λ and target gradient
    data = concatenate_datasets([make_mcq_dataset(10, seed=7), make_mcq_dataset(6, seed=8, num_choices=3)])
    trainer = make_trainer(
        data,
        RCFTTrainer,
        model_seed=5,
        ece_weight=0.5,
        ece_scale=1e-3,
        ece_normalization="estep",
        ece_target_gradient=True,
        estep_source="train",
        estep_samples=None,
        bin_refresh="once",
        per_device_train_batch_size=8,
    )
    assert trainer.estep_source == "train"
    stats = trainer.estimate_bins()  # what the first step's E-step finds: the same model on the same rows
    assert stats["counts"].sum() == 16
    batch = first_batch(trainer)
    model, option_ids = trainer.model, letter_ids(tok)
    loss, got, num_items = trainer_loss_and_grads(trainer, batch)
    # the E-step scored every training row, so each bin's count is the authors' `total_count`
    ref = authors_reference(model, batch, option_ids, stats["accuracy"], stats["counts"], num_items)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-8, msg=name)
    # ... which differs from calib-trl's default objective with the same λ
    model.zero_grad()
    assert abs(reference(model, batch, option_ids, stats["accuracy"], trainer.args, num_items) - ref) > 1e-6


def test_empty_estep_bins(make_trainer):
    # The authors give an empty E-step bin accuracy 0, and divide by its zero count. calib-trl: the row's own
    # confidence is its top target, and the `"estep"` count is at least the batch's rows in the bin. The per-row targets
    # and counts are not public: they are read off the trainer's helpers, on E-step statistics set by hand.
    trainer = make_trainer(make_mcq_dataset(10, seed=3), RCFTTrainer, ece_normalization="estep")
    accuracy = torch.linspace(0.05, 0.95, 10)
    accuracy[3] = float("nan")
    counts = torch.tensor([0, 1, 2, 0, 3, 2, 1, 0, 1, 0], dtype=torch.float64)
    part = trainer.part("rcft")
    part.bin_stats = {"accuracy": accuracy, "counts": counts}
    probs = torch.tensor([[0.35, 0.3, 0.2, 0.15], [0.55, 0.25, 0.1, 0.1], [0.32, 0.3, 0.2, 0.18]])
    bins, row_accuracy = part.row_bins(probs)
    assert bins.tolist() == [3, 5, 3]
    torch.testing.assert_close(row_accuracy, torch.tensor([0.35, accuracy[5].item(), 0.32]))
    n_b = part.ece_bin_counts(trainer, bins)
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


def assert_estep_statistics(stats, model, tok, rows, n_bins=10):
    """The E-step's statistics are those of `rows`, scored independently from the full logits."""
    scores = reference_option_scores(model, tok, rows)
    bins = equal_width_bins(torch.tensor(scores["confidences"]), n_bins, one_apart=False).numpy()
    assert stats["counts"].tolist() == [float((bins == b).sum()) for b in range(n_bins)]
    for b in range(n_bins):
        if (bins == b).any():
            assert stats["accuracy"][b].item() == pytest.approx(scores["correct"][bins == b].mean(), abs=1e-6)
        else:
            assert torch.isnan(stats["accuracy"][b])
    accuracy = scores["correct"].mean()
    assert stats["estep_accuracy"] == pytest.approx(accuracy)
    assert stats["estep_confidence_gap"] == pytest.approx(abs(accuracy - scores["confidences"].mean()))
    return scores


def test_estep_reads_heldout_rows_by_default(make_trainer, tok, tmp_path, caplog):
    train, heldout = make_mcq_dataset(8, seed=3), make_mcq_dataset(6, seed=11)

    def build(**kwargs):
        return make_trainer(train, RCFTTrainer, model_seed=6, estep_samples=None, **kwargs)

    with caplog.at_level(logging.INFO, logger="calib_trl"):
        trainer = build(calibration_dataset=heldout)
    assert trainer.estep_source == "heldout"
    assert "only used by online detection" not in caplog.text and "E-step reads the training rows" not in caplog.text
    assert_estep_statistics(trainer.estimate_bins(), trainer.model, tok, heldout)
    trainer.create_model_card()
    assert "| estep_rows | heldout |" in (tmp_path / "README.md").read_text()
    # `estep_source="train"` keeps the training rows
    kept = build(calibration_dataset=heldout, estep_source="train")
    assert kept.estep_source == "train"
    assert_estep_statistics(kept.estimate_bins(), kept.model, tok, train)
    with pytest.raises(
        ValueError, match=r"`estep_source='heldout'` needs held-out .* `estep_dataset=` or `calibration_dataset=`"
    ):
        build(estep_source="heldout")
    with pytest.raises(ValueError, match=r"The calibration_dataset is missing the column\(s\) \['choices'\]"):
        build(calibration_dataset=heldout.remove_columns("choices"))
    # without held-out rows: one warning, however many E-steps run, and no held-out accuracy to compare with
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib_trl"):
        trainer = build(bin_refresh="1", max_steps=2, logging_steps=1)
        trainer.train()
    assert trainer.estep_source == "train"
    assert caplog.text.count("RCFT's E-step reads the training rows") == 1
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("rcft/estep_accuracy" in h and "rcft/accuracy_gap" not in h for h in logs)


def test_estep_dataset_is_what_the_estep_scores(make_trainer, tok):
    # `estep_dataset` wins over `calibration_dataset`: the E-step's statistics, and the logged ones, are its rows'
    train, heldout, other = make_mcq_dataset(8, seed=3), make_mcq_dataset(6, seed=11), make_mcq_dataset(9, seed=12)
    trainer = make_trainer(
        train,
        RCFTTrainer,
        model_seed=6,
        estep_samples=None,
        bin_refresh="once",
        max_steps=1,
        logging_steps=1,
        calibration_dataset=heldout,
        estep_dataset=other,
    )
    assert trainer.estep_source == "heldout"
    scores = assert_estep_statistics(trainer.estimate_bins(), trainer.model, tok, other)
    # (which the calibration rows would not give)
    assert reference_option_scores(trainer.model, tok, heldout)["correct"].mean() != scores["correct"].mean()
    trainer.train()  # the E-step before the first step scores the model as it is here
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["rcft/estep_accuracy"] == pytest.approx(scores["correct"].mean())
    assert logged["rcft/accuracy_gap"] == pytest.approx(logged["rcft/row_accuracy"] - scores["correct"].mean())


def test_logs_training_against_heldout_accuracy(make_trainer, tok):
    heldout = make_mcq_dataset(6, seed=11)
    trainer = make_trainer(
        make_mcq_dataset(8, seed=3),
        RCFTTrainer,
        model_seed=6,
        max_steps=2,
        logging_steps=1,
        bin_refresh="once",
        calibration_dataset=heldout,
    )
    before = reference_option_scores(trainer.model, tok, heldout)  # the one E-step scores the model before training
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rcft/row_accuracy" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["rcft/estep_accuracy"] == pytest.approx(before["correct"].mean())
        assert h["rcft/accuracy_gap"] == pytest.approx(h["rcft/row_accuracy"] - h["rcft/estep_accuracy"])
        assert h["rcft/estep_confidence_gap"] == pytest.approx(
            abs(before["correct"].mean() - before["confidences"].mean())
        )


def test_invalid_rows_raise_or_are_excluded(make_trainer):
    data = make_mcq_dataset(8, seed=3).to_list()
    data[2]["completion"] = [{"role": "assistant", "content": LETTERS[(data[2]["answer"] + 1) % 4]}]
    data = Dataset.from_list(data)
    with pytest.raises(ValueError, match=r"Row 2 of the train dataset .* instead of the answer letter"):
        make_trainer(data, RCFTTrainer)
    trainer = make_trainer(data, RCFTTrainer, invalid_rows="exclude", max_steps=1, logging_steps=1)
    markers = [sum(1 for v in row if v > 0) for row in trainer.train_dataset["calib_answer_token"]]
    assert markers == [1, 1, 0, 1, 1, 1, 1, 1]  # row 2 gets no answer mark: no ECE term
    trainer.train()
    assert [h["rcft/excluded_rows"] for h in trainer.state.log_history if "loss" in h] == [1]


def test_estep_statistics_and_schedule(make_trainer, tok):
    # 2, 3 and 4 options: the tiny model's confidence depends mostly on a row's number of options, so the rows spread
    # over several bins
    data = concatenate_datasets([make_mcq_dataset(6, seed=9, num_choices=k) for k in (2, 3, 4)]).shuffle(seed=0)
    trainer = make_trainer(data, RCFTTrainer, model_seed=1, bin_refresh="2", max_steps=5, estep_samples=None)
    scores = assert_estep_statistics(trainer.estimate_bins(), trainer.model, tok, data)
    assert (
        len(set(equal_width_bins(torch.tensor(scores["confidences"]), 10, one_apart=False).tolist())) >= 3
    )  # several bins in use
    calls = []
    original = trainer.estimate_bins
    trainer.estimate_bins = lambda model=None: calls.append(trainer.state.global_step) or original(model)
    trainer.train()
    assert calls == [0, 2, 4]


def test_answer_positions_follow_trls_tokenization_with_chat_template_kwargs(make_trainer, tok):
    # A template that renders a per-row note: SFTTrainer passes the row's `chat_template_kwargs`, so the answer must be
    # located in SFTTrainer's tokens, not in a re-tokenization that leaves the note out
    from helpers import CHAT_TEMPLATE

    from calib_trl.core.columns import ANSWER_TOKEN_COLUMN

    tok.chat_template = "{% if note is defined %}{{ '[' + note + ']\n' }}{% endif %}" + CHAT_TEMPLATE
    data = make_mcq_dataset(6, seed=3)
    data = data.add_column("chat_template_kwargs", [{"note": "x" * (5 + 7 * i)} for i in range(len(data))])
    trainer = make_trainer(data, RCFTTrainer, max_steps=1)
    letters = {LETTERS[k]: tok.convert_tokens_to_ids(LETTERS[k]) for k in range(4)}
    prepared = trainer.train_dataset
    for i, row in enumerate(prepared):
        marks = [p for p, k in enumerate(row[ANSWER_TOKEN_COLUMN]) if k]
        assert marks == [row["labels"].index(next(t for t in row["labels"] if t != -100))]
        assert row["input_ids"][marks[0]] == letters[LETTERS[data[i]["answer"]]]
        assert "[" + "x" * (5 + 7 * i) + "]" in tok.decode(row["input_ids"])  # the note is in the trained tokens
    trainer.train()
