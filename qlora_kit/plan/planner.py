"""The plan step: will this model and recipe fit this card, and if not, what is the cheapest change that fits?

Builds on memory.py's arithmetic; nothing here loads a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from rich.console import Group
from rich.table import Table
from rich.text import Text

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.errors import UserError
from qlora_kit.plan.memory import (
    TIGHT_FRACTION,
    MemoryPlan,
    estimate_peak_memory,
    largest_micro_batch,
    longest_sequence,
    most_uncheckpointed_layers,
)
from qlora_kit.plan.recipes import Recipe
from qlora_kit.probe import hardware
from qlora_kit.probe.catalog import find_gpu, find_model_shape, gpu_catalogue, model_ids
from qlora_kit.units import GIB

LABELS = {
    "quantized_weights": "linear weights, NF4 + constants",
    "unquantized_weights": "embeddings, head, norms (16-bit)",
    "tower_weights": "vision tower, frozen (16-bit)",
    "lora_weights": "LoRA weights (fp32)",
    "lora_gradients": "LoRA gradients (fp32)",
    "optimizer_state": "optimizer state",
    "saved_activations": "activations saved for backward",
    "backward_working_set": "backward peak: loss or one layer",
    "allocator_slack": "allocator slack (reserved - allocated)",
    "cuda_context": "CUDA context (nvidia-smi only)",
    "process_overhead": "python + libraries",
    "reference_adapter": "DPO reference: the starting adapter",
    "ddp_gradient_buckets": "DDP gradient buckets",
    "fsdp_gathered_weights": "FSDP: one layer + embeddings gathered",
}


MIN_SEQ_LEN = 128  # step-downs never shorten sequences below this: shorter ones rarely hold a whole example


@dataclass(frozen=True)
class StepShape:
    """How a step's examples are split and bounded: the settings an out-of-memory step-down may change. The examples
    a step draws, and so the effective batch, never change."""

    micro_batch: int
    seq_len: int
    checkpointing: bool  # recompute layers in backward (the recipe's gradient_checkpointing)
    offload: bool  # with checkpointing on a GPU: saved layer inputs wait in host RAM
    uncheckpointed_layers: int = 0  # with checkpointing: the last layers that keep their activations

    @classmethod
    def of(cls, recipe: Recipe) -> StepShape:
        return cls(
            recipe.micro_batch,
            recipe.seq_len,
            recipe.gradient_checkpointing,
            recipe.activation_offload,
            recipe.uncheckpointed_layers if recipe.gradient_checkpointing else 0,
        )

    def applied_to(self, recipe: Recipe) -> Recipe:
        """The recipe with this shape; accumulation grows as the micro-batch shrinks, keeping the effective batch."""
        effective = recipe.micro_batch * recipe.grad_accum
        return replace(
            recipe,
            micro_batch=self.micro_batch,
            grad_accum=math.ceil(effective / self.micro_batch),
            seq_len=self.seq_len,
            gradient_checkpointing=self.checkpointing,
            activation_offload=self.offload,
            uncheckpointed_layers=self.uncheckpointed_layers,
        )


def cheaper(shape: StepShape, device: str) -> StepShape | None:
    """The next cheaper way to run the same step, or None when nothing is left. One order for plan's advice, auto's
    choice and training's out-of-memory recovery: what costs only speed first (recompute the layers kept whole, then
    every layer; halve the micro-batch; offload activations on a GPU), and only then what changes what is learned
    (halve the sequences, which cuts longer examples)."""
    if shape.checkpointing and shape.uncheckpointed_layers:
        return replace(shape, uncheckpointed_layers=0)
    if not shape.checkpointing:
        return replace(shape, checkpointing=True)
    if shape.micro_batch > 1:
        return replace(shape, micro_batch=shape.micro_batch // 2)
    if device == "cuda" and not shape.offload:
        return replace(shape, offload=True)
    if shape.seq_len > MIN_SEQ_LEN:
        return replace(shape, seq_len=max(MIN_SEQ_LEN, shape.seq_len // 2))
    return None


@dataclass
class Target:
    """Where the run would train: a GPU (catalogued, sized by hand, or probed) or this machine's RAM."""

    name: str
    device: str  # "cuda" or "cpu"
    capacity_bytes: int
    bf16: bool = True
    note: str = ""
    gpus: int = 1  # several GPUs of this kind, each holding what the plan shows
    strategy: str = "ddp"  # ddp: a whole model per GPU; fsdp: weights sharded across them

    @property
    def layout(self) -> dict:
        return {"gpus": self.gpus, "strategy": self.strategy, "bf16": self.bf16}


