"""gpt-oss (20b, 120b): attention with biases and a learned sink per head, sliding-window layers alternating with
full ones, and a mixture of experts in every layer (32 or 128 experts, 4 routed a token) whose weights carry biases
and a clamped SwiGLU. The hub checkpoints hold the experts in MXFP4 (e2m1 values, an e8m0 scale a block of 32): read
through transformers' own MXFP4 dequantization, one tensor at a time, they are re-quantized to NF4 expert by expert
as they arrive (experts_in_4bit(from_mxfp4=True)); a 16-bit load (merge) asks transformers to dequantize them."""

from qlora_kit.architectures import Family

FAMILY = Family("gpt-oss", ("gpt_oss",), eager_attention=True, attention_sinks=True, expert_biases=True)
