import io

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM

from qlora_kit.errors import UserError
from qlora_kit.export.merge import merge_adapter
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import run_training
from tests.test_cli import run_cli

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    data = folder / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    recipe = Recipe(model=str(llama_dir), data=str(data), rank=8, lr=5e-2, steps=4, micro_batch=4, dropout=0.0)
    run_training(recipe, folder / "run", Console(file=io.StringIO()))
    return folder / "run" / "adapter"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_an_exact_merge_gives_the_logits_of_base_plus_adapter(llama_dir, trained, tmp_path):
    """fp32: equal up to float rounding (1e-4); the default bf16 within 5% of the logits' mean size."""
    reference = logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), trained)
    )
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(None, trained, tmp_path / "fp32", dtype="fp32"))
    assert not any("lora" in name for name, _ in merged.named_parameters()), "a plain model, no PEFT layers"
    torch.testing.assert_close(logits(merged), reference, rtol=1e-4, atol=1e-4)
    base = logits(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))
    assert (reference - base).abs().max() > 1e-2, "the adapter changes the output, so the comparison means something"
    merged16 = AutoModelForCausalLM.from_pretrained(merge_adapter(None, trained, tmp_path / "bf16"))
    assert merged16.dtype == torch.bfloat16
    # bf16 runs the whole forward pass in bf16 (8 bits of mantissa), not only the merged weights: judged on average.
    assert (logits(merged16) - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_merging_into_the_dequantized_4bit_base_tracks_the_trained_model(llama_dir, trained, tmp_path):
    from qlora_kit.model import load as models

    # What training saw: the 4-bit base + adapter, in train mode (see models.no_dropout on bitsandbytes' CPU repacking).
    quantized = PeftModel.from_pretrained(models.load_base_4bit(llama_dir, torch.float32, torch.device("cpu")), trained)
    with models.no_dropout(quantized):
        reference = logits(quantized)
    merged = AutoModelForCausalLM.from_pretrained(
        merge_adapter(None, trained, tmp_path / "q", dtype="fp32", from_quantized=True)
    )
    torch.testing.assert_close(logits(merged), reference, rtol=1e-4, atol=1e-4)


def test_merge_refuses_a_used_folder_and_unsafe_adapters(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        merge_adapter(None, trained, tmp_path / "used")
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--adapter", tmp_path, "--out", tmp_path / "m")
    assert code == 1 and "holds no adapter_config.json" in err
