"""Tiny random models and data, built in seconds with no hub: the fixtures every test file shares."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a pirate sails the sea and sings a song",
    "one two three four five six seven eight nine ten",
    "what is the capital of france? the capital is paris.",
    "hello world, this is a tiny tokenizer for tests",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True)
def tokenized_cache(tmp_path_factory, monkeypatch):
    """Tokenized tables of the tests' throwaway data files go to a temporary cache, not the user's."""
    folder = tmp_path_factory.mktemp("tokenized-cache")
    monkeypatch.setattr("qlora_kit.data.cache_dir", lambda: folder)
    return folder / "tokenized"


def build_tokenizer():
    """A byte-level BPE tokenizer of ~300 tokens with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(kind: str, vocab_size: int):
    """2-layer configs of real architectures, small enough to train on CPU in seconds."""
    from transformers import Gemma2Config, GemmaConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "gemma":
        return GemmaConfig(**common, head_dim=16)
    if kind == "gemma2":
        return Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    raise ValueError(kind)


def save_tiny_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """Write a random tiny model and the test tokenizer as a normal Hugging Face model folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("what is the capital of france?", "paris, arr!"), ("one two three?", "four five, arr!")]]
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats] * 4)
