"""The choice `qlora-kit auto` makes: a shipped recipe picked and tuned to this card, model and data (cli/auto.py
probes, reads the data, and trains with it).

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

import math
from dataclasses import dataclass, field, replace

from rich.console import Group
from rich.markup import escape
from rich.text import Text

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.plan.memory import TIGHT_FRACTION, estimate_peak_memory, most_uncheckpointed_layers
from qlora_kit.plan.planner import StepShape, Target, cheaper, reference_forwards
from qlora_kit.plan.recipes import Recipe, card_gb, card_recipes, count_steps, load_recipe, recipe_summary
from qlora_kit.probe.sources import describe_source
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


def percentile(values: list[int], q: float) -> int:
    """The q-th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def reference_forwards_of(recipe: Recipe, examples: int, world: int) -> tuple[int, int] | None:
    """plan.reference_forwards for a DPO run on these examples, before they are split: the held-out share is
    recipe.eval_fraction of them (an eval_data file, not read yet, is not counted)."""

    if recipe.method != "dpo":
        return None
    held = round(recipe.eval_fraction * examples)
    return reference_forwards(recipe, count_steps(examples - held, recipe, world), examples - held, held, world)
