"""The memory model against real bytes (weights, LoRA) and measured CPU allocation (activations and loss)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.errors import UserError
from qlora_kit.model import load as models
from qlora_kit.plan.memory import (
    estimate_peak_memory,
    largest_micro_batch,
    longest_sequence,
    most_uncheckpointed_layers,
    quantized_weight_bytes,
)
from qlora_kit.plan.recipes import Recipe
from qlora_kit.probe.catalog import find_model_shape
from qlora_kit.units import GIB
from tests.conftest import build_tokenizer, save_tiny_model
from tests.tiny_models import tiny_config

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Large enough that activations dwarf allocator noise, small enough to step in a second on CPU."""
    folder = tmp_path_factory.mktemp("small-llama")
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder, ModelShape.from_config("small-llama", config.to_dict())


def real_weight_bytes(model) -> tuple[int, int]:
    """(bytes of 4-bit layers with all their quantization constants, bytes of every other parameter)."""
    seen, quantized = set(), 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            for t in (
                module.weight.data,
                state.absmax,
                state.code,
                state.offset,
                state.state2.absmax,
                state.state2.code,
            ):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    quantized += t.numel() * t.element_size()
    other = sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))
    return quantized, other


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_terms_match_the_real_bytes_of_a_4bit_model(small_llama, dtype):
    folder, shape = small_llama
    quantized, other = real_weight_bytes(models.load_base_4bit(folder, dtype, CPU))
    assert quantized_weight_bytes(shape) == pytest.approx(quantized, rel=0.01)
    assert shape.unquantized_params() * dtype.itemsize == other


def test_a_multimodal_checkpoint_keeps_its_vision_tower_unquantized_and_counted(tmp_path):
    """Gemma 3 4B-27B: the language model in 4-bit, the SigLIP tower and projector frozen in the compute dtype."""
    folder = save_tiny_model(tmp_path, "gemma3")
    shape = ModelShape.from_config("gemma3", json.loads((folder / "config.json").read_text()))
    model = models.load_base_4bit(folder, torch.bfloat16, CPU)
    quantized, other = real_weight_bytes(model)
    tower = sum(p.numel() for name, p in model.named_parameters() if "vision_tower" in name or "projector" in name)
    assert shape.tower_params == tower and (shape.unquantized_params() + shape.tower_params) * 2 == other
    assert quantized_weight_bytes(shape) == pytest.approx(quantized, rel=0.01)
    plan = estimate_peak_memory(shape, Recipe(rank=4))
    assert (
        plan.components["tower_weights"] == 2 * tower
        and plan.total_params - plan.trainable_params == shape.parameter_count()
    )


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen3", "gemma3_text", "gemma3", "olmo3", "phi3"])
@pytest.mark.parametrize(
    "rank, targets, dora",
    [
        (8, "all-linear", False),
        (16, "q_proj,v_proj", False),
        (8, "all-linear", True),
        (4, "attention", False),
        (4, "mlp,q_proj", True),
    ],
)
def test_lora_count_matches_peft_exactly(tmp_path, kind, rank, targets, dora):
    if kind == "phi3" and "q_proj" in targets:
        pytest.skip("Phi-3 has no q_proj: its queries, keys and values are one fused qkv_proj")
    folder = save_tiny_model(tmp_path, kind)
    config = json.loads((folder / "config.json").read_text())
    recipe = Recipe(rank=rank, target_modules=targets, use_dora=dora)
    lora = models.attach_lora(models.load_base_4bit(folder, torch.float32, CPU), recipe)
    plan = estimate_peak_memory(ModelShape.from_config(kind, config), recipe)
    assert plan.trainable_params == models.parameter_counts(lora)[0]
    assert plan.total_params == models.parameter_counts(lora)[1]


