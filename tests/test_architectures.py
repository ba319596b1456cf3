"""The family modules: each declares one FAMILY, no model_type belongs to two, and what the rest of the code asks of
a family comes from there."""

import re

import pytest

from qlora_kit.architectures import all_families, family_of, gguf_family
from qlora_kit.errors import UserError


def test_each_model_type_has_one_family():
    model_types = [t for family in all_families() for t in family.model_types]
    assert len(model_types) == len(set(model_types))
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"} <= set(model_types)
    assert family_of({"model_type": "qwen3"}).qk_norms and family_of({"model_type": "phi3"}).fused_qkv
    assert family_of({"model_type": "gpt_neox"}) is None


def test_a_family_llama_cpp_does_not_run_is_refused_naming_those_it_does():
    with pytest.raises(UserError, match="Exporting gpt_neox models to GGUF is not supported yet") as refused:
        gguf_family({"model_type": "gpt_neox"})
    assert "Qwen3 (qwen3)" in refused.value.hint and "Gemma 2 (gemma2)" in refused.value.hint
    assert gguf_family({"model_type": "mistral"}).gguf_name == "llama"


def test_a_family_that_overflows_fp16_computes_in_fp32_on_a_card_without_bf16(monkeypatch):
    """Gemma on a T4: the plan counts fp32 compute and says why, and training picks fp32; a Llama keeps fp16."""
    import dataclasses

    import torch

    from qlora_kit.model.load import pick_device_and_dtype
    from qlora_kit.plan.planner import choose_target, make_plan
    from qlora_kit.plan.recipes import Recipe

    t4 = choose_target(gpu="T4")
    gemma = make_plan("gemma-2b", Recipe(), t4)
    as_if_bf16 = make_plan("gemma-2b", Recipe(), dataclasses.replace(t4, bf16=True))
    assert gemma.plan.total_bytes > as_if_bf16.plan.total_bytes
    assert any("computes in fp32, as Gemma overflows fp16" in note for note in gemma.plan.notes)
    llama = make_plan("llama-3.2-1b", Recipe(), t4)
    assert (
        llama.plan.total_bytes
        == make_plan("llama-3.2-1b", Recipe(), dataclasses.replace(t4, bf16=True)).plan.total_bytes
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert pick_device_and_dtype("auto", config={"model_type": "gemma"})[1] == torch.float32
    assert pick_device_and_dtype("auto", config={"model_type": "llama"})[1] == torch.float16
    assert pick_device_and_dtype("fp16", config={"model_type": "gemma"})[1] == torch.float16  # as asked


class Recorded:
    """A stand-in GGUF writer: the keys a family's metadata hook adds."""

    def __init__(self):
        self.keys = {}

    def __getattr__(self, name):
        return lambda *values: self.keys.__setitem__(name.removeprefix("add_"), values)


@pytest.mark.parametrize(
    "model_type, change, says",
    [
        ("gemma3_text", {"layer_types": ["full_attention"] * 6}, "which layers attend within the sliding window"),
        ("gemma3_text", {"query_pre_attn_scalar": 99}, "query_pre_attn_scalar (99)"),
        ("smollm3", {"no_rope_layers": [1, 1, 1, 1]}, "other layers than every 4th"),
        ("olmo3", {"layer_types": ["sliding_attention"] * 4}, "other layers than three of every four"),
        (
            "olmo3",
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 2.0}}},
            "attention factor or betas",
        ),
        (
            "olmo3",
            {"rope_parameters": {"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_theta": 5e5}}},
            "a rotary base of their own",
        ),
        ("gpt_oss", {"layer_types": ["full_attention"] * 4}, "which layers attend within the sliding window"),
        ("gpt_oss", {"swiglu_limit": 10.0}, "the SwiGLU clamp and scale (10.0, 1.702)"),
    ],
)
def test_what_llama_cpp_builds_in_differently_is_refused_on_export(model_type, change, says):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type,
        num_hidden_layers=6 if model_type == "gemma3_text" else 4,
        head_dim=16,
        num_attention_heads=4,
        hidden_size=64,
        sliding_window=4,
    ).to_dict()
    family = gguf_family(config)
    config["query_pre_attn_scalar"] = 16
    family.gguf_metadata(written := Recorded(), config)  # as transformers makes it: accepted
    assert model_type == "smollm3" or written.keys["sliding_window"] == (4,)
    with pytest.raises(UserError, match=re.escape(says)):
        family.gguf_metadata(Recorded(), config | change)


def hub_layout(folder):
    """Rewrite a checkpoint's weight names as the hub's Gemma 3 4B-27B have them (saved before transformers 4.52)."""
    from safetensors.torch import load_file, save_file

    from qlora_kit.probe.sources import OLD_MULTIMODAL_NAMES

    weights = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in weights.items():
        old = next((old + name[len(new) :] for old, new in OLD_MULTIMODAL_NAMES if name.startswith(new)), name)
        renamed[old] = tensor
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    assert any(name.startswith("language_model.model.") for name in renamed)