@dataclass
class PlanReport:
    plan: MemoryPlan
    target: Target
    longest_seq_at_batch_1: int
    largest_micro_batch: int
    fix: str | None
    uncheckpointed_layers: int = 0  # with checkpointing: how many last layers could skip recomputation and still fit
    faster: str | None = None  # the setting that spends spare memory on speed, when there is some
    alternatives: dict[str, int] | None = None  # full fine-tuning and 16-bit LoRA totals, for comparison
    models_that_fit: list[str] | None = None  # when it does not fit: catalogue models that do, with these settings
    reference: dict | None = None  # DPO: {"mode": on_the_fly | precomputed, "why": ...}

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "target": self.target.__dict__,
            "longest_seq_at_batch_1": self.longest_seq_at_batch_1,
            "largest_micro_batch": self.largest_micro_batch,
            "fix": self.fix,
            "uncheckpointed_layers": self.uncheckpointed_layers,
            "faster": self.faster,
            "alternatives": self.alternatives,
            "models_that_fit": self.models_that_fit,
            "reference": self.reference,
        }

    def render(self) -> Group:
        return render(self)

    @classmethod
    def from_dict(cls, values: dict) -> PlanReport:
        """A plan as to_dict wrote it (a run's plan.json), of this version or an earlier one: fields added since take
        their defaults, the derived totals are derived again."""
        plan = {k: v for k, v in values["plan"].items() if k in {f.name for f in fields(MemoryPlan)}}
        target = {k: v for k, v in values["target"].items() if k in {f.name for f in fields(Target)}}
        known = {f.name for f in fields(cls)} - {"plan", "target"}
        return cls(MemoryPlan(**plan), Target(**target), **{k: v for k, v in values.items() if k in known})


def check_positive(gigabytes: float, flag: str) -> None:
    """A memory size given on the command line (--vram, --vram-limit) must be a positive, finite number of GB."""
    if not math.isfinite(gigabytes) or gigabytes <= 0:
        raise UserError(
            f"{flag} must be a positive number of gigabytes, not {gigabytes:g}.", hint=f"Give gigabytes, e.g. {flag} 8."
        )


def choose_target(
    gpu: str | None = None, vram_gib: float | None = None, hardware=None, vram_limit: float | None = None
) -> Target:
    """The card named (--gpu), a card of a given size (--vram), else the probed GPU (capped at vram_limit GB when
    given: --vram-limit), else this machine's RAM (or, with vram_limit, a card of that size to plan for)."""
    # `is not None` throughout: --vram 0 and --gpu "" are given, and wrong, not absent
    if gpu is not None and (vram_gib is not None or vram_limit is not None):
        other = "--vram" if vram_gib is not None else "--vram-limit"
        raise UserError(
            f"Give either --gpu or {other}, not both.",
            hint="--gpu picks a catalogued card; "
            + ("--vram any size." if vram_gib is not None else "--vram-limit caps this machine's GPU."),
        )
    if vram_limit is not None:
        check_positive(vram_limit, "--vram-limit")
        if hardware is None or not hardware.gpus:
            return choose_target(vram_gib=vram_limit)
        probed = choose_target(hardware=hardware)
        return replace(
            probed,
            name=f"{probed.name} (limited to {vram_limit:g} GB)",
            capacity_bytes=min(probed.capacity_bytes, int(vram_limit * GIB)),
        )
    if gpu is not None:
        spec = find_gpu(gpu)
        return Target(spec.name, "cuda", int(spec.vram_gib * GIB), spec.bf16)
    if vram_gib is not None:
        check_positive(vram_gib, "--vram")
        return Target(f"{vram_gib:g} GB GPU", "cuda", int(vram_gib * GIB))
    if hardware is not None and hardware.gpus:
        gpu0 = hardware.gpus[0]
        return Target(gpu0.name, "cuda", int(gpu0.vram_total_gib * GIB), gpu0.bf16)
    available = hardware.ram_available_gib if hardware is not None else 0.0
    in_use = (
        f", {hardware.ram_total_gib - available:.1f} of {hardware.ram_total_gib:.1f} GiB in use" if hardware else ""
    )
    return Target(
        f"this machine's free RAM (no GPU{in_use})",
        "cpu",
        int(available * GIB),
        note=(
            "No GPU found and no --gpu/--vram given: this plans a CPU run against the RAM that is free now (other "
            "programs hold the rest). Use --gpu NAME or --vram GB to plan for a card."
        ),
    )