@pytest.mark.parametrize("kind", ["qwen3_5_text", "lfm2", "qwen3_next"])
def test_a_hybrids_mixers_are_counted_as_the_loaded_model_holds_them(tmp_path, kind):
    """Gated DeltaNet (Qwen3.5, Qwen3-Next's fused projections) and LFM2's short convolutions beside softmax attention:
    NF4 bytes, 16-bit weights (convolutions, decays, gated norms), parameters and LoRA parameters, exactly."""
    folder = save_tiny_model(tmp_path, kind)
    shape = ModelShape.from_config(kind, json.loads((folder / "config.json").read_text()))
    assert shape.mixer_layers == 3 if kind != "lfm2" else shape.mixer_layers == 2
    for targets in ("all-linear", "attention"):
        recipe = Recipe(rank=8, target_modules=targets, dropout=0.0)
        base = models.load_base_4bit(folder, torch.float32, CPU)
        quantized, other = real_weight_bytes(base)
        if kind != "qwen3_next":  # its experts are packed beside the parameters (test_experts.py counts them)
            assert (quantized_weight_bytes(shape), shape.unquantized_params() * 4) == (quantized, other)
        plan = estimate_peak_memory(shape, recipe)
        assert (plan.trainable_params, plan.total_params) == models.parameter_counts(models.attach_lora(base, recipe))


@pytest.mark.parametrize("kind", ["gemma4_text", "gemma4"])
def test_gemma_4_s_full_attention_layers_moe_block_and_tower_are_counted_as_loaded(tmp_path, kind):
    """Gemma 4's full-attention layer (heads twice as wide over 1 KV head, no v_proj), the dense MLP beside its experts
    (adapted at the recipe's rank), its linear router (16-bit, not adapted) and, in the multimodal checkpoint, the
    vision tower: parameters and LoRA parameters exactly, for each preset of layers."""
    folder = save_tiny_model(tmp_path, kind)
    shape = ModelShape.from_config(kind, json.loads((folder / "config.json").read_text()))
    assert (shape.global_layers, shape.global_head_dim, shape.global_kv_heads, shape.global_values_are_keys) == (
        1,
        32,
        1,
        True,
    )
    assert (shape.moe_layers, shape.shared_expert_size, shape.frozen_mlp_names) == (6, 48, ())
    assert bool(shape.tower_params) == (kind == "gemma4")
    for targets in ("all-linear", "attention", "mlp"):
        recipe = Recipe(rank=8, target_modules=targets, dropout=0.0)
        plan = estimate_peak_memory(shape, recipe)
        base = models.load_base_4bit(folder, torch.float32, CPU)
        assert (plan.trainable_params, plan.total_params) == models.parameter_counts(models.attach_lora(base, recipe))


def test_gemma_4_s_small_models_are_refused_by_the_plan_in_one_sentence():
    config = tiny_config("gemma4_text", 300, hidden_size_per_layer_input=16).to_dict()
    with pytest.raises(UserError, match="E2B and E4B"):
        ModelShape.from_config("gemma-4-e2b-like", config)


def test_catalogue_parameter_counts_match_the_published_sizes():
    published = {
        "gemma-2b": 2.51e9,
        "llama-3.1-8b": 8.03e9,
        "mistral-7b-v0.3": 7.25e9,
        "qwen2.5-7b": 7.62e9,
        "phi-3-mini": 3.82e9,
        "smollm2-135m": 0.135e9,
        "llama-3.2-1b": 1.24e9,
        "gemma-2-9b": 9.24e9,
    }
    for name, size in published.items():
        assert find_model_shape(name).parameter_count() == pytest.approx(size, rel=0.02), name


def test_weights_alone_match_the_design_anchors():
    # shared/design.md, measured on an H100: weights alone on GPU
    for name, anchor_gib in [("gemma-2b", 1.93), ("llama-3.1-8b", 5.32)]:
        c = estimate_peak_memory(find_model_shape(name), Recipe()).components
        assert (c["quantized_weights"] + c["unquantized_weights"]) / GIB == pytest.approx(anchor_gib, abs=0.02)


