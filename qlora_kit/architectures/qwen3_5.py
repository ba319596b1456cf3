"""Qwen3.5 (0.8B-27B, dense): a hybrid. Three of every four layers mix tokens with Gated DeltaNet, a linear attention
whose state is a fixed-size matrix a head (queries and keys from a short causal convolution, a learned decay, a gated
norm on the output); the fourth is softmax attention with q/k norms whose q_proj also gives a sigmoid gate for its
output. The hub checkpoints are multimodal (model_type qwen3_5); transformers loads their language model alone as
a causal LM, so the vision tower is never loaded. Without the flash-linear-attention kernels transformers runs
the delta rule in chunks of 64 tokens in fp32, and that is what the memory model counts (measured on CPU)."""

from qlora_kit.architectures import Family

DELTA_RULE_CHUNK = 64  # transformers' torch_chunk_gated_delta_rule


def mixer_layers(config: dict) -> int:
    """How many layers are Gated DeltaNet: layer_types, or every layer but each full_attention_interval-th."""
    every = config.get("full_attention_interval") or 4
    kinds = config.get("layer_types") or [
        "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(config["num_hidden_layers"])]
    return kinds.count("linear_attention")


def gated_delta_net(config: dict) -> dict:
    """ModelShape's fields for the Gated DeltaNet layers and the gated softmax attention."""
    h, kernel = config["hidden_size"], config.get("linear_conv_kernel_dim") or 4
    key_heads, value_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
    key_dim, value_dim = config["linear_key_head_dim"], config["linear_value_head_dim"]
    keys, values = key_heads * key_dim, value_heads * value_dim
    convolved = 2 * keys + values  # queries, keys and values pass the convolution together
    return dict(
        mixer_layers=mixer_layers(config),
        mixer_linears=(("in_proj_qkv", h, convolved), ("in_proj_z", h, values), ("in_proj_b", h, value_heads),
                       ("in_proj_a", h, value_heads), ("out_proj", values, h)),
        mixer_params=convolved * kernel + value_dim + 2 * value_heads,  # convolution, gated norm, decay and its bias
        # Fitted on CPU (benchmarks/family_memory.py): projections, convolution and its activation, the gate and the
        # output in the compute dtype; the delta rule's fp32 copies of queries and keys (widened to the value heads),
        # values, and each chunk's decays and attention (chunk x chunk a head)
        mixer_activations=(6 * (keys + values),
                           12 * value_heads * key_dim + 5 * values + 11 * DELTA_RULE_CHUNK * value_heads // 2),
        attention_output_gate=True,
    )


FAMILY = Family("Qwen3.5", ("qwen3_5", "qwen3_5_text"), qk_norms=True, shape_fields=gated_delta_net)
