"""Recipe: every setting of a training run, with a help line, type and allowed range per field.

The same field metadata drives validation (of every Recipe made), YAML loading, the run's recipe.yaml and the
command-line flags of `train` (cli/app.py makes one per field), so a new setting is one edit here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from qlora_kit.errors import UserError

# The card recipes: recipes/*.yaml at the top of the project, installed as this package (pyproject.toml maps it).
SHIPPED_RECIPES = "qlora_kit.recipe_files"


def _setting(default, help: str, *, low=None, high=None, choices=None, aliases=(), old_flag=None):
    """A Recipe field: its help line, range or choices (checked on every Recipe made), extra flag names, and a flag
    it had before (still taken, with a line saying the new name)."""
    return field(
        default=default,
        metadata={"help": help, "low": low, "high": high, "choices": choices, "aliases": aliases, "old_flag": old_flag},
    )


@dataclass
class Recipe:
    """Settings of one QLoRA run; `None` model/data means "given on the command line"."""

    model: str | None = _setting(
        None,
        "base model: local folder, .gguf file, hub id (ORG/NAME or ORG/NAME@REVISION), or smollm2-135m",
        aliases=("-m",),
    )
    data: str | None = _setting(
        None,
        "training data: a .jsonl (or .json, .parquet, .csv) file of examples in one format "
        "(text, prompt/completion, alpaca, chat messages or sharegpt conversations), "
        "or a hub dataset: org/name (its data_split) or org/name:file.jsonl",
        aliases=("-d",),
    )
    data_split: str = _setting(
        "train",
        "the split of a hub dataset given as data (org/name); a hub dataset given as "
        "eval_data is read from its test split",
    )
    data_config: str | None = _setting(None, "the configuration (subset) of a hub dataset that has several")
    eval_data: str | None = _setting(None, "held-out data in the same format, evaluated during training")
    eval_fraction: float = _setting(
        0.0, "without eval_data, hold out this fraction of data for evaluation", low=0.0, high=0.5
    )
    eval_every: int = _setting(
        0, "evaluate eval_data every N optimizer steps (and after the last); 0 = only after the last", low=0
    )
    # No choices list: seven names would not fit an 80-column --help line; data.read_records refuses an unknown one.
    data_format: str = _setting(
        "auto",
        "format of the data files: auto (detected per file), text, completion, alpaca, "
        "chat, sharegpt, preference or preference_chat",
        aliases=("--format",),
    )
    method: str = _setting(
        "sft",
        "what to learn: sft (the answers in the data), dpo (prefer each chosen answer over its "
        "rejected one, against the model the run starts as) or orpo (the same with no reference, "
        "plus the chosen answer's SFT loss); dpo and orpo need preference data",
        choices=("sft", "dpo", "orpo"),
    )
    beta: float = _setting(
        0.1,
        "how strongly to prefer: with dpo, how far the model may move from the reference (higher: "
        "less); with orpo, the weight of the preference term (TRL's beta, the paper's lambda)",
        low=0.0,
    )
    reference: str = _setting(
        "auto",
        "where dpo's reference log-probs come from: on_the_fly (a forward pass with no graph "
        "in each step), precomputed (one pass over every pair before the first step, kept "
        "in the run folder) or auto (the plan picks the one with fewer forward passes, or "
        "the one that fits)",
        choices=("auto", "on_the_fly", "precomputed"),
    )
    train_on_inputs: bool = _setting(
        False, "also learn prompts and user turns, not only completions and assistant turns"
    )
    chat_template_kwargs: str = _setting(
        "",
        "variables for the model's chat template, KEY=VALUE[,KEY=VALUE]: "
        "enable_thinking=false trains Qwen3 and SmolLM3 to answer without "
        "reasoning; the adapter's template keeps them, so inference renders alike",
    )
    skip_bad_lines: bool = _setting(False, "train on the good examples and report the bad ones, instead of stopping")
    rank: int = _setting(16, "LoRA rank r: adapter capacity; memory and adapter size grow linearly", low=1, high=1024)
    alpha: float = _setting(32.0, "LoRA alpha: the update is scaled by alpha / rank", low=0.0)
    expert_rank: int = _setting(
        0,
        "LoRA rank of each expert of a mixture-of-experts layer; 0: rank / the experts a "
        "token is routed to (at least 2), so each token's update has the rank a dense layer's "
        "would, and the experts' LoRA state is not rank x experts times a layer's",
        low=0,
        high=1024,
    )
    dropout: float = _setting(
        0.0, "dropout on the LoRA input; 0 is the fast path (no mask, no copy of each input)", low=0.0, high=0.9
    )
    target_modules: str = _setting(
        "all-linear",
        "layers that get LoRA: all-linear, attention (q, k, v, o), mlp (gate, up, "
        "down), or comma-separated names (q_proj,v_proj)",
    )
    use_rslora: bool = _setting(
        False,
        "rank-stabilised LoRA: scale the update by alpha / sqrt(rank) instead of alpha / "
        "rank, so high ranks keep learning",
    )
    use_dora: bool = _setting(
        False,
        "DoRA: learn each weight's magnitude apart from its direction (a vector per layer, "
        "and more memory and time per step)",
    )
    lora_init: str = _setting(
        "default",
        "how LoRA starts: default (B = 0: the 4-bit base as it is), or loftq (A and B "
        "start as the 4-bit rounding error of each weight, so base + BA is closer to the 16-bit "
        "model); pissa and olora move weight into the adapter, which a 4-bit base cannot take back",
        choices=("default", "loftq", "pissa", "olora"),
    )
    init_adapter: str | None = _setting(
        None,
        "start from this PEFT adapter's weights (a finished run's adapter, or "
        "anyone's), with a fresh optimizer and schedule; its rank, alpha and "
        "layers are taken from it",
        aliases=("--from-adapter",),
    )
    seq_len: int = _setting(512, "longest sequence in tokens; longer examples are truncated", low=8, high=1_048_576)
    packing: bool = _setting(False, "pack short examples into full sequences (no attention across examples)")
    drop_long: bool = _setting(False, "drop examples longer than seq_len instead of truncating them")
    group_by_length: bool = _setting(True, "draw examples of similar length into the same step, so little is padded")
    micro_batch: int = _setting(4, "examples per forward/backward pass", low=1, high=4096, aliases=("--batch",))
    grad_accum: int = _setting(
        1, "micro-batches per optimizer step (effective batch = micro_batch x grad_accum)", low=1, high=4096
    )
    steps: int = _setting(0, "optimizer steps; 0 means derive them from epochs", low=0)
    epochs: float = _setting(1.0, "passes over the data when steps is 0", low=0.0)
    lr: float = _setting(2e-4, "peak learning rate", low=0.0, high=1.0)
    warmup_ratio: float = _setting(
        0.05, "fraction of steps spent warming the learning rate up linearly", low=0.0, high=1.0
    )
    schedule: str = _setting("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    weight_decay: float = _setting(0.0, "AdamW weight decay on LoRA weights", low=0.0, high=1.0)
    max_grad_norm: float = _setting(1.0, "clip the gradient norm to this; 0 disables clipping", low=0.0)
    # --checkpointing was also read as "write checkpoints" (--checkpoint-every), hence the longer, usual name
    gradient_checkpointing: bool = _setting(
        True,
        "recompute each layer in backward instead of keeping its activations",
        old_flag="--checkpointing/--no-checkpointing",
    )
    uncheckpointed_layers: int = _setting(
        0,
        "with checkpointing: how many of the last decoder layers keep their "
        "activations instead of recomputing them (faster, more memory)",
        low=0,
    )
    activation_offload: bool = _setting(False, "with checkpointing on a GPU, keep saved activations in pinned host RAM")
    loss_chunk_tokens: int = _setting(
        0, "tokens per chunk of the chunked loss; 0 picks from the vocabulary size", low=0
    )
    parallel: str = _setting(
        "ddp",
        "on several GPUs: ddp (each holds the whole 4-bit model), fsdp (weights and LoRA state "
        "sharded across them), or fsdp_offload (the shards wait in host RAM between uses)",
        choices=("ddp", "fsdp", "fsdp_offload"),
    )
    optimizer: str = _setting(
        "auto",
        "auto = paged 8-bit AdamW on CUDA, torch AdamW on CPU (adamw_8bit runs on both)",
        choices=("auto", "paged_adamw_8bit", "adamw_8bit", "adamw"),
    )
    precision: str = _setting(
        "auto",
        "compute dtype: auto = bf16 if supported, else fp16 on GPU, fp32 on CPU",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    seed: int = _setting(0, "seed for LoRA init, data order and dropout", low=0)
    checkpoint_every: int = _setting(
        50,
        "write a checkpoint (adapter, optimizer, data position) every N optimizer steps, "
        "so the run can resume; 0 = only at the end and when stopped",
        low=0,
    )
    keep_checkpoints: int = _setting(2, "how many of the newest checkpoints to keep", low=1, high=1000)

    def __post_init__(self) -> None:
        """Every Recipe is checked, however it is made (a file, flags, Recipe(...), dataclasses.replace)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name), "recipe"))

    def evaluates_after(self, step: int, total_steps: int) -> bool:
        """Whether a run of total_steps evaluates its held-out data after this step: every eval_every, and the last."""
        return step == total_steps or bool(self.eval_every and step % self.eval_every == 0)

    def to_yaml(self, header: str = "") -> str:
        """The recipe as commented YAML, one help line above each setting; unset model/data are left out."""
        lines = [f"# {line}".rstrip() for line in header.splitlines()] + ([""] if header else [])
        for f in dataclasses.fields(self):
            if f.default is None and getattr(self, f.name) is None:
                continue
            lines.append(f"# {f.metadata['help']}")
            lines.append(yaml.safe_dump({f.name: getattr(self, f.name)}, sort_keys=False).strip())
        return "\n".join(lines) + "\n"


