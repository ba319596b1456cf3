"""The adapter: saved in plain PEFT format so any PEFT user can load it, and used to generate text."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from qlora_kit import model as models
from qlora_kit.errors import UserError
from qlora_kit.sources import resolve_model

# Hub ids of the originals behind our aliases, so a saved adapter names a base that loads anywhere.
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_base_id(source: str, folder: Path) -> str:
    """What adapter_config.json should name as the base: a hub id where one is known, else the local folder."""
    if source in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[source]
    if not Path(source).expanduser().exists():
        return source  # a hub id
    return str(folder.resolve())


def save_adapter(model, tokenizer, folder: Path, base_id: str, card: str | None = None) -> int:
    """Write adapter_config.json, adapter_model.safetensors, tokenizer files and the card (README.md) atomically;
    returns the weights' bytes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if card:
            (staging / "README.md").write_text(card)
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_id
        config_path.write_text(json.dumps(config, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return (folder / "adapter_model.safetensors").stat().st_size


def adapter_card(recipe, base_id: str, facts: dict) -> str:
    """adapter/README.md: what the adapter is, what made it, and how to load it with plain PEFT, so a shared adapter
    folder explains itself. facts: steps, first/last loss, eval loss, examples, data format, peak memory, params."""
    eval_line = f"- Eval loss at the end: {facts['eval_loss']:.4f}\n" if facts.get("eval_loss") is not None else ""
    return f"""---
base_model: {base_id}
library_name: peft
tags: [lora, qlora, qlora-kit]
---
# LoRA adapter for {base_id}

Trained with [qlora-kit](https://pypi.org/project/qlora-kit/) on a 4-bit NF4 base (double quantization).

## Training
- Data: `{Path(recipe.data).name}`, {facts['examples']:,} {facts['format']} examples; loss on {
        'every token' if recipe.train_on_inputs or facts['format'] == 'text' else 'completions / assistant turns'}
- Steps: {facts['steps']} of micro-batch {recipe.micro_batch} x {recipe.grad_accum} accumulation, sequences up to {recipe.seq_len} tokens
- LoRA: rank {recipe.rank}, alpha {recipe.alpha:g}, dropout {recipe.dropout:g}, on {recipe.target_modules}; {facts['trainable_params']:,} trainable parameters
- Learning rate {recipe.lr:g} ({recipe.schedule}), seed {recipe.seed}, precision {facts['precision']}
- Loss: {facts['first_loss']:.4f} at the first step, {facts['last_loss']:.4f} at the last
{eval_line}- Peak memory: {facts['peak_memory_gib']:.2f} GiB ({facts['memory_kind']})

The full settings are in the run's `recipe.yaml`, one step per line in `metrics.jsonl`.

## Use it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

or `qlora-kit generate --adapter path/to/this/folder --prompt "..."`; `qlora-kit merge` writes a standalone model.
"""


def base_source_for(adapter_dir: Path) -> str:
    """The base model a run's adapter was trained on: the run's recipe.yaml, else adapter_config.json."""
    recipe_file = adapter_dir.parent / "recipe.yaml"
    if recipe_file.is_file():
        recipe = yaml.safe_load(recipe_file.read_text()) or {}
        if recipe.get("model"):
            return recipe["model"]
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def check_adapter_folder(adapter_dir: Path) -> None:
    """A PEFT adapter folder with safetensors weights, or a UserError saying what is missing."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no adapter_config.json.", hint="Pass the adapter folder of a run, e.g. runs/NAME/adapter.")
    if not (adapter_dir / "adapter_model.safetensors").is_file():  # a pickled .bin could run code when loaded
        raise UserError(f"{adapter_dir} holds no adapter_model.safetensors; qlora-kit reads adapters only as safetensors.",
                        hint="Convert it once with PEFT: load it where you trust it and save_pretrained(safe_serialization=True).")


def load_with_adapter(source: str | None, adapter_dir: str | Path | None, precision: str = "auto"):
    """The 4-bit base (with the adapter on top when given) and its tokenizer, ready to generate."""
    from peft import PeftModel

    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        check_adapter_folder(adapter_dir)
        source = source or base_source_for(adapter_dir)
    if source is None:
        raise UserError("No base model given.", hint="Pass --model, or --adapter from a qlora-kit run.")
    device, dtype = models.pick_device_and_dtype(precision)
    folder = resolve_model(source)
    has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = models.load_tokenizer(adapter_dir if has_tokenizer else folder)
    model = models.load_base_4bit(folder, dtype, device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, chat: bool = True) -> str:
    """The model's reply to `prompt`, through the chat template when the tokenizer has one; greedy at temperature 0."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
