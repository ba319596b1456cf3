"""Qwen3-Next (80B-A3B): Qwen3.5's hybrid layers (Gated DeltaNet in three of every four, gated softmax attention in
the fourth; its DeltaNet projections fused as in_proj_qkvz and in_proj_ba) with a mixture of experts in every MLP:
512 experts of width moe_intermediate_size, 10 routed a token, and a shared expert every token takes, weighted by
its own sigmoid gate. PEFT 0.21 takes the shared expert's gate_proj/up_proj/down_proj for transformers 4's experts,
so they stay frozen (its gate is adapted). About 40 GiB in NF4: more than one consumer card holds."""

from qlora_kit.architectures import Family
from qlora_kit.architectures.qwen3_5 import (
    gated_delta_net,
    gguf_overrides,
    gguf_weights as dt_bias_renamed,
    norms_decay_and_convolution,
    write_delta_net_sizes,
)
from qlora_kit.errors import UserError


def shape_fields(config: dict) -> dict:
    h, key_heads, value_heads = config["hidden_size"], config["linear_num_key_heads"], config["linear_num_value_heads"]
    keys, values = key_heads * config["linear_key_head_dim"], value_heads * config["linear_value_head_dim"]
    fused = (("in_proj_qkvz", h, 2 * keys + 2 * values), ("in_proj_ba", h, 2 * value_heads), ("out_proj", values, h))
    return gated_delta_net(config) | {
        "mixer_linears": fused,
        "shared_expert_size": config.get("shared_expert_intermediate_size") or 0,
    }


def gguf_metadata(writer, config: dict) -> None:
    from qlora_kit.architectures.shape import moe_shape

    moe = moe_shape(config)
    if not config.get("norm_topk_prob", True) or moe["moe_layers"] != config["num_hidden_layers"]:
        raise UserError(
            "This Qwen3-Next differs from what llama.cpp builds in: norm_topk_prob false or dense MLP layers.",
            hint="Keep the adapter for transformers and PEFT; llama.cpp cannot run this model as trained.",
        )
    write_delta_net_sizes(writer, config)
    writer.add_expert_count(moe["num_experts"])
    writer.add_expert_used_count(moe["experts_per_token"])
    writer.add_expert_feed_forward_length(moe["expert_size"])
    writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def gguf_weights(weights, config: dict, updates: dict):
    """in_proj_qkvz holds each key head's group [q, k, v, z] in turn; llama.cpp reads all queries, keys and values
    as one projection and the gates as another: the adapter's change is added, then the rows regrouped."""
    import torch

    groups, key_dim = config["linear_num_key_heads"], config["linear_key_head_dim"]
    values = config["linear_num_value_heads"] // groups * config["linear_value_head_dim"]
    for name, weight in dt_bias_renamed(weights, config, updates):
        if not name.endswith(".in_proj_qkvz.weight"):
            yield name, weight
            continue
        if name in updates:
            weight = updates.pop(name).applied_to(weight)
        q, k, v, z = weight.reshape(groups, -1, weight.shape[-1]).split([key_dim, key_dim, values, values], dim=1)
        layer = name.removesuffix("_qkvz.weight")
        yield f"{layer}_qkv.weight", torch.cat([part.reshape(-1, weight.shape[-1]) for part in (q, k, v)])
        yield f"{layer}_z.weight", z.reshape(-1, weight.shape[-1])


def gguf_weight(name: str, weight, config: dict):
    return norms_decay_and_convolution(name, weight)


def gguf_lora(layer: str, part: str, matrix, config: dict):
    if layer.endswith("in_proj_qkvz"):  # llama.cpp holds it as two weights, which one LoRA pair cannot carry
        raise UserError(
            "A GGUF adapter cannot hold LoRA on Qwen3-Next's in_proj_qkvz, which llama.cpp splits in two.",
            hint="Export it merged instead: --format gguf.",
        )
    return matrix


FAMILY = Family(
    "Qwen3-Next",
    ("qwen3_next",),
    qk_norms=True,
    shape_fields=shape_fields,
    gguf_name="qwen3next",
    gguf_overrides=gguf_overrides,
    gguf_metadata=gguf_metadata,
    gguf_weights=gguf_weights,
    gguf_weight=gguf_weight,
    gguf_lora=gguf_lora,
    gguf_f32=("ssm_conv1d.weight",),
)
