"""OLMo 3: norms after attention and after the MLP instead of before, q/k norms over all heads' projections at
once, no grouped-query attention in the 7B, a sliding window in three layers of every four and YaRN on the
fourth. llama.cpp runs it as `olmo2` with the 3:1 pattern built in, so a config with another is refused on export."""

import math

from qlora_kit.architectures import ADAPTER_INSTEAD, Family
from qlora_kit.errors import UserError

LLAMA_CPP_SWA_PATTERN = 4  # llama.cpp's OLMo 3: every 4th layer attends fully, the others within the window


def gguf_metadata(writer, config: dict) -> None:
    import gguf

    expected = [
        "full_attention" if (i + 1) % LLAMA_CPP_SWA_PATTERN == 0 else "sliding_attention"
        for i in range(config["num_hidden_layers"])
    ]
    if config.get("layer_types", expected) != expected:
        raise UserError(
            "This OLMo 3 attends within its sliding window in other layers than three of every four, "
            "which llama.cpp assumes.",
            hint=ADAPTER_INSTEAD,
        )
    rope = config.get("rope_parameters") or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    if local.get("rope_theta", full.get("rope_theta")) != full.get("rope_theta"):
        raise UserError(
            "This OLMo 3's sliding-window layers have a rotary base of their own, which llama.cpp does not read.",
            hint=ADAPTER_INSTEAD,
        )
    writer.add_sliding_window(config["sliding_window"])
    if full.get("rope_type") == "yarn":  # the full-attention layers only, in llama.cpp as in transformers
        # llama.cpp's YaRN takes its attention scale (0.1 ln factor + 1) and betas (32, 1) as transformers' defaults
        defaults = dict(attention_factor=0.1 * math.log(full["factor"]) + 1, beta_fast=32.0, beta_slow=1.0)
        if any(not math.isclose(full.get(key, value), value, rel_tol=1e-6) for key, value in defaults.items()):
            raise UserError(
                "This OLMo 3's YaRN rotary scaling sets an attention factor or betas other than llama.cpp computes.",
                hint=ADAPTER_INSTEAD,
            )
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])


FAMILY = Family(
    "OLMo 3",
    ("olmo3",),
    qk_norms=True,
    qk_norms_span_heads=True,
    gguf_name="olmo2",
    rope_scalings=("yarn",),
    gguf_metadata=gguf_metadata,
)
