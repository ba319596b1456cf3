"""The adapter: saved in plain PEFT format so any PEFT user can load it, and used to generate text."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.catalog import catalogue_id
from qlora_kit.errors import UserError
from qlora_kit.hardware import CPU_SHARE
from qlora_kit.model import load_base_4bit, load_tokenizer, pick_device_and_dtype
from qlora_kit.recipes import read_settings
from qlora_kit.sources import check_adapter_folder, describe_source, packaged_model, resolve_model


def portable_base_id(source: str, folder: Path) -> str:
    """What adapter_config.json should name as the base: a hub id where one is known (the original of a model
    that a package ships), else the local folder."""
    packaged = packaged_model(source)
    if packaged:
        return packaged.hub_id
    if not Path(source).expanduser().exists():
        return catalogue_id(source) or source  # a hub id, or a catalogue name for one
    return str(folder.resolve())


@contextmanager
def staged_folder(final: Path):
    """An empty folder beside `final` to write into; when the block ends without error it replaces `final` in one
    rename, so `final` is always whole (new or old) or absent. On any error, a second Ctrl-C included, it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; an adapter is meant to be shared
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_adapter(model, tokenizer, folder: Path, base_id: str, card: str | None = None, state_dict: dict | None = None) -> int:
    """Write adapter_config.json, adapter_model.safetensors, tokenizer files and the card (README.md) atomically;
    returns the weights' bytes. state_dict: the LoRA tensors gathered whole, when the model's are sharded."""
    with staged_folder(folder) as staging:
        # Only the adapter that trains: a DPO run also holds the one it started from, frozen, as its reference.
        model.save_pretrained(staging, selected_adapters=["default"],
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(staging)
        if card:
            (staging / "README.md").write_text(card)
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_id
        config_path.write_text(json.dumps(config, indent=2))
    return (Path(folder) / "adapter_model.safetensors").stat().st_size


def adapter_card(recipe, base_id: str, facts: dict) -> str:
    """adapter/README.md: what the adapter is, what made it, and how to load it with plain PEFT, so a shared adapter
    folder explains itself. facts: steps, first/last loss, eval loss, examples, data format, peak memory, params."""
    eval_line = f"- Eval loss at the end: {facts['eval_loss']:.4f}\n" if facts.get("eval_loss") is not None else ""
    chain = lineage(recipe.init_adapter)
    started_from = (f"- Started from the weights of the adapter `{recipe.init_adapter}`: "
                    f"{' → '.join([base_id, *chain, 'this adapter'])}\n") if chain else ""
    origin = describe_source(recipe.model)
    origin_line = f" The base was {origin}." if origin else ""
    if packaged_model(recipe.model):
        origin_line += (f" The original `{base_id}` loads this adapter too; its weights differ from those trained on "
                        "by the GGUF's rounding.")
    return f"""---
base_model: {base_id}
library_name: peft
tags: [lora, qlora, qlora-kit]
---
# LoRA adapter for {base_id}

Trained with [qlora-kit](https://pypi.org/project/qlora-kit/) on a 4-bit NF4 base (double quantization).{origin_line}

## Training
- Data: `{Path(recipe.data).name}`, {facts['examples']:,} {facts['format']} examples; loss on {
        'every token' if recipe.train_on_inputs or facts['format'] == 'text' else 'completions / assistant turns'}
- Steps: {facts['steps']} of micro-batch {recipe.micro_batch} x {recipe.grad_accum} accumulation, sequences up to {recipe.seq_len} tokens
- LoRA: rank {recipe.rank}, alpha {recipe.alpha:g}, dropout {recipe.dropout:g}, on {recipe.target_modules}; {facts['trainable_params']:,} trainable parameters
{started_from}- Learning rate {recipe.lr:g} ({recipe.schedule}), seed {recipe.seed}, precision {facts['precision']}
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


def lineage(init_adapter: str | None) -> list[str]:
    """The adapters a run's adapter was trained on top of, oldest first, as far as their runs' recipe.yaml say."""
    chain: list[str] = []
    while init_adapter and init_adapter not in chain:
        chain.insert(0, init_adapter)
        init_adapter = run_settings(Path(init_adapter)).get("init_adapter")
    return chain


def corrects_nf4_rounding(adapter_dir: Path) -> bool:
    """Whether the adapter, or one it was trained on top of, started as LoftQ (lora_init loftq in its run's
    recipe.yaml): its weights include a correction of NF4's rounding, so it belongs on the 4-bit base, not the
    16-bit one."""
    settings = run_settings(adapter_dir)
    return settings.get("lora_init") == "loftq" or any(run_settings(Path(a)).get("lora_init") == "loftq"
                                                        for a in lineage(settings.get("init_adapter")))


def run_settings(adapter_dir: Path | None) -> dict:
    """The settings of the run that trained an adapter (its recipe.yaml, beside runs/NAME/adapter), or {}."""
    return read_settings(Path(adapter_dir).parent / "recipe.yaml") if adapter_dir else {}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def base_source_for(adapter_dir: Path) -> str:
    """The base model a run's adapter was trained on: the run's recipe.yaml, else adapter_config.json."""
    return (run_settings(adapter_dir).get("model")
            or json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])


def tokenizer_folder(adapter_dir: Path | None, base_folder: Path, needs: str = "tokenizer_config.json") -> Path:
    """Where the tokenizer to use with an adapter lives: the adapter folder (qlora-kit saves it there) when it holds
    the file `needs`, else the base."""
    return adapter_dir if adapter_dir is not None and (Path(adapter_dir) / needs).is_file() else base_folder


def load_with_adapter(source: str | None, adapter_dir: str | Path | None, precision: str = "auto",
                      trust_remote_code: bool = False):
    """The 4-bit base (with the adapter on top when given) and its tokenizer, ready to generate."""
    model, tokenizer, _ = load_with_adapters(source, [adapter_dir] if adapter_dir is not None else [], precision,
                                             trust_remote_code)
    return model, tokenizer


def load_with_adapters(source: str | None, adapter_dirs: list, precision: str = "auto", trust_remote_code: bool = False):
    """The 4-bit base with every adapter loaded under its own name (the first one active), its tokenizer, and the
    names. Switching is model.set_adapter(name): the base is loaded once however many adapters there are."""
    from peft import PeftModel

    adapter_dirs = [Path(d) for d in adapter_dirs]
    for adapter_dir in adapter_dirs:
        check_adapter_folder(adapter_dir)
    if source is None and adapter_dirs:
        bases = {base_source_for(d) for d in adapter_dirs}
        if len(bases) > 1:
            raise UserError(f"These adapters were trained on different bases: {', '.join(sorted(bases))}.",
                            hint="Pass adapters of one base, or name the base with --model.")
        source = bases.pop()
    if source is None:
        raise UserError("No base model given.", hint="Pass --model, or --adapter from a qlora-kit run.")
    device, dtype = pick_device_and_dtype(precision)
    folder = resolve_model(source)
    tokenizer = load_tokenizer(tokenizer_folder(adapter_dirs[0] if adapter_dirs else None, folder), trust_remote_code)
    model = load_base_4bit(folder, dtype, device, trust_remote_code)
    names = adapter_names(adapter_dirs)
    for name, adapter_dir in zip(names, adapter_dirs):
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_dir, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name)
    if names:
        model.set_adapter(names[0])
    model.eval()
    return model, tokenizer, names


def adapter_names(adapter_dirs: list[Path]) -> list[str]:
    """A short unique name per adapter: the run's name for runs/NAME/adapter, else the folder's name."""
    names = []
    for d in adapter_dirs:
        name = d.resolve().parent.name if d.name == "adapter" else d.name
        candidate, n = name, 1
        while candidate in names:
            n += 1
            candidate = f"{name}-{n}"
        names.append(candidate)
    return names


@dataclass
class Sampling:
    """How replies are drawn: temperature 0 is greedy (repeatable)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered for the model's next reply: its chat template, or the fallback training used."""
    from qlora_kit.data import FALLBACK_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)


