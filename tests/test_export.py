import io
import json
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from qlora_kit.errors import UserError
from qlora_kit.export.gguf import export_gguf_adapter, export_merged_gguf, interleave_rotary_rows, lora_updates
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import run_training
from tests.test_cli import run_cli

FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "smollm3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "olmo3",
    "phi3",
    "phi4_mini",
    "lfm2",
    "qwen3_5_text",
)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, request) -> dict:
    """A trained adapter of each tiny model family, with its base folder."""
    from tests.tiny_models import save_tiny_model

    folder = tmp_path_factory.mktemp("export")
    data = folder / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    found = {}
    for kind in FAMILIES:
        base = save_tiny_model(folder / kind, kind)
        recipe = Recipe(model=str(base), data=str(data), rank=4, alpha=8, lr=5e-2, steps=2, micro_batch=4)
        run_training(recipe, folder / f"{kind}-run", Console(file=io.StringIO()))
        found[kind] = (folder / f"{kind}-run" / "adapter", base)
    return found


@pytest.fixture(scope="module")
def merged_models(adapters, tmp_path_factory) -> dict:
    """Each family's adapter merged into its base by peft, in fp32: what every export is compared with."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter

    folder = tmp_path_factory.mktemp("merged")
    return {
        kind: AutoModelForCausalLM.from_pretrained(merge_adapter(None, adapter_dir, folder / kind, dtype="fp32")).eval()
        for kind, (adapter_dir, _) in adapters.items()
    }


IDS = [5, 17, 42, 99, 7, 3, 250, 11, 60, 61]


def logits_of(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_a_gguf_adapter_holds_every_lora_matrix_under_llama_cpp_names(adapters, tmp_path, kind):
    adapter_dir, base = adapters[kind]
    fields, tensors = read_gguf(export_gguf_adapter(adapter_dir, tmp_path / "a.gguf"))
    assert fields["general.architecture"] == kind and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(tensors) == len(lora) == 2 * 2 * 7, "A and B of 7 linear layers in each of 2 blocks"
    a, b = tensors["blk.1.ffn_down.weight.lora_a"], tensors["blk.1.ffn_down.weight.lora_b"]
    # GGUF lists dimensions fastest first: A is (in, rank), B (rank, out), as llama.cpp checks against its weight.
    assert list(a.shape) == [128, 4] and list(b.shape) == [4, 64] and a.tensor_type.name == "F32"
    down_b = lora["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    np.testing.assert_array_equal(np.asarray(b.data).reshape(64, 4), down_b.numpy())
    q_b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    written = torch.from_numpy(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data).reshape(q_b.shape).copy())
    # Llama's query rows follow llama.cpp's rotary layout; Gemma's are as transformers has them.
    torch.testing.assert_close(written, interleave_rotary_rows(q_b, 4) if kind == "llama" else q_b, rtol=0, atol=0)


def test_rotary_rows_are_interleaved_as_llama_cpp_rotates_pairs():
    """Per head of d rows, transformers' row i pairs with row i + d/2; llama.cpp's row 2i with row 2i + 1."""
    heads, d = 3, 8
    weight = torch.arange(heads * d * 2, dtype=torch.float32).reshape(heads * d, 2)
    moved = interleave_rotary_rows(weight, heads)
    for h in range(heads):
        for i in range(d // 2):
            assert torch.equal(moved[h * d + 2 * i], weight[h * d + i])
            assert torch.equal(moved[h * d + 2 * i + 1], weight[h * d + d // 2 + i])


def test_rslora_alpha_is_scaled_so_llama_cpp_scales_as_peft_did(adapters, tmp_path):
    adapter_dir, _ = adapters["llama"]
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_rslora": True}))
    fields, _ = read_gguf(export_gguf_adapter(tmp_path / "adapter", tmp_path / "a.gguf"))
    assert fields["adapter.lora.alpha"] == pytest.approx(8 * 2), "alpha / sqrt(r) == (alpha * sqrt(r)) / r at r = 4"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "DoRA adapter"),
        ({"rank_pattern": {"q_proj": 8}}, "own rank or alpha"),
        ({"peft_type": "IA3"}, "IA3 adapter; GGUF adapters are LoRA only"),
    ],
)
def test_what_a_gguf_adapter_cannot_hold_is_refused(adapters, tmp_path, change, message):
    adapter_dir, _ = adapters["llama"]
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(UserError, match=message):
        export_gguf_adapter(tmp_path / "adapter", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_an_unsupported_architecture_names_the_supported_ones(adapters, tmp_path):
    adapter_dir, base = adapters["llama"]
    shutil.copytree(base, tmp_path / "base")
    config_path = tmp_path / "base" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "gpt_neox"}))
    with pytest.raises(UserError, match="gpt_neox models to GGUF is not supported yet") as error:
        export_gguf_adapter(adapter_dir, tmp_path / "a.gguf", str(tmp_path / "base"))
    assert "(gemma2)" in error.value.hint and "(qwen3)" in error.value.hint


def test_export_writes_the_gguf_beside_the_adapter_and_says_how_to_use_it(adapters, tmp_path, monkeypatch, capsys):
    adapter_dir, _ = adapters["gemma"]
    shutil.copytree(adapter_dir.parent, tmp_path / "run")
    code, out, _ = run_cli(monkeypatch, capsys, "export", "--adapter", tmp_path / "run" / "adapter")
    assert code == 0 and (tmp_path / "run" / "adapter.gguf").is_file()
    assert "--lora" in out and "--ollama" in out
    code, _, err = run_cli(monkeypatch, capsys, "export", "--adapter", tmp_path / "run" / "adapter", "--format", "onnx")
    assert code == 2 and "gguf-adapter" in err


def gguf_array(tensor) -> np.ndarray:
    """A GGUF tensor's values in transformers' (out, in) order."""
    return np.asarray(tensor.data).reshape([int(n) for n in reversed(tensor.shape)])


def test_a_merged_gguf_holds_base_plus_adapter_and_the_tokenizer_training_used(adapters, tmp_path):
    from safetensors.torch import load_file

    from tests.tiny_models import CHAT_TEMPLATE

    adapter_dir, base = adapters["llama"]
    fields, tensors = read_gguf(export_merged_gguf(adapter_dir, tmp_path / "m.gguf", quant="f32"))
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 300 and fields["tokenizer.ggml.tokens"][2] == "</s>"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert len(tensors) == 3 + 2 * 9, "embeddings, final norm and output head; 9 tensors per block"
    weights, updates = load_file(base / "model.safetensors"), lora_updates(adapter_dir)
    for name, gguf_name, heads in [
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", None),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", 2),
    ]:
        expected = updates[name].applied_to(weights[name])
        expected = interleave_rotary_rows(expected, heads) if heads else expected
        np.testing.assert_allclose(gguf_array(tensors[gguf_name]), expected.numpy(), rtol=1e-6, atol=1e-7)


def test_a_q8_0_merged_gguf_quantizes_matrices_and_keeps_norms_in_f32(adapters, tmp_path):
    _, tensors = read_gguf(export_merged_gguf(adapters["llama"][0], tmp_path / "m.gguf", quant="q8_0"))
    assert (
        tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
        and tensors["output.weight"].tensor_type.name == "Q8_0"
    )
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def with_config(base, folder, **changes):
    """A copy of a base model folder with its config.json changed."""
    shutil.copytree(base, folder)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    return str(folder)


def test_what_the_merged_export_cannot_write_is_one_sentence(adapters, tmp_path, monkeypatch):
    adapter_dir, base = adapters["llama"]
    with pytest.raises(UserError, match="gpt_neox models to GGUF is not supported yet"):
        export_merged_gguf(
            adapter_dir, tmp_path / "m.gguf", with_config(base, tmp_path / "neox", model_type="gpt_neox")
        )
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(UserError, match=r"scales its rotary embeddings \(yarn\)"):
        export_merged_gguf(adapter_dir, tmp_path / "m.gguf", with_config(base, tmp_path / "rope", rope_parameters=yarn))
    # llama.cpp scales Gemma 2's queries by head_dim whatever query_pre_attn_scalar says.
    with pytest.raises(UserError, match="query_pre_attn_scalar 32, and llama.cpp would use 16"):
        export_merged_gguf(
            adapters["gemma2"][0],
            tmp_path / "m.gguf",
            with_config(adapters["gemma2"][1], tmp_path / "g2", query_pre_attn_scalar=32),
        )
    with pytest.raises(UserError, match="Unknown --quant q3"):
        export_merged_gguf(adapter_dir, tmp_path / "m.gguf", quant="q3")
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(UserError, match="needs llama.cpp's quantizer") as error:
        export_merged_gguf(adapter_dir, tmp_path / "m.gguf", quant="q4_k_m")
    assert "ollama create NAME --quantize q4_K_M" in error.value.hint
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*")), "nothing half-written is left"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "phi3"])
def test_transformers_reads_each_merged_gguf_back_as_the_merged_model(adapters, merged_models, tmp_path, kind):
    """transformers' own GGUF loader (which knows these four families, not Gemma) undoes llama.cpp's layouts: what it
    reads must be the merged model exactly, so a broken export fails here without llama.cpp."""
    from transformers import AutoModelForCausalLM

    path = export_merged_gguf(adapters[kind][0], tmp_path / f"{kind}.gguf", quant="f32")
    # Its Gemma 2 reader leaves query_pre_attn_scalar at the 2B's 256, which GGUF does not hold; llama.cpp uses head_dim.
    changes = {"query_pre_attn_scalar": 16} if kind == "gemma2" else {}
    read_back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32, **changes)
    assert relative_gap(logits_of(read_back), logits_of(merged_models[kind])) < 1e-6  # measured: 0.0


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(use_rslora=True)], ids=["dora", "rslora"])
def test_a_merged_gguf_of_each_variant_is_what_peft_merges(adapters, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    base = adapters["llama"][1]
    run_training(
        Recipe(model=str(base), data=str(data), rank=4, alpha=8, lr=5e-2, steps=2, micro_batch=4, **variant),
        tmp_path / "run",
        Console(file=io.StringIO()),
    )
    peft_merged = AutoModelForCausalLM.from_pretrained(
        merge_adapter(None, tmp_path / "run" / "adapter", tmp_path / "merged", dtype="fp32")
    )
    path = export_merged_gguf(tmp_path / "run" / "adapter", tmp_path / "m.gguf", quant="f32")
    read_back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert relative_gap(logits_of(read_back), logits_of(peft_merged)) < 1e-6  # measured: 0.0


def test_a_loftq_adapter_exports_merged_into_the_weights_as_nf4_rounds_them(adapters, tmp_path):
    """LoftQ's adapter corrects NF4's rounding: the merged GGUF must be the 4-bit model as trained, and a GGUF adapter
    (which would ride on an unrounded base) is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.model.load import load_base_4bit

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    base = adapters["llama"][1]
    run_training(
        Recipe(model=str(base), data=str(data), rank=4, alpha=8, lr=5e-2, steps=2, micro_batch=4, lora_init="loftq"),
        tmp_path / "run",
        Console(file=io.StringIO()),
    )
    adapter_dir = tmp_path / "run" / "adapter"
    with pytest.raises(UserError, match="started as LoftQ") as error:
        export_gguf_adapter(adapter_dir, tmp_path / "a.gguf")
    assert "--format gguf" in error.value.hint
    path = export_merged_gguf(adapter_dir, tmp_path / "m.gguf", quant="f32")
    read_back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    # The 4-bit base dequantized: bnb's CPU matmul on the packed weights itself differs by ~0.4%.
    as_trained = PeftModel.from_pretrained(
        load_base_4bit(base, torch.float32, torch.device("cpu")).dequantize(), adapter_dir
    )
    assert relative_gap(logits_of(read_back), logits_of(as_trained)) < 1e-5  # measured: 0.0