def make_plan(
    model: str | ModelShape,
    recipe: Recipe,
    target: Target,
    compare: bool = False,
    reference_forwards: tuple[int, int] | None = None,
) -> PlanReport:
    """Estimate, then the headroom searches and (when it does not fit) the cheapest change that fits. For DPO, first
    how the reference is computed, from reference_forwards (see that function) when the data is known."""
    shape = model if isinstance(model, ModelShape) else find_model_shape(model)
    reference = None
    if recipe.method == "dpo":
        mode, why = choose_reference(
            recipe.reference,
            reference_forwards,
            lambda mode: fits_target(shape, replace(recipe, reference=mode), target),
        )
        recipe, reference = replace(recipe, reference=mode), {"mode": mode, "why": why}
    plan = estimate_peak_memory(shape, recipe, target.device, target.capacity_bytes, **target.layout)
    if target.note:
        plan.notes.append(target.note)
    if target.device == "cuda" and not target.bf16 and recipe.precision in ("auto", "bf16"):
        plan.notes.append(
            f"{target.name} has no bf16: training computes in fp32, as {shape.family} overflows fp16 (counted above)."
            if shape.fp16_overflows and recipe.precision == "auto"
            else f"{target.name} has no bf16: training uses fp16 with loss scaling (same memory)."
        )
    spare, fits = 0, plan.verdict != "does not fit"
    if recipe.gradient_checkpointing and plan.verdict == "fits":  # spend only what keeps the plan out of "tight"
        spare = most_uncheckpointed_layers(
            shape, recipe, target.device, int(TIGHT_FRACTION * target.capacity_bytes), **target.layout
        )
    return PlanReport(
        plan=plan,
        target=target,
        longest_seq_at_batch_1=longest_sequence(shape, recipe, target.device, target.capacity_bytes, **target.layout),
        largest_micro_batch=largest_micro_batch(shape, recipe, target.device, target.capacity_bytes, **target.layout),
        fix=None if fits else suggest_fix(shape, recipe, target),
        uncheckpointed_layers=spare,
        faster=room_to_go_faster(shape, recipe, spare),
        alternatives=compare_full(plan, shape) if compare else None,
        models_that_fit=None if fits else catalogue_models_that_fit(target, recipe),
        reference=reference,
    )


def reference_forwards(
    recipe: Recipe, total_steps: int, pairs: int, eval_pairs: int, world: int = 1
) -> tuple[int, int]:
    """A DPO run's reference forward passes, counted in pairs: (on the fly: every pair a step draws, and the held-out
    pairs at each evaluation; precomputed: every pair once)."""
    evals = sum(recipe.evaluates_after(step, total_steps) for step in range(1, total_steps + 1)) if eval_pairs else 0
    return total_steps * recipe.micro_batch * recipe.grad_accum * world + evals * eval_pairs, pairs + eval_pairs


def choose_reference(asked: str, forwards: tuple[int, int] | None, fits) -> tuple[str, str]:
    """How DPO's reference log-probs are computed, and why: as asked; else precomputed when on the fly does not fit
    (fits(mode) says) or when it takes fewer forward passes; else on the fly, which starts training at once."""
    if asked != "auto":
        return asked, "as the recipe asks"
    if not fits("on_the_fly"):  # precomputed needs less: no step holds a reference pass
        return "precomputed", "the reference pass does not fit beside a step, so it runs once before the first step"
    if forwards is None:
        return "on_the_fly", "a run precomputes it instead when that takes fewer forward passes, counted from its data"
    on_the_fly, precomputed = forwards
    if precomputed < on_the_fly:
        return (
            "precomputed",
            f"{precomputed:,} pair forward passes before the first step instead of {on_the_fly:,} during the run",
        )
    return (
        "on_the_fly",
        f"{on_the_fly:,} pair forward passes during the run, where precomputing would take {precomputed:,}",
    )