# target_modules presets: every architecture's names for them (Phi-3 fuses qkv_proj and gate_up_proj).
TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj"),
}


def rank_of_experts(recipe: Recipe, experts_per_token: int) -> int:
    """The LoRA rank each expert gets (Recipe.expert_rank says why)."""
    return recipe.expert_rank or max(2, recipe.rank // max(1, experts_per_token))


def target_names(target_modules: str) -> str | list[str]:
    """What peft's target_modules takes for a recipe's setting: "all-linear", or the layer names."""
    if target_modules == "all-linear":
        return target_modules
    return [name for part in target_modules.split(",") for name in TARGET_PRESETS.get(part.strip(), (part.strip(),))]


def optimizer_in_use(recipe: Recipe, device_type: str) -> str:
    """The optimizer a run of `recipe` really uses on this device type ("cuda" or "cpu"): auto is paged 8-bit AdamW
    on CUDA; fsdp_offload's shards step in host RAM and paging needs CUDA, so both fall back to torch AdamW."""
    name = recipe.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device_type == "cuda" else "adamw"
    if recipe.parallel == "fsdp_offload" or (name == "paged_adamw_8bit" and device_type != "cuda"):
        name = "adamw"
    return name


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    kind = setting_type(f).__name__
    if meta["low"] is not None and meta["high"] is not None:
        return f"{kind} from {meta['low']} to {meta['high']}"
    if meta["low"] is not None:
        return f"{kind} >= {meta['low']}"
    return kind


def setting_type(f: dataclasses.Field) -> type:
    """The type a Recipe field holds: int, float, str or bool (`str | None` is str)."""
    return _setting_types()[f.name]


@functools.cache
def _setting_types() -> dict[str, type]:
    types_ = {}
    for name, hint in typing.get_type_hints(Recipe).items():
        if isinstance(hint, types.UnionType):  # `str | None`
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        types_[name] = hint
    return types_


def _coerce(f: dataclasses.Field, value, where: str):
    kind = setting_type(f)
    if value is None and f.default is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and kind is float and not math.isfinite(value):  # nan passes every range check, and poisons the run
        ok = False
    if not ok:
        raise UserError(
            f"{where}: `{f.name}` is {value!r}, but it must be a {'finite ' * (kind is float)}{_allowed(f)}.",
            hint=f.metadata["help"],
        )
    meta = f.metadata
    too_low = meta["low"] is not None and value < meta["low"]
    too_high = meta["high"] is not None and value > meta["high"]
    if too_low or too_high or (meta["choices"] and value not in meta["choices"]):
        raise UserError(f"{where}: `{f.name}` is {value!r}, but it must be {_allowed(f)}.", hint=f.metadata["help"])
    return value


def recipe_from_dict(values: dict, where: str = "recipe") -> Recipe:
    """Validate a mapping of settings into a Recipe; `where` names the source in error messages."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for key in values:
        if key not in fields:
            raise UserError(f"{where}: unknown setting `{key}`.", hint="Known settings: " + ", ".join(fields))
    recipe = Recipe(**{k: _coerce(fields[k], v, where) for k, v in values.items()})
    if recipe.steps == 0 and recipe.epochs == 0:  # else the run would quietly train one step
        raise UserError(
            f"{where}: `epochs` is 0 and `steps` is 0, so there is nothing to train.",
            hint="Give --epochs above 0 (e.g. 1), or --steps N.",
        )
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe: a shipped one by name ("8gb") or a YAML file."""
    path = find_recipe(path) if str(path) in card_recipes() else Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"Cannot read recipe {path}: {e.strerror}.", hint="Check the path.") from None
    except yaml.YAMLError as e:
        raise not_a_recipe(path, e) from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of settings.", hint="Write one `name: value` per line.")
    return recipe_from_dict(values, where=str(path))