def test_a_gemma_gguf_holds_its_norms_as_llama_cpp_scales_them_and_no_output_head(adapters, tmp_path):
    adapter_dir, base = adapters["gemma"]
    fields, tensors = read_gguf(export_merged_gguf(adapter_dir, tmp_path / "g.gguf", quant="f32"))
    assert fields["general.architecture"] == "gemma" and fields["gemma.attention.key_length"] == 16
    weights = load_file(base / "model.safetensors")
    np.testing.assert_array_equal(
        gguf_array(tensors["blk.1.ffn_norm.weight"]),
        weights["model.layers.1.post_attention_layernorm.weight"].numpy() + 1,
    )
    assert "output.weight" not in tensors, "llama.cpp reads Gemma's tied output head from token_embd"


def test_the_base_alone_exports_for_gguf_adapters_to_ride_on(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base = adapters["qwen2"]
    path = export_merged_gguf(None, tmp_path / "base.gguf", str(base), quant="f32")
    read_back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert relative_gap(logits_of(read_back), logits_of(AutoModelForCausalLM.from_pretrained(base))) < 1e-6


def test_a_merged_export_says_its_peak_ram_and_refuses_when_it_is_not_there(adapters, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qlora_kit.export.gguf import WRITE_BUFFER_BYTES, merged_export_ram

    adapter_dir, base = adapters["llama"]
    largest = 300 * 64  # the tiny Llama's embeddings and output head, the largest weights it has
    assert merged_export_ram(base) == largest * 4 * 3 + WRITE_BUFFER_BYTES
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=100 * 2**20))
    with pytest.raises(UserError, match=r"needs about 0.3 GiB of RAM at its peak, and 0.1 GiB is available") as error:
        export_merged_gguf(adapter_dir, tmp_path / "m.gguf")
    assert "--format gguf-adapter" in error.value.hint and not list(tmp_path.iterdir())


