"""gpt-oss (20b, 120b): attention with biases and a learned sink per head, sliding-window layers alternating with
full ones, and a mixture of experts in every layer (32 or 128 experts, 4 routed a token) whose weights carry biases
and a clamped SwiGLU. The hub checkpoints hold the experts in MXFP4 (e2m1 values, an e8m0 scale a block of 32): read
through transformers' own MXFP4 dequantization, one tensor at a time, they are re-quantized to NF4 expert by expert
as they arrive (experts_in_4bit(from_mxfp4=True)); a 16-bit load (merge) asks transformers to dequantize them."""

import re

from qlora_kit.architectures import Family
from qlora_kit.errors import UserError

FUSED = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)(_blocks|_scales|_bias)?")
LLAMA_CPP_SWIGLU = (7.0, 1.702)  # the clamp and sigmoid scale llama.cpp's gpt-oss builds in


def gguf_metadata(writer, config: dict) -> None:
    import gguf

    from qlora_kit.architectures.shape import moe_shape

    layers = config["num_hidden_layers"]
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    swiglu = (config.get("swiglu_limit", 7.0), config.get("swiglu_alpha", 1.702))
    differs = [
        what
        for what, same in (
            ("which layers attend within the sliding window", config.get("layer_types", alternating) == alternating),
            (f"the SwiGLU clamp and scale {swiglu}", swiglu == LLAMA_CPP_SWIGLU),
        )
        if not same
    ]
    if differs:
        raise UserError(
            f"This gpt-oss differs from what llama.cpp builds in: {', '.join(differs)}.",
            hint="Keep the adapter for transformers and PEFT; llama.cpp cannot run this model as trained.",
        )
    moe, rope = moe_shape(config), config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_sliding_window(config["sliding_window"])
    writer.add_expert_count(moe["num_experts"])
    writer.add_expert_used_count(moe["experts_per_token"])
    writer.add_expert_feed_forward_length(moe["expert_size"])
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", 4096))


def gguf_weights(weights, config: dict, updates: dict):
    """The checkpoint's fused experts as llama.cpp holds them: gate_up_proj (experts x in x 2 out, gate and up
    columns interleaved; MXFP4 blocks and scales in the hub's checkpoints) split into gate and up, each expert out x in,
    the adapter's change added before the split; their biases split the same way; the sinks named as a weight."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = {}
    for name, weight in weights:
        match = FUSED.fullmatch(name)
        if name.endswith("self_attn.sinks"):
            yield name + ".weight", weight
        elif match is None:
            yield name, weight
        elif match[3] == "_bias":
            layer, projection = match[1], match[2]
            if projection == "down_proj":
                yield f"{layer}.down_proj.bias", weight
            else:
                yield f"{layer}.gate_proj.bias", weight[..., 0::2]
                yield f"{layer}.up_proj.bias", weight[..., 1::2]
        elif match[3] == "_blocks":
            blocks[name.removesuffix("_blocks")] = weight
        else:  # the weight itself, or its MXFP4 scales: its blocks came first, in the checkpoint's sorted order
            fused = name.removesuffix("_scales")
            if match[3] == "_scales":
                weight = convert_moe_packed_tensors(blocks.pop(fused), weight, dtype=torch.float32)
            yield from experts_as_llama_cpp(match[1], match[2], weight, updates)
    if blocks:
        raise UserError(
            f"The base's checkpoint has MXFP4 blocks without scales: {', '.join(blocks)}.",
            hint="Check that every shard of the model is in its folder.",
        )


def experts_as_llama_cpp(layer: str, projection: str, weight, updates: dict):
    """One fused experts weight (experts x in x out) as llama.cpp's stacked out x in tensors, with its change."""
    from qlora_kit.architectures.fused_experts import experts_change

    stack = weight.float().transpose(1, 2)
    key, change = experts_change(layer, projection, stack, updates)
    if key is not None:
        updates.pop(key)
    stack = stack + change
    if projection == "down_proj":
        yield f"{layer}.down_proj.weight", stack
    else:
        yield f"{layer}.gate_proj.weight", stack[:, 0::2]
        yield f"{layer}.up_proj.weight", stack[:, 1::2]


FAMILY = Family(
    "gpt-oss",
    ("gpt_oss",),
    eager_attention=True,
    attention_sinks=True,
    expert_biases=True,
    gguf_name="gpt-oss",
    rope_scalings=("yarn",),
    gguf_metadata=gguf_metadata,
    gguf_weights=gguf_weights,
    gguf_f32=("_exps.bias",),
)
