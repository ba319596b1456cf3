"""`qlora-kit auto`: probe -> plan -> choose a recipe and tune it to this card, model and data -> train.

The choice, in a fixed order so it is predictable:
1. start from the largest shipped recipe whose card size is not above the usable memory (cpu.yaml without a GPU);
2. fit the sequence length to the data: the 95th percentile of token lengths, rounded up to 64; with little data,
   shrink the effective batch so that an epoch still makes at least 10 optimizer steps;
3. raise the micro-batch while the plan keeps 10% headroom, keeping the effective batch with accumulation, until
   a micro-batch holds enough tokens to keep the device busy;
4. when it does not fit, step down as training would (plan.cheaper: checkpointing, micro-batch, activation
   offload, sequence length), then a smaller rank;
5. spend what is left on speed: the last decoder layers keep their activations instead of being recomputed, and
   only when nothing is recomputed any more, larger micro-batches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.text import Text

from qlora_kit.catalog import find_model_shape
from qlora_kit.data import percentile
from qlora_kit.errors import UserError
from qlora_kit.memory import TIGHT_FRACTION, ModelShape, estimate_peak_memory, most_uncheckpointed_layers
from qlora_kit.plan import (
    StepShape,
    Target,
    catalogue_models_that_fit,
    cheaper,
    choose_target,
    describe_reference,
    make_plan,
    reference_forwards,
)
from qlora_kit.recipes import Recipe, card_gb, card_recipes, count_steps, load_recipe, recipe_summary, with_overrides
from qlora_kit.sources import describe_source
from qlora_kit.units import GIB

# Plan to use no more of the card than `plan` calls a fit (90%): fragmentation and other processes need the rest.
HEADROOM = TIGHT_FRACTION
# Tokens per micro-batch beyond which a larger micro-batch barely raises throughput, so spare memory does more by
# skipping recomputation (a quarter of a step's work). GPU: the H100 anchors in shared/design.md (gemma-2b: 2,048
# tokens 5.5k tok/s, 8,192 tokens 12.3-12.9k); CPU: measured on 2 cores (benchmarks/recompute.py).
BUSY_TOKENS = {"cuda": 8192, "cpu": 1024}
MIN_STEPS_PER_EPOCH = 10  # with fewer examples than this many effective batches, the batch shrinks until an epoch
# makes this many optimizer steps: 12 examples in one step of 16 teach nothing, 12 steps of 1 do


@dataclass
class Change:
    setting: str
    old: object
    new: object
    why: str


@dataclass
class Choice:
    target: Target
    recipe_name: str
    recipe: Recipe
    shape: ModelShape | None = None
    changes: list[Change] = field(default_factory=list)
    planned_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.planned_bytes <= self.target.capacity_bytes

    def change(self, why: str, **settings) -> None:
        """Apply settings, keeping one Change per setting: from the recipe's value to the latest, with the latest reason."""
        for key, value in settings.items():
            earlier = next((c for c in self.changes if c.setting == key), None)
            if earlier:
                earlier.new, earlier.why = value, why
            elif getattr(self.recipe, key) != value:
                self.changes.append(Change(key, getattr(self.recipe, key), value, why))
        self.changes = [c for c in self.changes if c.old != c.new]
        self.recipe = replace(self.recipe, **settings)

    def total(self, recipe: Recipe | None = None) -> int:
        """The planned peak of recipe (the current one by default) on the target."""
        recipe = recipe or self.recipe
        return estimate_peak_memory(
            self.shape,
            recipe,
            self.target.device,
            gpus=self.target.gpus,
            strategy=recipe.parallel,
            bf16=self.target.bf16,
        ).total_bytes

    def roomy(self, recipe: Recipe | None = None) -> bool:
        """Whether recipe (the current one by default) leaves the card the headroom a plan calls a fit."""
        return self.total(recipe) <= HEADROOM * self.target.capacity_bytes


