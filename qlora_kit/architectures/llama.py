"""Llama 2 and 3.x (and SmolLM2, which is a Llama): llama.cpp rotates interleaved pairs, so q and k rows are
reordered on export; Llama 3.1's rotary scaling is written as llama.cpp's rope_freqs."""

from qlora_kit.architectures import Family

FAMILY = Family(
    "Llama 2/3.x, SmolLM2", ("llama",), gguf_name="llama", rotary_rows_interleaved=True, rope_scalings=("llama3",)
)
