"""Model: the base loaded in 4-bit (NF4, double quant, through bitsandbytes) with fresh LoRA weights on it.

load.py loads the tokenizer and the 4-bit base, attaches LoRA as a recipe says, picks device and dtype and sets
gradient checkpointing; experts.py quantizes a mixture of experts' fused weights and puts LoRA on them.
Imports: data/, plan/, probe/, architectures/ and the shared modules.
"""
