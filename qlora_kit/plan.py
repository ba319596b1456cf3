"""The plan step: will this model and recipe fit this card, and if not, what is the cheapest change that fits?

Builds on memory.py's arithmetic; nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.console import Group
from rich.table import Table
from rich.text import Text

from qlora_kit.catalog import find_gpu, find_model_shape, model_ids
from qlora_kit.errors import UserError
from qlora_kit.memory import (GIB, TIGHT_FRACTION, MemoryPlan, ModelShape, estimate_peak_memory, largest_micro_batch,
                              longest_sequence, most_uncheckpointed_layers)
from qlora_kit.recipes import Recipe

LABELS = {
    "quantized_weights": "linear weights, NF4 + constants",
    "unquantized_weights": "embeddings, head, norms (16-bit)",
    "lora_weights": "LoRA weights (fp32)",
    "lora_gradients": "LoRA gradients (fp32)",
    "optimizer_state": "optimizer state",
    "saved_activations": "activations saved for backward",
    "backward_working_set": "backward peak: loss or one layer",
    "allocator_slack": "allocator slack (reserved - allocated)",
    "cuda_context": "CUDA context (nvidia-smi only)",
    "process_overhead": "python + libraries",
    "ddp_gradient_buckets": "DDP gradient buckets",
    "fsdp_gathered_weights": "FSDP: one layer + embeddings gathered",
}


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
        return {"gpus": self.gpus, "strategy": self.strategy}


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

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "target": self.target.__dict__, "longest_seq_at_batch_1": self.longest_seq_at_batch_1,
                "largest_micro_batch": self.largest_micro_batch, "fix": self.fix,
                "uncheckpointed_layers": self.uncheckpointed_layers, "faster": self.faster, "alternatives": self.alternatives,
                "models_that_fit": self.models_that_fit}

    def render(self) -> Group:
        return render(self)


def choose_target(gpu: str | None = None, vram_gib: float | None = None, hardware=None) -> Target:
    """The card named (--gpu), a card of a given size (--vram), else the probed GPU, else this machine's RAM."""
    if gpu and vram_gib:
        raise UserError("Give either --gpu or --vram, not both.", hint="--gpu picks a catalogued card; --vram any size.")
    if gpu:
        spec = find_gpu(gpu)
        return Target(spec.name, "cuda", int(spec.vram_gib * GIB), spec.bf16)
    if vram_gib:
        if vram_gib <= 0:
            raise UserError(f"--vram must be positive, not {vram_gib}.", hint="Give the card's memory in GB, e.g. --vram 8.")
        return Target(f"{vram_gib:g} GB GPU", "cuda", int(vram_gib * GIB))
    if hardware is not None and hardware.gpus:
        gpu0 = hardware.gpus[0]
        return Target(gpu0.name, "cuda", int(gpu0.vram_total_gib * GIB), gpu0.bf16)
    available = hardware.ram_available_gib if hardware is not None else 0.0
    in_use = f", {hardware.ram_total_gib - available:.1f} of {hardware.ram_total_gib:.1f} GiB in use" if hardware else ""
    return Target(f"this machine's free RAM (no GPU{in_use})", "cpu", int(available * GIB), note=(
        "No GPU found and no --gpu/--vram given: this plans a CPU run against the RAM that is free now (other "
        "programs hold the rest). Use --gpu NAME or --vram GB to plan for a card."))


def make_plan(model: str | ModelShape, recipe: Recipe, target: Target, compare: bool = False) -> PlanReport:
    """Estimate, then the headroom searches and (when it does not fit) the cheapest change that fits."""
    shape = model if isinstance(model, ModelShape) else find_model_shape(model)
    plan = estimate_peak_memory(shape, recipe, target.device, target.capacity_bytes, **target.layout)
    if target.note:
        plan.notes.append(target.note)
    if target.device == "cuda" and not target.bf16 and recipe.precision in ("auto", "bf16"):
        plan.notes.append(f"{target.name} has no bf16: training uses fp16 with loss scaling (same memory).")
    spare, fits = 0, plan.verdict != "does not fit"
    if recipe.gradient_checkpointing and plan.verdict == "fits":  # spend only what keeps the plan out of "tight"
        spare = most_uncheckpointed_layers(shape, recipe, target.device, int(TIGHT_FRACTION * target.capacity_bytes),
                                           **target.layout)
    return PlanReport(
        plan=plan, target=target,
        longest_seq_at_batch_1=longest_sequence(shape, recipe, target.device, target.capacity_bytes, **target.layout),
        largest_micro_batch=largest_micro_batch(shape, recipe, target.device, target.capacity_bytes, **target.layout),
        fix=None if fits else suggest_fix(shape, recipe, target),
        uncheckpointed_layers=spare,
        faster=room_to_go_faster(shape, recipe, spare),
        alternatives=compare_full(plan, shape) if compare else None,
        models_that_fit=None if fits else catalogue_models_that_fit(target, recipe),
    )


