"""Gemma (1): RMSNorm scales by 1 + weight, the output head is the embeddings, activations exceed fp16's range."""

from qlora_kit.architectures import Family

FAMILY = Family(
    "Gemma", ("gemma",), fp16_overflows=True, gguf_name="gemma", norms_plus_one=True, output_is_embeddings=True
)