def llama_cpp_logits(llama_cpp, path, ids, lora_path=None) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(path),
        lora_path=lora_path and str(lora_path),
        n_ctx=256,
        logits_all=True,
        n_threads=2,
        verbose=False,
    )
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)])
    llm.close()
    return scores


def relative_gap(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def same_clear_argmax(got, expected) -> bool:
    """Whether every argmax is equal where the top two logits are more than 0.05 apart: f16 weights may swap two
    logits a hair apart."""
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    return bool((got.argmax(-1) == expected.argmax(-1))[clear].all())


MOON = [{"role": "user", "content": "Tell me about the moon."}]


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def greedy_tokens(llm, ids, eos_id: int, count: int = 12) -> list[int]:
    """llama.cpp's greedy continuation of ids, up to count tokens or the end of the answer."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if token == eos_id or len(tokens) == count:
            break
        tokens.append(token)
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
def test_llama_cpp_runs_each_family_merged_and_as_base_plus_adapter_as_transformers_does(
    adapters, merged_models, tmp_path, kind
):
    """Each tiny family three ways in llama.cpp itself: merged f16; the base alone in f16 with adapter.gguf on top;
    the merged model's greedy continuation."""
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    adapter_dir, base = adapters[kind]
    expected = logits_of(merged_models[kind])
    merged = export_merged_gguf(adapter_dir, tmp_path / "merged.gguf")
    base_gguf = export_merged_gguf(None, tmp_path / "base.gguf", str(base))
    adapter_gguf = export_gguf_adapter(adapter_dir, tmp_path / "adapter.gguf")
    got = llama_cpp_logits(llama_cpp, merged, IDS)
    # Measured (relative logit gap, merged / base + adapter): llama 0.0016 / 0.0016, qwen2 0.0014 / 0.0016,
    # qwen3 0.0013 / 0.0010, smollm3 0.0019 / 0.0019, gemma 0.0012 / 0.0012, gemma2 0.0007 / 0.0008, gemma3_text
    # 0.0008 / 0.0008, olmo3 0.0011 / 0.0011, phi3 0.0015 / 0.0016, phi4_mini 0.0012 / 0.0011, lfm2 0.0016,
    # qwen3_5_text 0.0054 (its delta rule in fp32 chunks); the adapter's own effect 0.2-1.0.
    assert relative_gap(got, expected) < 0.01 and same_clear_argmax(got, expected)
    assert relative_gap(llama_cpp_logits(llama_cpp, base_gguf, IDS, lora_path=adapter_gguf), expected) < 0.01
    llm = llama_cpp.Llama(model_path=str(merged), n_ctx=256, n_threads=2, verbose=False)
    tokens = greedy_tokens(llm, IDS, eos_id=2, count=8)
    llm.close()
    answer = merged_models[kind].generate(input_ids=torch.tensor([IDS]), max_new_tokens=8, do_sample=False)
    assert tokens == answer[0, len(IDS) :].tolist()[: len(tokens)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "qwen3_next"])