def catalogue_models_that_fit(target: Target, recipe: Recipe) -> list[str]:
    """Catalogue models that fit the target with this recipe, keeping the 10% a plan calls tight; largest first."""
    shapes = sorted((find_model_shape(m) for m in model_ids()), key=lambda s: -s.parameter_count())
    return [s.name for s in shapes
            if estimate_peak_memory(s, recipe, target.device, **target.layout).total_bytes <= TIGHT_FRACTION * target.capacity_bytes]


def suggest_fix(shape: ModelShape, recipe: Recipe, target: Target) -> str:
    """The first change, in a fixed order (checkpointing, micro-batch, sequence, rank), that makes the run fit."""
    def fits(candidate: Recipe) -> bool:
        return estimate_peak_memory(shape, candidate, target.device, **target.layout).total_bytes <= target.capacity_bytes

    if not recipe.gradient_checkpointing and fits(replace(recipe, gradient_checkpointing=True)):
        return "turn gradient checkpointing on"
    recipe = replace(recipe, gradient_checkpointing=True)
    batch = recipe.micro_batch
    while batch > 1:
        batch //= 2
        accum = recipe.grad_accum * recipe.micro_batch // batch
        if fits(replace(recipe, micro_batch=batch, grad_accum=accum)):
            return f"--micro-batch {batch} --grad-accum {accum} (same effective batch of {batch * accum})"
    recipe = replace(recipe, micro_batch=1)
    longest = longest_sequence(shape, recipe, target.device, target.capacity_bytes)
    if longest >= 128:
        return f"--micro-batch 1 and --seq-len {longest} (the longest that fits)"
    for rank in (8, 4):
        if rank < recipe.rank and fits(replace(recipe, rank=rank, seq_len=128)):
            return f"--rank {rank} with --seq-len 128"
    smallest = estimate_peak_memory(shape, replace(recipe, seq_len=128, rank=min(recipe.rank, 4)), target.device)
    return (f"nothing fits {target.name}: even seq 128, rank 4 needs {smallest.total_bytes / GIB:.1f} GiB; "
            "use a smaller model or a larger card")


def room_to_go_faster(shape: ModelShape, recipe: Recipe, spare_layers: int) -> str | None:
    """The flag that skips recomputing layers the card has memory to keep, or None when there is none to spare."""
    if spare_layers <= recipe.uncheckpointed_layers:
        return None
    if spare_layers >= shape.num_layers:
        return "--no-checkpointing: every layer's activations fit, so nothing needs recomputing in backward"
    return (f"--uncheckpointed-layers {spare_layers}: the last {spare_layers} of {shape.num_layers} layers can keep their "
            "activations instead of being recomputed in backward")


def compare_full(plan: MemoryPlan, shape: ModelShape) -> dict[str, int]:
    """Totals for the same run as 16-bit LoRA and as full fine-tuning (bf16 weights and grads, fp32 master + AdamW)."""
    c = plan.components
    lora_parts = c["lora_weights"] + c["lora_gradients"] + c["optimizer_state"]
    base_weights = c["quantized_weights"] + c["unquantized_weights"]
    lora16 = plan.total_bytes - c["quantized_weights"] + 2 * shape.linear_params()
    full = plan.total_bytes - base_weights - lora_parts + 16 * shape.parameter_count()
    return {"qlora_4bit": plan.total_bytes, "lora_16bit": lora16, "full_finetune": full}


def render(report: PlanReport) -> Group:
    """The plan as a rich table plus a verdict line and advice."""
    plan, target = report.plan, report.target
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    where = target.name if target.gpus == 1 else f"each of {target.gpus} x {target.name} ({target.strategy.upper()})"
    table = Table(title=f"{plan.model}: seq {plan.seq_len} x micro-batch {plan.micro_batch}, LoRA rank {plan.rank}, on {where}")
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
    lines = [table, Text.from_markup(f"[bold {colour}]{plan.verdict.upper()}[/]: {gib(plan.total_bytes)} of {gib(target.capacity_bytes)}")]
    lines.append(Text(f"Trainable: {plan.trainable_params:,} of {plan.total_params:,} parameters "
                      f"({100 * plan.trainable_params / plan.total_params:.2f}%), adapter {plan.adapter_bytes / 2**20:.1f} MiB on disk"))
    lines.append(Text(f"Longest sequence at micro-batch 1: {report.longest_seq_at_batch_1 or 'none fits'}; "
                      f"largest micro-batch at seq {plan.seq_len}: {report.largest_micro_batch or 'none fits'}"))
    if report.fix:
        lines.append(Text.from_markup(f"[bold]To make it fit:[/] {report.fix}"))
    if report.models_that_fit is not None:
        lines.append(Text.from_markup("[bold]Catalogue models that fit these settings:[/] "
                                      + (", ".join(report.models_that_fit[:6]) or "none")))
    if report.faster:
        lines.append(Text.from_markup(f"[bold]Room to go faster:[/] {report.faster}"))
    if report.alternatives:
        a = report.alternatives
        lines.append(Text(f"Same run as 16-bit LoRA: {gib(a['lora_16bit'])}; as full fine-tuning: {gib(a['full_finetune'])} "
                          f"({a['full_finetune'] / a['qlora_4bit']:.1f}x this QLoRA plan)"))
    lines += [Text(note, style="dim") for note in plan.notes]
    return Group(*lines)
