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
        "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(config["num_hidden_layers"])
    ]
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
        mixer_linears=(
            ("in_proj_qkv", h, convolved),
            ("in_proj_z", h, values),
            ("in_proj_b", h, value_heads),
            ("in_proj_a", h, value_heads),
            ("out_proj", values, h),
        ),
        mixer_params=convolved * kernel + value_dim + 2 * value_heads,  # convolution, gated norm, decay and its bias
        # Fitted on CPU (benchmarks/family_memory.py): projections, convolution and its activation, the gate and the
        # output in the compute dtype; the delta rule's fp32 copies of queries and keys (widened to the value heads),
        # values, and each chunk's decays and attention (chunk x chunk a head)
        mixer_activations=(
            6 * (keys + values),
            12 * value_heads * key_dim + 5 * values + 11 * DELTA_RULE_CHUNK * value_heads // 2,
        ),
        attention_output_gate=True,
    )


def gguf_overrides(config: dict) -> dict:
    rope = config.get("rope_parameters") or {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return dict(rope_dimension_count=int(head_dim * rope.get("partial_rotary_factor", 0.25)))


def write_delta_net_sizes(writer, config: dict) -> None:
    """The delta rule's sizes and where full attention comes, as llama.cpp's qwen35 and qwen3next read them."""
    writer.add_ssm_conv_kernel(config.get("linear_conv_kernel_dim") or 4)
    writer.add_ssm_state_size(config["linear_key_head_dim"])
    writer.add_ssm_group_count(config["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(config["linear_num_value_heads"])
    writer.add_ssm_inner_size(config["linear_value_head_dim"] * config["linear_num_value_heads"])
    writer.add_full_attention_interval(config.get("full_attention_interval") or 4)


def gguf_metadata(writer, config: dict) -> None:
    """The delta rule's sizes, and the rotary sections llama.cpp's loader requires (text alone gives every section
    the same position, so they rotate as plain rotary does)."""
    write_delta_net_sizes(writer, config)
    sections = list((config.get("rope_parameters") or {}).get("mrope_section") or (11, 11, 10))
    rotated = gguf_overrides(config)["rope_dimension_count"]
    if sum(sections) != rotated // 2:  # a smaller model than the sections were made for: one section covers all
        sections = [rotated // 2]
    writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))


def gguf_weights(weights, config: dict, updates: dict):
    for name, weight in weights:  # the decay's bias, under the name llama.cpp's converter gives it
        yield (name.removesuffix(".dt_bias") + ".dt_proj.bias" if name.endswith(".dt_bias") else name), weight


def norms_decay_and_convolution(name: str, weight):
    """What Qwen3.5 and Qwen3-Next share in llama.cpp: norms scale by 1 + weight (the gated norm inside the delta rule
    excepted), the decay is -exp(A_log), the convolution is channels x kernel."""
    import torch

    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return weight.float() + 1
    if name.endswith(".A_log"):
        return -torch.exp(weight.float())
    if name.endswith(".conv1d.weight"):
        return weight.reshape(weight.shape[0], -1)
    return weight


def value_heads_tiled(weight, dim: int, config: dict, head_dim: int):
    """Value heads from transformers' order (grouped by the key head they share) to llama.cpp's (tiled: the first
    value head of every group, then the second ...), which lets ggml broadcast the keys instead of repeating them."""
    groups = config["linear_num_key_heads"]
    per_group = config["linear_num_value_heads"] // groups
    if per_group == 1:
        return weight
    shape = list(weight.shape)
    grouped = weight.reshape(*shape[:dim], groups, per_group, head_dim, *shape[dim + 1 :])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def gguf_weight(name: str, weight, config: dict):
    """The weight as llama.cpp's qwen35 holds it: as norms_decay_and_convolution says, and value heads tiled."""
    import torch

    keys, value_dim = config["linear_num_key_heads"] * config["linear_key_head_dim"], config["linear_value_head_dim"]
    weight = norms_decay_and_convolution(name, weight)
    if ".linear_attn." not in name:
        return weight
    if name.endswith((".A_log", ".dt_proj.bias", ".in_proj_a.weight", ".in_proj_b.weight")):
        return value_heads_tiled(weight, 0, config, 1)
    if name.endswith((".in_proj_qkv.weight", ".conv1d.weight")):
        return torch.cat([weight[: 2 * keys], value_heads_tiled(weight[2 * keys :], 0, config, value_dim)])
    if name.endswith(".in_proj_z.weight"):
        return value_heads_tiled(weight, 0, config, value_dim)
    if name.endswith(".out_proj.weight"):
        return value_heads_tiled(weight, 1, config, value_dim)
    return weight


def gguf_lora(layer: str, part: str, matrix, config: dict):
    """LoRA's B makes a projection's rows, A reads its columns: tiled as the weight's are."""
    if part == "b" and layer.endswith(("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b")):
        return gguf_weight(layer + ".weight", matrix, config)
    if part == "a" and layer.endswith("linear_attn.out_proj"):
        return value_heads_tiled(matrix, 1, config, config["linear_value_head_dim"])
    return matrix


FAMILY = Family(
    "Qwen3.5",
    ("qwen3_5", "qwen3_5_text"),
    qk_norms=True,
    shape_fields=gated_delta_net,
    gguf_name="qwen35",
    gguf_overrides=gguf_overrides,
    gguf_metadata=gguf_metadata,
    gguf_weights=gguf_weights,
    gguf_weight=gguf_weight,
    gguf_lora=gguf_lora,
    gguf_f32=("ssm_conv1d.weight",),
)
