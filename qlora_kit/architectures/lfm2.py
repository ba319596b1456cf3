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


FAMILY = Family("LFM2", ("lfm2",), qk_norms=True, shape_fields=short_convolutions)