def choose_recipe(
    shape: ModelShape,
    target: Target,
    lengths: list[int] | None = None,
    chosen: dict | None = None,
    from_data: dict | None = None,
) -> Choice:
    """Pick and tune a recipe for this model on this target; lengths are the data's token counts per example; chosen:
    settings the user fixed (the adapter's layers and variant), which the tuning plans with and never changes;
    from_data: settings the data decided (the method for preference pairs), kept the same way."""
    recipes = card_recipes()
    if target.device == "cpu":
        name = "cpu"
    else:
        # A "12 GB" card reports a little under 12 GiB, hence the 5% grace.
        sizes = [n for n in recipes if card_gb(n) <= target.capacity_bytes / GIB * 1.05]
        name = sizes[-1] if sizes else next(iter(recipes))
    choice = Choice(target, name, load_recipe(recipes[name]), shape)
    if chosen:
        choice.change("you chose it", **chosen)
    if from_data:
        choice.change("the data holds preference pairs", **from_data)
    if target.gpus > 1:
        _choose_layout(choice)
    if target.device == "cuda" and not target.bf16:
        if shape.fp16_overflows:
            choice.change(
                f"{target.name} has no bf16, and {shape.family}'s activations overflow fp16: fp32", precision="fp32"
            )
        else:
            choice.change(f"{target.name} has no bf16: fp16 with loss scaling", precision="fp16")
    if target.device == "cpu":
        choice.warnings.append(
            "No GPU: training runs on the CPU. It works, but expect seconds per step even for small models."
        )
    effective = _fit_to_data(choice, lengths) if lengths else choice.recipe.micro_batch * choice.recipe.grad_accum
    _grow_micro_batch(choice, effective, BUSY_TOKENS[target.device])
    _step_down_until_it_fits(choice, rank_fixed="rank" in (chosen or {}))
    _spend_spare_memory(choice, effective)
    choice.planned_bytes = choice.total()
    if choice.fits and not choice.roomy():
        choice.warnings.append(
            "Tight: the plan is within 10% of the card. If a step runs out of memory, "
            "training steps down (micro-batch, offload, sequence length) and redoes it."
        )
    cut = sum(length > choice.recipe.seq_len for length in lengths or [])
    if cut:
        choice.warnings.append(
            f"{cut} of {len(lengths)} examples ({100 * cut / len(lengths):.0f}%) are longer than "
            f"{choice.recipe.seq_len} tokens and will be truncated."
        )
    return choice


def _choose_layout(choice: Choice) -> None:
    """On several GPUs: DDP when one card holds the model at its smallest settings, else shard it with FSDP."""
    gpus = choice.target.gpus
    smallest = replace(choice.recipe, parallel="ddp", micro_batch=1, seq_len=min(512, choice.recipe.seq_len))
    if choice.roomy(smallest):
        choice.changes.append(
            Change("parallel", "-", "ddp", f"the model fits one card: each of the {gpus} GPUs holds it")
        )
    elif choice.roomy(replace(smallest, parallel="fsdp")):
        choice.change(
            f"the model does not fit one card: its weights are sharded across the {gpus} GPUs (FSDP)", parallel="fsdp"
        )
    else:
        choice.change(
            f"even sharded across the {gpus} GPUs it does not fit: the shards wait in host RAM (FSDP offload)",
            parallel="fsdp_offload",
        )


