"""Calibration of generated answers: the match rule, and the answers, confidences and entropies of the scoring pass
against a greedy loop written from the definition on full logits; temperature scaling of the token logits."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import make_model, make_open_ended_dataset, memorize, reference_greedy_answers

from calib_trl.evaluation.generation import (
    fit_answer_temperature,
    match_answer,
    reference_token_logits,
    score_generations,
)
from calib_trl.evaluation.temperature_scaling import fit_temperature
from calib_trl.metrics import confidence_report


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("3 + 4 = 7", "7"),
        ("The answer is 72.", "72"),
        ("72", "72"),
        ("1,024", "1024"),
        ("It is -3.", "-3"),
        ("2.50", "2.5"),
        ("The capital of Kenya is Nairobi.", "Nairobi"),
        ("Nairobi, Kenya", "Nairobi"),
        ("nairobi", "Nairobi"),
        ("The capital of Brazil is Brasília.", "Brasilia"),
        ("Washington, D.C.", "Washington"),
        ("It is Addis Ababa.\nAddis Ababa is large.", "Addis Ababa"),
    ],
)
def test_the_match_rule_accepts_how_a_model_states_an_answer(answer, reference):
    assert match_answer(answer, reference)


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("17", "7"),  # a number is compared whole
        ("27 + 45 = 70", "72"),  # a wrong sum
        ("7 + 3 = 10", "7"),  # the stated result is the last number, not an operand
        ("72 apples\n72", "7"),
        ("", "7"),
        ("seven", "7"),  # number words are not read
        ("Nairobian", "Nairobi"),  # a whole word, not a part of one
        ("Addis", "Addis Ababa"),  # every word of the reference
        ("\n\nLagos.\nThe capital is Abuja.", "Abuja"),  # the first non-empty line only
    ],
)
def test_the_match_rule_refuses_false_positives(answer, reference):
    assert not match_answer(answer, reference)


@pytest.fixture(scope="module")
def answering(tok_module):
    """A tiny model that answers the first 6 of 12 open-ended rows (memorised), and other things for the rest."""
    rows = make_open_ended_dataset(12)
    model = memorize(make_model(len(tok_module), seed=2), tok_module, rows.select(range(6)))
    return model, rows


@pytest.fixture(scope="module")
def tok_module():
    from helpers import make_tokenizer

    return make_tokenizer()


def test_answers_confidences_and_entropies_equal_a_greedy_loop_on_full_logits(answering, tok_module):
    model, rows = answering
    reference = reference_greedy_answers(model, tok_module, rows, max_new_tokens=12)
    scaled = reference_greedy_answers(model, tok_module, rows, max_new_tokens=12, temperature=2.5)
    scores = score_generations(
        model, tok_module, rows, batch_size=5, max_new_tokens=12, temperatures=[2.5], progress=False
    )
    assert scores.answers == reference["answers"]
    words = [row["completion"][0]["content"] for row in rows]
    assert scores.correct.tolist() == [w in a.split() for a, w in zip(reference["answers"], words)]
    assert scores.correct.tolist() == [True] * 6 + [False] * 6
    for name in ("sequence", "first_token"):
        np.testing.assert_allclose(scores.confidence[name], reference[name], rtol=1e-4)
        np.testing.assert_allclose(scores.scaled[(name, 2.5)], scaled[name], rtol=1e-4)
    np.testing.assert_allclose(scores.entropy, reference["entropy"], rtol=1e-4)
    # the report is the confidence report of the chosen confidence, with the side measures
    report = scores.report(confidence="first_token", temperature=2.5)
    expected = confidence_report(scaled["first_token"], scores.correct)
    assert {k: report[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    assert report["kind"] == "generation" and report["temperature"] == 2.5 and not report["temperature_at_bound"]
    assert report["entropy"] == pytest.approx(reference["entropy"].mean(), rel=1e-4)
    assert report["lm_nll"] > 0


def test_a_user_match_function_replaces_the_rule(answering, tok_module):
    model, rows = answering
    scores = score_generations(
        model, tok_module, rows, max_new_tokens=6, match=lambda answer, reference: reference[0] == "c", progress=False
    )
    assert scores.correct.tolist() == [row["completion"][0]["content"].startswith("c") for row in rows]


def test_the_answer_temperature_is_fitted_on_the_reference_tokens(answering, tok_module):
    """T minimises the NLL of the reference answers' tokens (and the end-of-turn token), teacher-forced."""
    model, rows = answering
    logits, targets = reference_token_logits(model, tok_module, rows, progress=False)
    expected_logits, expected_targets = [], []
    for row in rows:
        prompt = tok_module.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        answer = tok_module(row["completion"][0]["content"])["input_ids"] + [tok_module.eos_token_id]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([prompt + answer])).logits[0]
        expected_logits.append(z[len(prompt) - 1 : len(prompt) - 1 + len(answer)])
        expected_targets += answer
    assert targets.tolist() == expected_targets
    torch.testing.assert_close(logits, torch.cat(expected_logits), rtol=1e-4, atol=1e-4)
    temperature = fit_answer_temperature(model, tok_module, rows, progress=False)
    assert temperature == pytest.approx(fit_temperature(torch.cat(expected_logits), expected_targets), rel=1e-5)
    nll = [
        float(torch.nn.functional.cross_entropy(torch.cat(expected_logits) / t, torch.tensor(expected_targets)))
        for t in (temperature * 0.9, temperature, temperature * 1.1)
    ]
    assert nll[1] <= min(nll[0], nll[2])


def test_rows_need_a_prompt_and_a_reference(tok_module):
    model = make_model(len(tok_module))
    with pytest.raises(ValueError, match="needs `prompt` and `completion` columns"):
        score_generations(model, tok_module, Dataset.from_list([{"prompt": "x"}]), progress=False)
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1"):
        score_generations(model, tok_module, make_open_ended_dataset(2), max_new_tokens=0, progress=False)
