"""Mixture-of-experts models in 4-bit (qlora_kit/model/experts.py): the experts NF4 expert by expert, LoRA on each expert and
not on the router, the adapter plain PEFT's, and the plan's counts those of the loaded model; on tiny Qwen3-MoE and
gpt-oss models (8 experts, 2 routed a token)."""

import json

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.errors import UserError
from qlora_kit.model.experts import Experts4bit, dequantize_experts
from qlora_kit.model.load import attach_lora, load_base_4bit, no_dropout
from qlora_kit.plan.memory import lora_params, quantized_weight_bytes
from qlora_kit.plan.recipes import Recipe, rank_of_experts
from tests.tiny_models import save_tiny_model

CPU = torch.device("cpu")
FAMILIES = ["qwen3_moe", "gpt_oss", "gemma4_text"]  # Gemma 4: a linear router, a dense MLP beside the experts


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {kind: save_tiny_model(root / kind, kind) for kind in FAMILIES} | {
        "dense": save_tiny_model(root / "qwen3", "qwen3")
    }


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 290, (2, 16), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with no_dropout(model), torch.no_grad():  # no eval(): bitsandbytes would repack its 4-bit weights for inference
        return model(input_ids=tokens).logits


def quantized_bytes(model) -> int:
    """The bytes the NF4 weights hold: packed values, 8-bit absmax, fp32 second-level absmax, the code tables."""

    def state_bytes(state):
        return state.absmax.numel() + 4 * state.state2.absmax.numel() + 4 * 256 + 4 + 4 * 16

    total = 0
    for module in model.modules():
        if isinstance(module, Experts4bit):
            total += sum(packed.numel() + sum(map(state_bytes, states)) for packed, states in module.packed.values())
        elif hasattr(getattr(module, "weight", None), "quant_state"):
            total += module.weight.numel() + state_bytes(module.weight.quant_state)
    return total


