import bitsandbytes as bnb
import pytest
import torch

from qlora_kit.errors import UserError
from qlora_kit.model import load as models
from qlora_kit.plan.recipes import Recipe
from tests.conftest import save_tiny_model

CPU = torch.device("cpu")


def test_linear_layers_load_as_nf4_with_double_quant(tiny_model_dir):
    base = models.load_base_4bit(tiny_model_dir, torch.float32, CPU)
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for layer in quantized:
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested, "double quantization quantizes the absmax constants too"
    assert not isinstance(base.get_output_embeddings(), bnb.nn.Linear4bit)


def test_only_lora_trains_in_fp32_and_16_bit_weights_are_never_upcast(tiny_model_dir):
    base = models.load_base_4bit(tiny_model_dir, torch.bfloat16, CPU)
    lora = models.attach_lora(base, Recipe(rank=4))
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    embeddings = lora.get_base_model().get_input_embeddings().weight
    assert embeddings.dtype == torch.bfloat16 and not embeddings.requires_grad


def test_trainable_count_matches_peft_and_the_lora_formula(tiny_model_dir):
    lora = models.attach_lora(models.load_base_4bit(tiny_model_dir, torch.float32, CPU), Recipe(rank=8))
    trainable, total = models.parameter_counts(lora)
    config = lora.get_base_model().config
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    per_layer = sum(8 * (a + b) for a, b in [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)])
    assert trainable == per_layer * config.num_hidden_layers
    assert total > trainable


def test_target_modules_can_be_named(llama_dir):
    lora = models.attach_lora(
        models.load_base_4bit(llama_dir, torch.float32, CPU), Recipe(rank=4, target_modules="q_proj, v_proj")
    )
    names = {n.split(".")[-4] for n, p in lora.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="LoRA could not be attached"):
        models.attach_lora(models.load_base_4bit(llama_dir, torch.float32, CPU), Recipe(target_modules="nothing_here"))


@pytest.mark.parametrize("kind", ["llama", "gemma", "gemma2"])
def test_logits_path_check_accepts_supported_architectures(tmp_path, kind):
    lora = models.attach_lora(models.load_base_4bit(save_tiny_model(tmp_path, kind), torch.float32, CPU), Recipe())
    models.check_logits_path(lora, CPU)
    assert lora.training


def test_logits_path_check_refuses_a_scaled_head(llama_dir):
    lora = models.attach_lora(models.load_base_4bit(llama_dir, torch.float32, CPU), Recipe())
    head = lora.get_base_model().lm_head
    head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(UserError, match="does not reproduce"):
        models.check_logits_path(lora, CPU)


def test_cpu_defaults_to_fp32_and_refuses_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device_and_dtype("auto") == (CPU, torch.float32)
    assert models.pick_device_and_dtype("bf16") == (CPU, torch.bfloat16)
    with pytest.raises(UserError, match="fp16 training needs a CUDA GPU"):
        models.pick_device_and_dtype("fp16")


def test_folder_that_is_not_a_causal_lm_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError, match="could not be loaded"):
        models.load_base_4bit(tmp_path, torch.float32, CPU)


@pytest.mark.parametrize("uncheckpointed, expected_runs", [(0, [2, 2]), (1, [2, 1]), (2, [1, 1]), (5, [1, 1])])
def test_only_the_last_uncheckpointed_layers_skip_recomputation(llama_dir, uncheckpointed, expected_runs):
    recipe = Recipe(rank=4, dropout=0.0, gradient_checkpointing=True, uncheckpointed_layers=uncheckpointed)
    lora = models.attach_lora(models.load_base_4bit(llama_dir, torch.float32, CPU), recipe)
    layers = models.lm_parts(lora)[0].layers
    runs = [0] * len(layers)
    for index, layer in enumerate(layers):  # counted in forward itself: module hooks do not fire on recomputation

        def counted(*args, index=index, forward=layer.mlp.forward, **kwargs):
            runs[index] += 1
            return forward(*args, **kwargs)

        layer.mlp.forward = counted
    lora.train()
    lora(input_ids=torch.arange(1, 17).unsqueeze(0)).logits.sum().backward()
    assert runs == expected_runs, (
        "a checkpointed layer runs twice (forward, then recomputed in backward), a kept one once"
    )


def test_an_adapter_made_for_another_base_is_refused_by_layer_and_shape(llama_dir, tmp_path):
    import io
    import shutil

    from rich.console import Console
    from safetensors.torch import load_file, save_file

    from qlora_kit.errors import UserError
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import run_training
    from tests.conftest import save_tiny_model

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(4)))
    run_training(
        Recipe(model=str(llama_dir), data=str(data), rank=4, steps=1, micro_batch=4),
        tmp_path / "a",
        Console(file=io.StringIO()),
    )
    adapter = tmp_path / "a" / "adapter"
    phi3 = save_tiny_model(tmp_path / "phi3", "phi3")  # fused qkv_proj: no q_proj to adapt
    with pytest.raises(
        UserError, match=r"adapts model.layers.0.(mlp.gate|self_attn.[qkv])_proj, which this base model does not have"
    ):
        models.attach_lora(
            models.load_base_4bit(phi3, torch.float32, torch.device("cpu")), Recipe(init_adapter=str(adapter))
        )
    shutil.copytree(adapter, tmp_path / "wider")
    weights = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    save_file({**weights, key: torch.zeros(4, 96)}, tmp_path / "wider" / "adapter_model.safetensors")
    with pytest.raises(
        UserError, match="its model.layers.1.mlp.down_proj maps 96 to 64 features, this model's 128 to 64"
    ) as error:
        models.attach_lora(
            models.load_base_4bit(llama_dir, torch.float32, torch.device("cpu")),
            Recipe(init_adapter=str(tmp_path / "wider")),
        )
    assert "--model" in error.value.hint


def test_loftq_starts_the_4bit_model_closer_to_the_16bit_one(llama_dir):
    """A and B start as the best rank-r fit of each weight's NF4 rounding error (default: B = 0, the 4-bit base)."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.plan.recipes import Recipe

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=ids).logits
        gaps = {}
        for init, rank in [("default", 16), ("loftq", 4), ("loftq", 16)]:
            model = models.attach_lora(
                models.load_base_4bit(llama_dir, torch.float32, torch.device("cpu")),
                Recipe(rank=rank, lora_init=init, gradient_checkpointing=False),
            )
            gaps[init, rank] = float((model(input_ids=ids).logits - full).norm() / full.norm())
    # Measured on the tiny Llama: 0.372, 0.342, 0.238.
    assert gaps["default", 16] > gaps["loftq", 4] > gaps["loftq", 16]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_would_change_a_4bit_base_are_refused(llama_dir, init):
    from qlora_kit.errors import UserError
    from qlora_kit.plan.recipes import Recipe

    with pytest.raises(UserError, match=f"lora_init {init} moves the main directions") as error:
        models.attach_lora(models.load_base_4bit(llama_dir, torch.float32, torch.device("cpu")), Recipe(lora_init=init))
    assert "loftq" in error.value.hint
