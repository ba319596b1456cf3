"""Gemma 4 (26B-A4B and 31B; the language model of checkpoints that hold a vision tower beside it): Gemma 3's
sliding-window layers, five to each full one, whose full layers are shaped apart (heads of global_head_dim over
num_global_key_value_heads KV heads, and with attention_k_eq_v no v_proj: the keys serve as values). The 26B-A4B
adds to every layer's dense MLP 128 experts of width 704, 8 routed a token by a router that is a linear layer
(router.proj, kept 16-bit and frozen as every family's router), with norms of their own around the two. PEFT
does not take this family's gate_proj/up_proj/down_proj for experts, so the dense MLP is adapted as in a dense
model. The small E2B/E4B, with per-layer embeddings and shared KV layers, are not modelled yet."""

from qlora_kit.architectures import Family
from qlora_kit.errors import UserError

FULL_EVERY = 6  # transformers' default layer_types: five sliding-window layers, then a full one


def full_attention_layers(config: dict) -> list[int]:
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or [
        "full_attention" if (i + 1) % FULL_EVERY == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)
    ]
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def shape_fields(config: dict) -> dict:
    if config.get("hidden_size_per_layer_input") or config.get("num_kv_shared_layers"):
        raise UserError(
            "Gemma 4 E2B and E4B (per-layer embeddings, shared KV layers) are not in qlora-kit's memory model yet.",
            hint="Plan and train Gemma 4 26B-A4B or 31B, or Gemma 3.",
        )
    full = full_attention_layers(config)
    # A saved config spells the full layers' shape per layer (per_layer_config, keyed by the layer's index as "5" in
    # config.json, "05" in a config object's dict); a published one by two keys
    per_layer = {int(layer): shape for layer, shape in (config.get("per_layer_config") or {}).items()}
    overrides = per_layer.get(full[0], {}) if full else {}
    values_are_keys = bool(config.get("attention_k_eq_v"))
    kv_heads = config.get("num_global_key_value_heads") if values_are_keys else None
    fields = dict(
        global_layers=len(full),
        global_values_are_keys=values_are_keys,
        global_head_dim=overrides.get("head_dim") or config.get("global_head_dim") or 512,
        global_kv_heads=overrides.get("num_key_value_heads") or kv_heads or config["num_key_value_heads"],
    )
    if config.get("enable_moe_block"):
        # The dense MLP beside the experts (no gate of its own), and four more norms (one the router's). Their weights:
        # four hidden vectors, the router's scale and a scale per expert. What they keep for backward is one norm's
        # worth: the router's and the experts' norms read the residual the MLP's norm keeps already, and with their
        # weights frozen each keeps only its input. Counting all eight norms as Llama's two, a CPU step measured 1.14
        # of its estimate; counted so, 1.02-1.09 at five points (benchmarks/family_memory.py)
        h = config["hidden_size"]
        fields |= dict(
            shared_expert_size=config["intermediate_size"],
            shared_expert_gated=False,
            norms_per_layer=5,
            layer_params=3 * h + config["num_experts"],
        )
    return fields


def vision_parameters(config: dict) -> int:
    """The vision tower's and its projection's parameters, from a multimodal config's vision_config."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict) or "hidden_size" not in vision:
        return 0
    d, i, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    heads, head_dim = vision["num_attention_heads"], vision.get("head_dim", 64)
    q, kv = heads * head_dim, vision.get("num_key_value_heads", heads) * head_dim
    patch, positions = vision.get("patch_size", 16), vision.get("position_embedding_size", 10240)
    layer = d * q + 2 * d * kv + q * d + 2 * head_dim + 3 * d * i + 4 * d  # attention, q/k norms, MLP, four norms
    embedder = 2 * positions * d + 3 * patch * patch * d  # two axes of position embeddings, the patch projection
    return layers * layer + embedder + d * config["text_config"]["hidden_size"]  # and the projection to the text


FAMILY = Family(
    "Gemma 4",
    ("gemma4_text", "gemma4"),
    towers=("vision_tower", "embed_vision", "audio_tower", "embed_audio"),
    tower_parameters=vision_parameters,
    qk_norms=True,
    norms_per_layer=4,
    fp16_overflows=True,
    output_is_embeddings=True,
    shape_fields=shape_fields,
    mlp_names_taken_by_peft=False,
    routers=("router",),
)