def test_llama_cpp_runs_a_merged_mixture_of_experts_as_transformers_does(tmp_path, kind):
    """A tiny Qwen3-MoE (8 experts, 2 a token; its checkpoint holds each expert apart, as the hub's does), a tiny
    gpt-oss (its checkpoint in MXFP4, as the hub's: fused, transposed, gate and up interleaved; biases, sinks, a
    window every 2nd layer) and a tiny Qwen3-Next (Gated DeltaNet with fused in_proj_qkvz, a shared expert) trained
    with LoRA on each expert, exported merged (the experts stacked per layer as llama.cpp holds them, each expert's
    change added): llama.cpp's logits and greedy tokens are the merged model's. Measured: relative gap 0.0013
    (Qwen3-MoE), 0.0023 (gpt-oss), the adapter's own effect 0.45 and 0.72. Qwen3-Next is written in f32: its delta
    rule carries f16 weights' rounding on to a gap of 0.042 in this tiny model, against 0.0001 in f32 (effect 1.06)."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter
    from tests.tiny_models import save_mxfp4_copies, save_tiny_model

    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    base = save_tiny_model(tmp_path / "model", kind)
    if kind == "gpt_oss":
        save_mxfp4_copies(base, tmp_path / "base", tmp_path / "decoded")
        base = tmp_path / "base"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    recipe = Recipe(model=str(base), data=str(data), rank=4, alpha=8, lr=5e-2, steps=2, micro_batch=4)
    run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))
    adapter = tmp_path / "run" / "adapter"
    merged_model = AutoModelForCausalLM.from_pretrained(
        merge_adapter(None, adapter, tmp_path / "merged", dtype="fp32")
    ).eval()
    expected = logits_of(merged_model)
    quant = "f32" if kind == "qwen3_next" else "f16"
    got = llama_cpp_logits(llama_cpp, export_merged_gguf(adapter, tmp_path / "merged.gguf", quant=quant), IDS)
    assert relative_gap(got, expected) < 0.01 and same_clear_argmax(got, expected)
    assert relative_gap(logits_of(AutoModelForCausalLM.from_pretrained(base).eval()), expected) > 0.1  # it learned
    llm = llama_cpp.Llama(model_path=str(tmp_path / "merged.gguf"), n_ctx=256, n_threads=2, verbose=False)
    tokens = greedy_tokens(llm, IDS, eos_id=2, count=8)
    llm.close()
    answer = merged_model.generate(input_ids=torch.tensor([IDS]), max_new_tokens=8, do_sample=False)
    assert tokens == answer[0, len(IDS) :].tolist()[: len(tokens)]


def sentencepiece_style_tokenizer(space_prefix: bool):
    """A tokenizer laid out as SentencePiece models are in tokenizer.json (Llama 2, Mistral, Gemma, Phi-3): <unk>,
    <s>, </s>, the 256 byte tokens, then pieces in merge order; "▁" for spaces, put before the text (Llama 2) or not
    (Gemma); bytes for what the pieces do not cover."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import CORPUS

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    learner.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=200))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in learned["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * space_prefix + [normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(" ", 1, 0)] * space_prefix
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    return tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("space_prefix", [True, False], ids=["llama-2-style", "gemma-style"])
def test_llama_cpp_tokenizes_sentencepiece_style_tokenizers_as_transformers_does(tmp_path, monkeypatch, space_prefix):
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    import gguf

    from tests.tiny_models import save_tiny_model

    tokenizer = sentencepiece_style_tokenizer(space_prefix)
    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=tokenizer)
    texts = ["The quick brown fox, it's 2024! Ünïcödé 🙂 done.", " leading space and  double", "<|user|>a pirate sails"]
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def tokenized_by_llama_cpp(path) -> list[list[int]]:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        return [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]

    assert tokenized_by_llama_cpp(export_merged_gguf(None, tmp_path / "right.gguf", str(base))) == expected
    # The check has teeth: without the scores that order the merges, llama.cpp splits words differently.
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_scores", lambda writer, scores: None)
    assert tokenized_by_llama_cpp(export_merged_gguf(None, tmp_path / "unscored.gguf", str(base))) != expected


