"""A model's shape: the facts of its config.json that decide memory and what LoRA adapts, family-neutral (each
family's own reading of its config is its shape_fields, in its file here)."""

from __future__ import annotations

from dataclasses import dataclass

# PEFT 0.21 reads these names in a mixture-of-experts model as transformers 4's per-expert layers and moves them to
# the fused experts, so a shared expert's or a dense MLP's layers of these names cannot be adapted there
NAMES_PEFT_TAKES_FOR_EXPERTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The config facts that decide memory, read from a config.json-like mapping."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qk_norms: bool = False
    qk_norms_span_heads: bool = False
    norms_per_layer: int = 2
    fp16_overflows: bool = False
    family: str = "this family"  # its name, for what the plan says
    tower_params: int = 0  # a multimodal checkpoint's vision tower and projector: loaded frozen, in 16-bit
    sliding_window: bool = False  # some layers attend within a window: the attention mask is materialised
    logit_softcap: bool = False
    max_positions: int = 131072
    # Mixture of experts: in `moe_layers` of the layers the MLP is num_experts experts of width expert_size (each a
    # gate/up and a down projection, quantized expert by expert), experts_per_token of them routed a token by a
    # 16-bit router; the other layers keep the dense MLP
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    moe_layers: int = 0
    expert_biases: bool = False  # Family.expert_biases
    attention_sinks: bool = False  # Family.attention_sinks
    eager_attention: bool = False  # Family.eager_attention
    shared_expert_size: int = 0  # a dense expert every token takes beside the routed ones, with a sigmoid gate
    shared_expert_gated: bool = True  # False: the dense MLP beside the experts has no gate of its own (Gemma 4)
    frozen_mlp_names: tuple[str, ...] = ()  # names_peft_takes_for_experts: layers of these names stay frozen
    layer_params: int = 0  # other 16-bit weights in each layer (Gemma 4's per-expert router scales)
    # Hybrids: in `mixer_layers` of the layers a linear-attention or convolution mixer (its family's shape_fields say
    # what) takes softmax attention's place: its linear layers, its other weights (16-bit) and what its forward keeps
    # a token, as (compute-dtype elements, fp32 elements)
    mixer_layers: int = 0
    mixer_linears: tuple[tuple[str, int, int], ...] = ()
    mixer_params: int = 0
    mixer_activations: tuple[int, int] = (0, 0)
    attention_output_gate: bool = False  # q_proj also gives a sigmoid gate for the attention output (Qwen3.5)
    renamed: tuple[tuple[str, str], ...] = ()  # (Llama's layer name, the family's), where a family names them its way
    # Full-attention layers shaped unlike the sliding-window ones (Gemma 4): in `global_layers` of the layers, the
    # heads are global_head_dim wide over global_kv_heads KV heads, and the keys serve as values where global_values_are_keys
    global_layers: int = 0
    global_head_dim: int = 0
    global_kv_heads: int = 0
    global_values_are_keys: bool = False

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelShape":
        """Build from config.json keys; what they leave unsaid (fused projections, q/k norms) from the family."""
        from qlora_kit.architectures import Family, family_of

        outer, config = config, config.get("text_config", config)
        heads = config["num_attention_heads"]
        family = family_of(config) or Family("unknown", ())
        holder = family_of(outer)  # the family of the checkpoint as a whole knows its towers
        fields = dict(
            name=name,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_embeddings=config.get("tie_word_embeddings", True),
            qkv_bias=bool(config.get("attention_bias", False)),
            fused_qkv=family.fused_qkv,
            fused_gate_up=family.fused_gate_up,
            qk_norms=family.qk_norms,
            qk_norms_span_heads=family.qk_norms_span_heads,
            norms_per_layer=family.norms_per_layer,
            fp16_overflows=family.fp16_overflows,
            eager_attention=family.eager_attention,
            expert_biases=family.expert_biases,
            attention_sinks=family.attention_sinks,
            family=family.name,
            tower_params=holder.tower_parameters(outer) if holder and holder.tower_parameters else 0,
            logit_softcap=bool(config.get("final_logit_softcapping")),
            sliding_window=bool(config.get("sliding_window"))
            and config.get("use_sliding_window", True)
            and "sliding_attention" in config.get("layer_types", ["sliding_attention"]),
            max_positions=config.get("max_position_embeddings") or 131072,
            frozen_mlp_names=names_peft_takes_for_experts(config),
            **moe_shape(config),
        )
        return cls(**fields | (family.shape_fields(config) if family.shape_fields else {}))

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of each linear layer in one decoder block (a dense one's, for MoE)."""
        return self.attention_shapes() + self.mlp_shapes()

    def attention_shapes(self, full: bool = False) -> list[tuple[str, int, int]]:
        """A softmax attention layer's linear layers; full: a global layer's, where they differ (global_layers)."""
        head_dim, kv_heads = (
            (self.global_head_dim, self.global_kv_heads) if full else (self.head_dim, self.num_kv_heads)
        )
        h, q, kv = self.hidden_size, self.num_heads * head_dim, kv_heads * head_dim
        queries = 2 * q if self.attention_output_gate else q
        values = [] if full and self.global_values_are_keys else [("v_proj", h, kv)]
        attention = (
            [("qkv_proj", h, q + 2 * kv)] if self.fused_qkv else [("q_proj", h, queries), ("k_proj", h, kv), *values]
        )
        return self._named(attention + [("o_proj", q, h)])

    def mlp_shapes(self, width: int | None = None) -> list[tuple[str, int, int]]:
        h, i = self.hidden_size, width or self.intermediate_size
        mlp = [("gate_up_proj", h, 2 * i)] if self.fused_gate_up else [("gate_proj", h, i), ("up_proj", h, i)]
        return self._named(mlp + [("down_proj", i, h)])

    def expert_shapes(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one expert's weights; [] for a dense model."""
        h, w = self.hidden_size, self.expert_size
        return [("gate_up_proj", h, 2 * w), ("down_proj", w, h)] if self.num_experts else []

    def shared_expert_shapes(self) -> list[tuple[str, int, int]]:
        h = self.hidden_size
        gate = [("shared_expert_gate", h, 1)] if self.shared_expert_gated else []
        return self.mlp_shapes(self.shared_expert_size) + gate if self.shared_expert_size else []

    def _named(self, shapes: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        names = dict(self.renamed)
        return [(names.get(name, name), a, b) for name, a, b in shapes]

    def layer_counts(self) -> list[tuple[list[tuple[str, int, int]], int]]:
        """(linear layers, how many times the model holds them): the softmax attention layers (global ones apart where
        they differ), a hybrid's other mixers, the dense MLPs, each expert's weights once per expert and MoE layer, and
        the shared experts."""
        dense = self.num_layers - self.moe_layers
        return [
            (self.attention_shapes(), self.num_layers - self.mixer_layers - self.global_layers),
            (self.attention_shapes(full=True), self.global_layers),
            (list(self.mixer_linears), self.mixer_layers),
            (self.mlp_shapes(), dense),
            (self.expert_shapes(), self.moe_layers * self.num_experts),
            (self.shared_expert_shapes(), self.moe_layers),
        ]

    def linear_params(self) -> int:
        return sum(count * sum(a * b for _, a, b in shapes) for shapes, count in self.layer_counts())

    def unquantized_params(self) -> int:
        """Embeddings, an untied head, norms and biases: the weights bitsandbytes leaves in 16-bit."""
        h = self.hidden_size
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        norms = (self.norms_per_layer * self.num_layers + 1) * h
        if self.qk_norms:  # each head's queries and keys, or (OLMo) all heads' projections at once
            heads = self.num_heads + self.num_kv_heads if self.qk_norms_span_heads else 2
            local = self.num_layers - self.mixer_layers - self.global_layers
            norms += local * heads * self.head_dim + self.global_layers * 2 * self.global_head_dim
        bias = self.num_layers * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        routers = self.moe_layers * self.num_experts * h
        if self.expert_biases:  # each expert's two projections, the router's and o_proj's
            routers += self.moe_layers * self.num_experts * (2 * self.expert_size + h + 1)
            bias += self.num_layers * h
        sinks = self.num_layers * self.num_heads if self.attention_sinks else 0
        others = self.mixer_layers * self.mixer_params + self.num_layers * self.layer_params
        return embeddings + norms + bias + routers + sinks + others

    def parameter_count(self) -> int:
        return self.linear_params() + self.unquantized_params() + self.tower_params


def names_peft_takes_for_experts(config: dict) -> tuple[str, ...]:
    """The layer names PEFT 0.21 moves onto a mixture-of-experts model's fused experts (Family.mlp_names_taken_by_peft),
    so that a shared expert's or dense MLP's layers of those names cannot be adapted; none for a dense model."""
    from qlora_kit.architectures import family_of

    family = family_of(config)
    taken = moe_shape(config) and (family is None or family.mlp_names_taken_by_peft)
    return NAMES_PEFT_TAKES_FOR_EXPERTS if taken else ()


def moe_shape(config: dict) -> dict:
    """ModelShape's mixture-of-experts fields from a config.json (none for a dense model)."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 0  # transformers 5 saves the latter
    if not experts:
        return {}
    layers = config["num_hidden_layers"]
    step, dense = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
    sparse = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
    routed = config.get("num_experts_per_tok") or config.get("top_k_experts") or 1  # the latter: Gemma 4
    return dict(
        num_experts=experts,
        experts_per_token=routed,
        expert_size=config.get("moe_intermediate_size") or config["intermediate_size"],
        moe_layers=sparse,
    )