@pytest.mark.parametrize("kind", FAMILIES)
def test_experts_load_in_4bit_and_compute_as_the_model_quantized_tensor_by_tensor(moe_dirs, kind):
    from transformers import AutoModelForCausalLM

    model = load_base_4bit(moe_dirs[kind], torch.float32, CPU)
    experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
    shape = ModelShape.from_config(kind, json.loads((moe_dirs[kind] / "config.json").read_text()))
    assert len(experts) == shape.moe_layers and all(
        m.gate_up_proj.stride() == (0, 0, 0) for m in experts
    )  # no 16-bit copy
    assert quantized_bytes(model) == quantized_weight_bytes(shape)
    # The reference: the same model with each expert's weights dequantized into the original 3-D parameters
    reference = load_base_4bit(moe_dirs[kind], torch.float32, CPU)
    dequantize_experts(reference)
    assert not any(isinstance(m, Experts4bit) for m in reference.modules())
    tokens = ids()
    assert torch.allclose(logits(model, tokens), logits(reference, tokens), atol=1e-4)

    # Against the 32-bit original, NF4's error: on tiny random weights it moves logits by ~40% in a dense Qwen3 too
    def error_of_4bit(folder):
        full = logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokens)
        return (logits(load_base_4bit(folder, torch.float32, CPU), tokens) - full).abs().mean() / full.abs().mean()

    assert error_of_4bit(moe_dirs[kind]) < 2 * error_of_4bit(moe_dirs["dense"])


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_goes_on_each_expert_not_the_router_and_loads_in_plain_peft(moe_dirs, kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = Recipe(rank=4, alpha=8)
    model = attach_lora(load_base_4bit(moe_dirs[kind], torch.float32, CPU), recipe)
    config = model.peft_config["default"]
    assert set(config.target_parameters) == {"gate_up_proj", "down_proj"}
    # keyed by the experts module: Gemma 4's dense down_proj keeps the recipe's rank
    assert (
        config.rank_pattern
        == {"experts.gate_up_proj": 2, "experts.down_proj": 2}
        == {k: rank_of_experts(recipe, 2) for k in config.rank_pattern}
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert not [name for name in trainable if ".gate." in name or "router" in name]  # the router stays frozen
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "router" in name)  # and 16-bit
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    with no_dropout(model):
        for _ in range(5):
            loss = model(input_ids=ids(), labels=ids()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.save_pretrained(tmp_path / "adapter")
    ours = logits(model, ids(1))
    # generate, chat and eval load it onto the 4-bit base as training had it
    from qlora_kit.adapter.folder import load_with_adapters
    from qlora_kit.model.experts import experts_lora_class

    loaded, _, _ = load_with_adapters(str(moe_dirs[kind]), [tmp_path / "adapter"], precision="fp32")
    assert any(isinstance(m, experts_lora_class()) for m in loaded.modules())
    assert torch.allclose(ours, logits(loaded, ids(1)), atol=1e-5)
    # Plain PEFT on the 32-bit model holding the 4-bit model's weights: the same logits
    reference = load_base_4bit(moe_dirs[kind], torch.float32, CPU)
    dequantize_experts(reference)
    plain_base = AutoModelForCausalLM.from_pretrained(moe_dirs[kind], dtype=torch.float32)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if hasattr(getattr(module, "weight", None), "quant_state"):
                weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                plain_base.get_submodule(name).weight.copy_(weight)
            for weight in ("gate_up_proj", "down_proj"):
                if isinstance(getattr(module, weight, None), torch.nn.Parameter) and getattr(module, weight).dim() == 3:
                    getattr(plain_base.get_submodule(name), weight).copy_(getattr(module, weight))
    plain = PeftModel.from_pretrained(plain_base, tmp_path / "adapter")
    assert torch.allclose(ours, logits(plain, ids(1)), atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_plan_counts_the_loaded_model_s_parameters_and_lora(moe_dirs, kind):
    shape = ModelShape.from_config(kind, json.loads((moe_dirs[kind] / "config.json").read_text()))
    recipe = Recipe(rank=8)
    model = attach_lora(load_base_4bit(moe_dirs[kind], torch.float32, CPU), recipe)
    trainable, total = model.get_nb_trainable_parameters()
    assert shape.parameter_count() == total - trainable
    assert lora_params(shape, 8, expert_rank=rank_of_experts(recipe, shape.experts_per_token)) == trainable
    assert lora_params(shape, 8, "attention") < trainable  # the experts' LoRA is counted apart


@pytest.mark.parametrize("setting", [dict(dropout=0.1), dict(use_dora=True)])
def test_dropout_and_dora_on_experts_are_refused_in_one_sentence(moe_dirs, setting):
    with pytest.raises(UserError, match="cannot be used on a mixture-of-experts model's experts") as refused:
        attach_lora(load_base_4bit(moe_dirs["qwen3_moe"], torch.float32, CPU), Recipe(rank=4, **setting))
    assert "attention" in refused.value.hint
    attach_lora(
        load_base_4bit(moe_dirs["qwen3_moe"], torch.float32, CPU), Recipe(rank=4, target_modules="attention", **setting)
    )


def test_fsdp_of_4bit_experts_is_refused_in_one_sentence(moe_dirs):
    with pytest.raises(UserError, match="mixture-of-experts model, whose 4-bit experts FSDP cannot shard") as refused:
        load_base_4bit(moe_dirs["gpt_oss"], torch.float32, CPU, shardable=True)
    assert "ddp" in refused.value.hint


def test_a_merge_is_the_base_plus_the_adapter(moe_dirs, tmp_path):
    """merge (from the 16-bit base, and into the dequantized 4-bit one) writes what plain PEFT computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter

    model = attach_lora(load_base_4bit(moe_dirs["qwen3_moe"], torch.float32, CPU), Recipe(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter's B is not zero
    model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(str(moe_dirs["qwen3_moe"]), tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    base = AutoModelForCausalLM.from_pretrained(moe_dirs["qwen3_moe"], dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids()),
        logits(plain, ids()),
        atol=1e-4,
    )
    rounded = merge_adapter(
        str(moe_dirs["qwen3_moe"]), tmp_path / "adapter", tmp_path / "rounded", dtype="fp32", from_quantized=True
    )
    assert torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(rounded, dtype=torch.float32), ids()),
        logits(model, ids()),
        atol=1e-4,
    )


def test_gpt_oss_s_mxfp4_checkpoint_loads_in_4bit_and_merges(moe_dirs, tmp_path):
    """The hub's gpt-oss holds its experts in MXFP4 (blocks and scales): they are read through transformers' own
    MXFP4 dequantization and packed to NF4 as they arrive, giving exactly the model of the weights they decode to;
    merge reads the same checkpoint in 16-bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter
    from tests.tiny_models import save_mxfp4_copies

    save_mxfp4_copies(moe_dirs["gpt_oss"], tmp_path / "mxfp4", tmp_path / "decoded")
    model = load_base_4bit(tmp_path / "mxfp4", torch.float32, CPU)
    assert quantized_bytes(model) == quantized_bytes(load_base_4bit(tmp_path / "decoded", torch.float32, CPU))
    plain = logits(load_base_4bit(tmp_path / "decoded", torch.float32, CPU), ids())
    assert torch.equal(logits(model, ids()), plain)
    lora = attach_lora(model, Recipe(rank=4, dropout=0.0))
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(1))
    lora.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(str(tmp_path / "mxfp4"), tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "decoded", dtype=torch.float32), tmp_path / "adapter"
    )
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids()),
        logits(reference, ids()),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.fixture(scope="module")