LLAMA_3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # 64: the tiny head's frequencies span it


@pytest.mark.slow
def test_llama_cpp_scales_rotary_frequencies_as_llama_3_does(adapters, tmp_path, monkeypatch):
    """Llama 3.1 and 3.2 stretch their low rotary frequencies (rope_type llama3); llama.cpp reads the factors from a
    rope_freqs tensor that the export computes with transformers' own code."""
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    from transformers import AutoModelForCausalLM

    import qlora_kit.export.gguf as export

    base = with_config(adapters["llama"][1], tmp_path / "llama3", rope_parameters=LLAMA_3_ROPE)
    ids = list(range(5, 250, 4))
    expected = logits_of(AutoModelForCausalLM.from_pretrained(base), ids)
    got = llama_cpp_logits(llama_cpp, export_merged_gguf(None, tmp_path / "scaled.gguf", base), ids)
    monkeypatch.setattr(export, "rope_frequency_factors", lambda _: None)
    unscaled = llama_cpp_logits(llama_cpp, export_merged_gguf(None, tmp_path / "unscaled.gguf", base), ids)
    # Measured: 0.0022 with the factors, 0.99 without them.
    assert relative_gap(got, expected) < 0.01 and relative_gap(unscaled, expected) > 0.1


TOKENIZER_TEXT = [
    "IT'S 2024, THEY'LL pay 1234567 (or 89)!\nYes,ok  fine\n\n\tdone",
    "it's we've i'd 3.14159 ,,hello",
    "HelloWorld camelCaseWords XMLHttp a/b//\n",
]