def read_settings(path: Path) -> dict:
    """A run's recipe.yaml as a plain mapping for reading (not validated: it may come from an older version), or {}
    when there is none; a file safe_load refuses (a !!python tag) is one sentence, not a traceback."""
    if not path.is_file():
        return {}
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise not_a_recipe(path, e) from None
    return settings if isinstance(settings, dict) else {}


def not_a_recipe(path: Path, error: yaml.YAMLError) -> UserError:
    """A YAML file safe_load refuses, in one sentence with where: broken syntax, or a tag such as !!python that would
    run code."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return UserError(
        f"{path} is not a recipe qlora-kit reads{where}: {problem}.",
        hint="A recipe is plain YAML, one `name: value` per line, with no !!python tags: fix that line.",
    )


def with_overrides(recipe: Recipe, **overrides) -> Recipe:
    """A copy of `recipe` with every override that is not None applied and validated."""
    values = dataclasses.asdict(recipe)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return recipe_from_dict(values, where="command line")


def card_gb(name: str) -> float:
    """The card size a recipe name stands for: 8 for "8gb"; infinity for "cpu" so it sorts last."""
    digits = name.removesuffix("gb")
    return int(digits) if digits.isdigit() else math.inf


def card_recipes() -> dict[str, Path]:
    """The shipped recipes by name (4gb ... 24gb, cpu), smallest card first."""
    names = {
        f.name.removesuffix(".yaml"): f for f in resources.files(SHIPPED_RECIPES).iterdir() if f.name.endswith(".yaml")
    }
    return {name: Path(str(names[name])) for name in sorted(names, key=card_gb)}


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe file: what the recipe is for."""
    lines = path.read_text().splitlines()
    return lines[0].lstrip("# ").strip() if lines else ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A shipped recipe by name ("8gb") or a recipe file by path."""
    recipes = card_recipes()
    if str(name_or_path) in recipes:
        return recipes[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise UserError(
        f"No recipe named {name_or_path}.", hint=f"Use one of {', '.join(recipes)}, or a path to a YAML file."
    )


def count_steps(n_examples: int, recipe: Recipe, processes: int = 1) -> int:
    """Optimizer steps: recipe.steps, else enough for recipe.epochs passes over the data (processes share a step)."""
    if recipe.steps:
        return recipe.steps
    return max(1, math.ceil(recipe.epochs * n_examples / (recipe.micro_batch * recipe.grad_accum * processes)))
