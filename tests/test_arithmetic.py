"""The arithmetic task: offline and deterministic, disjoint splits, both forms naming the same answer, each level's
share, and the capitals of the out-of-domain split."""

from collections import Counter

import pytest

from calib_trl.defaults import ARITHMETIC_SPLIT_SIZES, LEVELS, load_default_dataset
from calib_trl.defaults.arithmetic import addition_rows, capital_rows
from calib_trl.evaluation.generation import match_answer
from calib_trl.mcq import LETTERS, validate_mcq_dataset


@pytest.fixture(scope="module")
def forms():
    return load_default_dataset("arithmetic"), load_default_dataset("arithmetic-mc")


def questions(split):
    return [row["prompt"][0]["content"] for row in split]


def test_the_default_dataset_is_the_arithmetic_task(forms):
    default = load_default_dataset()
    assert {name: questions(default[name]) for name in default} == {
        name: questions(forms[0][name]) for name in default
    }


def test_splits_have_their_sizes_and_are_disjoint(forms):
    open_ended, _ = forms
    assert {name: len(split) for name, split in open_ended.items()} == ARITHMETIC_SPLIT_SIZES
    seen = {name: set(questions(split)) for name, split in open_ended.items()}
    assert all(len(seen[name]) == len(open_ended[name]) for name in seen)  # no question twice in a split
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not seen[a] & seen[b], (a, b)


def test_it_is_the_same_on_every_call_and_another_seed_gives_other_rows(forms):
    again = load_default_dataset("arithmetic")
    assert all(again[name].to_list() == forms[0][name].to_list() for name in again)
    other = addition_rows(seed=1)
    assert [row["question"] for row in other["test"]] != questions(forms[0]["test"])


def test_both_forms_name_the_same_answer(forms):
    open_ended, multiple_choice = forms
    for name in open_ended:
        validate_mcq_dataset(multiple_choice[name], name=name, require_completion=True)
        for oe, mc in zip(open_ended[name], multiple_choice[name]):
            answer = oe["completion"][0]["content"]
            assert mc["choices"][mc["answer"]] == answer and oe["subject"] == mc["subject"]
            assert mc["completion"][0]["content"] == LETTERS[mc["answer"]]
            assert mc["prompt"][0]["content"].startswith(oe["prompt"][0]["content"] + "\n\nA. ")
            assert len(set(mc["choices"])) == 4


def test_sums_are_right_and_levels_keep_their_shares(forms):
    open_ended, _ = forms
    for name in ("train", "calibration", "test"):
        for row in open_ended[name]:
            a, b = row["prompt"][0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(row["completion"][0]["content"]) == int(a) + int(b)
            digits = sorted((len(a), len(b)), reverse=True)
            assert row["subject"] == f"{digits[0]}+{digits[1]} digits" and row["subject"] in LEVELS
        counts = Counter(open_ended[name]["subject"])
        for level, (_, share) in LEVELS.items():
            assert abs(counts[level] - share * len(open_ended[name])) <= len(LEVELS)


def test_the_out_of_domain_split_asks_for_every_capital_and_the_rule_accepts_them(forms):
    rows = capital_rows()
    assert len(rows) == ARITHMETIC_SPLIT_SIZES["ood"] == len(forms[0]["ood"])
    assert {row["subject"] for row in rows} == {"capitals"}
    assert len({row["answer"] for row in rows}) == len(rows)
    for row in rows:
        assert match_answer(f"The capital is {row['answer']}.", row["answer"])
        country = row["question"].removeprefix("What is the capital of ").removesuffix("?")
        # echoing the question never states the answer
        assert not match_answer(f"The capital of {country} is unknown.", row["answer"])


def test_plain_text_form_and_bad_arguments():
    plain = load_default_dataset("arithmetic", conversational=False)["test"][0]
    assert plain["prompt"].endswith("?\nAnswer:") and plain["completion"].startswith(" ")
    with pytest.raises(ValueError, match="No embedded dataset is named 'arith'"):
        load_default_dataset("arith")
    with pytest.raises(ValueError, match="rows of level '1\\+1 digits' asked for"):
        addition_rows(sizes={"train": 10_000})