def tokenizer_splitting_with(pattern: str | None):
    """A ~300-token byte-level BPE tokenizer trained on TOKENIZER_TEXT after splitting it with pattern (None: GPT-2's
    own), so that its merges differ where the splitting rules do."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False)
        if pattern is None
        else pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(TOKENIZER_TEXT * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "gpt-4o"])
def test_llama_cpp_tokenizes_as_transformers_does_with_each_splitting_rule(adapters, tmp_path, monkeypatch, name):
    """Byte-level BPE tokenizers differ in the regular expression that splits text before merging (Llama 3 keeps
    digits in threes, Qwen2 one by one, both split contractions case-blind; o200k splits words at case changes);
    llama.cpp knows them by name."""
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    import qlora_kit.export.gguf as export

    pattern = next((regex for regex, known in export.SPLIT_PATTERNS.items() if known == name), None)
    tokenizer = tokenizer_splitting_with(pattern)
    base = tmp_path / "base"
    shutil.copytree(adapters["llama"][1], base)
    for old in base.glob("tokenizer*"):
        old.unlink()
    tokenizer.save_pretrained(base)

    def tokenized_by_llama_cpp(path) -> list[list[int]]:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        return [llm.tokenize(text.encode(), add_bos=False, special=True) for text in TOKENIZER_TEXT]

    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TOKENIZER_TEXT]
    assert tokenized_by_llama_cpp(export_merged_gguf(None, tmp_path / "right.gguf", str(base))) == expected
    # The check has teeth: the same file naming another rule tokenizes differently.
    monkeypatch.setattr(export, "pre_tokenizer_name", lambda _: "qwen2" if name == "gpt-2" else "gpt-2")
    assert tokenized_by_llama_cpp(export_merged_gguf(None, tmp_path / "wrong.gguf", str(base))) != expected


@pytest.mark.slow
def test_llama_cpp_runs_the_merged_smollm2_demo_as_transformers_does(demo_run, tmp_path):
    """The demo's model merged at three precisions: the logit gap to transformers grows with the quantization, and
    the greedy answer stays the pirate's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.probe.sources import resolve_model

    out, _ = demo_run
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = chat_ids(tokenizer, MOON)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32), out / "adapter"
    )
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        answer = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)[
            0, len(ids) :
        ].tolist()
    # Measured: f16 0.0014, q8_0 0.042, q4_k_m 0.140; all three gave the same 20 greedy tokens as transformers.
    for quant, largest_gap in [("f16", 0.01), ("q8_0", 0.08), ("q4_k_m", 0.25)]:
        path = export_merged_gguf(out / "adapter", tmp_path / f"{quant}.gguf", quant=quant)
        assert relative_gap(llama_cpp_logits(llama_cpp, path, ids), expected) < largest_gap, quant
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
        tokens = greedy_tokens(llm, ids, tokenizer.eos_token_id)
        assert tokens == answer[: len(tokens)], quant
        if quant == "f16":  # the chat template inside the file formats the conversation as training did
            reply = llm.create_chat_completion(MOON, temperature=0, max_tokens=12)["choices"][0]["message"]["content"]
            assert reply.startswith(tokenizer.decode(answer[:6]).strip()), reply
            merged_f16 = llama_cpp_logits(llama_cpp, path, ids)
        llm.close()
    # The other route to the same model: the base alone in f16 with adapter.gguf on top (measured: 0.0017 from the
    # merged f16 file, whose weights were rounded to f16 after the adapter was added).
    base_f16 = export_merged_gguf(None, tmp_path / "base-f16.gguf", "smollm2-135m")
    adapter_gguf = export_gguf_adapter(out / "adapter", tmp_path / "adapter.gguf")
    assert relative_gap(llama_cpp_logits(llama_cpp, base_f16, ids, lora_path=adapter_gguf), merged_f16) < 0.01


