"""Qwen3-Next (80B-A3B): Qwen3.5's hybrid layers (Gated DeltaNet in three of every four, gated softmax attention in
the fourth; its DeltaNet projections fused as in_proj_qkvz and in_proj_ba) with a mixture of experts in every MLP:
512 experts of width moe_intermediate_size, 10 routed a token, and a shared expert every token takes, weighted by
its own sigmoid gate. PEFT 0.21 takes the shared expert's gate_proj/up_proj/down_proj for transformers 4's experts,
so they stay frozen (its gate is adapted). About 40 GiB in NF4: more than one consumer card holds."""

from qlora_kit.architectures import Family
from qlora_kit.architectures.qwen3_5 import gated_delta_net


def shape_fields(config: dict) -> dict:
    h, key_heads, value_heads = config["hidden_size"], config["linear_num_key_heads"], config["linear_num_value_heads"]
    keys, values = key_heads * config["linear_key_head_dim"], value_heads * config["linear_value_head_dim"]
    fused = (("in_proj_qkvz", h, 2 * keys + 2 * values), ("in_proj_ba", h, 2 * value_heads), ("out_proj", values, h))
    return gated_delta_net(config) | {"mixer_linears": fused,
                                      "shared_expert_size": config.get("shared_expert_intermediate_size") or 0}


FAMILY = Family("Qwen3-Next", ("qwen3_next",), qk_norms=True, shape_fields=shape_fields)