def _fit_to_data(choice: Choice, lengths: list[int]) -> int:
    """Sequence length from the data's 95th percentile; with little data, a smaller effective batch, returned."""
    p95 = percentile(lengths, 95)
    wanted = min(64 * math.ceil(p95 / 64), choice.shape.max_positions)
    if wanted < choice.recipe.seq_len:
        choice.change(f"95% of the examples are at most {p95} tokens", seq_len=wanted)
    elif wanted > choice.recipe.seq_len and choice.roomy(
        replace(choice.recipe, seq_len=wanted, gradient_checkpointing=True)
    ):
        choice.change(f"95% of the examples are at most {p95} tokens, and the card has room", seq_len=wanted)
        if not choice.roomy():
            choice.change(
                "to fit the longer sequences: layers are recomputed in backward instead of keeping their activations",
                gradient_checkpointing=True,
            )
    effective = choice.recipe.micro_batch * choice.recipe.grad_accum
    if len(lengths) < MIN_STEPS_PER_EPOCH * effective:  # small data: more, smaller steps learn more
        effective = 1 << (max(1, len(lengths) // MIN_STEPS_PER_EPOCH).bit_length() - 1)
        batch = min(choice.recipe.micro_batch, effective)
        choice.change(
            f"{len(lengths)} examples: an effective batch of {effective} makes {len(lengths) // effective} "
            "optimizer steps an epoch",
            micro_batch=batch,
            grad_accum=effective // batch,
        )
    return effective


def _grow_micro_batch(choice: Choice, effective: int, busy_tokens: float) -> None:
    """Double the micro-batch (accumulation shrinking) while the card has room, up to the effective batch, until a
    micro-batch holds busy_tokens."""
    while (
        choice.recipe.micro_batch * 2 <= effective
        and choice.recipe.micro_batch * choice.recipe.seq_len < busy_tokens
        and choice.roomy(replace(choice.recipe, micro_batch=choice.recipe.micro_batch * 2))
    ):
        batch = choice.recipe.micro_batch * 2
        choice.change(
            f"the card has room; same effective batch of {effective}", micro_batch=batch, grad_accum=effective // batch
        )


STEP_DOWN_REASONS = {
    "uncheckpointed_layers": "to fit: every layer is recomputed in backward",
    "checkpointing": "to fit: layers are recomputed in backward instead of keeping their activations",
    "micro_batch": "to fit; same effective batch of {effective}",
    "offload": "to fit: checkpointed activations wait in host RAM",
    "seq_len": "to fit: shorter sequences",
}


def _step_down_until_it_fits(choice: Choice, rank_fixed: bool = False) -> None:
    """Step down as training would (plan.cheaper), then halve the rank (unless an adapter to start from fixes it),
    until the plan keeps its headroom."""
    while not choice.roomy():
        now = StepShape.of(choice.recipe)
        smaller = cheaper(now, choice.target.device)
        if smaller is not None:
            changed = next(k for k in STEP_DOWN_REASONS if getattr(smaller, k) != getattr(now, k))
            recipe = smaller.applied_to(choice.recipe)
            settings = {
                f: getattr(recipe, f)
                for f in (
                    "gradient_checkpointing",
                    "micro_batch",
                    "grad_accum",
                    "activation_offload",
                    "seq_len",
                    "uncheckpointed_layers",
                )
            }
            effective = choice.recipe.micro_batch * choice.recipe.grad_accum
            choice.change(
                STEP_DOWN_REASONS[changed].format(effective=effective),
                **{f: v for f, v in settings.items() if getattr(choice.recipe, f) != v},
            )
        elif choice.recipe.rank > 4 and not rank_fixed:
            choice.change("to fit: a smaller adapter", rank=choice.recipe.rank // 2, alpha=choice.recipe.alpha / 2)
        else:
            return


def _spend_spare_memory(choice: Choice, effective: int) -> None:
    """Memory left over goes to speed: layers that keep their activations, then (nothing recomputed) bigger batches."""
    target, shape = choice.target, choice.shape
    if choice.recipe.gradient_checkpointing and choice.roomy():
        layers = most_uncheckpointed_layers(
            shape,
            choice.recipe,
            target.device,
            int(HEADROOM * target.capacity_bytes),
            gpus=target.gpus,
            strategy=choice.recipe.parallel,
        )
        if layers >= shape.num_layers:
            choice.change(
                "the card has room for every layer's activations: no recomputation, faster steps",
                gradient_checkpointing=False,
                uncheckpointed_layers=0,
            )
        elif layers:
            choice.change(
                f"the card has room: the last {layers} of {shape.num_layers} layers keep their activations "
                "instead of being recomputed, for faster steps",
                uncheckpointed_layers=layers,
            )
    if not choice.recipe.gradient_checkpointing:
        _grow_micro_batch(choice, effective, math.inf)


def render_choice(choice: Choice, shape: ModelShape, source: str | None = None) -> Group:
    """The choice in a few lines: card, recipe, what changed and why, the planned peak against the card. source is
    the model as the user named it, shown with where its weights come from when the name does not say (a GGUF)."""
    t = choice.target
    origin = describe_source(source) if source else None
    model = f"{source} ({origin})" if origin else shape.name
    lines = [
        Text.from_markup(
            f"[bold]Card:[/] {escape(t.name)}, {t.capacity_bytes / GIB:.1f} GiB"
            + ("" if t.device == "cpu" else f", {'bf16' if t.bf16 else 'fp16 (no bf16)'}")
        ),
        Text.from_markup(
            f"[bold]Model:[/] {escape(model)}, {shape.parameter_count() / 1e9:.2f}B parameters"
            + (f"; {t.gpus} GPUs, {choice.recipe.parallel.upper()}, memory per GPU" if t.gpus > 1 else "")
        ),
        Text.from_markup(
            f"[bold]Recipe:[/] {choice.recipe_name}: {recipe_summary(card_recipes()[choice.recipe_name])}"
        ),
    ]
    for c in choice.changes:
        lines.append(Text(f"  {c.setting}: {c.old} -> {c.new}  ({c.why})"))
    if not choice.changes:
        lines.append(Text("  used as written"))
    colour = "green" if choice.fits else "red"
    lines.append(
        Text.from_markup(
            f"[bold]Planned peak:[/] [{colour}]{choice.planned_bytes / GIB:.2f} GiB[/] of "
            f"{t.capacity_bytes / GIB:.2f} GiB ({'nvidia-smi' if t.device == 'cuda' else 'process memory'})"
        )
    )
    lines += [Text(w, style="yellow") for w in choice.warnings]
    return Group(*lines)


def data_lengths(records: list[dict], tokenizer=None, cache_key: str | None = None) -> list[int]:
    """Token count per example; without a tokenizer, about 4 characters per token. The tokenized table is cached
    under cache_key, so the training run that follows does not tokenize again."""
    from qlora_kit.data import tokenize

    if tokenizer is None:
        return [max(1, len(json.dumps(r)) // 4) for r in records]
    return tokenize(records, tokenizer, seq_len=2**31 - 1, cache_key=cache_key).lengths


def run_auto(
    model: str,
    data_path: Path,
    out: Path | None,
    console: Console,
    vram_limit: float | None = None,
    gpu: str | None = None,
    dry_run: bool = False,
    display: str = "auto",
    trust_remote_code: bool = False,
    gpus: int = 1,
    steps: int | None = None,
    epochs: float | None = None,
    data_split: str = "train",
    data_config: str | None = None,
    report_to: list[str] | None = None,
    **lora,
):
    """Probe, choose, print the choice, and (unless dry_run) train with it, for `steps` optimizer steps or `epochs`
    passes over the data when given (else the recipe's); data_split and data_config choose a hub dataset's part;
    report_to: the trackers the steps also go to.
    lora: the settings the user chose for what is learned (method, beta, target_modules, use_rslora, use_dora,
    lora_init, init_adapter, chat_template_kwargs), which the choice plans with and keeps; preference data without
    a method trains with DPO."""
    from qlora_kit import data as data_module
    from qlora_kit.model import load_tokenizer
    from qlora_kit.run_folder import next_free_run_dir
    from qlora_kit.sources import resolve_model
    from qlora_kit.train import RunOptions, run_training

    loaded = data_module.read_records(data_path, can_skip=False, split=data_split, config=data_config)
    with_overrides(Recipe(), steps=steps, epochs=epochs)  # a bad value is reported before anything is loaded
    from_data = _settings_from_data(loaded, data_path, lora, console)
    chosen = lora_choices(lora)
    shape = find_model_shape(model)
    target = _target_here(gpu, vram_limit, gpus, dry_run)
    if os.environ.get("RANK", "0") != "0":  # rank 0 explains the choice; every rank makes the same one
        console = Console(quiet=True)
    try:
        tokenizer = load_tokenizer(
            resolve_model(model, trust_remote_code, console), trust_remote_code, chosen.get("chat_template_kwargs", "")
        )
    except UserError:
        if not dry_run:
            raise
        tokenizer = None
    lengths = data_lengths(loaded.records, tokenizer, tokenizer and data_module.cache_key(loaded, tokenizer))
    choice = choose_recipe(shape, target, lengths, chosen, from_data)
    if tokenizer is None:
        choice.warnings.append(
            "The model's tokenizer is not available here: token lengths are estimated at 4 characters per token."
        )
    console.print(render_choice(choice, shape, model))
    check_choice_fits(choice, shape, target)
    recipe = with_overrides(
        choice.recipe,
        model=model,
        data=str(data_path),
        steps=steps,
        epochs=epochs,
        data_split=data_split,
        data_config=data_config,
    )
    # The run keeps the plan that made the choice (plan.json, the dashboard's marks), not one of its own for one GPU.
    plan = make_plan(
        shape,
        recipe,
        replace(target, strategy=recipe.parallel),
        reference_forwards=_reference_forwards(recipe, len(lengths), target.gpus),
    )
    if dry_run:  # a run says it as it starts
        if plan.reference:
            console.print(f"DPO reference: {describe_reference(plan.reference)}")
        return choice
    return run_training(
        recipe,
        out or next_free_run_dir(Path("runs"), "auto"),
        console,
        RunOptions(display=display, trust_remote_code=trust_remote_code, plan=plan, report_to=report_to),
    )


def _settings_from_data(loaded, data_path: Path, lora: dict, console: Console) -> dict:
    """What the data decides when the user did not: preference pairs train with DPO."""
    from qlora_kit.data import PREFERENCE_FORMATS

    if loaded.format in PREFERENCE_FORMATS and lora.get("method") is None:
        console.print(f"{data_path} holds preference pairs: training with DPO (--method orpo for ORPO).")
        return {"method": "dpo"}  # pairs of a chosen and a rejected answer are what DPO learns from
    return {}


def _target_here(gpu: str | None, vram_limit: float | None, gpus: int, dry_run: bool) -> Target:
    """The card to choose for (--gpu), else this machine's GPU (capped at vram_limit) or RAM, times the GPUs the run
    trains on; a choice for a card is trained only on a machine with a GPU."""
    from qlora_kit.hardware import probe

    hardware = probe(check_bnb=False)
    target = choose_target(gpu=gpu, hardware=hardware, vram_limit=vram_limit)
    gpus = int(os.environ.get("WORLD_SIZE", gpus))  # under torchrun: one process per GPU
    if gpus > 1:
        target = replace(target, gpus=gpus)
    if not dry_run and target.device == "cuda" and not hardware.gpus:
        raise UserError(
            f"This machine has no GPU, so it cannot train the choice made for {target.name}.",
            hint="Add --dry-run to see the choice, or drop --gpu/--vram-limit to train on the CPU.",
        )
    return target


def check_choice_fits(choice: Choice, shape: ModelShape, target: Target) -> None:
    """Refuse a choice that does not fit even at the smallest settings, naming catalogue models that would."""
    if choice.fits:
        return
    smaller = catalogue_models_that_fit(replace(target, strategy=choice.recipe.parallel), choice.recipe)
    raise UserError(
        f"{shape.name} does not fit {target.name} even at the smallest settings: "
        f"{choice.planned_bytes / GIB:.1f} GiB planned for {target.capacity_bytes / GIB:.1f} GiB.",
        hint=(f"These catalogue models fit: {', '.join(smaller[:4])}." if smaller else "Use a larger card.")
        + " `qlora-kit plan` shows the details.",
    )


def _reference_forwards(recipe: Recipe, examples: int, world: int) -> tuple[int, int] | None:
    """plan.reference_forwards for a DPO run on these examples, before they are split: the held-out share is
    recipe.eval_fraction of them (an eval_data file, not read yet, is not counted)."""

    if recipe.method != "dpo":
        return None
    held = round(recipe.eval_fraction * examples)
    return reference_forwards(recipe, count_steps(examples - held, recipe, world), examples - held, held, world)


def lora_choices(lora: dict) -> dict:
    """The settings the user chose for the adapter, with those an adapter to start from fixes (rank, alpha,
    layers, variant): auto plans with them and does not change them."""
    from qlora_kit.model import settings_from_adapter

    given = with_overrides(Recipe(), **lora)
    if not given.init_adapter:
        return {k: v for k, v in lora.items() if v is not None}
    fixed = settings_from_adapter(given)
    return {
        **{k: v for k, v in lora.items() if v is not None},
        **{k: getattr(fixed, k) for k in ("rank", "alpha", "target_modules", "use_rslora", "use_dora")},
    }
