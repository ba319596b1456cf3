"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (q/k norms, head_dim 128) with a mixture of experts in
every layer's MLP: 128 experts of width moe_intermediate_size, 8 routed a token, no shared expert. The experts are
held in 4-bit and adapted per expert (qlora_kit/experts.py); the router stays frozen. llama.cpp runs it as
qwen3moe, with the experts' weights stacked per layer; it renormalises the routed experts' weights always and has
every layer sparse, so a config that differs is refused on export."""

from qlora_kit.architectures import Family
from qlora_kit.errors import UserError


def gguf_metadata(writer, config: dict) -> None:
    differs = [what for what, same in (
        ("norm_topk_prob false (llama.cpp renormalises the chosen experts' weights)", config.get("norm_topk_prob", True)),
        ("dense MLP layers (mlp_only_layers, decoder_sparse_step)",
         not config.get("mlp_only_layers") and config.get("decoder_sparse_step", 1) == 1)) if not same]
    if differs:
        raise UserError(f"This Qwen3-MoE differs from what llama.cpp builds in: {', '.join(differs)}.",
                        hint="Keep the adapter for transformers and PEFT; llama.cpp cannot run this model as trained.")
    writer.add_expert_count(config.get("num_experts") or config["num_local_experts"])  # transformers 5 saves the latter
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


FAMILY = Family("Qwen3-MoE", ("qwen3_moe",), qk_norms=True, gguf_name="qwen3moe", gguf_metadata=gguf_metadata)
