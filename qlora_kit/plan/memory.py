"""The memory model: peak memory of a qlora-kit run, per component, from a model config and a recipe.

Pure arithmetic: no torch, no weights. It follows what qlora-kit's own loop allocates (NF4 linear weights,
16-bit everything else, fp32 LoRA, checkpointed layer inputs, one layer recomputed at a time, a chunked loss),
so its numbers are for this tool, not for other trainers. docs/memory.md explains each term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.plan.recipes import Recipe, optimizer_in_use, rank_of_experts, target_names
from qlora_kit.probe.hardware import CUDA_CONTEXT_BYTES
from qlora_kit.units import GIB

NF4_BLOCK = 64  # weights per absmax constant
DQ_BLOCK = 256  # absmax constants per second-level constant with double quantization
HOST_PROCESS_BYTES = int(0.7 * GIB)  # measured: libraries, tokenizer and loading residue of a CPU run
CHUNK_LOGIT_ELEMENTS = 2**25  # 128 MiB of fp32 logits per chunk of the chunked loss
TIGHT_FRACTION = 0.90  # above this share of the card a run is "tight": fragmentation may tip it over


@dataclass
class MemoryPlan:
    """Predicted peak memory of one run, per component, against a device's capacity."""

    model: str
    device: str  # "cuda" or "cpu"
    seq_len: int
    micro_batch: int
    rank: int
    components: dict[str, int]  # bytes, in the order they are shown
    trainable_params: int
    total_params: int
    adapter_bytes: int
    capacity_bytes: int | None = None  # the card's memory (or the host's available RAM)
    details: dict[str, int] = field(default_factory=dict)  # the two candidates for the backward peak
    notes: list[str] = field(default_factory=list)

    @property
    def allocated_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated() should report."""
        return sum(v for k, v in self.components.items() if k not in ("allocator_slack", "cuda_context"))

    @property
    def total_bytes(self) -> int:
        """Everything the device must hold: what nvidia-smi shows at the peak (or the process RSS on CPU)."""
        return sum(self.components.values())

    @property
    def verdict(self) -> str:
        if self.capacity_bytes is None:
            return "unknown"
        if self.total_bytes > self.capacity_bytes:
            return "does not fit"
        return "tight" if self.total_bytes > TIGHT_FRACTION * self.capacity_bytes else "fits"

    def to_dict(self) -> dict:
        """JSON-ready: components in bytes plus the derived totals and verdict."""
        return {
            **asdict(self),
            "allocated_bytes": self.allocated_bytes,
            "total_bytes": self.total_bytes,
            "verdict": self.verdict,
        }


def lora_params(
    shape: ModelShape,
    rank: int,
    target_modules: str = "all-linear",
    use_dora: bool = False,
    expert_rank: int | None = None,
) -> int:
    """Trainable LoRA parameters: rank x (in + out) for every targeted linear layer (expert_rank for an expert's
    weights), and with DoRA a magnitude per output feature."""
    total = 0
    for shapes, count in shape.layer_counts():
        experts = bool(shapes) and shapes == shape.expert_shapes()
        layers = [
            layer for layer in targeted(shapes, target_modules) if experts or layer[0] not in shape.frozen_mlp_names
        ]
        r = (expert_rank or rank) if experts else rank
        total += count * (r * sum(a + b for _, a, b in layers) + (sum(b for _, _, b in layers) if use_dora else 0))
    return total


def targeted(shapes: list[tuple[str, int, int]], target_modules: str) -> list[tuple[str, int, int]]:
    """Those of the layers LoRA adapts."""
    names = target_names(target_modules)
    return list(shapes) if names == "all-linear" else [layer for layer in shapes if layer[0] in names]


def quantized_weight_bytes(shape: ModelShape, double_quant: bool = True) -> int:
    """NF4 linear weights: half a byte each, one absmax per 64 (8-bit with double quant, plus an fp32 one per
    256 blocks and a 256-entry code table; else fp32), and NF4's 16-entry code table, per layer."""
    total = 0
    for shapes, count in shape.layer_counts():  # each expert is quantized on its own, as a linear layer is
        for _, a, b in shapes:
            blocks = -(-a * b // NF4_BLOCK)
            constants = blocks + 4 * -(-blocks // DQ_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
            total += count * (a * b // 2 + constants + 4 * 16)
    return total


def estimate_peak_memory(
    shape: ModelShape,
    recipe: Recipe,
    device: str = "cuda",
    capacity_bytes: int | None = None,
    gpus: int = 1,
    strategy: str = "ddp",
    bf16: bool = True,
) -> MemoryPlan:
    """Per-component peak memory of training `shape` with `recipe` on a CUDA GPU or the CPU; with gpus > 1, on each
    GPU of a data-parallel (ddp: every GPU holds the model) or sharded (fsdp: weights and LoRA state split;
    fsdp_offload: the shards in host RAM) run. bf16: whether the GPU computes in it (without, a family that
    overflows fp16 computes in fp32, as model.pick_device_and_dtype chooses)."""
    # Longer than a screen on purpose: one term per component, in docs/memory.md's order, so the model is read and
    # checked against the doc in one place; split up, each term would need the same dozen shape variables.
    on_gpu = device == "cuda"
    cb = (
        4
        if recipe.precision == "fp32"
        or (recipe.precision == "auto" and (not on_gpu or (not bf16 and shape.fp16_overflows)))
        else 2
    )
    h, i, V, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_layers
    # A preference example is two sequences (prompt + chosen, prompt + rejected), run as one batch.
    sequences = recipe.micro_batch * (2 if recipe.method in ("dpo", "orpo") else 1)
    tokens = recipe.seq_len * sequences
    lora = lora_params(
        shape, recipe.rank, recipe.target_modules, recipe.use_dora, rank_of_experts(recipe, shape.experts_per_token)
    )

    if shape.moe_layers:
        # Each token is routed to k experts, so its MLP activations are k copies at the experts' width: the gathered
        # input and the output row (h each), gate/up and act(gate) (3 w); the router's fp32 logits and softmax.
        # Backward adds 2 h + w a copy (fitted on CPU, benchmarks/family_memory.py: k 2-8, width 128-512, 16-64 experts)
        k, w = shape.experts_per_token, shape.expert_size
        mlp_per_token = k * (2 * h + 3 * w) * cb + 2 * shape.num_experts * 4
        mlp_backward = k * (2 * h + w) * cb
    else:
        mlp_per_token, mlp_backward = 4 * i * cb, 3 * i * cb // 2
    if shape.shared_expert_size:  # a dense MLP beside the routed experts, and its gate
        mlp_per_token += 4 * shape.shared_expert_size * cb + 2 * cb
        mlp_backward += 3 * shape.shared_expert_size * cb // 2

    def adapted_layer_copies(shapes: list[tuple[str, int, int]]) -> int:
        """Per token: each LoRA layer's dropped-out copy of its input and the mask; DoRA's base and LoRA outputs,
        kept to rescale them by the magnitudes."""
        layers = targeted(shapes, recipe.target_modules)
        dropout = sum(a for _, a, _ in layers) * (cb + 1) if recipe.dropout > 0 else 0
        return dropout + (2 * sum(b for _, _, b in layers) * cb if recipe.use_dora else 0)

    # One decoder layer's activations kept for backward (forward pass), in bytes per token: what every layer keeps,
    # then what its softmax attention or (in a hybrid's other layers) its mixer keeps
    per_token_block = (
        shape.norms_per_layer * h * (4 + cb)  # RMSNorms (two, or four in Gemma 2/3): fp32 upcast input and output
        + 2 * h * cb  # the two residual sums
        + mlp_per_token  # gate, up, act(gate), act(gate) * up (and for experts, their inputs and outputs)
        + adapted_layer_copies(shape.mlp_shapes())
    )

    def per_token_attention_layer(full: bool = False) -> int:
        head_dim, kv_heads = (
            (shape.global_head_dim, shape.global_kv_heads) if full else (shape.head_dim, shape.num_kv_heads)
        )
        q, kv = shape.num_heads * head_dim, kv_heads * head_dim
        return per_token_block + (
            ((q + kv) * 4 if shape.qk_norms else 0)  # q/k norms (Qwen3, Gemma 3, OLMo 3): their fp32 upcast (measured)
            + (q + 2 * kv) * cb
            + (q + kv) * cb  # q, k, v projections and their rotated copies
            + 2 * q * cb  # attention output (+ its o_proj input)
            + (4 * q * cb if shape.attention_output_gate else 0)  # the gate half of q_proj, its sigmoid, the product
            + adapted_layer_copies(shape.attention_shapes(full))
        )

    per_token_attention = per_token_attention_layer()
    per_token_global = per_token_attention_layer(full=True) if shape.global_layers else 0
    mixed, fp32 = shape.mixer_activations
    per_token_mixer = per_token_block + mixed * cb + fp32 * 4 + adapted_layer_copies(list(shape.mixer_linears))
    per_token_layer = max(per_token_attention, per_token_global, per_token_mixer if shape.mixer_layers else 0)
    # a 4-bit weight's (an expert's) 16-bit copy, forward and backward
    dequantized = 2 * max(a * b for shapes, count in shape.layer_counts() if count for _, a, b in shapes) * cb
    # Backward through one layer: activation gradients (measured on CPU: ~1.5 x intermediate per token).
    # A family whose attention transformers runs eagerly (gpt-oss: no SDPA kernel takes its sinks) holds each layer's
    # softmax scores whole, heads x seq x seq a sequence, and backward half as much again (measured on CPU)
    scores = sequences * shape.num_heads * recipe.seq_len**2 * cb if shape.eager_attention else 0
    backward_only = tokens * mlp_backward + dequantized + 3 * scores // 2
    recompute = tokens * per_token_layer + scores + backward_only  # a checkpointed layer runs forward again first
    checkpointed = L - min(recipe.uncheckpointed_layers, L) if recipe.gradient_checkpointing else 0
    # the last layers keep every activation; a hybrid's mixers (and Gemma 4's global layers) are spread evenly among them
    mixers, full = shape.mixer_layers / L, shape.global_layers / L
    per_token_kept = (1 - mixers - full) * per_token_attention + mixers * per_token_mixer + full * per_token_global
    kept = int((L - checkpointed) * (tokens * per_token_kept + scores))
    inputs = checkpointed * tokens * h * cb  # a checkpointed layer keeps only its input
    offloaded = 0
    if recipe.activation_offload and on_gpu:
        offloaded, inputs = inputs, 0  # they wait in pinned host RAM until backward needs them
    # Layers that attend within a sliding window get a (seq x seq) mask per sequence, made once per forward and held
    # by every checkpointed layer until backward (measured on CPU, OLMo 3 at 2 x 2048 tokens: 36 MiB, about the
    # compute dtype's size per element, where a causal-only model makes none).
    window_mask = sequences * recipe.seq_len**2 * cb if shape.sliding_window else 0
    saved = inputs + kept + window_mask

    chunk = min(recipe.loss_chunk_tokens or default_chunk_tokens(V), tokens)
    per_logit = 12 + (4 if shape.logit_softcap else 0)  # measured: fp32 logits, log-softmax, gradient (+ tanh)
    loss = tokens * h * (4 + 3 * cb) + chunk * V * per_logit  # final norm, labelled rows and their gradient
    # DPO's reference: the same model with the adapter off, after the policy's forward and with no graph kept: one
    # layer's activations at a time, the final hidden states, and one chunk's log-probs. Precomputed, no step has it.
    on_the_fly = recipe.method == "dpo" and recipe.reference != "precomputed"
    reference = tokens * (per_token_layer + h * cb) + chunk * V * 8 if on_the_fly else 0

    components = {
        "quantized_weights": quantized_weight_bytes(shape),
        "unquantized_weights": shape.unquantized_params() * cb,
        **({"tower_weights": shape.tower_params * cb} if shape.tower_params else {}),
        "lora_weights": 4 * lora,
        "lora_gradients": 4 * lora,
        "optimizer_state": optimizer_state_bytes(optimizer_in_use(recipe, device)) * lora,
        "saved_activations": saved,
        # Backward meets these one after another on top of what is saved: the loss (its chunks freed as it goes),
        # then the kept layers, then the checkpointed ones, recomputed once the kept layers' activations are freed.
        "backward_working_set": max(loss, backward_only, recompute - kept if checkpointed else 0, reference),
    }
    if recipe.method == "dpo" and recipe.init_adapter:
        components["reference_adapter"] = 4 * lora  # the adapter the run started from, frozen: DPO's reference
    if gpus > 1 and strategy == "ddp":
        components["ddp_gradient_buckets"] = 4 * lora  # DDP all-reduces gradients through bucket copies of them
    if gpus > 1 and strategy in ("fsdp", "fsdp_offload"):
        for key in (
            "quantized_weights",
            "unquantized_weights",
            "tower_weights",
            "lora_weights",
            "lora_gradients",
            "optimizer_state",
        ):
            if key in components:
                components[key] = -(-components[key] // gpus) if strategy == "fsdp" else 0  # offloaded: in host RAM
        # Each layer's shards are gathered whole to compute with (the next one prefetched), and so are the embeddings.
        components["fsdp_gathered_weights"] = 2 * (quantized_weight_bytes(shape) // L + 8 * lora // L) + V * h * cb
    if on_gpu:
        components["allocator_slack"] = int(0.10 * (saved + components["backward_working_set"])) + 64 * 2**20
        components["cuda_context"] = CUDA_CONTEXT_BYTES
    else:
        components["process_overhead"] = HOST_PROCESS_BYTES
    sizes = {"lora": lora, "compute_bytes": cb, "offloaded": offloaded, "scores": scores, "sequences": sequences}
    notes = plan_notes(shape, recipe, on_gpu, gpus, strategy, sizes)
    details = {
        "layer_recompute": recompute if checkpointed else backward_only,
        "loss_working_set": loss,
        "loss_chunk_tokens": chunk,
        "checkpointed_layers": checkpointed,
        "reference_forward": reference,
    }
    return MemoryPlan(
        model=shape.name,
        device=device,
        seq_len=recipe.seq_len,
        micro_batch=recipe.micro_batch,
        rank=recipe.rank,
        components=components,
        trainable_params=lora,
        total_params=shape.parameter_count() + lora,
        adapter_bytes=4 * lora,
        capacity_bytes=capacity_bytes,
        details=details,
        notes=notes,
    )


def plan_notes(shape: ModelShape, recipe: Recipe, on_gpu: bool, gpus: int, strategy: str, sizes: dict) -> list[str]:
    """The plan's notes: what the figures assume or leave out, for this model and recipe (sizes: the estimate's
    lora parameters, compute_bytes, offloaded and scores bytes, sequences a micro-batch)."""
    lora, cb, offloaded, scores = sizes["lora"], sizes["compute_bytes"], sizes["offloaded"], sizes["scores"]
    sequences, L = sizes["sequences"], shape.num_layers
    notes = [f"{offloaded / GIB:.2f} GiB of checkpointed activations are offloaded to host RAM."] if offloaded else []
    if shape.moe_layers:
        notes.append(
            f"Mixture of experts: {shape.num_experts} experts a layer, {shape.experts_per_token} routed a token, "
            f"every one in NF4; LoRA of rank {rank_of_experts(recipe, shape.experts_per_token)} on each "
            "expert (expert_rank), the router frozen."
        )
    if shape.mixer_layers:
        notes.append(
            f"{shape.family} is a hybrid: {shape.mixer_layers} of its {L} layers mix tokens without softmax "
            "attention, and their activations are counted as transformers' own PyTorch code keeps them (a "
            "linear attention's fp32 chunks included); optional fused kernels need less."
        )
    if scores:
        notes.append(
            f"transformers runs {shape.family}'s attention eagerly: its scores take {scores / GIB:.2f} GiB a "
            "layer, held whole."
        )
    if shape.tower_params:
        notes.append(
            f"The checkpoint's vision tower and projector ({shape.tower_params / 1e6:,.0f}M parameters) are loaded "
            "frozen in 16-bit: training on text never runs them, and only the language model is adapted."
        )
    if gpus > 1:
        notes.append(
            f"Per GPU, for {gpus} GPUs with {strategy.upper()}"
            + (" (sharding terms are first-principles estimates, not yet measured)." if strategy != "ddp" else ".")
        )
    if gpus > 1 and strategy == "fsdp_offload":
        weights = quantized_weight_bytes(shape) + (shape.unquantized_params() + shape.tower_params) * cb
        host = weights // gpus + 16 * lora // gpus
        notes.append(
            f"fsdp_offload keeps {host / GIB:.2f} GiB of shards (weights, LoRA, fp32 AdamW) in each process's host RAM."
        )
    notes += (
        []
        if on_gpu
        else [
            "On CPU, glibc keeps freed memory for reuse, so the process RSS reads 2-3x the planned activations; "
            "that memory is reused, not leaked."
        ]
    )
    if recipe.method in ("dpo", "orpo"):
        model = (
            "the adapter the run starts from, kept frozen" if recipe.init_adapter else "the base with the adapter off"
        )
        notes.append(
            f"{recipe.method.upper()}: each example is two sequences (chosen and rejected), {sequences} a micro-batch"
            + (f"; the reference is {model}, not a second model" if recipe.method == "dpo" else "")
            + "."
        )
    return notes


def optimizer_state_bytes(optimizer: str) -> int:
    """Bytes of optimizer state per trainable parameter: two 8-bit moments, or two fp32 ones."""
    return 2 if "8bit" in optimizer else 8


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows per chunk of the chunked loss, so one chunk's fp32 logits stay near 128 MiB: 128 for a 256k vocabulary."""
    rows = max(32, CHUNK_LOGIT_ELEMENTS // vocab_size)
    return 1 << (rows.bit_length() - 1)  # a power of two keeps matmul shapes friendly


def longest_sequence(shape: ModelShape, recipe: Recipe, device: str, capacity: int, **layout) -> int:
    """Longest seq_len (a multiple of 128) at micro-batch 1 that fits the capacity; 0 if none does.
    layout: gpus and strategy, as for estimate_peak_memory."""

    def fits(seq: int) -> bool:
        plan = estimate_peak_memory(shape, replace(recipe, seq_len=seq, micro_batch=1), device, capacity, **layout)
        return plan.total_bytes <= capacity

    return _largest(fits, 128, shape.max_positions, step=128)


def largest_micro_batch(shape: ModelShape, recipe: Recipe, device: str, capacity: int, **layout) -> int:
    """Largest micro-batch at the recipe's seq_len that fits the capacity; 0 if none does."""

    def fits(batch: int) -> bool:
        plan = estimate_peak_memory(shape, replace(recipe, micro_batch=batch), device, capacity, **layout)
        return plan.total_bytes <= capacity

    return _largest(fits, 1, 4096, step=1)


def most_uncheckpointed_layers(shape: ModelShape, recipe: Recipe, device: str, capacity: int, **layout) -> int:
    """With checkpointing on, the most decoder layers that can keep their activations (skipping recomputation,
    so steps run faster) while the run still fits the capacity; 0 if only full checkpointing fits (or nothing)."""
    for layers in range(shape.num_layers, 0, -1):  # a scan, not a bisection: the total is not quite monotone here
        candidate = replace(recipe, gradient_checkpointing=True, uncheckpointed_layers=layers)
        if estimate_peak_memory(shape, candidate, device, capacity, **layout).total_bytes <= capacity:
            return layers
    return 0


def _largest(fits, low: int, high: int, step: int) -> int:
    """Binary search for the largest multiple of `step` in [low, high] where fits() holds (fits is monotone)."""
    if not fits(low):
        return 0
    lo, hi = low // step, high // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step
