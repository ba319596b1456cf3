"""Training: check inputs, load the 4-bit model with LoRA, run the loop, write the run directory.

run_training() is what `qlora-kit train` calls; train_loop() is the loop itself, readable top to bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from qlora_kit import adapter, checkpoint, data, distributed, model as models
from qlora_kit.dashboard import Dashboard, MetricsLog, RunInfo, describe_step_down
from qlora_kit.distributed import Ranks
from qlora_kit.errors import UserError
from qlora_kit.hardware import CPU_SHARE, usage_now
from qlora_kit.loss import chunked_cross_entropy, default_chunk_tokens
from qlora_kit.recipes import Recipe, load_recipe, optimizer_in_use
from qlora_kit.sources import describe_source, resolve_model

GIB = 2**30
RUN_FILES = ("recipe.yaml", "plan.json", "metrics.jsonl", "adapter")
MAX_NONFINITE_IN_A_ROW = 5  # skipped NaN/inf steps tolerated before the run stops
FEW_STEPS = 20  # a run of fewer optimizer steps, derived from epochs, is warned about: it will learn little


@dataclass
class RunSummary:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    tokens: int
    trainable_params: int
    total_params: int
    adapter_dir: Path
    adapter_bytes: int
    best_loss: float = math.nan
    peak_memory_gib: float = math.nan  # GPU reserved peak, or process RSS peak on CPU
    padding_pct: float = math.nan  # share of computed positions that were padding, averaged over steps
    stopped_by: int = 0  # the signal (SIGINT, SIGTERM) that stopped the run early, after a checkpoint
    step_downs: list[str] = field(default_factory=list)
    info: RunInfo | None = None
    rank: int = 0  # with several processes, only rank 0 reports


class Stopped(Exception):
    """The loop stopped after a step because a signal asked it to; a checkpoint of that step is written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_training(recipe: Recipe, out_dir: Path, console: Console, display: str = "auto", resume: bool = False,
                 overwrite: bool = False, trust_remote_code: bool = False) -> RunSummary:
    """Validate everything a user can get wrong, then train and write out_dir; nothing is written on bad input.
    With resume, continue exactly from the run's last good checkpoint."""
    ranks = distributed.start()
    out_dir = Path(distributed.from_main(str(out_dir), ranks))  # a default name (runs/auto-N) is rank 0's choice
    if not ranks.main:  # rank 0 speaks and writes for all
        console, display = Console(quiet=True), "quiet"
    resume_from = distributed.on_main(lambda: prepare_out_dir(out_dir, recipe, resume, overwrite, console), ranks)
    if not recipe.model or not recipe.data:
        raise UserError("Both a model and a data file are needed.", hint="Pass --model and --data (or a recipe that names them).")
    loaded = data.read_records(recipe.data, recipe.data_format, recipe.skip_bad_lines)
    eval_records = data.read_records(recipe.eval_data, recipe.data_format).records if recipe.eval_data else []
    device, dtype = models.pick_device_and_dtype(recipe.precision, ranks.local_rank)
    with console.status(f"Preparing {recipe.model} ..."):
        folder = resolve_model(recipe.model)
        tokenizer = models.load_tokenizer(folder, trust_remote_code)
        examples = data.tokenize(loaded.records, tokenizer, recipe.seq_len, recipe.train_on_inputs, recipe.drop_long,
                                 cache_key=data.cache_key(loaded, tokenizer))
        dropped, truncated = len(loaded.records) - len(examples), examples.truncated
        loaded.records = None  # the tokenized table replaces the text for the rest of the run
        eval_examples = data.tokenize(eval_records, tokenizer, recipe.seq_len, recipe.train_on_inputs) if eval_records else []
        if recipe.eval_fraction and not eval_examples:
            examples, eval_examples = data.split_off(examples, recipe.eval_fraction, recipe.seed)
        unpacked = len(examples)
        if recipe.packing:
            examples = data.pack(examples, recipe.seq_len, recipe.seed)
        # Planned at the longest example, since micro-batches are padded only to their longest; before loading, so
        # that a run which cannot fit stops with the plan's reason instead of being killed for memory.
        plan = plan_for_run(folder, replace(recipe, seq_len=max(data.lengths_of(examples))))
        check_fits(plan, device, console)
        torch.manual_seed(recipe.seed)  # LoRA initialisation is part of what the seed fixes
        model = models.attach_lora(models.load_base_4bit(folder, dtype, device, trust_remote_code,
                                                         shardable=ranks.active and recipe.parallel != "ddp"), recipe)
        models.check_logits_path(model, device)
    trainable, total = models.parameter_counts(model)
    origin = describe_source(recipe.model)
    console.print(f"Model: {recipe.model}" + (f" ({origin})" if origin else "")
                  + f" in 4-bit NF4 (double quant), compute {str(dtype).removeprefix('torch.')} on {device.type}")
    console.print(f"Data: {len(examples)} {loaded.format} examples from {recipe.data}"
                  + (f", {len(eval_examples)} held out for evaluation" if eval_examples else ""))
    if truncated:
        console.print(f"[yellow]{truncated} examples longer than {recipe.seq_len} tokens are cut to it "
                      "(--drop-long drops them instead; `qlora-kit data check` shows the lengths).[/]")
    if dropped:
        console.print(f"[yellow]{dropped} examples dropped: " + ("longer than seq_len or " if recipe.drop_long else "") + "nothing left to learn[/]")
    if recipe.packing:
        fill = sum(examples.lengths) / (len(examples) * recipe.seq_len)
        console.print(f"Packing: {unpacked} examples in {len(examples)} sequences of up to {recipe.seq_len} tokens, {fill:.0%} full")
    if loaded.skipped:
        console.print(f"[yellow]Skipped {len(loaded.skipped)} bad examples, the first: {loaded.skipped[0]}[/]")
    console.print(f"Trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), "
                  f"adapter about {trainable * 4 / 2**20:.1f} MiB on disk")
    if ranks.active:
        layout = {"ddp": "Data parallel (DDP)", "fsdp": "Sharded (FSDP)", "fsdp_offload": "Sharded (FSDP, shards in host RAM)"}
        console.print(f"{layout[recipe.parallel]} over {ranks.world} processes: "
                      f"{recipe.micro_batch * recipe.grad_accum} examples "
                      f"each, {recipe.micro_batch * recipe.grad_accum * ranks.world} a step")
    total_steps = count_steps(len(examples), recipe, ranks.world)
    if not recipe.steps and total_steps < FEW_STEPS:
        epochs = f"{recipe.epochs:g} epoch{'s' * (recipe.epochs != 1)}"
        console.print(f"[yellow]Only {total_steps} optimizer step{'s' * (total_steps > 1)}: {epochs} of {len(examples)} "
                      f"examples at {recipe.micro_batch * recipe.grad_accum * ranks.world} a step. An adapter learns "
                      "little from so few; add examples, or pass --epochs or --steps.[/]")
    if plan["faster"]:  # memory this run leaves unused could make every step cheaper
        console.print(f"[dim]Room to go faster: {plan['faster']}.[/]")

    def start_run_folder() -> list[dict]:
        check_free_disk(out_dir, trainable, recipe, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(recipe.to_yaml())
        (out_dir / "plan.json").write_text(json.dumps(plan, indent=2))
        done = checkpoint.step_of(resume_from) if resume_from else 0
        return metrics_up_to(out_dir / "metrics.jsonl", done)  # earlier steps of a resumed run

    history = distributed.on_main(start_run_folder, ranks)
    metrics = MetricsLog(out_dir / "metrics.jsonl" if ranks.main else None)
    losses, tokens = [m["loss"] for m in history], sum(m["tokens"] for m in history)
    peaks = [m["mem_reserved_gib" if device.type == "cuda" else "rss_gib"] for m in history]
    paddings, step_downs, stopped = [m["padding_pct"] for m in history], [], None
    evals = [m["eval_loss"] for m in history if "eval_loss" in m]
    # A resumed run's clock goes on from its last recorded step, so time_s and tokens/s cover the whole run.
    start = time.perf_counter() - (history[-1]["time_s"] if history else 0.0)
    base_id = adapter.portable_base_id(recipe.model, folder)
    resume_hint = f"qlora-kit train --out {out_dir} --resume" + (f" --gpus {ranks.world}" if ranks.active else "")
    info = RunInfo(out_dir.name, recipe.model, device.type, total_steps, plan["target"]["capacity_bytes"] / GIB,
                   plan["plan"]["total_bytes"] / GIB)
    with Dashboard(console, info, display) as dashboard, StopOnSignal(dashboard) as signals:
        if resume_from:
            dashboard.note(f"Resuming from {resume_from.name}: steps 1-{len(history)} are done.")

        def on_step(m: dict) -> None:
            nonlocal tokens
            m["time_s"] = time.perf_counter() - start
            if "eval_loss" in m:
                evals.append(m["eval_loss"])
            losses.append(m["loss"])
            tokens += m["tokens"]
            peaks.append(m["mem_reserved_gib"] if device.type == "cuda" else m["rss_gib"])
            paddings.append(m["padding_pct"])
            metrics.write(m)
            dashboard.step(m)

        def on_event(event: dict) -> None:
            step_downs.append(describe_step_down(event))
            metrics.write(event)
            dashboard.note(f"Out of memory at step {event['step']}: {step_downs[-1]}; redoing the step.")

        def save(step: int, optimizer, scheduler, scaler, trainer_state: dict) -> None:
            lora, optimizer_state = checkpoint.gather_trainable(model), checkpoint.gather_optimizer(model, optimizer)
            if not ranks.main:  # every rank helps gather (FSDP shards); rank 0 writes
                return
            try:
                checkpoint.save_checkpoint(
                    out_dir, step, lambda where: adapter.save_adapter(model, tokenizer, where, base_id, state_dict=lora),
                    optimizer_state, scheduler, scaler, trainer_state, recipe.keep_checkpoints)
            except OSError as e:
                previous = checkpoint.complete_checkpoints(out_dir)
                kept = f"The checkpoint {previous[0]} is intact. " if previous else ""
                raise UserError(f"Could not write the checkpoint of step {step}: {e.strerror or e}.",
                                hint=f"{kept}Free disk space or fix the folder, then resume: {resume_hint}") from None
            dashboard.checkpoint(step)

        try:
            train_loop(model, examples, recipe, total_steps, tokenizer.pad_token_id, device, dtype, on_step, console,
                       on_event, save=save, resume_from=resume_from, stop_requested=lambda: signals.received, ranks=ranks,
                       eval_examples=eval_examples)
        except (Stopped, UserError) as stop:
            stopped = stop  # keep what was learned: the adapter of the last finished step is saved below
        except KeyboardInterrupt:  # the second Ctrl-C: no more writing, the checkpoints on disk are whole
            dashboard.stop()  # the message below goes under the last frame, not above a frame drawn again
            last = checkpoint.complete_checkpoints(out_dir)
            console.print("[bold red]Stopped at once.[/] " + (f"Resume from {last[0].name} with: {resume_hint}" if last else
                                                                "No checkpoint was written yet."))
            raise
        finally:
            metrics.close()
    if not losses:
        if isinstance(stopped, UserError):
            raise stopped
        raise UserError("Stopped before the first step finished; no adapter was written.", hint="Run again.")
    adapter_dir = out_dir / "adapter"
    facts = dict(steps=len(losses), first_loss=losses[0], last_loss=losses[-1], examples=len(examples), format=loaded.format,
                 eval_loss=evals[-1] if evals else None,
                 peak_memory_gib=max(peaks), memory_kind="GPU reserved" if device.type == "cuda" else "process RSS",
                 trainable_params=trainable, precision=str(dtype).removeprefix("torch."))
    if isinstance(stopped, UserError) and ranks.active:
        raise stopped  # other ranks may not be in step to gather the weights; the last checkpoint holds them
    lora = checkpoint.gather_trainable(model)
    try:
        adapter_bytes = (adapter.save_adapter(model, tokenizer, adapter_dir, base_id, adapter.adapter_card(recipe, base_id, facts),
                                              state_dict=lora) if ranks.main else 0)
    except OSError as e:
        if isinstance(stopped, UserError):
            raise stopped from None
        raise UserError(f"Could not write the adapter to {adapter_dir}: {e.strerror or e}.",
                        hint="The last checkpoint holds the same weights; free space and run "
                             f"`{resume_hint}` to write it.") from None
    if isinstance(stopped, UserError):
        raise UserError(stopped.message, hint=f"The adapter of step {len(losses)} is saved in {adapter_dir}. {stopped.hint}")
    if isinstance(stopped, Stopped):
        console.print(f"Stopped by {stopped}: step {len(losses)} is checkpointed and its adapter is in {adapter_dir}.\n"
                      f"Resume with: {resume_hint}")
    distributed.finish(ranks)
    return RunSummary(len(losses), losses[0], losses[-1], time.perf_counter() - start, tokens, trainable, total,
                      adapter_dir, adapter_bytes, best_loss=min(losses), peak_memory_gib=max(peaks),
                      padding_pct=sum(paddings) / len(paddings),
                      stopped_by=stopped.signum if isinstance(stopped, Stopped) else 0, step_downs=step_downs, info=info,
                      rank=ranks.rank)


class StopOnSignal:
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, with a
    checkpoint; a second one stops at once (checkpoints are written atomically, so the last one stays whole)."""

    def __init__(self, dashboard: Dashboard):
        self.dashboard, self.received, self.previous = dashboard, None, {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals to the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.dashboard.note(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                            "(Ctrl-C again to stop at once).")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def prepare_out_dir(out_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, console: Console) -> Path | None:
    """Check the run folder: a new run needs it free of runs (or --overwrite); --resume needs a run with a good
    checkpoint and the same settings. Returns the checkpoint to resume from."""
    if out_dir.is_file():
        raise UserError(f"{out_dir} is a file, not a run folder.", hint="Choose another --out.")
    holds_run = out_dir.is_dir() and any((out_dir / name).exists() for name in (*RUN_FILES, "checkpoints"))
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other.", hint="Pass one of them.")
    if not resume:
        if holds_run and not overwrite:
            raise UserError(f"{out_dir} already holds a run.",
                            hint="Continue it with --resume, start it again with --overwrite, or choose another --out.")
        if holds_run:
            for name in (*RUN_FILES, "checkpoints"):
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        remove_staging_leftovers(out_dir)
        return None
    if not holds_run or not (out_dir / "recipe.yaml").is_file():
        raise UserError(f"{out_dir} holds no run to resume.", hint="Drop --resume to start a new run there.")
    saved = load_recipe(out_dir / "recipe.yaml")
    changed = [f"{name} ({getattr(saved, name)!r} in the run, {getattr(recipe, name)!r} now)"
               for name in recipe.__dataclass_fields__ if getattr(saved, name) != getattr(recipe, name)]
    if changed:
        raise UserError(f"A resumed run keeps its settings, but these differ: {', '.join(changed)}.",
                        hint="Resume with only --out and --resume, or start a new run.")
    found, passed_over = checkpoint.latest_good_checkpoint(out_dir)
    for sentence in passed_over:
        console.print(f"[yellow]Checkpoint {sentence}; falling back to an earlier one.[/]")
    if found is None:
        raise UserError(f"{out_dir} has no complete checkpoint to resume from.",
                        hint="Start again with --overwrite (set checkpoint_every so a long run can resume).")
    for newer in checkpoint.complete_checkpoints(out_dir):  # damaged ones after the resume point would be redone
        if checkpoint.step_of(newer) > checkpoint.step_of(found):
            shutil.rmtree(newer)
    remove_staging_leftovers(out_dir)
    return found


def remove_staging_leftovers(out_dir: Path) -> None:
    """Delete the staging folders (.adapter.partial-*, checkpoints/.step-N.partial-*) of writes a killed run never
    finished: whole ones are renamed into place, so these are never read, only left taking disk space."""
    for leftover in [*out_dir.glob(".*.partial-*"), *(out_dir / "checkpoints").glob(".*.partial-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def metrics_up_to(path: Path, step: int) -> list[dict]:
    """Keep metrics.jsonl's lines up to `step` (those after it are redone by a resumed run); returns its step lines."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [m for m in kept if m.get("step", 0) <= step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    return [m for m in kept if "loss" in m]


def check_free_disk(out_dir: Path, trainable: int, recipe: Recipe, device: torch.device) -> None:
    """Refuse to start a run whose checkpoints and adapter would not fit on the disk."""
    optimizer = optimizer_in_use(recipe, device.type)
    needed = checkpoint.checkpoint_bytes(trainable, optimizer) * (recipe.keep_checkpoints + 1) + trainable * 4 + 64 * 2**20
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"The disk holding {existing} has {free / 2**20:,.0f} MiB free; this run's checkpoints and "
                        f"adapter need about {needed / 2**20:,.0f} MiB.",
                        hint="Free space, choose another --out, or keep fewer checkpoints (keep_checkpoints).")