def answering_with(model, name: str | None):
    """A context in which the model answers with adapter `name`, or with the bare base model for None."""
    if name is not None:
        model.set_adapter(name)
        return nullcontext()
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def generate_reply(model, tokenizer, messages: list[dict] | str, sampling: Sampling = Sampling(), streamer=None) -> str:
    """The model's reply to a conversation (a list of messages), or its continuation of plain text (a str)."""
    return generate_replies(model, tokenizer, [messages], sampling, streamer)[0]


@torch.no_grad()
def generate_replies(model, tokenizer, requests: list, sampling: Sampling = Sampling(), streamer=None) -> list[str]:
    """Replies to several requests (conversations or plain texts) in one batch, left-padded so every reply starts
    right after its own prompt."""
    CPU_SHARE.use_free_cores(model.device)  # here, in the generating thread: chat generates on a thread of its own
    texts = [r if isinstance(r, str) else chat_prompt(tokenizer, r) for r in requests]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:  # a chat prompt already holds its special tokens; a plain text gets the tokenizer's own
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=isinstance(requests[0], str))
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(model.device)
    drawn = (dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p) if sampling.temperature > 0
             else dict(do_sample=False))
    output = model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, use_cache=True, streamer=streamer,
                            pad_token_id=tokenizer.pad_token_id, **drawn)
    return [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in output]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, chat: bool = True) -> str:
    """The model's reply to one prompt, as a one-turn chat (or plain text continuation with chat=False)."""
    request = [{"role": "user", "content": prompt}] if chat else prompt
    return generate_reply(model, tokenizer, request, Sampling(temperature, 1.0, max_new_tokens))
