"""gpt-oss (20b, 120b): attention with biases and a learned sink per head, sliding-window layers alternating with
full ones, and a mixture of experts in every layer (32 or 128 experts, 4 routed a token) whose weights carry biases
and a clamped SwiGLU. The hub checkpoints hold the experts in MXFP4, which transformers dequantizes on load; they are
re-quantized to NF4 expert by expert as they arrive (qlora_kit/experts.py)."""

from qlora_kit.architectures import Family

FAMILY = Family("gpt-oss", ("gpt_oss",), eager_attention=True, attention_sinks=True, expert_biases=True)
