"""Model names and paths resolved offline: the default model, local directories, Hub ids with the Hub offline."""

import pytest

from calib_trl.defaults import (
    DEFAULT_MODEL_NAME,
    resolve_model_name_or_path,
)
from calib_trl.defaults import model as loading


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