def plan_for_layout(
    model: str,
    recipe: Recipe,
    gpu: str | None = None,
    vram_gib: float | None = None,
    gpus: int = 1,
    strategy: str = "ddp",
    compare: bool = False,
) -> PlanReport:
    """`qlora-kit plan`: the plan on the card named (or sized, or probed) for `gpus` of them in a layout."""
    layouts = Recipe.__dataclass_fields__["parallel"].metadata["choices"]  # the layouts a run can train with
    if strategy not in layouts:
        raise UserError(f"Unknown --strategy {strategy}.", hint=f"Use {', '.join(layouts[:-1])} or {layouts[-1]}.")
    probed = None if (gpu is not None or vram_gib is not None) else hardware.probe(check_bnb=False)
    target = replace(choose_target(gpu, vram_gib, probed), gpus=gpus, strategy=strategy)
    if gpus > 1 and target.device != "cuda":
        raise UserError(
            "--gpus plans for several GPUs, and no GPU is named or found.", hint='Add --gpu "RTX 3090" or --vram 24.'
        )
    return make_plan(model, recipe, target, compare=compare)


def catalogue_models_that_fit(target: Target, recipe: Recipe) -> list[str]:
    """Catalogue models that fit the target with this recipe, keeping the 10% a plan calls tight; largest first."""
    shapes = sorted((find_model_shape(m) for m in model_ids()), key=lambda s: -s.parameter_count())
    return [
        s.name
        for s in shapes
        if estimate_peak_memory(s, recipe, target.device, **target.layout).total_bytes
        <= TIGHT_FRACTION * target.capacity_bytes
    ]


def fits_target(shape: ModelShape, recipe: Recipe, target: Target) -> bool:
    """Whether the planned peak of recipe is within the target's capacity."""
    return estimate_peak_memory(shape, recipe, target.device, **target.layout).total_bytes <= target.capacity_bytes


def suggest_fix(shape: ModelShape, recipe: Recipe, target: Target) -> str:
    """The flags for the first step of cheaper() that makes the run fit, with the longest sequence that then fits
    when sequences must be shortened; a smaller rank when even the shortest does not."""
    step = StepShape.of(recipe)
    while (step := cheaper(step, target.device)) is not None:
        candidate = step.applied_to(recipe)
        if step.seq_len < recipe.seq_len:  # rather than halving: the longest sequence that fits
            longest = longest_sequence(shape, candidate, target.device, target.capacity_bytes, **target.layout)
            if longest >= MIN_SEQ_LEN:
                return _as_flags(
                    recipe, replace(candidate, seq_len=min(longest, recipe.seq_len)), "(the longest that fits)"
                )
        elif fits_target(shape, candidate, target):
            return _as_flags(recipe, candidate)
    smallest = replace(
        StepShape.of(recipe),
        micro_batch=1,
        seq_len=MIN_SEQ_LEN,
        checkpointing=True,
        offload=target.device == "cuda",
        uncheckpointed_layers=0,
    ).applied_to(recipe)
    for rank in (8, 4):
        if rank < recipe.rank and fits_target(shape, replace(smallest, rank=rank), target):
            return _as_flags(recipe, replace(smallest, rank=rank))
    needed = estimate_peak_memory(shape, replace(smallest, rank=min(recipe.rank, 4)), target.device, **target.layout)
    larger = ""
    if target.device == "cuda":  # the smallest card that runs the settings as asked, none changed
        as_asked = estimate_peak_memory(shape, recipe, target.device, **target.layout).total_bytes
        cards = sorted((gpu for gpu in gpu_catalogue() if gpu.vram_gib * GIB >= as_asked), key=lambda gpu: gpu.vram_gib)
        larger = (
            f" such as the {cards[0].name} ({cards[0].vram_gib:g} GB), which runs these settings as they are"
            if cards
            else ""
        )
    return (
        f"nothing fits {target.name}: even seq {MIN_SEQ_LEN}, rank 4 needs {needed.total_bytes / GIB:.1f} GiB; "
        f"use a smaller model or a larger card{larger}"
    )


def _as_flags(recipe: Recipe, changed: Recipe, seq_note: str = "") -> str:
    """The train flags that turn recipe into changed, e.g. "--micro-batch 2 --grad-accum 4 (same effective batch of 8)"."""
    flags = []
    if changed.gradient_checkpointing != recipe.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if changed.uncheckpointed_layers != recipe.uncheckpointed_layers:
        flags.append(f"--uncheckpointed-layers {changed.uncheckpointed_layers}")
    if changed.micro_batch != recipe.micro_batch:
        flags.append(
            f"--micro-batch {changed.micro_batch} --grad-accum {changed.grad_accum} (same effective batch of "
            f"{changed.micro_batch * changed.grad_accum})"
        )
    if changed.activation_offload != recipe.activation_offload:
        flags.append("--activation-offload")
    if changed.seq_len != recipe.seq_len:
        flags.append(f"--seq-len {changed.seq_len} {seq_note}".strip())
    if changed.rank != recipe.rank:
        flags.append(f"--rank {changed.rank}")
    return " ".join(flags)


