"""Multiple-choice scoring against hand-computed references: option softmax, answer mass, the language-model check."""

import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets
from helpers import make_mcq_dataset, make_model, make_tokenizer

from calib_trl.evaluation.scoring import score_multiple_choice
from calib_trl.tokenization import option_token_ids, prompt_text_tokens, tokenize_prompt


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=11)
    # 4-, 3- and 2-option rows, so the softmax over each row's own options is exercised
    data = concatenate_datasets(
        [
            make_mcq_dataset(5, seed=1),
            make_mcq_dataset(4, seed=2, num_choices=3),
            make_mcq_dataset(3, seed=3, num_choices=2),
        ]
    )
    return tok, model, data


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def test_scores_match_a_hand_computed_softmax_over_each_rows_options(setup):
    tok, model, data = setup
    scores = score_multiple_choice(model, tok, data, batch_size=5, progress=False, lm_check=True)
    for i, row in enumerate(data):
        ids = tokenize_prompt(tok, row["prompt"])
        k = len(row["choices"])
        letters = option_token_ids(tok, row["prompt"], k, completion=row["completion"])
        logits = full_logits(model, ids)
        last = logits[-1]
        expected = last[letters].softmax(-1).numpy()
        np.testing.assert_allclose(scores.probs[i, :k], expected, rtol=1e-5, atol=1e-6)
        assert (scores.probs[i, k:] == 0).all() and np.isneginf(scores.logits[i, k:]).all()
        full = last.softmax(-1)
        np.testing.assert_allclose(scores.answer_mass[i], float(full[letters].sum()), rtol=1e-5)
        np.testing.assert_allclose(scores.answer_nll[i], -float(full[letters[row["answer"]]].log()), rtol=1e-5)
        # the language-model check: the NLL of the question's text tokens under the full logits
        positions = prompt_text_tokens(tok, row["prompt"], ids)
        logp = logits.log_softmax(-1)
        expected_nll = -sum(float(logp[p - 1, ids[p]]) for p in positions)
        np.testing.assert_allclose(scores.lm_nll_sum[i], expected_nll, rtol=1e-4)
        assert scores.lm_tokens[i] == len(positions)
    assert scores.lm_nll == pytest.approx(scores.lm_nll_sum.sum() / scores.lm_tokens.sum())
    assert scores.labels.tolist() == list(data["answer"])


def test_report_adds_answer_mass_lm_check_and_temperature(setup):
    tok, model, data = setup
    scores = score_multiple_choice(model, tok, data, progress=False, lm_check=True)
    report = scores.report()
    assert report["answer_mass"] == pytest.approx(float(scores.answer_mass.mean()))
    assert report["lm_nll"] == pytest.approx(scores.lm_nll)
    assert "temperature" not in report
    hot = scores.report(temperature=4.0)
    assert hot["temperature"] == 4.0
    assert hot["accuracy"] == report["accuracy"]  # scaling never changes the argmax
    assert hot["mean_confidence"] < report["mean_confidence"]
    without = score_multiple_choice(model, tok, data, progress=False)
    assert without.lm_nll is None and "lm_nll" not in without.report()
    np.testing.assert_array_equal(without.probs, scores.probs)


def test_a_prompt_longer_than_the_model_positions_is_refused_by_row(tok):
    """The tiny model has 512 positions and the tokenizer one token per character: a longer prompt is named."""
    from calib_trl.evaluation.scoring import score_completions
    from calib_trl.mcq import make_mcq_example

    rows = make_mcq_dataset(3).to_list()
    rows[1] = make_mcq_example("why? " * 120, ["a", "b", "c", "d"], 1)
    model = make_model(len(tok))
    with pytest.raises(ValueError, match=r"The prompt of row 1 is \d+ tokens long, over the 512 positions"):
        score_multiple_choice(model, tok, Dataset.from_list(rows), progress=False)
    open_ended = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    with pytest.raises(ValueError, match=r"The prompt and completion of row 1 is \d+ tokens long, over the 512"):
        score_completions(model, tok, open_ended, progress=False)
