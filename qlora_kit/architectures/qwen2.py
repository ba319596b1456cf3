"""Qwen2 and Qwen2.5: biases on q, k and v (counted by the memory model from attention_bias or the family)."""

from qlora_kit.architectures import Family

FAMILY = Family("Qwen2/2.5", ("qwen2",), gguf_name="qwen2")
