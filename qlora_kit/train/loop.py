"""The training loop: optimizer steps over the examples, and what a step is made of.

start_loop() builds the loop's state (LoopState: model, loss, optimizer, scheduler, scaler and where the run
stands), from a checkpoint when resuming; train_loop() runs the steps, telling the rest of the run what happens
through one Hooks object. A step that runs out of memory is redone on a cheaper shape (step_down), so no step is
lost. Collectives go through the World, which does nothing for a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from qlora_kit.data import dataset as data
from qlora_kit.errors import UserError
from qlora_kit.model.load import set_checkpointing
from qlora_kit.objectives.preference import PreferenceLoss
from qlora_kit.objectives.sft import CausalLMLoss, evaluate_with_stats
from qlora_kit.plan.planner import StepShape, cheaper
from qlora_kit.plan.recipes import Recipe, optimizer_in_use
from qlora_kit.probe.hardware import CPU_SHARE, usage_now
from qlora_kit.train import checkpoint
from qlora_kit.train.checkpoint import TrainerState
from qlora_kit.train.distributed import World

MAX_NONFINITE_IN_A_ROW = 5  # skipped NaN/inf steps tolerated before the run stops


@dataclass
class LoopState:
    """All the loop reads and changes: what trains, what steps it, and where the run stands (what a checkpoint
    keeps)."""

    model: torch.nn.Module
    loss: torch.nn.Module  # CausalLMLoss or PreferenceLoss, wrapped for data parallelism
    trainable: list[torch.nn.Parameter]  # what the optimizer steps and the gradient clipping measures
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    progress: TrainerState  # the step, the data position, the step's shape after step-downs, skipped updates
    device: torch.device
    world: World = World()


class Hooks:
    """What the loop tells the rest of the run; each does nothing here, and a run overrides what it needs."""

    def step(self, metrics: dict) -> None:
        """A step finished; metrics is its metrics.jsonl line."""

    def step_down(self, event: dict) -> None:
        """The step ran out of memory and is redone on a cheaper shape (event's "from" and "to")."""

    def checkpoint(self, state: LoopState) -> None:
        """Time to write a checkpoint of state.progress.step (every checkpoint_every steps, at the end, on a stop)."""

    def stop_requested(self) -> int:
        """The signal that asked the run to stop after this step, or 0."""
        return 0


class StepsKept(Hooks):
    """Hooks that keep every step's metrics line, for code that trains with no run folder (tests, benchmarks)."""

    def __init__(self):
        self.steps: list[dict] = []

    def step(self, metrics: dict) -> None:
        self.steps.append(metrics)


@dataclass(frozen=True)
class Outcome:
    """How the loop ended: finished (neither field set), stopped by a signal after a checkpoint, or failed with an
    error the user can act on (nothing fitting in memory, a full disk); the weights are those of the last step."""

    signum: int = 0
    error: UserError | None = None


def start_loop(
    model,
    recipe: Recipe,
    progress: TrainerState,
    *,
    device: torch.device,
    dtype: torch.dtype,
    world: World = World(),
    resume_from: Path | None = None,
    console: Console | None = None,
) -> LoopState:
    """The loop's state for model at progress's start, or at resume_from's checkpoint when given."""
    loss = (
        CausalLMLoss(model, recipe.loss_chunk_tokens)
        if recipe.method == "sft"
        else PreferenceLoss(model, recipe.method, recipe.beta, recipe.loss_chunk_tokens, recipe.init_adapter)
    )
    # Wrapped first: FSDP replaces the parameters with sharded ones, which are what the optimizer must hold.
    loss = world.wrap(loss, device, recipe.parallel, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, recipe, device, console)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(progress.total_steps, recipe))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    state = LoopState(model, loss, trainable, optimizer, scheduler, scaler, progress, device, world)
    if resume_from:
        resume(state, resume_from, recipe, console)
    return state


