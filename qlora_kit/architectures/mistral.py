"""Mistral 7B: a Llama in llama.cpp's eyes (the same tensors and rotary layout)."""

from qlora_kit.architectures import Family

FAMILY = Family("Mistral", ("mistral",), gguf_name="llama", rotary_rows_interleaved=True)
