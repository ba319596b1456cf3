"""Gemma 3 (text: 270M, 1B; the language model of 4B-27B): Gemma's norms (+1) and tied head, q/k norms, five
sliding-window layers to each full one, a rotary base per layer type (10k local, 1M global, linearly scaled on 4B+).
llama.cpp builds the 5:1 pattern and the local base in, so configs that differ are refused on export.
The 4B-27B checkpoints (model_type gemma3, Gemma3ForConditionalGeneration) hold a SigLIP vision tower and a
projector beside the language model: trained on text, they stay frozen in 16-bit and get no LoRA."""

from qlora_kit.architectures import ADAPTER_INSTEAD, Family
from qlora_kit.errors import UserError

LLAMA_CPP_SWA_PATTERN = 6  # llama.cpp's Gemma 3: every 6th layer attends fully, the others within the window
LLAMA_CPP_LOCAL_ROPE_BASE = 10000.0


def gguf_metadata(writer, config: dict) -> None:
    import gguf

    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    expected = [
        "full_attention" if (i + 1) % LLAMA_CPP_SWA_PATTERN == 0 else "sliding_attention" for i in range(layers)
    ]
    rope = config.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", LLAMA_CPP_LOCAL_ROPE_BASE)
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 62-layer 27B
    scaled_by = config["hidden_size"] // heads if layers == 62 else head_dim
    differs = [
        what
        for what, same in (
            ("which layers attend within the sliding window", config.get("layer_types", expected) == expected),
            (f"the local layers' rotary base ({local:g})", local == LLAMA_CPP_LOCAL_ROPE_BASE),
            (
                f"query_pre_attn_scalar ({config.get('query_pre_attn_scalar')})",
                config.get("query_pre_attn_scalar", scaled_by) == scaled_by,
            ),
            ("logit soft-capping", not config.get("attn_logit_softcapping")),
        )
        if not same
    ]
    if differs:
        raise UserError(
            f"This Gemma 3 differs from what llama.cpp builds in: {', '.join(differs)}.", hint=ADAPTER_INSTEAD
        )
    writer.add_sliding_window(config["sliding_window"])
    full = rope.get("full_attention") or {}
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])


def vision_parameters(config: dict) -> int:
    """The SigLIP vision tower's and the projector's parameters, from a multimodal config's vision_config."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return 0
    d, i, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    patch, channels = vision.get("patch_size", 14), vision.get("num_channels", 3)
    patches = (vision.get("image_size", 224) // patch) ** 2
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # attention, MLP, two layer norms (with biases)
    embeddings = channels * patch * patch * d + d + patches * d  # patch convolution and position embeddings
    # SigLIP's attention-pooling head (probe, attention, norm, MLP), which Gemma 3's checkpoints leave out
    head = d + 3 * d * d + 3 * d + d * d + d + 2 * d + (d * i + i) + (i * d + d)
    head = head if vision.get("vision_use_head", True) else 0
    text_hidden = config["text_config"]["hidden_size"]
    projector = d * text_hidden + d  # the input projection and its soft-embedding norm
    return layers * layer + embeddings + 2 * d + head + projector  # 2 * d: the post layer norm


FAMILY = Family(
    "Gemma 3",
    ("gemma3_text", "gemma3"),
    towers=("vision_tower", "multi_modal_projector"),
    tower_parameters=vision_parameters,
    qk_norms=True,
    norms_per_layer=4,
    fp16_overflows=True,
    gguf_name="gemma3",
    norms_plus_one=True,
    output_is_embeddings=True,
    rope_scalings=("linear",),
    gguf_metadata=gguf_metadata,
)
