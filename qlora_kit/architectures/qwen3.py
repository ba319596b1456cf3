"""Qwen3 (dense): an RMSNorm over each head's queries and keys, head_dim set apart from hidden_size / heads (128
in every size), no q/k/v biases; tied embeddings up to 4B. llama.cpp reads the norms as attn_q_norm/attn_k_norm."""

from qlora_kit.architectures import Family

FAMILY = Family("Qwen3", ("qwen3",), qk_norms=True, gguf_name="qwen3")