def room_to_go_faster(shape: ModelShape, recipe: Recipe, spare_layers: int) -> str | None:
    """The flag that skips recomputing layers the card has memory to keep, or None when there is none to spare."""
    if spare_layers <= recipe.uncheckpointed_layers:
        return None
    if spare_layers >= shape.num_layers:
        return "--no-gradient-checkpointing: every layer's activations fit, so nothing needs recomputing in backward"
    return (
        f"--uncheckpointed-layers {spare_layers}: the last {spare_layers} of {shape.num_layers} layers can keep their "
        "activations instead of being recomputed in backward"
    )


def compare_full(plan: MemoryPlan, shape: ModelShape) -> dict[str, int]:
    """Totals for the same run as 16-bit LoRA and as full fine-tuning (bf16 weights and grads, fp32 master + AdamW)."""
    c = plan.components
    lora_parts = c["lora_weights"] + c["lora_gradients"] + c["optimizer_state"]
    base_weights = c["quantized_weights"] + c["unquantized_weights"] + c.get("tower_weights", 0)
    lora16 = plan.total_bytes - c["quantized_weights"] + 2 * shape.linear_params()
    full = plan.total_bytes - base_weights - lora_parts + 16 * shape.parameter_count()
    return {"qlora_4bit": plan.total_bytes, "lora_16bit": lora16, "full_finetune": full}


def describe_reference(reference: dict) -> str:
    """A plan's DPO reference choice in words, e.g. "precomputed (why)"."""
    return f"{reference['mode'].replace('_', ' ')} ({reference['why']})"


def render(report: PlanReport) -> Group:
    """The plan as a rich table plus a verdict line and advice."""
    plan, target = report.plan, report.target
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    where = target.name if target.gpus == 1 else f"each of {target.gpus} x {target.name} ({target.strategy.upper()})"
    table = Table(
        title=f"{plan.model}: seq {plan.seq_len} x micro-batch {plan.micro_batch}, LoRA rank {plan.rank}, on {where}"
    )
    table.add_column("component")
    table.add_column("memory", justify="right")
    for key, value in plan.components.items():
        table.add_row(LABELS.get(key, key), gib(value))
    if plan.device == "cuda":
        table.add_row("[bold]peak allocated (torch)", f"[bold]{gib(plan.allocated_bytes)}")
        table.add_row("[bold]total (what nvidia-smi shows)", f"[bold]{gib(plan.total_bytes)}")
    else:
        table.add_row("[bold]total (process memory)", f"[bold]{gib(plan.total_bytes)}")
    table.add_row("capacity", gib(target.capacity_bytes))
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}.get(plan.verdict, "white")
    lines = [
        table,
        Text.from_markup(
            f"[bold {colour}]{plan.verdict.upper()}[/]: {gib(plan.total_bytes)} of {gib(target.capacity_bytes)}"
        ),
    ]
    lines.append(
        Text(
            f"Trainable: {plan.trainable_params:,} of {plan.total_params:,} parameters "
            f"({100 * plan.trainable_params / plan.total_params:.2f}%), adapter {plan.adapter_bytes / 2**20:.1f} MiB on disk"
        )
    )
    lines.append(
        Text(
            f"Longest sequence at micro-batch 1: {report.longest_seq_at_batch_1 or 'none fits'}; "
            f"largest micro-batch at seq {plan.seq_len}: {report.largest_micro_batch or 'none fits'}"
        )
    )
    if report.fix:
        lines.append(Text.from_markup(f"[bold]To make it fit:[/] {report.fix}"))
    if report.models_that_fit is not None:
        lines.append(
            Text.from_markup(
                "[bold]Catalogue models that fit these settings:[/] "
                + (", ".join(report.models_that_fit[:6]) or "none")
            )
        )
    if report.faster:
        lines.append(Text.from_markup(f"[bold]Room to go faster:[/] {report.faster}"))
    if report.reference:
        lines.append(Text(f"DPO reference: {describe_reference(report.reference)}"))
    if report.alternatives:
        a = report.alternatives
        lines.append(
            Text(
                f"Same run as 16-bit LoRA: {gib(a['lora_16bit'])}; as full fine-tuning: {gib(a['full_finetune'])} "
                f"({a['full_finetune'] / a['qlora_4bit']:.1f}x this QLoRA plan)"
            )
        )
    lines += [Text(note, style="dim") for note in plan.notes]
    return Group(*lines)