def train_loop(state: LoopState, examples, recipe: Recipe, hooks: Hooks, pad_id: int, eval_examples=()) -> Outcome:
    """Optimizer steps of micro_batch x grad_accum examples per process, from the state's step to its last;
    evaluates eval_examples every eval_every steps and after the last. Ends after a step's checkpoint when a
    signal asks (Outcome.signum); a UserError (nothing fits, too many NaN steps) is raised."""
    progress, world = state.progress, state.world
    per_step = recipe.micro_batch * recipe.grad_accum  # per process
    grouped = recipe.group_by_length and not recipe.packing
    stream = data.example_stream(examples, recipe.seed, per_step * world.size, grouped, start=progress.position)
    state.model.train()
    for step in range(progress.step + 1, progress.total_steps + 1):
        CPU_SHARE.use_free_cores(state.device)  # as many threads as other programs leave cores free
        started = time.perf_counter()
        drawn = [next(stream) for _ in range(per_step * world.size)]  # (epoch, example): every process draws alike
        progress.position += len(drawn)
        share = world.share([example for _, example in drawn])
        step_loss, tokens, padding, stats = until_it_fits(state, hooks, step, forward_backward, share, pad_id)
        grad_norm, finite = apply_update(state, recipe.max_grad_norm, step_loss)
        count_nonfinite(progress, finite, step)
        lr, seconds = state.scheduler.get_last_lr()[0], time.perf_counter() - started
        state.scheduler.step()
        progress.step = step
        evaluated = {}
        if eval_examples and recipe.evaluates_after(step, progress.total_steps):
            eval_loss, eval_stats = until_it_fits(state, hooks, step, evaluate, eval_examples, pad_id)
            evaluated = {"eval_loss": eval_loss, **{f"eval_{name}": value for name, value in eval_stats.items()}}
        shape = progress.shape
        hooks.step(
            {
                "step": step,
                "epoch": drawn[-1][0],
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                **stats,
                "step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "padding_pct": padding,
                "micro_batch": shape.micro_batch,
                "grad_accum": -(-per_step // shape.micro_batch),
                "seq_len": shape.seq_len,
                **memory_readings(state.device, world),
                **evaluated,
                **({} if finite else {"skipped_update": True, "nonfinite_steps": progress.nonfinite_steps}),
            }
        )
        signum = world.largest(hooks.stop_requested())  # every process stops after the same step
        if signum or step == progress.total_steps or (recipe.checkpoint_every and step % recipe.checkpoint_every == 0):
            hooks.checkpoint(state)
        if signum:
            return Outcome(signum=signum)
    return Outcome()


def until_it_fits(state: LoopState, hooks: Hooks, step: int, work, *args):
    """work(state, *args) (which reads the step's shape from the state), redone on a cheaper shape after each
    out-of-memory error; step_down raises UserError when nothing cheaper is left."""
    while True:
        try:
            return work(state, *args)
        except torch.OutOfMemoryError:
            state.optimizer.zero_grad(set_to_none=True)  # the half-done work is redone from scratch
        step_down(state, hooks, step)  # outside the except block, so the failed attempt's tensors are freed first


def step_down(state: LoopState, hooks: Hooks, step: int) -> None:
    """Run the rest of the run on plan.cheaper()'s next shape, with the model's checkpointing to match, and say so."""
    device, world = state.device, state.world
    if world.active:  # the other processes wait in a collective for this one: no redo in step
        raise UserError(
            f"Out of memory on rank {world.rank}.",
            hint="Lower --micro-batch or --seq-len; `qlora-kit plan --gpus N` shows what fits.",
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before, after = state.progress.shape, cheaper(state.progress.shape, device.type)
    if after is None:
        raise UserError(
            f"Out of memory even at micro-batch 1, {before.seq_len}-token sequences"
            + (", with activations offloaded." if device.type == "cuda" else ", recomputing every layer."),
            hint="Use a smaller model or a larger card; `qlora-kit plan` shows what fits.",
        )
    if recomputing(after) != recomputing(before):
        set_checkpointing(state.model, offload=after.offload, uncheckpointed_layers=after.uncheckpointed_layers)
    state.progress.shape = after
    event = {"from": dataclasses.asdict(before), "to": dataclasses.asdict(after)}
    hooks.step_down({"event": "out_of_memory_step_down", "step": step, **event})


def recomputing(shape: StepShape) -> tuple:
    """What of a step's shape the model's gradient checkpointing settings follow."""
    return shape.checkpointing, shape.offload, shape.uncheckpointed_layers


def forward_backward(state: LoopState, examples: list, pad_id: int) -> tuple[float, int, float, dict]:
    """Accumulate gradients of this process's share of a step in micro-batches of the state's shape; returns the
    step's (mean loss, tokens, % padding, means of the loss's statistics) over all processes."""
    shape, world, scaler = state.progress.shape, state.world, state.scaler
    # Similar lengths share a micro-batch, so little is padded; the step's examples (and gradient) are the same.
    examples = sorted(data.truncate(examples, shape.seq_len), key=len)
    # Normalise by the whole step's labelled tokens (every process's), not per micro-batch, so any split gives the
    # same gradient; DistributedDataParallel averages over processes, so each share is scaled back up by their number.
    n_targets = world.total(data.loss_units(examples))
    starts = range(0, len(examples), shape.micro_batch)
    step_loss, step_tokens, slots, sums = 0.0, 0, 0, {}
    for start in starts:
        # With DDP, gradients are all-reduced once per step: on the last micro-batch's backward.
        syncing = start == starts[-1] or not hasattr(state.loss, "no_sync")
        with contextlib.nullcontext() if syncing else state.loss.no_sync():
            loss_sum, _, attention_mask, stats = state.loss(
                examples[start : start + shape.micro_batch], pad_id, state.device
            )
            loss = loss_sum / n_targets
            scaler.scale(loss * world.size).backward()
        slots += attention_mask.numel()
        step_loss += loss.item()
        step_tokens += int(attention_mask.sum())
        sums = {name: sums.get(name, 0.0) + value.item() for name, value in stats.items()}
    step_loss, step_tokens, slots = (world.total(x) for x in (step_loss, step_tokens, slots))
    # Only preference losses report statistics, and for pairs n_targets is already the step's pairs (every
    # process's): no collective for SFT, none twice for DPO.
    means = {name: world.total(value) / n_targets for name, value in sums.items()}
    return step_loss, int(step_tokens), 100 * (1 - step_tokens / max(slots, 1)), means


def evaluate(state: LoopState, examples: list, pad_id: int) -> tuple[float, dict]:
    """The mean loss (and the loss's statistics) over the held-out examples, in micro-batches of the state's shape."""
    shape = state.progress.shape
    return evaluate_with_stats(
        state.model, examples, shape.micro_batch, pad_id, state.device, state.loss, shape.seq_len
    )


def apply_update(state: LoopState, max_grad_norm: float, step_loss: float) -> tuple[float, bool]:
    """Clip and apply the accumulated gradient unless the loss or gradient is NaN/inf; returns (grad norm, applied)."""
    optimizer, scaler = state.optimizer, state.scaler
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, max_grad_norm or math.inf)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    # fp16's scaler skips overflowing steps itself; otherwise a NaN/inf loss or gradient must never reach the weights.
    finite = math.isfinite(step_loss) and (scaler.is_enabled() or math.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def count_nonfinite(progress: TrainerState, finite: bool, step: int) -> None:
    """Count skipped updates; several in a row stop the run (the weights are still those of the last good step)."""
    progress.nonfinite_in_a_row = 0 if finite else progress.nonfinite_in_a_row + 1
    progress.nonfinite_steps += not finite
    if progress.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise UserError(
            f"The loss or gradient was NaN or infinite for {MAX_NONFINITE_IN_A_ROW} steps in a row (up to "
            f"step {step}); those updates were skipped, so the weights are from step {step - MAX_NONFINITE_IN_A_ROW}.",
            hint="Lower --lr, train in bf16 or fp32 (--precision), or look for broken examples with `qlora-kit data check`.",
        )


def resume(state: LoopState, folder: Path, recipe: Recipe, console: Console | None) -> None:
    """Load a checkpoint into the state: weights, optimizer, scheduler, scaler, RNGs and where the run stood (its
    totals stay this run's: a resume on changed data was allowed by the caller)."""
    now = state.progress
    saved = checkpoint.load_checkpoint(
        folder, state.model, state.optimizer, state.scheduler, state.scaler, state.device
    )
    per_step, size = recipe.micro_batch * recipe.grad_accum, state.world.size
    if saved.ranks != size and console:
        console.print(
            f"[yellow]Resuming on {size} process(es) instead of {saved.ranks}: a step now takes "
            f"{per_step * size} examples instead of {per_step * saved.ranks}, so the run "
            "goes on from the same data position but is not the one it would have been.[/]"
        )
    shape = saved.shape
    if shape.checkpointing:  # as the run last stepped, which an out-of-memory step-down may have changed
        set_checkpointing(state.model, offload=shape.offload, uncheckpointed_layers=shape.uncheckpointed_layers)
    fingerprint = now.fingerprint or saved.fingerprint
    state.progress = replace(
        saved, total_steps=now.total_steps, examples=now.examples, ranks=size, fingerprint=fingerprint
    )


def memory_readings(device: torch.device, world: World) -> dict:
    """This process's memory readings, and with several processes every one's (rank 0 writes them all)."""
    usage = usage_now(device)
    if not world.active:
        return usage
    every_rank = world.gather({k: usage[k] for k in ("mem_reserved_gib", "nvml_used_gib", "rss_gib")})
    return {**usage, "ranks": world.size, "rank_memory": every_rank}


def lr_multiplier(total_steps: int, recipe: Recipe):
    """Linear warmup, then cosine decay towards zero (or constant), as a LambdaLR factor of the step index."""
    warmup = round(recipe.warmup_ratio * total_steps)

    def factor(index: int) -> float:
        if index < warmup:
            return (index + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (index - warmup) / max(1, total_steps - warmup)))

    return factor


def make_optimizer(params, recipe: Recipe, device: torch.device, console: Console | None = None):
    """Paged 8-bit AdamW on CUDA (states page to host RAM under pressure); torch AdamW on CPU unless the recipe
    asks for bitsandbytes' (unpaged) 8-bit AdamW, which runs there too."""
    console = console or Console(quiet=True)
    name, asked = optimizer_in_use(recipe, device.type), recipe.optimizer
    if asked not in ("auto", name) and recipe.parallel == "fsdp_offload":  # offloaded shards step on the CPU
        console.print(
            f"[yellow]{asked} steps on the GPU; with fsdp_offload the shards step in host RAM, so torch AdamW is used.[/]"
        )
    elif asked not in ("auto", name):  # paging needs CUDA's unified memory; 8-bit states do not
        console.print(f"[yellow]{asked} needs CUDA; using torch AdamW with fp32 states on CPU instead.[/]")
    kwargs = dict(lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.999))
    if name == "adamw":
        console.print("Optimizer: torch AdamW (fp32 states)")
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    console.print(f"Optimizer: bitsandbytes {'PagedAdamW8bit' if name == 'paged_adamw_8bit' else 'AdamW8bit'}")
    optimizer_class = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return optimizer_class(params, **kwargs)


def train_model(
    model, examples, recipe: Recipe, hooks: Hooks, *, pad_id: int, dtype: torch.dtype, resume_from: Path | None = None
) -> Outcome:
    """recipe.steps steps of model on examples with no run folder (hooks.checkpoint saves, if anything does): what
    tests and benchmarks train with."""
    progress = TrainerState(StepShape.of(recipe), total_steps=recipe.steps, examples=len(examples))
    device = next(model.parameters()).device
    state = start_loop(model, recipe, progress, device=device, dtype=dtype, resume_from=resume_from)
    return train_loop(state, examples, recipe, hooks, pad_id)
