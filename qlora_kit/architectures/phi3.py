"""Phi-3, Phi-3.5 and Phi-4-mini: q, k and v fused into one qkv_proj, gate and up into one gate_up_proj. Phi-4-mini
rotates only 3/4 of each head and scales its rotary frequencies with LongRoPE: a short and a long factor list,
which llama.cpp reads as two tensors and picks between by context size (short up to the original context)."""

import math

from qlora_kit.architectures import Family


def rotary_scaling(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def original_context(config: dict) -> int:
    return (
        rotary_scaling(config).get("original_max_position_embeddings")
        or config.get("original_max_position_embeddings")
        or config["max_position_embeddings"]
    )


def is_longrope(config: dict) -> bool:
    rope = rotary_scaling(config)
    return rope.get("rope_type", rope.get("type")) in ("longrope", "su")


def gguf_metadata(writer, config: dict) -> None:
    writer.add_rope_scaling_orig_ctx_len(original_context(config))
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: no sliding window, as llama.cpp reads it
    if is_longrope(config):  # the scale transformers puts on cos and sin, which llama.cpp reads as a key
        original = original_context(config)
        scale = config["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        writer.add_rope_scaling_attn_factors(rotary_scaling(config).get("attention_factor") or default)


def gguf_tensors(config: dict) -> dict:
    import numpy as np

    if not is_longrope(config):
        return {}
    rope = rotary_scaling(config)
    return {
        f"rope_factors_{kind}.weight": np.array(rope[f"{kind}_factor"], dtype=np.float32) for kind in ("long", "short")
    }


FAMILY = Family(
    "Phi-3, Phi-4-mini",
    ("phi3",),
    fused_qkv=True,
    fused_gate_up=True,
    gguf_name="phi3",
    rope_scalings=("longrope", "su"),
    gguf_metadata=gguf_metadata,
    gguf_tensors=gguf_tensors,
)
