"""What qlora-kit knows of each model family, one module per family (the way transformers keeps a folder per model
and llama.cpp's converter a class per architecture). `plan`, `train`, `merge` and `export` ask `family_of(config)`
and never name a model_type themselves: a new dense family is one module here, declaring `FAMILY`, plus its tests
(docs/architectures.md says how).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from qlora_kit.errors import UserError

# The hint when a family's config differs from what llama.cpp builds in: the adapter GGUF still serves
ADAPTER_INSTEAD = (
    "Export the adapter instead (--format gguf-adapter) and use it on a GGUF of the base made by "
    "llama.cpp's own converter."
)


@dataclass(frozen=True)
class Family:
    """One architecture family: what its config.json's model_type values mean to memory, training and export."""

    name: str  # as people know it, e.g. "Qwen3"
    model_types: tuple[str, ...]  # config.json's model_type values it covers
    # The memory model
    fused_qkv: bool = False  # one qkv_proj instead of q_proj, k_proj, v_proj
    fused_gate_up: bool = False  # one gate_up_proj instead of gate_proj and up_proj
    qk_norms: bool = False  # an RMSNorm over each head's queries and keys (two head_dim vectors a layer)
    qk_norms_span_heads: bool = False  # the q/k norms cover all heads' projections at once (OLMo 2/3): wider
    norms_per_layer: int = 2  # hidden_size-wide norms a layer: 4 where attention and MLP are also normed after
    # Multimodal checkpoints trained on text: the modules beside the language model (a vision tower, its projector)
    # are loaded frozen and unquantized and get no LoRA; tower_parameters(config) counts them for the memory model
    towers: tuple[str, ...] = ()
    tower_parameters: Callable | None = None
    # transformers runs the family's attention eagerly (no SDPA kernel for it): the scores are held whole
    eager_attention: bool = False
    attention_sinks: bool = False  # a learned logit a head beside the scores
    expert_biases: bool = False  # a bias on each expert's projections and on the router; o_proj biased too
    # PEFT 0.21 reads layers named gate_proj/up_proj/down_proj in a MoE model of this family as transformers 4's
    # per-expert layers and moves them onto the fused experts (its conversion table names the family's model_type);
    # a shared expert's or dense MLP's layers of those names are then left frozen
    mlp_names_taken_by_peft: bool = True
    routers: tuple[str, ...] = ()  # modules of a router held as linear layers: kept 16-bit and frozen, like the others
    # (config) -> ModelShape fields beyond those every family's config gives (a hybrid's mixers, renamed layers)
    shape_fields: Callable | None = None
    # Training on cards without bf16: fp16 overflows in some families' activations; they compute in fp32 there
    fp16_overflows: bool = False
    # GGUF, as llama.cpp reads it (gguf_name None: llama.cpp does not run the family, and export says so)
    gguf_name: str | None = None  # general.architecture, and the gguf package's tensor name map
    rotary_rows_interleaved: bool = False  # llama.cpp's Llama layout: q and k rows reordered (export/gguf.py's doc)
    norms_plus_one: bool = False  # RMSNorm scales by 1 + weight in transformers, by the weight llama.cpp reads
    output_is_embeddings: bool = False  # the output head is always the embeddings; llama.cpp reads token_embd
    rope_scalings: tuple[str, ...] = ()  # rotary scalings beyond "default" that llama.cpp computes as transformers
    gguf_metadata: Callable | None = None  # (writer, config) -> None: keys beyond the common ones; may refuse
    gguf_overrides: Callable | None = (
        None  # (config) -> {GGUFWriter.add_<key> suffix: value} for common keys it differs in
    )
    gguf_weight: Callable | None = None  # (name, weight, config) -> the weight as llama.cpp holds it, where it differs
    # (layer name, "a" or "b", matrix, config) -> the LoRA matrix as llama.cpp's layout of that layer's weight needs it
    gguf_lora: Callable | None = None
    gguf_f32: tuple[str, ...] = ()  # endings of llama.cpp's names for weights it computes with in F32 only
    # (weights, config, updates) -> weights: the checkpoint's (name, tensor) stream renamed and split as the gguf
    # package's tensor map names them, any adapter change to a tensor it splits added first (and taken out of updates)
    gguf_weights: Callable | None = None
    gguf_tensors: Callable | None = (
        None  # (config) -> {name: float32 array}: tensors llama.cpp reads beside the weights
    )

    @property
    def hint(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"


SHARED_MODULES = {"shape", "fused_experts"}  # the family-neutral shape, and what fused experts' LoRA changes


def all_families() -> list[Family]:
    """Every family module's FAMILY, in module name order (the package's other modules hold what all share)."""
    modules = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED_MODULES)
    return [importlib.import_module(f"{__name__}.{module}").FAMILY for module in modules]


def frozen_modules_pattern(model) -> str | None:
    """A regular expression for every module inside the towers and linear routers this model has (peft's
    exclude_modules), or None."""
    family = family_of(model.config.to_dict())
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    frozen = [name for name in (family.towers + family.routers if family else ()) if name in names]
    return rf"(.*\.)?({'|'.join(frozen)})(\..*)?" if frozen else None


def family_of(config: dict) -> Family | None:
    """The family of a config.json (its text config for a multimodal one), or None for one qlora-kit does not know."""
    model_type = config.get("model_type")
    return next((family for family in all_families() if model_type in family.model_types), None)


def gguf_family(config: dict) -> Family:
    """The family of a base for a GGUF export, or one sentence naming the families llama.cpp runs."""
    family = family_of(config)
    if family is None or family.gguf_name is None:
        runs = ", ".join(f.hint for f in all_families() if f.gguf_name)
        what = family.name if family else config.get("model_type") or "this"
        raise UserError(
            f"Exporting {what} models to GGUF is not supported{' yet' if family is None else ''}.",
            hint=f"Supported: {runs}.",
        )
    return family
