"""Phi-3 and Phi-3.5: q, k and v fused into one qkv_proj, gate and up into one gate_up_proj."""

from qlora_kit.architectures import Family


def gguf_metadata(writer, config: dict) -> None:
    writer.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings")
                                         or config["max_position_embeddings"])
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: no sliding window, as llama.cpp reads it


FAMILY = Family("Phi-3", ("phi3",), fused_qkv=True, fused_gate_up=True, gguf_name="phi3", gguf_metadata=gguf_metadata)
