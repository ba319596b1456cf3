"""`qlora-kit export`: an adapter as GGUF, the format llama.cpp, Ollama and LM Studio read.

`--format gguf-adapter` writes the LoRA A and B matrices under llama.cpp's tensor names (`blk.N.attn_q.weight.lora_a`)
with `general.type = adapter`, `adapter.type = lora` and the alpha, through the `gguf` package (llama.cpp's own
Python library). llama.cpp (`--lora`) and Ollama (`ADAPTER` in a Modelfile) add it to any GGUF of the same base,
quantized ones included: a few MB that travel instead of a whole model.

llama.cpp stores some weights differently from transformers, and an adapter must follow its base: for Llama and
Mistral the rows of the query and key projections are reordered (llama.cpp rotates interleaved pairs of dimensions,
transformers the two halves), so B, which makes those rows, is reordered the same way; A is untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.adapter import base_source_for
from qlora_kit.errors import UserError
from qlora_kit.sources import check_adapter_folder, resolve_model

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type is written in GGUF."""

    gguf_name: str  # general.architecture, and the gguf package's tensor name map
    rotary_rows_interleaved: bool = False  # llama.cpp's Llama layout: q and k rows reordered (see the module doc)


ARCHITECTURES = {
    "llama": Architecture("llama", rotary_rows_interleaved=True),
    "mistral": Architecture("llama", rotary_rows_interleaved=True),
    "qwen2": Architecture("qwen2"),
    "gemma": Architecture("gemma"),
    "gemma2": Architecture("gemma2"),
    "phi3": Architecture("phi3"),
}


def architecture_of(config: dict) -> Architecture:
    """The GGUF layout of a base model's config.json, or one sentence naming the ones supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"Exporting {model_type or 'this'} models to GGUF is not supported yet.",
                        hint=f"Supported: {', '.join(sorted(ARCHITECTURES))} (Llama 3.x, SmolLM2, Mistral, Qwen2/2.5, "
                             "Gemma, Gemma 2, Phi-3).")
    return ARCHITECTURES[model_type]


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a query or key projection's output rows from transformers' rotary layout (each head's first half,
    then its second half) to llama.cpp's Llama layout (pairs interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_alpha(adapter_config: dict) -> float:
    """The alpha llama.cpp needs to scale by alpha / rank as peft did: rsLoRA scales by alpha / sqrt(rank)."""
    alpha, rank = float(adapter_config["lora_alpha"]), int(adapter_config["r"])
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha


def check_plain_lora(adapter_config: dict, adapter_dir: Path) -> None:
    """GGUF adapters hold A and B with one rank and alpha: refuse what they cannot carry."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir} is a {adapter_config['peft_type']} adapter; GGUF adapters are LoRA only.")
    if adapter_config.get("use_dora"):
        raise UserError(f"{adapter_dir} is a DoRA adapter, which llama.cpp cannot load as an adapter.",
                        hint="Export it merged instead: --format gguf.")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise UserError(f"{adapter_dir} gives some layers their own rank or alpha, which a GGUF adapter cannot hold.",
                        hint="Export it merged instead: --format gguf.")


def adapter_tensors_for_gguf(lora: dict[str, torch.Tensor], config: dict, architecture: Architecture) -> dict:
    """The adapter's A and B matrices under llama.cpp's names (`blk.0.attn_q.weight.lora_a`), in llama.cpp's layout."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture.gguf_name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    tensors = {}
    for key, tensor in lora.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise UserError(f"The adapter holds {key}, which is not a LoRA A or B matrix.",
                            hint="Only LoRA on linear layers exports to a GGUF adapter; export it merged: --format gguf.")
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise UserError(f"llama.cpp has no tensor for {module}, which this adapter trains.",
                            hint="Export it merged instead: --format gguf.")
        tensor = tensor.float()
        projection = module.rsplit(".", 1)[-1]
        if part == "B.weight" and architecture.rotary_rows_interleaved and projection in heads:
            tensor = interleave_rotary_rows(tensor, heads[projection])
        tensors[f"{gguf_name}.lora_{part[0].lower()}"] = tensor.contiguous()
    return tensors


def export_gguf_adapter(adapter_dir: Path, out: Path, source: str | None = None) -> Path:
    """Write adapter_dir's LoRA weights as a GGUF adapter at out (a .gguf file); returns out."""
    import gguf
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    check_adapter_folder(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    check_plain_lora(adapter_config, adapter_dir)
    base = resolve_model(source or base_source_for(adapter_dir))
    config = json.loads((base / "config.json").read_text())
    architecture = architecture_of(config)
    tensors = adapter_tensors_for_gguf(load_file(adapter_dir / "adapter_model.safetensors"), config, architecture)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(staging, architecture.gguf_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(adapter_config))
    writer.add_name(adapter_dir.parent.name if adapter_dir.name == "adapter" else adapter_dir.name)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.replace(out)
    return out