@pytest.mark.parametrize("layout", ["transformers-5", "hub"])
def test_gemma_3_multimodal_trains_on_text_and_its_adapter_is_plain_peft_on_its_own_class(tmp_path, layout):
    """Gemma 3 4B-27B's class: LoRA on the language model only, the vision tower frozen; the adapter loads in plain
    peft on Gemma3ForConditionalGeneration and merges to the same model; the GGUF holds the language model."""
    import io
    import json

    import gguf
    import torch
    from peft import PeftModel
    from rich.console import Console
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    from qlora_kit.export.gguf import export_merged_gguf
    from qlora_kit.export.merge import merge_adapter
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import run_training
    from tests.tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / "gemma-3", "gemma3")
    if layout == "hub":
        hub_layout(base)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": f"three {i}"}]}
            )
            + "\n"
            for i in range(8)
        )
    )
    summary = run_training(
        Recipe(model=str(base), data=str(data), rank=4, alpha=8, lr=5e-2, steps=4, micro_batch=4),
        tmp_path / "run",
        Console(file=io.StringIO()),
    )
    assert summary.last_loss < summary.first_loss
    adapter = tmp_path / "run" / "adapter"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as lora:
        assert lora.keys() and all(".model.language_model.layers." in key for key in lora.keys())
    plain = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(base), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(
        merge_adapter(None, adapter, tmp_path / "merged", dtype="fp32")
    ).eval()
    assert type(merged).__name__ == "Gemma3ForConditionalGeneration"
    ids = torch.tensor([[7, 17, 42, 99, 11]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    names = [t.name for t in gguf.GGUFReader(export_merged_gguf(adapter, tmp_path / "m.gguf")).tensors]
    assert "blk.5.attn_q.weight" in names and len(names) == 1 + 1 + 6 * 13  # embeddings, norm, 13 a layer: no tower


@pytest.mark.parametrize(
    "kind",
    [
        "qwen3",
        "smollm3",
        "gemma3_text",
        "gemma3",
        "olmo3",
        "phi4_mini",
        "qwen3_moe",
        "gpt_oss",
        "qwen3_5_text",
        "lfm2",
        "qwen3_next",
        "gemma4",
    ],
)
def test_each_new_family_learns_and_resumes_exactly_after_a_kill(tmp_path, kind, monkeypatch):
    """Loss falls; a run that lost its last checkpoint and adapter (killed before writing them) resumes from the one
    before and ends bit for bit as the run that was never stopped. On one torch thread: beside the other test
    workers, qlora-kit would give the two runs as many threads as cores are free, and gpt-oss's eager attention sums
    in another order on another thread count."""
    import io
    import shutil

    import torch
    from rich.console import Console

    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import RunOptions, run_training
    from tests.test_reliability import assert_same_run, losses
    from tests.tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / kind, kind)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox jumps {i}"}}\n' for i in range(16)))
    recipe = Recipe(
        model=str(base), data=str(data), rank=4, alpha=8, lr=2e-2, steps=4, micro_batch=2, checkpoint_every=2
    )
    quiet = Console(file=io.StringIO())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # CpuShare leaves the thread count as the user set it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(recipe, tmp_path / "whole", quiet)
        run_training(recipe, tmp_path / "killed", quiet)
        shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-4")
        shutil.rmtree(tmp_path / "killed" / "adapter")
        run_training(recipe, tmp_path / "killed", quiet, RunOptions(resume=True))
    finally:
        torch.set_num_threads(threads)
    assert_same_run(tmp_path / "killed", tmp_path / "whole")
    steps = losses(tmp_path / "whole")
    assert steps[4] < steps[1]


@pytest.mark.parametrize("kind", ["qwen3_5_text", "lfm2", "qwen3_next", "gemma4"])
def test_a_hybrids_or_gemma_4s_merge_is_the_base_plus_the_adapter(tmp_path, kind):
    """Qwen3.5's, LFM2's and Qwen3-Next's adapters cover their mixers' projections (in_proj_qkv, in_proj_z ...
    out_proj; in_proj, out_proj; in_proj_qkvz, in_proj_ba; and Qwen3-Next's experts), Gemma 4's its experts and the
    dense MLP beside them; merged into the 32-bit base (Gemma 4's with its vision tower) they give what plain PEFT
    computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter
    from qlora_kit.model import load as models
    from qlora_kit.plan.recipes import Recipe
    from tests.tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / "base", kind)
    lora = models.attach_lora(
        models.load_base_4bit(base, torch.float32, torch.device("cpu")), Recipe(rank=4, dropout=0.0)
    )
    torch.manual_seed(1)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)  # an adapter that changes the output
    assert any(
        mixer in name
        for name, _ in lora.named_parameters()
        for mixer in ("in_proj_qkv", "conv.in_proj.lora", "experts.lora")
    )
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        reference = PeftModel.from_pretrained(plain, tmp_path / "adapter")(input_ids=ids).logits
        merged_dir = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(input_ids=ids).logits
        unchanged = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    assert (reference - unchanged).abs().max() > 1e-2
