"""The embedded MMLU in deterministic splits: sizes, fixed contents, disjointness, valid multiple-choice rows."""

import hashlib
import json
import os

import pytest

from calib_trl import defaults
from calib_trl.defaults import (
    MMLU_SPLIT_SIZES,
    OOD_SUBJECTS,
    load_mmlu_dataset,
    load_mmlu_rows,
)
from calib_trl.defaults import mmlu as default_data
from calib_trl.mcq import LETTERS, validate_mcq_dataset
from calib_trl.tokenization import option_token_ids

# sha256 of the JSON list of question texts of each split, in order (default arguments)
SPLIT_HASHES = {
    "train": "f201479655ca7cf9e69151c27707d01f2e247538c66ebb2a4448fb9485902f30",
    "calibration": "1e76c790bbc9023776130af4a0052cb2b85dbe743337dbcbbe01a372e868ff3d",
    "test": "a6218cf6aea9601bde4c4ac56acbebe4812dfa7cf7d8e015e147d83a6619bae5",
    "ood": "75124e3c208de85b9267142d3db0841e611225dfd3475399f25fc1b87e805bae",
}


def question_text(prompt) -> str:
    text = prompt[0]["content"] if isinstance(prompt, list) else prompt
    return text.split("\n\nA. ")[0]


def split_hash(dataset) -> str:
    return hashlib.sha256(json.dumps([question_text(p) for p in dataset["prompt"]]).encode()).hexdigest()


@pytest.fixture(scope="module")
def splits():
    return load_mmlu_dataset()


@pytest.fixture(scope="module")
def plain_splits():
    return load_mmlu_dataset(conversational=False)


@pytest.fixture(scope="module")
def tokenizer():
    return defaults.load_default_tokenizer()


def test_split_sizes(splits):
    sizes = {name: len(ds) for name, ds in splits.items()}
    assert sizes == MMLU_SPLIT_SIZES
    # the sizes README states are those of the splits
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = " ".join(f.read().split())
    assert f"`ood` split ({sizes['ood']:,} questions)" in readme
    assert (
        f"`train` ({sizes['train']:,}), `calibration` ({sizes['calibration']:,}) and `test` ({sizes['test']:,})"
        in readme
    )


def test_split_hashes_are_fixed(splits, plain_splits):
    for name in splits:
        assert split_hash(splits[name]) == SPLIT_HASHES[name], name
        assert split_hash(plain_splits[name]) == SPLIT_HASHES[name], name


def test_splits_are_disjoint(splits):
    keys = {
        name: {(question_text(p), tuple(c)) for p, c in zip(ds["prompt"], ds["choices"])}
        for name, ds in splits.items()
    }
    for name, ds in splits.items():
        assert len(keys[name]) == len(ds), f"{name} holds a question twice"
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not keys[a] & keys[b], (a, b)


def test_ood_subjects_only_in_ood(splits):
    assert set(splits["ood"]["subject"]) == set(OOD_SUBJECTS)
    in_domain = set()
    for name in ("train", "calibration", "test"):
        subjects = set(splits[name]["subject"])
        assert not subjects & set(OOD_SUBJECTS), name
        in_domain |= subjects
    assert len(in_domain) == 57 - len(OOD_SUBJECTS)


def test_loading_is_deterministic(splits):
    again = load_mmlu_dataset()
    for name in splits:
        assert again[name].to_dict() == splits[name].to_dict()


def test_seed_changes_in_domain_splits_only(splits):
    other = load_mmlu_dataset(seed=1)
    assert other["ood"]["prompt"] == splits["ood"]["prompt"]
    assert other["test"]["prompt"] != splits["test"]["prompt"]
    pooled = lambda d: sorted(question_text(p) for n in ("train", "calibration", "test") for p in d[n]["prompt"])  # noqa: E731
    assert pooled(other) == pooled(splits)


def test_split_does_not_depend_on_format(splits, plain_splits):
    for name in splits:
        conv, plain = splits[name], plain_splits[name]
        assert conv["subject"] == plain["subject"]
        assert conv["answer"] == plain["answer"]
        assert conv["choices"] == plain["choices"]
        assert [p[0]["content"] + "\nAnswer:" for p in conv["prompt"]] == plain["prompt"]


def test_header_rows_and_duplicates_are_dropped():
    rows = load_mmlu_rows()
    assert len(rows) == 14042 - 105
    assert all(r["correct_answer"] in "ABCD" and r["question"] != "question" for r in rows)
    keys = {(r["question"], r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]) for r in rows}
    assert len(keys) == len(rows)
    with open(defaults.mmlu_path()) as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == 14044
    assert sum(r["correct_answer"] not in ("A", "B", "C", "D") for r in raw) == 2


def test_documented_counts_are_those_of_the_file():
    with open(defaults.mmlu_path()) as f:
        raw = [json.loads(line) for line in f if line.strip()]
    headers = sum(r["correct_answer"] not in LETTERS[:4] for r in raw)
    kept = len(load_mmlu_rows())
    duplicates = len(raw) - headers - kept
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = " ".join(f.read().split())
    docstring = " ".join(load_mmlu_dataset.__doc__.split())
    for text in (readme, docstring):
        assert f"holds {len(raw):,} rows: MMLU's {len(raw) - headers:,} test questions" in text
        assert f"and {headers} stray header rows. Dropping the header rows and {duplicates} exact duplicates" in text
        assert f"leaves {kept:,} questions" in text
    assert f"the {len(raw) - headers:,} test questions of [cais/mmlu]" in default_data.DEFAULT_DATASET_NOTE


def test_rows_are_valid_mcq(splits, plain_splits):
    for data, conversational in ((splits, True), (plain_splits, False)):
        for name, ds in data.items():
            validate_mcq_dataset(ds, name=name, require_completion=True)
            assert set(ds["answer"]) <= {0, 1, 2, 3}
            assert all(len(c) == 4 for c in ds["choices"])
            row = ds[0]
            letter = LETTERS[row["answer"]]
            if conversational:
                assert row["prompt"][0]["role"] == "user"
                assert row["completion"] == [{"role": "assistant", "content": letter}]
            else:
                assert row["prompt"].endswith("Answer:") and row["completion"] == f" {letter}"
    # every letter is the correct answer somewhere
    assert set(splits["test"]["answer"]) == {0, 1, 2, 3}


def test_option_tokens_with_default_tokenizer(splits, plain_splits, tokenizer):
    conv_ids = [
        option_token_ids(tokenizer, row["prompt"], 4, row["completion"]) for row in splits["test"].select(range(3))
    ]
    plain_ids = [
        option_token_ids(tokenizer, row["prompt"], 4, row["completion"])
        for row in plain_splits["test"].select(range(3))
    ]
    for ids in conv_ids + plain_ids:
        assert [tokenizer.decode([i]).strip() for i in ids] == ["A", "B", "C", "D"]
    assert conv_ids[0] == conv_ids[1] == conv_ids[2]
    assert plain_ids[0] == plain_ids[1] == plain_ids[2]


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="not in MMLU"):
        load_mmlu_dataset(ood_subjects=("astronomy", "alchemy"))
    with pytest.raises(ValueError, match="calibration_size"):
        load_mmlu_dataset(calibration_size=10_000, test_size=10_000)
    small = load_mmlu_dataset(calibration_size=0, test_size=10, ood_subjects=("astronomy",))
    assert len(small["calibration"]) == 0 and len(small["test"]) == 10 and len(small["ood"]) == 152
    assert small["calibration"].features == small["train"].features