@pytest.mark.slow
def test_llama_cpp_applies_the_exported_smollm2_adapter_as_transformers_does(demo_run, tmp_path):
    """The demo's adapter (20 steps on the real SmolLM2-135M), exported and loaded by llama.cpp itself on the GGUF
    the demo trained from (Q4_1): its logits follow transformers' base + adapter as closely as llama.cpp's base
    follows transformers' base, while the adapter moves them far more than that."""
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp: pip install "qlora-kit[export]"')
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.probe.sources import gguf_file_of, resolve_model

    out, _ = demo_run
    adapter_gguf = export_gguf_adapter(out / "adapter", tmp_path / "adapter.gguf")
    base_gguf = gguf_file_of("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = chat_ids(tokenizer, MOON)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    with torch.no_grad():
        hf_base = base(input_ids=torch.tensor([ids])).logits[0].numpy()
        adapted = PeftModel.from_pretrained(base, out / "adapter")
        hf_adapted = adapted(input_ids=torch.tensor([ids])).logits[0].numpy()
    cpp_base = llama_cpp_logits(llama_cpp, base_gguf, ids)
    cpp_adapted = llama_cpp_logits(llama_cpp, base_gguf, ids, lora_path=adapter_gguf)
    # Measured: base 0.030 (llama.cpp's own rounding: its Q4_1 matmuls quantize activations), base + adapter 0.037,
    # adapter effect 0.49; the same adapter without the query/key row reordering: 0.086.
    base_gap, adapted_gap = relative_gap(cpp_base, hf_base), relative_gap(cpp_adapted, hf_adapted)
    effect = relative_gap(hf_adapted, hf_base)
    print(
        f"relative logit gap to transformers: base {base_gap:.4f}, base + adapter {adapted_gap:.4f}; adapter effect {effect:.3f}"
    )
    assert adapted_gap < 1.5 * base_gap and effect > 10 * adapted_gap
    assert (cpp_adapted.argmax(-1) == hf_adapted.argmax(-1)).mean() >= 0.85

    # What a user sees: llama.cpp answers as the fine-tuned model does (measured: the same 20 greedy tokens,
    # "Arr, matey! The moon be a celestial body, ...").
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf), n_ctx=256, n_threads=2, verbose=False)
    cpp_tokens = greedy_tokens(llm, ids, tokenizer.eos_token_id)
    llm.close()
    with torch.no_grad():
        hf_tokens = adapted.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)[
            0, len(ids) :
        ].tolist()
    assert cpp_tokens == hf_tokens[: len(cpp_tokens)] and "arr" in tokenizer.decode(cpp_tokens).lower()
