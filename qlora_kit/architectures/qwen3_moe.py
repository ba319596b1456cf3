"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (q/k norms, head_dim 128) with a mixture of experts in
every layer's MLP: 128 experts of width moe_intermediate_size, 8 routed a token, no shared expert. The experts are
held in 4-bit and adapted per expert (qlora_kit/model/experts.py); the router stays frozen. llama.cpp runs it as
qwen3moe, with the experts' weights stacked per layer; it renormalises the routed experts' weights always and has
every layer sparse, so a config that differs is refused on export."""

from qlora_kit.architectures import Family
from qlora_kit.errors import UserError


def gguf_metadata(writer, config: dict) -> None:
    from qlora_kit.architectures.shape import moe_shape

    moe = moe_shape(config)
    differs = [
        what
        for what, same in (
            (
                "norm_topk_prob false (llama.cpp renormalises the chosen experts' weights)",
                config.get("norm_topk_prob", True),
            ),
            (
                "dense MLP layers (mlp_only_layers, decoder_sparse_step)",
                moe["moe_layers"] == config["num_hidden_layers"],
            ),
        )
        if not same
    ]
    if differs:
        raise UserError(
            f"This Qwen3-MoE differs from what llama.cpp builds in: {', '.join(differs)}.",
            hint="Keep the adapter for transformers and PEFT; llama.cpp cannot run this model as trained.",
        )
    writer.add_expert_count(moe["num_experts"])
    writer.add_expert_used_count(moe["experts_per_token"])
    writer.add_expert_feed_forward_length(moe["expert_size"])


FAMILY = Family("Qwen3-MoE", ("qwen3_moe",), qk_norms=True, gguf_name="qwen3moe", gguf_metadata=gguf_metadata)