def measured_transient(folder: Path, **settings) -> int:
    """Peak transient bytes of one training step on CPU (benchmarks/measure_cpu_memory.py says how)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "measure_cpu_memory.py"), str(folder), json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["step_peak_transient"]


@pytest.mark.parametrize(
    "settings",
    [
        dict(seq_len=1024, micro_batch=2),  # the loss chunk dominates the backward peak
        dict(seq_len=2048, micro_batch=2, loss_chunk_tokens=32),  # one recomputed layer dominates
        dict(
            seq_len=1024, micro_batch=2, loss_chunk_tokens=32, gradient_checkpointing=False
        ),  # every layer's activations
        dict(seq_len=2048, micro_batch=2, loss_chunk_tokens=32, dropout=0.0),  # no per-LoRA dropout copies
        dict(
            seq_len=2048, micro_batch=2, loss_chunk_tokens=32, dropout=0.0, uncheckpointed_layers=2
        ),  # half the layers whole
        # DoRA keeps each adapted layer's base and LoRA outputs (measured: +88 MiB, estimate/measured 1.08) ...
        dict(seq_len=2048, micro_batch=2, loss_chunk_tokens=32, dropout=0.0, use_dora=True),
        dict(
            seq_len=1024, micro_batch=2, loss_chunk_tokens=32, dropout=0.0, use_dora=True, gradient_checkpointing=False
        ),  # ... 1.09
        # A preference pair is two sequences; DPO's reference forward (no graph) fits inside the backward peak
        dict(seq_len=1024, micro_batch=1, loss_chunk_tokens=32, dropout=0.0, method="dpo"),
        dict(seq_len=1024, micro_batch=1, dropout=0.0, method="orpo"),
    ],
)
def test_activation_and_loss_terms_track_measured_cpu_allocation(small_llama, settings):
    """What one step allocates beyond the weights (activations, loss, LoRA gradients) against the estimate."""
    folder, shape = small_llama
    c = estimate_peak_memory(shape, Recipe(**settings), device="cpu").components
    estimate = c["saved_activations"] + c["backward_working_set"] + c["lora_gradients"]
    measured = measured_transient(folder, **settings)
    assert 0.9 * measured <= estimate <= 1.25 * measured, (estimate / 2**20, measured / 2**20)


@pytest.mark.parametrize(
    "kind, changes",
    [
        ("qwen3", dict(head_dim=64)),  # q/k norms per head
        (
            "gemma3_text",
            dict(head_dim=64, sliding_window=512, query_pre_attn_scalar=64),
        ),  # 4 norms, q/k norms, a window
        ("olmo3", dict(sliding_window=512)),  # q/k norms over all heads, post-norms, a window
        # 16 experts of width 256, 4 a token, every one in NF4 with LoRA of rank 4
        ("qwen3_moe", dict(head_dim=64, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4)),
        # the same experts with biases, attention computed eagerly (its scores held whole), a window every 2nd layer
        (
            "gpt_oss",
            dict(head_dim=64, intermediate_size=256, num_local_experts=16, num_experts_per_tok=4, sliding_window=512),
        ),
        # 3 layers of Gated DeltaNet (its delta rule in fp32 chunks of 64), then 1 of gated attention
        (
            "qwen3_5_text",
            dict(
                head_dim=64,
                linear_num_key_heads=2,
                linear_key_head_dim=64,
                linear_num_value_heads=4,
                linear_value_head_dim=64,
            ),
        ),
        # short convolutions in 2 layers, attention in 2
        ("lfm2", dict(layer_types=["conv", "full_attention", "conv", "full_attention"], full_attn_idxs=[1, 3])),
        # 3 sliding-window layers, then a full one of 128-wide heads over 1 KV head, keys as values; a dense MLP beside 16
        # experts of width 256 (4 a token), eight norms a layer
        (
            "gemma4_text",
            dict(
                head_dim=64,
                global_head_dim=128,
                num_global_key_value_heads=1,
                attention_k_eq_v=True,
                sliding_window=512,
                enable_moe_block=True,
                num_experts=16,
                top_k_experts=4,
                moe_intermediate_size=256,
                hidden_size_per_layer_input=0,
                final_logit_softcapping=30.0,
            ),
        ),
    ],
)
def test_todays_families_activation_terms_track_measured_cpu_allocation(tmp_path, kind, changes):
    """The recompute-dominated step (one layer run again and back-propagated) of families whose layers hold more than
    Llama's: measured estimate/measured 1.07 (Qwen3), 1.08 (Gemma 3), 1.06 (OLMo 3), Qwen3-MoE 1.03, gpt-oss 1.08;
    Qwen3.5 1.04, LFM2 1.08, Gemma 4 1.07; Llama's is 1.08 (docs/memory.md; benchmarks/family_memory.py measures the
    mixture-of-experts and hybrid grid)."""
    import transformers
    from packaging.version import Version

    from benchmarks.family_memory import RECOMPUTED, measure_point

    if kind == "gemma4_text" and Version(transformers.__version__) < Version("5.24"):
        pytest.skip(
            "transformers 5.23's Gemma 4 keeps 9% less a step (the estimate 1.17 of it, on the safe side); the "
            "terms are fitted to 5.24 and later"
        )
    point = measure_point(kind, changes, RECOMPUTED, tmp_path)  # 4 layers, h 256, head_dim 64, V 8192
    assert 0.9 <= point["ratio"] <= 1.1, (point["estimate"] / 2**20, point["measured"] / 2**20)


def test_longer_sequences_and_batches_cost_more_and_the_searches_agree():
    shape = find_model_shape("gemma-2b")
    recipe = Recipe(seq_len=2048, micro_batch=1)
    capacity = 6 * GIB
    totals = [
        estimate_peak_memory(shape, Recipe(seq_len=s, micro_batch=b)).total_bytes
        for s, b in [(512, 1), (2048, 1), (2048, 4)]
    ]
    assert totals == sorted(totals)
    longest = longest_sequence(shape, recipe, "cuda", capacity)
    assert estimate_peak_memory(shape, Recipe(seq_len=longest, micro_batch=1)).total_bytes <= capacity
    if longest < shape.max_positions:
        assert estimate_peak_memory(shape, Recipe(seq_len=longest + 128, micro_batch=1)).total_bytes > capacity
    batch = largest_micro_batch(shape, recipe, "cuda", capacity)
    assert estimate_peak_memory(shape, Recipe(seq_len=2048, micro_batch=batch + 1)).total_bytes > capacity


def test_checkpointing_offload_and_8bit_optimizer_save_memory():
    shape = find_model_shape("llama-3.2-1b")
    base = estimate_peak_memory(shape, Recipe(seq_len=2048)).total_bytes
    offloaded = estimate_peak_memory(shape, Recipe(seq_len=2048, activation_offload=True))
    assert offloaded.total_bytes < base and offloaded.components["saved_activations"] == 0
    assert "offloaded to host RAM" in offloaded.notes[0]
    assert estimate_peak_memory(shape, Recipe(seq_len=2048, gradient_checkpointing=False)).total_bytes > 1.5 * base
    assert estimate_peak_memory(shape, Recipe(seq_len=2048, optimizer="adamw")).total_bytes > base


def test_uncheckpointed_layers_sit_between_full_checkpointing_and_none_and_the_search_agrees():
    shape, recipe = find_model_shape("gemma-2b"), Recipe(seq_len=2048, micro_batch=1, gradient_checkpointing=True)

    def total(**settings):
        return estimate_peak_memory(shape, replace(recipe, **settings)).total_bytes

    every, none = total(), total(gradient_checkpointing=False)
    assert total(uncheckpointed_layers=0) == every and total(uncheckpointed_layers=shape.num_layers) == none
    assert total(uncheckpointed_layers=99) == none, "more layers than the model has: none is checkpointed"
    middle = [total(uncheckpointed_layers=n) for n in (4, 8, 12)]
    assert every < middle[0] < middle[1] < middle[2] < none
    capacity = (every + none) // 2
    layers = most_uncheckpointed_layers(shape, recipe, "cuda", capacity)
    assert 0 < layers < shape.num_layers
    assert total(uncheckpointed_layers=layers) <= capacity < total(uncheckpointed_layers=layers + 1)
    assert most_uncheckpointed_layers(shape, recipe, "cuda", every - 1) == 0


def test_memory_model_needs_no_torch():
    code = "import sys; import qlora_kit.plan.memory; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def calibration_points() -> list[dict]:
    results = ROOT / "benchmarks" / "results"
    lines = [
        line
        for path in sorted(results.glob("memory_*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return [point for point in map(json.loads, lines) if point["status"] == "ok"]


def test_the_committed_cpu_calibration_points_hold_for_today_s_memory_model():
    """benchmarks/family_memory.py's measurements, committed under benchmarks/results/ (docs/memory.md's
    mixture-of-experts, hybrid and Gemma 4 tables), each estimated again now: a change to the memory model that moves
    one out of 0.9-1.15 of what was measured fails here, with no model built or run."""
    from transformers import AutoConfig

    from benchmarks.family_memory import SIZES

    latest = {}  # a point measured again replaces its earlier row
    for path in sorted((ROOT / "benchmarks" / "results").glob("family_memory_*.jsonl")):
        for point in map(json.loads, path.read_text().splitlines()):
            latest[json.dumps([point["model_type"], point["changes"], point["settings"]], sort_keys=True)] = point
    assert len(latest) >= 20
    for point in latest.values():
        config = AutoConfig.for_model(point["model_type"], **SIZES | point["changes"]).to_dict()
        shape = ModelShape.from_config(point["model_type"], config)
        c = estimate_peak_memory(shape, Recipe(**point["settings"]), device="cpu").components
        ratio = (c["saved_activations"] + c["backward_working_set"] + c["lora_gradients"]) / point["measured"]
        assert 0.9 <= ratio <= 1.15, (point["model_type"], point["changes"], point["settings"], round(ratio, 3))


@pytest.mark.skipif(
    not calibration_points(),
    reason="waits for a GPU run of benchmarks/calibrate_memory.py (benchmarks/"
    "gpu_session.sh) to commit benchmarks/results/memory_*.jsonl, which no session with a GPU has done yet",
)
def test_plan_matches_every_committed_gpu_measurement():
    """Within +-10% of torch's measured peak allocation, and never more than 5% under it."""
    misses = []
    for point in calibration_points():
        recipe = Recipe(**point["recipe"])
        estimate = estimate_peak_memory(find_model_shape(point["model"]), recipe, "cuda").allocated_bytes
        ratio = estimate / point["peak_allocated"]
        if not 0.95 <= ratio <= 1.10:
            misses.append(
                f"{point['model']} seq {recipe.seq_len} x {recipe.micro_batch} r{recipe.rank} "
                f"ckpt={recipe.gradient_checkpointing} kept={recipe.uncheckpointed_layers}: estimate/measured = {ratio:.2f}"
            )
    assert not misses, "\n".join(misses)


def test_several_gpus_ddp_adds_gradient_buckets_and_fsdp_shards_the_weights():
    from qlora_kit.probe.catalog import find_model_shape

    shape, recipe = find_model_shape("llama-3.1-8b"), Recipe(seq_len=2048, micro_batch=1)
    one = estimate_peak_memory(shape, recipe)
    ddp = estimate_peak_memory(shape, recipe, gpus=2, strategy="ddp")
    fsdp = estimate_peak_memory(shape, recipe, gpus=4, strategy="fsdp")
    assert ddp.components["ddp_gradient_buckets"] == one.components["lora_gradients"]
    assert ddp.total_bytes > one.total_bytes
    assert fsdp.components["quantized_weights"] == -(-one.components["quantized_weights"] // 4)
    assert fsdp.components["saved_activations"] == one.components["saved_activations"], (
        "activations are per GPU either way"
    )
    assert fsdp.total_bytes < one.total_bytes and "fsdp_gathered_weights" in fsdp.components
    offload = estimate_peak_memory(shape, recipe, gpus=4, strategy="fsdp_offload")
    assert offload.components["quantized_weights"] == 0 and offload.total_bytes < fsdp.total_bytes
    assert any("host RAM" in note for note in offload.notes)