def plan_for_run(folder: Path, recipe: Recipe) -> dict:
    """The memory estimate for this run on this machine's GPU (or RAM), kept to compare with what it used."""
    from qlora_kit.hardware import probe
    from qlora_kit.plan import choose_target, make_plan

    return make_plan(str(folder), recipe, choose_target(hardware=probe(check_bnb=False))).to_dict()


def check_fits(plan: dict, device: torch.device, console: Console) -> None:
    """Stop a CPU run that its plan says cannot fit in free RAM: nothing steps down there, the system kills the
    process. On a GPU, out-of-memory errors step the run down, so a plan that does not fit is only a warning."""
    if plan["plan"]["verdict"] != "does not fit":
        return
    planned, capacity, fix = plan["plan"]["total_bytes"] / GIB, plan["target"]["capacity_bytes"] / GIB, plan["fix"]
    shape = f"micro-batch {plan['plan']['micro_batch']} x {plan['plan']['seq_len']} tokens"
    if device.type == "cpu":
        raise UserError(f"This run needs about {planned:.1f} GiB of RAM ({shape}), and {capacity:.1f} GiB is free.",
                        hint=f"To make it fit: {fix}. `qlora-kit plan` shows where the memory goes.")
    console.print(f"[yellow]The plan says this run does not fit {plan['target']['name']} ({planned:.1f} of {capacity:.1f} GiB, "
                  f"{shape}); it will step down when it runs out of memory. To make it fit: {fix}.[/]")


