"""Models with the catalogue's real configs and random weights: what the benchmarks train, with no download."""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_kit.probe.catalog import _models, find_model_shape


def build_random_model(name: str, folder: Path, device: str = "cuda") -> Path:
    """Save (once) a randomly initialised bf16 model with the catalogue config of `name`, plus a stand-in tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    entry = dict(_models()["models"][find_model_shape(name).name])
    entry.pop("short", None)
    config = AutoConfig.for_model(**entry)
    with torch.device(device):  # initialising on the GPU takes seconds even for 8B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder
