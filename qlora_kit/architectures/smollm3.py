"""SmolLM3: a Llama (llama.cpp's rotary layout too) whose every 4th layer uses no rotary embedding at all (NoPE);
llama.cpp builds that pattern in, so a config with another pattern is refused on export."""

from qlora_kit.architectures import ADAPTER_INSTEAD, Family
from qlora_kit.errors import UserError

LLAMA_CPP_NO_ROPE_STEP = 4  # llama.cpp's SmolLM3 leaves rotary out of layers 4, 8, 12, ...


def gguf_metadata(writer, config: dict) -> None:
    layers = config["num_hidden_layers"]
    expected = [int((i + 1) % LLAMA_CPP_NO_ROPE_STEP != 0) for i in range(layers)]
    if config.get("no_rope_layers", expected) != expected:
        raise UserError(
            "This SmolLM3 leaves rotary embeddings out of other layers than every 4th, which llama.cpp assumes.",
            hint=ADAPTER_INSTEAD,
        )


FAMILY = Family("SmolLM3", ("smollm3",), gguf_name="smollm3", rotary_rows_interleaved=True, gguf_metadata=gguf_metadata)
