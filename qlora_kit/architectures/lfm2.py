"""LFM2 (Liquid AI, 350M-2.6B): a hybrid. Most layers mix tokens with a gated short convolution (in_proj gives B, C
and x; the output is C * conv(B * x), over the last 3 tokens) and the rest with softmax attention with q/k norms
(its output projection is named out_proj). The MLP's layers are w1, w3 and w2, and its width is 2/3 of
intermediate_size, scaled and rounded up as block_auto_adjust_ff_dim says; the final norm is embedding_norm."""

from qlora_kit.architectures import Family


def feed_forward_width(config: dict) -> int:
    """The MLP's width as transformers builds it from intermediate_size."""
    width = config["intermediate_size"]
    if config.get("block_auto_adjust_ff_dim"):
        width = int(2 * width / 3)
        if config.get("block_ffn_dim_multiplier") is not None:
            multiple = config["block_multiple_of"]
            width = multiple * -(-int(config["block_ffn_dim_multiplier"] * width) // multiple)
    return width


def short_convolutions(config: dict) -> dict:
    """ModelShape's fields for the convolution layers and LFM2's layer names."""
    h, biased = config["hidden_size"], bool(config.get("conv_bias"))
    kinds = config.get("layer_types") or ["conv"] * config["num_hidden_layers"]
    return dict(
        intermediate_size=feed_forward_width(config),
        mixer_layers=sum(1 for kind in kinds if kind != "full_attention"),
        mixer_linears=(("in_proj", h, 3 * h), ("out_proj", h, h)),
        mixer_params=h * (config.get("conv_L_cache") or 3) + (5 * h if biased else 0),  # the projections' biases too
        # fitted on CPU (benchmarks/family_memory.py): in_proj's output (3 h), B * x and C * y; the convolution's
        # input and output are views of these, or freed
        mixer_activations=(5 * h, 0),
        renamed=(("o_proj", "out_proj"), ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")),
    )


def gguf_overrides(config: dict) -> dict:
    """llama.cpp's LFM2 reads the MLP's real width, a KV head count per layer (0 in a convolution layer) and norm_eps."""
    kinds = config.get("layer_types") or ["conv"] * config["num_hidden_layers"]
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return dict(
        feed_forward_length=feed_forward_width(config),
        layer_norm_rms_eps=config["norm_eps"],
        head_count_kv=[heads if kind == "full_attention" else 0 for kind in kinds],
    )


def gguf_metadata(writer, config: dict) -> None:
    writer.add_shortconv_l_cache(config.get("conv_L_cache") or 3)


def gguf_weight(name: str, weight, config: dict):
    """The convolution's weight (channels x 1 x kernel in transformers) is channels x kernel in llama.cpp."""
    return weight.squeeze(1) if name.endswith("conv.conv.weight") else weight


FAMILY = Family(
    "LFM2",
    ("lfm2",),
    qk_norms=True,
    shape_fields=short_convolutions,
    gguf_name="lfm2",
    gguf_overrides=gguf_overrides,
    gguf_metadata=gguf_metadata,
    gguf_weight=gguf_weight,
    gguf_f32=("shortconv.conv.weight",),
)