def moe_run(moe_dirs, tmp_path_factory):
    """A Qwen3-MoE adapter trained two steps by qlora-kit's own loop."""
    import io

    from rich.console import Console

    from qlora_kit.train.run import run_training

    folder = tmp_path_factory.mktemp("moe-run")
    data = folder / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    recipe = Recipe(model=str(moe_dirs["qwen3_moe"]), data=str(data), rank=4, alpha=8, lr=5e-2, steps=2, micro_batch=4)
    run_training(recipe, folder / "run", Console(file=io.StringIO()))
    return folder / "run" / "adapter"


def test_an_experts_adapter_exports_merged_only_and_what_llama_cpp_reads_otherwise_is_refused(
    moe_dirs, moe_run, tmp_path
):
    from qlora_kit.export.gguf import export_gguf_adapter, export_merged_gguf

    with pytest.raises(
        UserError, match="adapts a mixture of experts' weights, which llama.cpp cannot apply"
    ) as refused:
        export_gguf_adapter(moe_run, tmp_path / "adapter.gguf")
    assert "--format gguf" in refused.value.hint and not (tmp_path / "adapter.gguf").exists()
    config = json.loads((moe_dirs["qwen3_moe"] / "config.json").read_text())
    other = tmp_path / "base"
    other.mkdir()
    for file in moe_dirs["qwen3_moe"].iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    (other / "config.json").write_text(json.dumps(config | {"norm_topk_prob": False}))
    with pytest.raises(UserError, match="norm_topk_prob false"):
        export_merged_gguf(None, tmp_path / "base.gguf", str(other))


def test_an_experts_adapter_is_checked_against_the_base_s_expert_shapes(moe_dirs, moe_run, tmp_path):
    """Without base_model.json (another tool's adapter), the checkpoint's headers tell whether each expert maps as
    many features in and out as the adapter's LoRA does: experts stored apart (Qwen3-MoE) or fused (gpt-oss)."""
    from qlora_kit.adapter.folder import check_layer_shapes, expert_shapes
    from qlora_kit.probe.sources import weight_shapes

    own = weight_shapes(moe_dirs["qwen3_moe"])
    assert expert_shapes(own, "model.layers.0.mlp.experts") == (8, {(64, 64), (64, 32)})
    assert expert_shapes(weight_shapes(moe_dirs["gpt_oss"]), "model.layers.0.mlp.experts") == (
        8,
        {(64, 64), (32, 64), (64, 32)},
    )
    check_layer_shapes(moe_run, own, moe_dirs["qwen3_moe"], hint="")
    wider = save_tiny_model(tmp_path / "wider", "qwen3_moe", moe_intermediate_size=48)
    with pytest.raises(UserError, match=r"was made for another model: its LoRA on model\.layers\.0\.mlp\.experts"):
        check_layer_shapes(moe_run, weight_shapes(wider), wider, hint="")
