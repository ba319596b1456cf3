"""The adapter: saved in plain PEFT format so any PEFT user can load it, and used to generate text."""

from __future__ import annotations

import json
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from qlora_kit.errors import UserError
from qlora_kit.files import staged_folder
from qlora_kit.model.experts import adapter_config
from qlora_kit.model.load import load_base_4bit, load_tokenizer, pick_device_and_dtype
from qlora_kit.plan.recipes import read_settings
from qlora_kit.probe.catalog import catalogue_id
from qlora_kit.probe.hardware import CPU_SHARE
from qlora_kit.probe.sources import (
    IDENTITY_FILE,
    check_adapter_folder,
    describe_source,
    lora_layers,
    model_identity,
    packaged_model,
    path_exists,
    read_model_config,
    resolve_model,
    weight_shapes,
)


def portable_base_id(source: str, folder: Path) -> str:
    """What adapter_config.json should name as the base: a hub id where one is known (the original of a model
    that a package ships), else the local folder."""
    packaged = packaged_model(source)
    if packaged:
        return packaged.hub_id
    if not path_exists(Path(source).expanduser()):
        return catalogue_id(source) or source  # a hub id, or a catalogue name for one
    return str(folder.resolve())


def save_adapter(
    model,
    tokenizer,
    folder: Path,
    base_id: str,
    card: str | None = None,
    state_dict: dict | None = None,
    base: dict | None = None,
) -> int:
    """Write adapter_config.json, adapter_model.safetensors, tokenizer files, the card (README.md) and the base's
    identity (base_model.json, from sources.model_identity) atomically; returns the weights' bytes. state_dict: the
    LoRA tensors gathered whole, when the model's are sharded."""
    with staged_folder(folder) as staging:
        if base:
            (staging / IDENTITY_FILE).write_text(json.dumps(base, indent=2))
        # Only the adapter that trains: a DPO run also holds the one it started from, frozen, as its reference.
        model.save_pretrained(
            staging, selected_adapters=["default"], **({"state_dict": state_dict} if state_dict is not None else {})
        )
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
    started_from = (
        (
            f"- Started from the weights of the adapter `{recipe.init_adapter}`: "
            f"{' → '.join([base_id, *chain, 'this adapter'])}\n"
        )
        if chain
        else ""
    )
    origin = describe_source(recipe.model)
    origin_line = f" The base was {origin}." if origin else ""
    if packaged_model(recipe.model):
        origin_line += (
            f" The original `{base_id}` loads this adapter too; its weights differ from those trained on "
            "by the GGUF's rounding."
        )
    return f"""---
base_model: {base_id}
library_name: peft
tags: [lora, qlora, qlora-kit]
---
# LoRA adapter for {base_id}

Trained with [qlora-kit](https://pypi.org/project/qlora-kit/) on a 4-bit NF4 base (double quantization).{origin_line}

## Training
- Data: `{Path(recipe.data).name if Path(recipe.data).is_absolute() else recipe.data}`, {facts["examples"]:,} {
        facts["format"]
    } examples; loss on {
        "every token" if recipe.train_on_inputs or facts["format"] == "text" else "completions / assistant turns"
    }
- Steps: {facts["steps"]} of micro-batch {recipe.micro_batch} x {recipe.grad_accum} accumulation, sequences up to {
        recipe.seq_len
    } tokens
- LoRA: rank {recipe.rank}, alpha {recipe.alpha:g}, dropout {recipe.dropout:g}, on {recipe.target_modules}; {
        facts["trainable_params"]:,} trainable parameters
{started_from}- Learning rate {recipe.lr:g} ({recipe.schedule}), seed {recipe.seed}, precision {facts["precision"]}
- Loss: {facts["first_loss"]:.4f} at the first step, {facts["last_loss"]:.4f} at the last
{eval_line}- Peak memory: {facts["peak_memory_gib"]:.2f} GiB ({facts["memory_kind"]})

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


def check_adapter_on_base(adapter_dir: Path, folder: Path, chosen: bool) -> str | None:
    """Refuse to use an adapter on a base it was not made for, in one sentence saying what differs: another
    architecture or other layer shapes, always; for the base the adapter's run names (not one chosen with --model),
    also a config or weights changed since it trained. A chosen base that differs only there is allowed: the
    sentence saying so is returned, for the caller to show."""
    adapter_dir = Path(adapter_dir)
    trained_on = recorded_base(adapter_dir)
    found = model_identity(folder)
    where = (trained_on or {}).get("hub_id") or (trained_on or {}).get("path") or base_named_by(adapter_dir)
    if where and not chosen and Path(where) == Path(found["path"]):
        hint = f"{folder} was replaced since: restore the model it held, or pass that model with --model."
    else:
        hint = f"Pass the base it was trained on with --model{f' ({where})' if where else ''}."
    named = Path(base_named_by(adapter_dir) or "")
    if trained_on is None and named.name and path_exists(named) and (named / "config.json").is_file():
        # another tool's adapter, or an older qlora-kit's: its architecture is that of the local base its config names
        trained_on = {"architecture": model_identity(named)["architecture"]}
    if trained_on and trained_on.get("architecture"):
        differ = [
            f"{key} {was!r} when it trained, {found['architecture'].get(key)!r} in {folder}"
            for key, was in trained_on["architecture"].items()
            if found["architecture"].get(key) != was
            and not (
                key == "architectures"
                and was
                and found["architecture"].get("model_type") != trained_on["architecture"].get("model_type")
            )
        ]  # the class follows the model_type
        if differ:
            raise UserError(f"{adapter_dir} was trained on another model: {'; '.join(differ)}.", hint=hint)
    check_layer_shapes(adapter_dir, weight_shapes(folder), folder, hint)
    changed = trained_on and [
        what
        for what, key in (("config.json", "config_sha256"), ("weights", "weights_sha256"))
        if trained_on.get(key) and trained_on[key] != found[key]
    ]
    if not changed:
        return None
    if chosen:
        return (
            f"{folder} is not the base {adapter_dir} was trained on (its {' and '.join(changed)} differ), though "
            "of the same architecture and shapes: using it, as --model says."
        )
    raise UserError(
        f"The base model at {folder} is not the one {adapter_dir} was trained on: its "
        f"{' and '.join(changed)} changed since.",
        hint="Restore the base it was trained on, or pass --model to use the adapter on this one anyway.",
    )


def say_note(note: str | None) -> None:
    """A note about the inputs, on stderr, so that --json output on stdout stays clean."""
    if note:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)


def recorded_base(adapter_dir: Path) -> dict | None:
    """The base an adapter was trained on, as qlora-kit recorded it (base_model.json), or None."""
    try:
        record = json.loads((Path(adapter_dir) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def base_named_by(adapter_dir: Path) -> str | None:
    """The base adapter_config.json names (base_model_name_or_path), if it names one."""
    try:
        named = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named else None


def check_layer_shapes(adapter_dir: Path, shapes: dict[str, tuple], folder: Path, hint: str) -> None:
    """Every layer the adapter adapts is in the base (shapes: weight name -> shape) and maps as many features in and
    out as its LoRA matrices do."""
    from safetensors import safe_open

    if not shapes:  # weights the headers cannot tell (a pre-quantized checkpoint): loading checks them
        return
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as weights:
        for module, (a_key, b_key) in lora_layers(weights.keys()).items():
            a, b = weights.get_slice(a_key).get_shape(), weights.get_slice(b_key).get_shape()
            shape = shapes.get(module + ".weight") or unique_suffix_match(shapes, module + ".weight")
            experts = expert_shapes(shapes, module.replace(".base_layer", ""))
            if shape is None and experts:  # LoRA on a layer's experts' weights: A holds rank rows an expert
                count, pairs = experts
                if (b[0], a[1]) not in pairs or a[0] % count:
                    raise UserError(
                        f"{adapter_dir} was made for another model: its LoRA on {module} maps {a[1]} to "
                        f"{b[0]} features in {a[0]} rows, which the {count} experts in {folder} do not "
                        f"fit ({', '.join(f'{i} to {o}' for o, i in sorted(pairs))}).",
                        hint=hint,
                    )
                continue
            if shape is None:
                raise UserError(
                    f"{adapter_dir} adapts {module}, which the model in {folder} does not have: it was "
                    "made for another model.",
                    hint=hint,
                )
            if shape is not UNKNOWN and tuple(shape[:2]) != (b[0], a[1]):
                raise UserError(
                    f"{adapter_dir} was made for another model: its {module} maps {a[1]} to {b[0]} "
                    f"features, the one in {folder} {shape[1]} to {shape[0]}.",
                    hint=hint,
                )


def expert_shapes(shapes: dict[str, tuple], module: str) -> tuple[int, set] | None:
    """(experts, {(out, in)} of the weights LoRA may adapt) for a layer's experts in a checkpoint: one weight per
    expert and projection (experts.0.gate_proj.weight ..., gate and up fused as in transformers 5), or fused 3-D
    tensors (experts x in x out, or out x in); None where `module` holds no experts."""
    inside = {name[len(module) + 1 :]: shape for name, shape in shapes.items() if name.startswith(module + ".")}
    apart = {name.split(".")[0] for name in inside if name.split(".")[0].isdigit()}
    if apart:
        first = {name.split(".")[1]: shape for name, shape in inside.items() if name.startswith("0.")}
        gate, down = first.get("gate_proj") or first.get("up_proj"), first.get("down_proj")
        return (len(apart), {(2 * gate[0], gate[1]), tuple(down)}) if gate and down else None
    fused = [shape for name, shape in inside.items() if len(shape) == 3 and not name.endswith(("_blocks", "_scales"))]
    return (fused[0][0], {pair for _, x, y in fused for pair in ((x, y), (y, x))}) if fused else None


UNKNOWN = ()  # a layer found more than once by its end (a vision tower's beside the language model's)


def unique_suffix_match(shapes: dict[str, tuple], name: str):
    """The shape of the one weight whose name ends like `name` (checkpoints may nest the language model under
    another prefix than the loaded model does), UNKNOWN when several do, None when none does."""
    parts = name.split(".")
    numbered = [
        i for i, part in enumerate(parts) if part.isdigit()
    ]  # keep the layer's number: layers.5 is not layers.0
    for start in range(1, max(2, numbered[-1]) if numbered else len(parts) - 1):
        tail = "." + ".".join(parts[start:])
        found = [shape for key, shape in shapes.items() if key.endswith(tail)]
        if len(found) == 1:
            return found[0]
        if found:
            return UNKNOWN
    return None


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
    return settings.get("lora_init") == "loftq" or any(
        run_settings(Path(a)).get("lora_init") == "loftq" for a in lineage(settings.get("init_adapter"))
    )


def run_settings(adapter_dir: Path | None) -> dict:
    """The settings of the run that trained an adapter (its recipe.yaml, beside runs/NAME/adapter), or {}."""
    return read_settings(Path(adapter_dir).parent / "recipe.yaml") if adapter_dir else {}


def base_source_for(adapter_dir: Path) -> str:
    """The base model a run's adapter was trained on: the run's recipe.yaml, else the base qlora-kit recorded beside
    the adapter, else what adapter_config.json names."""
    source = (
        run_settings(adapter_dir).get("model")
        or (recorded_base(adapter_dir) or {}).get("source")
        or base_named_by(adapter_dir)
    )
    if not source:
        raise UserError(f"{adapter_dir} does not say which base model it was trained on.", hint="Pass it with --model.")
    return source


def tokenizer_folder(adapter_dir: Path | None, base_folder: Path, needs: str = "tokenizer_config.json") -> Path:
    """Where the tokenizer to use with an adapter lives: the adapter folder (qlora-kit saves it there) when it holds
    the file `needs`, else the base."""
    return adapter_dir if adapter_dir is not None and (Path(adapter_dir) / needs).is_file() else base_folder


def load_with_adapter(
    source: str | None, adapter_dir: str | Path | None, precision: str = "auto", trust_remote_code: bool = False
):
    """The 4-bit base (with the adapter on top when given) and its tokenizer, ready to generate."""
    model, tokenizer, _ = load_with_adapters(
        source, [adapter_dir] if adapter_dir is not None else [], precision, trust_remote_code
    )
    return model, tokenizer


def load_with_adapters(
    source: str | None, adapter_dirs: list, precision: str = "auto", trust_remote_code: bool = False
):
    """The 4-bit base with every adapter loaded under its own name (the first one active), its tokenizer, and the
    names. Switching is model.set_adapter(name): the base is loaded once however many adapters there are."""
    from peft import PeftModel

    adapter_dirs = [Path(d) for d in adapter_dirs]
    for adapter_dir in adapter_dirs:
        check_adapter_folder(adapter_dir)
    chosen = source is not None
    if source is None and adapter_dirs:
        bases = {base_source_for(d) for d in adapter_dirs}
        if len(bases) > 1:
            raise UserError(
                f"These adapters were trained on different bases: {', '.join(sorted(bases))}.",
                hint="Pass adapters of one base, or name the base with --model.",
            )
        source = bases.pop()
    if source is None:
        raise UserError("No base model given.", hint="Pass --model, or --adapter from a qlora-kit run.")
    pick_device_and_dtype(precision)  # a precision this machine lacks, said before a download
    folder = resolve_model(source)
    device, dtype = pick_device_and_dtype(precision, config=read_model_config(folder))
    for adapter_dir in adapter_dirs:
        say_note(check_adapter_on_base(adapter_dir, folder, chosen=chosen))
    tokenizer = load_tokenizer(tokenizer_folder(adapter_dirs[0] if adapter_dirs else None, folder), trust_remote_code)
    model = load_base_4bit(folder, dtype, device, trust_remote_code)
    names = adapter_names(adapter_dirs)
    for name, adapter_dir in zip(names, adapter_dirs):
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_dir, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name, config=adapter_config(adapter_dir))
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
    from qlora_kit.data.dataset import FALLBACK_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)


def answering_with(model, name: str | None):
    """A context in which the model answers with adapter `name`, or with the bare base model for None."""
    if name is not None:
        model.set_adapter(name)
        return nullcontext()
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def generate_reply(
    model,
    tokenizer,
    messages: list[dict] | str,
    sampling: Sampling = Sampling(),
    streamer=None,
    stop: threading.Event | None = None,
) -> str:
    """The model's reply to a conversation (a list of messages), or its continuation of plain text (a str)."""
    return generate_replies(model, tokenizer, [messages], sampling, streamer, stop)[0]


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    requests: list,
    sampling: Sampling = Sampling(),
    streamer=None,
    stop: threading.Event | None = None,
) -> list[str]:
    """Replies to several requests (conversations or plain texts) in one batch, left-padded so every reply starts
    right after its own prompt. Setting `stop` (from another thread) ends them after the token being made."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class WhenStopSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    CPU_SHARE.use_free_cores(model.device)  # here, in the generating thread: chat generates on a thread of its own
    texts = [r if isinstance(r, str) else chat_prompt(tokenizer, r) for r in requests]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:  # a chat prompt already holds its special tokens; a plain text gets the tokenizer's own
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=isinstance(requests[0], str))
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(model.device)
    drawn = (
        dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.temperature > 0
        else dict(do_sample=False)
    )
    output = model.generate(
        **inputs,
        max_new_tokens=sampling.max_new_tokens,
        use_cache=True,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([WhenStopSet()] if stop else []),
        **drawn,
    )
    return [tokenizer.decode(row[inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in output]


def generate(
    model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, chat: bool = True
) -> str:
    """The model's reply to one prompt, as a one-turn chat (or plain text continuation with chat=False)."""
    request = [{"role": "user", "content": prompt}] if chat else prompt
    return generate_reply(model, tokenizer, request, Sampling(temperature, 1.0, max_new_tokens))
