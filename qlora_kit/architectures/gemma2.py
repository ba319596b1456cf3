"""Gemma 2: Gemma's norms and head, plus logit soft-capping, sliding-window layers and a query scale of its own."""

from qlora_kit.architectures import Family
from qlora_kit.errors import UserError


def gguf_metadata(writer, config: dict) -> None:
    # llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 46-layer 27B,
    # where transformers reads query_pre_attn_scalar: the two agree on Google's models, not necessarily others.
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    scaled_by = config["hidden_size"] // heads if layers == 46 else head_dim
    if config.get("query_pre_attn_scalar", scaled_by) != scaled_by:
        raise UserError(
            f"This Gemma 2 scales attention by query_pre_attn_scalar {config['query_pre_attn_scalar']}, "
            f"and llama.cpp would use {scaled_by}.",
            hint="Export the adapter instead (--format gguf-adapter) and use it on a GGUF of the base.",
        )
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


FAMILY = Family(
    "Gemma 2",
    ("gemma2",),
    norms_per_layer=4,
    fp16_overflows=True,
    gguf_name="gemma2",
    norms_plus_one=True,
    output_is_embeddings=True,
    gguf_metadata=gguf_metadata,
)