def named_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """root/name for a plain run name; a name with a path in it (../x, /x, a/b) could write outside root, so it is refused."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise UserError(f"The run name {name!r} is not a plain name.",
                        hint="Use letters, digits, '.', '_' and '-' (starting with a letter or digit), or pass --out.")
    return root / name


def next_free_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3 ... so repeated runs never overwrite an earlier one."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


@dataclass
class StepShape:
    """How a step's examples are split and bounded; out-of-memory step-downs change it, never the examples drawn."""

    micro_batch: int
    seq_len: int
    checkpointing: bool
    offload: bool
    uncheckpointed_layers: int = 0  # with checkpointing: the last layers that keep their activations


def train_loop(model, examples, recipe: Recipe, total_steps: int, pad_id: int, device, dtype, on_step, console,
               on_event=lambda event: None, save=None, resume_from: Path | None = None, stop_requested=lambda: None,
               ranks: Ranks = Ranks(), eval_examples=()) -> None:
    """Optimizer steps of micro_batch x grad_accum examples per rank; calls on_step(metrics) after each step and
    save(step, optimizer, scheduler, scaler, trainer_state) every checkpoint_every steps, at the end and when
    stop_requested() names a signal (then raises Stopped). Starts after resume_from's step when given. Evaluates
    eval_examples every eval_every steps and after the last."""
    # Wrapped first: FSDP replaces the parameters with sharded ones, which are what the optimizer must hold.
    loss_module = distributed.wrap(CausalLMLoss(model, recipe), ranks, device, recipe.parallel, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe, device, console)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(total_steps, recipe))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    state = {"step": 0, "position": 0, "nonfinite_in_a_row": 0, "nonfinite_steps": 0,
             "shape": StepShape(recipe.micro_batch, recipe.seq_len, recipe.gradient_checkpointing, recipe.activation_offload,
                                recipe.uncheckpointed_layers if recipe.gradient_checkpointing else 0).__dict__}
    if resume_from:
        state = resume(resume_from, model, optimizer, scheduler, scaler, device, recipe, len(examples), total_steps, ranks, console)
    shape, per_step = StepShape(**state["shape"]), recipe.micro_batch * recipe.grad_accum  # per rank
    position = state["position"]  # examples drawn so far, by every rank together
    stream = data.example_stream(examples, recipe.seed, per_step * ranks.world, recipe.group_by_length and not recipe.packing,
                                 start=position)
    model.train()
    for step in range(state["step"] + 1, total_steps + 1):
        CPU_SHARE.use_free_cores(device)  # as many threads as other programs leave cores free: none waits descheduled
        started = time.perf_counter()
        drawn = [next(stream) for _ in range(per_step * ranks.world)]  # every rank draws alike, then takes its share
        position += len(drawn)
        epoch, step_examples = drawn[-1][0], [example for _, example in drawn[ranks.rank::ranks.world]]
        while True:
            try:
                step_loss, step_tokens, padding = forward_backward(loss_module, step_examples, shape, pad_id, device,
                                                                   scaler, recipe, ranks)
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)  # the half-done step is redone from scratch
                before, shape = shape, step_down(shape, model, device, ranks)
                on_event({"event": "out_of_memory_step_down", "step": step, "from": before.__dict__, "to": shape.__dict__})
        grad_norm, finite = apply_update(params, optimizer, scheduler, scaler, recipe, step_loss)
        count_nonfinite(state, finite, step)
        lr, seconds = scheduler.get_last_lr()[0], time.perf_counter() - started
        scheduler.step()
        evaluated = {}
        if eval_examples and (step == total_steps or (recipe.eval_every and step % recipe.eval_every == 0)):
            evaluated["eval_loss"] = evaluate(model, eval_examples, recipe, pad_id, device, loss_module)
        on_step({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                 "step_s": seconds, "tokens_per_s": step_tokens / seconds, "padding_pct": padding, "micro_batch": shape.micro_batch,
                 "grad_accum": -(-per_step // shape.micro_batch), "seq_len": shape.seq_len, **memory_readings(device, ranks),
                 **evaluated, **({} if finite else {"skipped_update": True, "nonfinite_steps": state["nonfinite_steps"]})})
        signum = distributed.largest(stop_requested() or 0, ranks)  # all ranks stop after the same step
        if save and (signum or step == total_steps or (recipe.checkpoint_every and step % recipe.checkpoint_every == 0)):
            state.update(step=step, position=position, shape=dict(shape.__dict__), total_steps=total_steps, examples=len(examples), ranks=ranks.world,
                         recipe=dataclasses.asdict(recipe))
            save(step, optimizer, scheduler, scaler, state)
        if signum:
            raise Stopped(signum)


def apply_update(params, optimizer, scheduler, scaler, recipe: Recipe, step_loss: float) -> tuple[float, bool]:
    """Clip and apply the accumulated gradient unless the loss or gradient is NaN/inf; returns (grad norm, applied)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or math.inf)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    # fp16's scaler skips overflowing steps itself; otherwise a NaN/inf loss or gradient must never reach the weights.
    finite = math.isfinite(step_loss) and (scaler.is_enabled() or math.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def count_nonfinite(state: dict, finite: bool, step: int) -> None:
    """Count skipped updates; several in a row stop the run (the weights are still those of the last good step)."""
    state["nonfinite_in_a_row"] = 0 if finite else state["nonfinite_in_a_row"] + 1
    state["nonfinite_steps"] += not finite
    if state["nonfinite_in_a_row"] >= MAX_NONFINITE_IN_A_ROW:
        raise UserError(f"The loss or gradient was NaN or infinite for {MAX_NONFINITE_IN_A_ROW} steps in a row (up to "
                        f"step {step}); those updates were skipped, so the weights are from step {step - MAX_NONFINITE_IN_A_ROW}.",
                        hint="Lower --lr, train in bf16 or fp32 (--precision), or look for broken examples with `qlora-kit data check`.")


def memory_readings(device, ranks: Ranks) -> dict:
    """This rank's memory readings, and with several ranks every rank's (rank 0 writes them all)."""
    usage = usage_now(device)
    if not ranks.active:
        return usage
    every_rank = distributed.gather({k: usage[k] for k in ("mem_reserved_gib", "nvml_used_gib", "rss_gib")}, ranks)
    return {**usage, "ranks": ranks.world, "rank_memory": every_rank}


def resume(folder: Path, model, optimizer, scheduler, scaler, device, recipe: Recipe, n_examples: int, total_steps: int,
           ranks: Ranks, console) -> dict:
    """Load a checkpoint into the model and training state; returns its trainer_state (step, position, shape)."""
    state = checkpoint.load_checkpoint(folder, model, optimizer, scheduler, scaler, device)
    check_same_data(state, n_examples, total_steps)
    per_step, saved_ranks = recipe.micro_batch * recipe.grad_accum, state.get("ranks", 1)
    if saved_ranks != ranks.world:
        console.print(f"[yellow]Resuming on {ranks.world} process(es) instead of {saved_ranks}: a step now takes "
                      f"{per_step * ranks.world} examples instead of {per_step * saved_ranks}, so the run "
                      "goes on from the same data position but is not the one it would have been.[/]")
    shape = StepShape(**state["shape"])
    if shape.checkpointing:  # as the run last stepped, which an out-of-memory step-down may have changed
        models.set_checkpointing(model, offload=shape.offload and device.type == "cuda", uncheckpointed_layers=shape.uncheckpointed_layers)
    return state


def check_same_data(state: dict, n_examples: int, total_steps: int) -> None:
    """A resumed run must draw from the same examples, or it would not continue the same run."""
    if state.get("examples") != n_examples or state.get("total_steps") != total_steps:
        raise UserError(f"The data changed since the checkpoint: it had {state.get('examples')} examples and "
                        f"{state.get('total_steps')} steps, now {n_examples} and {total_steps}.",
                        hint="Resume with the data the run started with, or start a new run.")


def forward_backward(loss_module, examples, shape: StepShape, pad_id: int, device, scaler, recipe: Recipe,
                     ranks: Ranks = Ranks()) -> tuple[float, int, float]:
    """Accumulate gradients of this rank's share of a step in micro-batches; returns the step's (mean token loss,
    tokens, % padding) over all ranks."""
    # Similar lengths share a micro-batch, so little is padded; the step's examples (and gradient) are the same.
    examples = sorted(data.truncate(examples, shape.seq_len), key=len)
    # Normalise by the whole step's labelled tokens (every rank's), not per micro-batch, so any split gives the same
    # gradient; DistributedDataParallel averages over ranks, so each rank's share is scaled back up by the world size.
    n_targets = distributed.total(data.learned_tokens(examples), ranks)
    starts = range(0, len(examples), shape.micro_batch)
    step_loss, step_tokens, slots = 0.0, 0, 0
    for start in starts:
        # With DDP, gradients are all-reduced once per step: on the last micro-batch's backward.
        syncing = start == starts[-1] or not hasattr(loss_module, "no_sync")
        with contextlib.nullcontext() if syncing else loss_module.no_sync():
            loss_sum, _, attention_mask = loss_module(examples[start:start + shape.micro_batch], pad_id, device)
            loss = loss_sum / n_targets
            scaler.scale(loss * ranks.world).backward()
        slots += attention_mask.numel()
        step_loss += loss.item()
        step_tokens += int(attention_mask.sum())
    step_loss, step_tokens, slots = (distributed.total(x, ranks) for x in (step_loss, step_tokens, slots))
    return step_loss, int(step_tokens), 100 * (1 - step_tokens / max(slots, 1))


class CausalLMLoss(torch.nn.Module):
    """A micro-batch's summed token loss as one module (decoder, then the chunked loss against the head), so that
    DistributedDataParallel can wrap all a step computes. Returns (loss sum, labelled tokens, attention mask)."""

    def __init__(self, model, recipe: Recipe):
        super().__init__()
        self.model = model
        self.chunk_tokens = recipe.loss_chunk_tokens or default_chunk_tokens(models.lm_parts(model)[1].shape[0])

    def forward(self, examples, pad_id: int, device):
        decoder, head_weight, softcap = models.lm_parts(self.model)
        hidden, labels, attention_mask = forward(decoder, examples, pad_id, device)
        loss_sum, count = chunked_cross_entropy(hidden, head_weight, labels, chunk_tokens=self.chunk_tokens, softcap=softcap)
        return loss_sum, count, attention_mask


def forward(decoder, examples, pad_id: int, device):
    """Final hidden states of a micro-batch, with its labels on the device and its attention mask."""
    input_ids, attention_mask, labels, position_ids = data.collate(examples, pad_id)
    if position_ids is not None:  # packed: restarting positions give a block-diagonal mask, so no 2D mask is passed
        position_ids, mask = position_ids.to(device), None
    else:  # no mask at all when nothing is padded lets SDPA take its fast path
        mask = None if attention_mask.all() else attention_mask.to(device)
    # use_cache=False also matters for packing: transformers only reads segments from position_ids without a cache.
    hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden, labels.to(device), attention_mask


def step_down(shape: StepShape, model, device: torch.device, ranks: Ranks = Ranks()) -> StepShape:
    """The next cheaper way to run a step: recompute every layer, halve the micro-batch (accumulation grows to keep the
    effective batch), checkpoint with activations offloaded to host RAM, halve sequences; UserError when nothing is left."""
    if ranks.active:  # the other ranks are waiting in a collective for this one: no redo in step
        raise UserError(f"Out of memory on rank {ranks.rank}.",
                        hint="Lower --micro-batch or --seq-len; `qlora-kit plan --gpus N` shows what fits.")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if shape.checkpointing and shape.uncheckpointed_layers:  # costs speed only, so it goes first
        models.set_checkpointing(model, offload=shape.offload and device.type == "cuda")
        return replace(shape, uncheckpointed_layers=0)
    if shape.micro_batch > 1:
        return replace(shape, micro_batch=shape.micro_batch // 2)
    if not (shape.checkpointing and (shape.offload or device.type != "cuda")):
        models.set_checkpointing(model, offload=device.type == "cuda")
        return replace(shape, checkpointing=True, offload=device.type == "cuda")
    if shape.seq_len > 64:
        return replace(shape, seq_len=shape.seq_len // 2)
    raise UserError("Out of memory even at micro-batch 1, 64-token sequences, with activations offloaded.",
                    hint="Use a smaller model or a larger card; `qlora-kit plan` shows what fits.")


def evaluate(model, examples, recipe: Recipe, pad_id: int, device, loss_module=None) -> float:
    """Mean token loss on held-out examples, without gradients or dropout; through the training loss_module when
    given (under FSDP only it gathers the sharded weights)."""
    loss_module, total, count = loss_module or CausalLMLoss(model, recipe), 0.0, 0
    with models.no_dropout(model), torch.no_grad():
        for start in range(0, len(examples), recipe.micro_batch):
            CPU_SHARE.use_free_cores(device)
            loss_sum, n, _ = loss_module(examples[start:start + recipe.micro_batch], pad_id, device)
            total, count = total + loss_sum.item(), count + n
    return total / max(count, 1)


def count_steps(n_examples: int, recipe: Recipe, world: int = 1) -> int:
    """Optimizer steps: recipe.steps, else enough for recipe.epochs passes over the data (world ranks share a step)."""
    if recipe.steps:
        return recipe.steps
    return max(1, math.ceil(recipe.epochs * n_examples / (recipe.micro_batch * recipe.grad_accum * world)))


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


def make_optimizer(params, recipe: Recipe, device: torch.device, console: Console):
    """Paged 8-bit AdamW on CUDA (states page to host RAM under pressure); torch AdamW on CPU unless the recipe
    asks for bitsandbytes' (unpaged) 8-bit AdamW, which runs there too."""
    name, asked = optimizer_in_use(recipe, device.type), recipe.optimizer
    if asked not in ("auto", name) and recipe.parallel == "fsdp_offload":  # offloaded shards step on the CPU
        console.print(f"[yellow]{asked} steps on the GPU; with fsdp_offload the shards step in host RAM, so torch AdamW is used.[/]")
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
