"""Knowledge-bias detection: answer NLLs, the Youden threshold, detect_known, style adaptation, online detection."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import make_mcq_dataset, make_model, make_tokenizer

from calib_trl import OnlineKnowledgeDetector, detect_known
from calib_trl.cogcalib.knowledge import style_adapt, youden_threshold
from calib_trl.evaluation.scoring import normalize_text, score_answers, score_completions
from calib_trl.mcq import LETTERS
from calib_trl.tokenization import tokenize_prompt, tokenize_prompt_completion

# -- Youden threshold -------------------------------------------------------------------------------------------------


def test_youden_threshold_separable_is_exact():
    nll = [0.1, 0.5, 0.9, 2.0, 2.5, 3.0]
    correct = [1, 1, 1, 0, 0, 0]
    t, j, tpr, tnr = youden_threshold(nll, correct)
    assert t == pytest.approx((0.9 + 2.0) / 2)
    assert (j, tpr, tnr) == (1.0, 1.0, 1.0)


def test_youden_threshold_overlapping_hand_computed():
    # sorted: 0.1 C, 0.2 W, 0.3 C, 0.4 C, 0.5 W, 0.6 W ; 3 correct, 3 wrong
    # cut after 0.1: TPR 1/3, TNR 1   -> J 1/3 ; after 0.2: 1/3, 2/3 -> 0 ; after 0.4: 1, 2/3 -> 2/3 (best)
    nll = [0.4, 0.6, 0.1, 0.5, 0.3, 0.2]
    correct = [1, 0, 1, 0, 1, 0]
    t, j, tpr, tnr = youden_threshold(nll, correct)
    assert t == pytest.approx(0.45)
    assert j == pytest.approx(2 / 3) and tpr == 1.0 and tnr == pytest.approx(2 / 3)


def test_youden_threshold_ties_and_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        nll = rng.integers(0, 6, size=25) / 2.0  # many ties
        correct = rng.random(25) < 0.5
        if correct.all() or (~correct).all():
            continue
        t, j, _, _ = youden_threshold(nll, correct)
        best = max(((nll <= c)[correct].mean() + (nll > c)[~correct].mean() - 1 for c in np.unique(nll)), default=0.0)
        assert j == pytest.approx(max(best, 0.0))
        flagged = nll <= t
        assert flagged[correct].mean() + (~flagged[~correct]).mean() - 1 == pytest.approx(j)


def test_youden_threshold_degenerate_and_invalid():
    with pytest.warns(UserWarning, match="every calibration item correctly"):
        assert youden_threshold([0.1, 0.2], [1, 1])[0] == math.inf
    with pytest.warns(UserWarning, match="no calibration item correctly"):
        assert youden_threshold([0.1, 0.2], [0, 0])[0] == -math.inf
    with pytest.raises(ValueError, match="NaN"):
        youden_threshold([float("nan")], [1])
    with pytest.raises(ValueError, match="at least one"):
        youden_threshold([], [])


# -- answer NLL -------------------------------------------------------------------------------------------------------


def test_mcq_answer_nll_equals_example_by_example_reference():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=1).eval()
    data = make_mcq_dataset(9, seed=2)
    nll, correct = score_answers(model, tok, data, batch_size=4, progress=False)
    for i, row in enumerate(data):
        ids = torch.tensor([tokenize_prompt(tok, row["prompt"])])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        letters = [tok.convert_tokens_to_ids(letter) for letter in LETTERS[:4]]
        gold = letters[row["answer"]]
        assert nll[i] == pytest.approx((logits.logsumexp(-1) - logits[gold]).item(), rel=1e-4, abs=1e-4)
        assert correct[i] == (int(logits[letters].argmax()) == row["answer"])


def test_open_ended_nll_and_greedy_match_reference():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=3).eval()
    rows = [
        {"prompt": [{"role": "user", "content": f"Say {w}"}], "completion": [{"role": "assistant", "content": w}]}
        for w in ["cat", "a dog", "sunny day", "x"]
    ]
    data = Dataset.from_list(rows)
    nll, correct = score_completions(model, tok, data, batch_size=3, check_correct=True, progress=False)
    for i, row in enumerate(rows):
        p = tokenize_prompt(tok, row["prompt"])
        full = tokenize_prompt_completion(tok, row["prompt"], row["completion"])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
        ref = -np.mean([logp[t - 1, full[t]].item() for t in range(len(p), len(full))])
        assert nll[i] == pytest.approx(ref, rel=1e-4, abs=1e-4)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=len(full) - len(p) + 8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        text = tok.decode(out[0, len(p) :], skip_special_tokens=True).strip().split("\n")[0]
        assert correct[i] == (normalize_text(text) == normalize_text(row["completion"][0]["content"]))


def test_normalize_answer_text():
    assert normalize_text("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_text("an apple, a pear") == "apple pear"


# -- detect_known ----------------------------------------------------------------------------------------------------


def test_detect_known_flags_and_report():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=4)
    train, calib = make_mcq_dataset(10, seed=5), make_mcq_dataset(30, seed=6)
    flagged, report = detect_known(
        model, tok, train, calibration_dataset=calib, batch_size=8, progress=False, return_report=True
    )
    cal_nll, cal_correct = score_answers(model, tok, calib, progress=False)
    t, j, _, _ = youden_threshold(cal_nll, cal_correct)
    assert report.threshold == pytest.approx(t) and report.youden_j == pytest.approx(j)
    assert report.detection_accuracy == pytest.approx(np.mean((cal_nll <= t) == cal_correct))
    nll, _ = score_answers(model, tok, train, progress=False)
    np.testing.assert_allclose(flagged["answer_nll"], nll, rtol=1e-6)
    assert flagged["known"] == (nll <= t).tolist()
    assert report.known_fraction == pytest.approx(np.mean(nll <= t))
    # explicit threshold, and re-running replaces the columns
    again = detect_known(model, tok, flagged, threshold=float(np.median(nll)), progress=False)
    assert again["known"] == (nll <= np.median(nll)).tolist()
    assert again.column_names.count("known") == 1


def test_detect_known_requires_threshold_or_calibration():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="needs a `calibration_dataset`"):
        detect_known(make_model(len(tok)), tok, make_mcq_dataset(3))


def test_style_adaptation_leaves_model_untouched_and_changes_scores():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=7)
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = make_mcq_dataset(16, seed=8)
    adapted = style_adapt(model, tok, data, steps=3, learning_rate=1e-3, batch_size=8, per_device_batch_size=4)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    a, _ = score_answers(model, tok, data, progress=False)
    b, _ = score_answers(adapted, tok, data, progress=False)
    assert b.mean() < a.mean()  # the adapted model puts more mass on the answer letters


def test_style_adaptation_with_lora():
    from peft import LoraConfig

    tok = make_tokenizer()
    model = make_model(len(tok), seed=7)
    adapted = style_adapt(
        model,
        tok,
        make_mcq_dataset(8),
        steps=2,
        batch_size=4,
        per_device_batch_size=4,
        learning_rate=1e-3,
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
    )
    assert any("lora_" in n for n, _ in adapted.named_parameters())
    assert not any("lora_" in n for n, _ in model.named_parameters())


# -- online detection -------------------------------------------------------------------------------------------------


def test_online_detector_refit_and_state():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=9)
    calib = make_mcq_dataset(20, seed=10)
    detector = OnlineKnowledgeDetector(calib, tok, refit_steps=5, batch_size=8)
    assert detector.due(0)
    report = detector.refit(model, 0)
    nll, correct = score_answers(model, tok, calib, progress=False)
    assert report.threshold == pytest.approx(youden_threshold(nll, correct)[0])
    assert not detector.due(0) and not detector.due(3) and detector.due(5)
    other = OnlineKnowledgeDetector(calib, tok, refit_steps=5)
    other.load_state_dict(detector.state_dict())
    assert other.threshold == detector.threshold and not other.due(0)
    with pytest.raises(ValueError, match="calibration_dataset"):
        OnlineKnowledgeDetector(None, tok)


@pytest.mark.parametrize("answer_nll", ["first", "mean"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_online_flags_use_each_examples_answer_nll(make_trainer, padding_free, answer_nll):
    # "first": each example's answer NLL is that of its first completion token (the answer letter); "mean": the mean
    # NLL of its completion tokens (the letter and the end of turn). Both are read off the training forward.
    train, calib = make_mcq_dataset(8, seed=11), make_mcq_dataset(16, seed=12)
    trainer = make_trainer(
        train,
        model_seed=13,
        calibration_loss="ecp",
        ecp_beta=0.5,
        calibration_space="vocabulary",  # the entropy below is the vocabulary-space term
        detection="online",
        answer_nll=answer_nll,
        per_device_train_batch_size=8,
        padding_free=padding_free,
        max_length=None if padding_free else 1024,
        calibration_dataset=calib,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    trainer.detector.refit(model, 0)  # fitted now, so that `compute_loss` does not re-fit over the threshold set below
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits.log_softmax(-1)
    tok_nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    # examples in order: each one's completion is a run of loss tokens, the first of which is its answer letter
    flat_mask, flat_nll = mask.reshape(-1), tok_nll.reshape(-1)
    positions = flat_mask.nonzero().flatten().tolist()
    starts = [k for k, p in enumerate(positions) if k == 0 or positions[k - 1] != p - 1]
    runs = [positions[a:b] for a, b in zip(starts, starts[1:] + [len(positions)])]
    assert len(runs) == 8 and all(len(run) > 1 for run in runs)
    example_nll = {
        "first": torch.stack([flat_nll[run[0]] for run in runs]),
        "mean": torch.stack([flat_nll[run].mean() for run in runs]),
    }
    other = "mean" if answer_nll == "first" else "first"
    # a threshold that splits this batch's examples, and at which the two definitions flag different examples, set
    # by hand on the detector (its public state) so that a trainer reading the wrong NLL gets other flags
    values = example_nll[answer_nll].sort().values.tolist()
    threshold = next(
        t
        for t in ((a + b) / 2 for a, b in zip(values, values[1:]))
        if (example_nll[answer_nll] <= t).tolist() != (example_nll[other] <= t).tolist()
    )
    trainer.detector.threshold = threshold
    flags = (example_nll[answer_nll] <= threshold).tolist()
    assert 0 < sum(flags) < len(flags)
    per_token_known = torch.zeros_like(flat_mask)
    for run, known in zip(runs, flags):
        per_token_known[run] = known
    per_token_known = per_token_known.reshape(mask.shape)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=None)
    ref = ((tok_nll - 0.5 * entropy * per_token_known) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
