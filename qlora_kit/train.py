"""Training: a run, in the order it happens, and the loop at its heart.

run_training() is what `train` and `auto` call. It reads top to bottom as the steps of a run: the run folder,
the data, the plan, the model, the loop (with dashboard, checkpoints and signals), the adapter; one function each.
train_loop() is the loop itself; loss.py holds what a micro-batch costs, run_folder.py what lands on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qlora_kit import adapter, checkpoint, data, distributed
from qlora_kit.checkpoint import TrainerState
from qlora_kit.dashboard import Dashboard, MetricsLog, RunInfo, describe_step_down, printable, shown_path
from qlora_kit.distributed import Ranks
from qlora_kit.errors import UserError
from qlora_kit.hardware import CPU_SHARE, cap_gpu_memory, probe, usage_now
from qlora_kit.loss import CausalLMLoss, evaluate_with_stats
from qlora_kit.model import (
    attach_lora,
    check_logits_path,
    load_base_4bit,
    load_tokenizer,
    parameter_counts,
    pick_device_and_dtype,
    set_checkpointing,
    settings_from_adapter,
)
from qlora_kit.plan import (
    StepShape,
    cheaper,
    check_positive,
    choose_target,
    describe_reference,
    make_plan,
    reference_forwards,
)
from qlora_kit.preference import PreferenceLoss, check_method_fits_data, reference_log_probs
from qlora_kit.recipes import Recipe, optimizer_in_use
from qlora_kit.run_folder import (
    REFERENCE_FILE,
    RunFolder,
    absolute_paths,
    check_fingerprint,
    check_free_disk,
    check_same_settings,
    fingerprint,
    open_run_folder,
)
from qlora_kit.sources import describe_source, model_identity, read_model_config, resolve_model
from qlora_kit.trackers import Trackers, recorded_trackers
from qlora_kit.units import GIB

MAX_NONFINITE_IN_A_ROW = 5  # skipped NaN/inf steps tolerated before the run stops
FEW_STEPS = 20  # a run of fewer optimizer steps, derived from epochs, is warned about: it will learn little
FOLDER_GONE_HINT = "Nothing more is written there. Start the run again, or resume a copy of the folder if you moved it."


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
    skipped_updates: int = 0  # steps whose loss or gradient was NaN/inf, so their update was not applied
    rewards: dict = field(default_factory=dict)  # a preference run's last reward figures, as metrics.jsonl names them
    info: RunInfo | None = None
    rank: int = 0  # with several processes, only rank 0 reports


class Stopped(Exception):
    """The loop stopped after a step because a signal asked it to; a checkpoint of that step is written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class TrainingData:
    """The examples a run trains and evaluates on, and what reading them dropped, cut or packed."""

    examples: object  # data.TokenizedExamples, or a list of packed Examples
    eval_examples: object
    format: str
    dropped: int = 0  # too long (with drop_long) or nothing to learn
    truncated: int = 0
    unpacked: int = 0  # examples before packing
    skipped: list = field(default_factory=list)  # bad lines, with skip_bad_lines


@dataclass
class Run:
    """All a run trains with, made once by run_training's setup steps and read by the loop and the finish."""

    folder: RunFolder
    recipe: Recipe
    training: TrainingData
    plan: dict
    model: object
    tokenizer: object
    base_id: str  # the base model as the adapter names it
    base: dict  # the base's identity (sources.model_identity), kept beside the adapter so its users can check it
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks
    total_steps: int
    trained_on: dict  # run_folder.fingerprint of the data and base model
    report_to: list = field(default_factory=list)  # trackers.TRACKERS the steps also go to


@dataclass
class RunRecord:
    """What the run has done, fed by the loop: each step's line goes to metrics.jsonl, the dashboard and the figures
    the summary and adapter card report. A resumed run's record starts from its earlier steps' lines."""

    device_type: str
    metrics: MetricsLog
    dashboard: Dashboard | None = None
    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    peaks_gib: list[float] = field(default_factory=list)
    paddings: list[float] = field(default_factory=list)
    tokens: int = 0
    skipped_updates: int = 0
    step_downs: list[str] = field(default_factory=list)
    rewards: dict = field(default_factory=dict)  # a preference run's last reward figures (and its last eval's)
    started: float = field(default_factory=time.perf_counter)
    trackers: Trackers | None = None  # --report-to

    def add(self, m: dict) -> None:
        """Count one step's line (a new one or, when resuming, an earlier one)."""
        self.losses.append(m["loss"])
        self.eval_losses += [m["eval_loss"]] if "eval_loss" in m else []
        self.peaks_gib.append(m["mem_reserved_gib" if self.device_type == "cuda" else "rss_gib"])
        self.paddings.append(m["padding_pct"])
        self.tokens += m["tokens"]
        self.skipped_updates += bool(m.get("skipped_update"))
        self.rewards.update({k: v for k, v in m.items() if k.startswith(("reward_", "eval_reward_"))})
        self.started = time.perf_counter() - m["time_s"]  # the clock goes on from the run's last recorded step

    def step(self, m: dict) -> None:
        m["time_s"] = time.perf_counter() - self.started
        self.add(m)
        self.write(m)
        if self.trackers:
            self.trackers.log(m)
        self.dashboard.step(m)

    def step_down(self, event: dict) -> None:
        self.step_downs.append(describe_step_down(event))
        self.write(event)
        self.dashboard.note(f"Out of memory at step {event['step']}: {self.step_downs[-1]}; redoing the step.")

    def write(self, line: dict) -> None:
        try:
            self.metrics.write(line)
        except OSError as e:  # a full disk: the checkpoints hold the run; a resume drops the torn line
            raise UserError(
                f"Could not write metrics.jsonl: {e.strerror or e}.",
                hint="Free disk space, then resume the run with --resume.",
            ) from None


def run_training(
    recipe: Recipe,
    out_dir: Path,
    console: Console,
    display: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    plan: dict | None = None,
    allow_changed_data: bool = False,
    force: bool = False,
    vram_limit: float | None = None,
    report_to: list[str] | None = None,
) -> RunSummary:
    """Validate everything a user can get wrong, then train and write out_dir; nothing is written on bad input.
    With resume, continue exactly from the run's last good checkpoint. plan: the plan that chose the settings
    (auto's), written as the run's plan.json; without it the run plans for this machine itself, capped at
    vram_limit GB of its GPU when given. force: start a CPU run its plan says cannot fit. report_to: trackers the
    steps also go to (a resume without it goes on with those the run used)."""
    if vram_limit is not None:
        check_vram_limit(vram_limit)
    recipe = settings_from_adapter(recipe)  # before recipe.yaml is written: it records what the adapter fixed
    recipe = absolute_paths(recipe)  # so that export, generate or a resume run from another folder find the same files
    ranks = distributed.start()
    out_dir = Path(distributed.from_main(str(out_dir), ranks))  # a default name (runs/auto-N) is rank 0's choice
    if not ranks.main:  # rank 0 speaks and writes for all
        console, display = Console(quiet=True), "quiet"
    out = distributed.on_main(lambda: open_run_folder(out_dir, recipe, resume, overwrite, console), ranks)
    if not ranks.main:
        out.lock_fd = None  # the lock is rank 0's
    try:
        loaded, held_out = _read_data(recipe)
        pick_device_and_dtype(recipe.precision, ranks.local_rank)  # a precision this machine lacks, said at once
        # Before the status line: a download shows its own progress (one live display at a time); rank 0 fetches.
        folder = distributed.on_main(lambda: resolve_model(recipe.model, trust_remote_code, console), ranks)
        device, dtype = pick_device_and_dtype(recipe.precision, ranks.local_rank, read_model_config(folder))
        with console.status(f"Preparing {recipe.model} ..."):
            if recipe.init_adapter:
                note = adapter.check_adapter_on_base(Path(recipe.init_adapter), folder, chosen=True)
                if note:
                    console.print(f"[yellow]{escape(note)}[/]", highlight=False)
            base = model_identity(folder, recipe.model)
            tokenizer = load_tokenizer(folder, trust_remote_code, recipe.chat_template_kwargs)
            training = _setup_data(recipe, loaded, held_out, tokenizer)
            total_steps = count_steps(len(training.examples), recipe, ranks.world)
            trained_on = fingerprint([loaded.path, held_out and held_out.path], folder)  # a hub dataset's file
            if out.resume_from:
                _check_resume_point(out, recipe, training, total_steps, trained_on, allow_changed_data)
            plan = _setup_plan(plan, out, folder, recipe, training, total_steps, ranks, vram_limit)
            check_fits(plan, device, console, force)
            if device.type == "cuda" and (cap := cap_gpu_memory(plan["target"]["capacity_bytes"], device)):
                console.print(
                    f"GPU memory: torch is held to {cap / GIB:.1f} GiB, the plan's {plan['target']['name']} "
                    "less the CUDA context; past it the run steps down."
                )
            model = _setup_model(folder, recipe, dtype, device, ranks, trust_remote_code)
        setup = Run(
            out,
            recipe,
            training,
            plan,
            model,
            tokenizer,
            adapter.portable_base_id(recipe.model, folder),
            base,
            device,
            dtype,
            ranks,
            total_steps,
            trained_on,
            report_to=report_to or (recorded_trackers(out.path) if out.resume_from else []),
        )
        _report_setup(setup, console)
        record, stopped = _fit(setup, console, display)
        return _finish(setup, record, stopped, console)
    finally:
        out.close()


def _read_data(recipe: Recipe) -> tuple[data.Records, data.Records | None]:
    """The training data and the held-out data file, read and checked before anything slow; the model and data must
    both be named."""
    if not recipe.model or not recipe.data:
        raise UserError(
            "Both a model and a data file are needed.", hint="Pass --model and --data (or a recipe that names them)."
        )
    loaded = data.read_records(
        recipe.data, recipe.data_format, recipe.skip_bad_lines, split=recipe.data_split, config=recipe.data_config
    )
    held_out = (
        data.read_records(
            recipe.eval_data, recipe.data_format, flag="--eval-data", split="test", config=recipe.data_config
        )
        if recipe.eval_data
        else None
    )
    return loaded, held_out


def _setup_data(recipe: Recipe, loaded: data.Records, held_out: data.Records | None, tokenizer) -> TrainingData:
    """Tokenize, split off held-out examples (unless a held-out file is given) and pack, as the recipe says."""
    check_method_fits_data(recipe, loaded.format)
    examples = data.tokenize(
        loaded.records,
        tokenizer,
        recipe.seq_len,
        recipe.train_on_inputs,
        recipe.drop_long,
        cache_key=data.cache_key(loaded, tokenizer),
    )
    dropped, truncated = len(loaded.records) - len(examples), examples.truncated
    examples, cut_alike = data.pairs_that_differ(examples, loaded, recipe.skip_bad_lines)
    loaded.records = None  # the tokenized table replaces the text for the rest of the run
    eval_examples = []
    if held_out:
        eval_examples = data.tokenize(held_out.records, tokenizer, recipe.seq_len, recipe.train_on_inputs)
        eval_examples, _ = data.pairs_that_differ(eval_examples, held_out, recipe.skip_bad_lines)
    if recipe.eval_fraction and not eval_examples:
        examples, eval_examples = data.split_off(examples, recipe.eval_fraction, recipe.seed)
    unpacked = len(examples)
    if recipe.packing:
        examples = data.pack(examples, recipe.seq_len, recipe.seed)
    return TrainingData(
        examples, eval_examples, loaded.format, dropped, truncated, unpacked, loaded.skipped + cut_alike
    )


def _check_resume_point(
    run: RunFolder, recipe: Recipe, training: TrainingData, total_steps: int, trained_on: dict, allow_changed_data: bool
) -> None:
    """A resumed run must go on with the base model and data it was trained on, or it would not be the same run."""
    saved = TrainerState.from_json((run.resume_from / "trainer_state.json").read_text())
    if saved.recipe:  # recipe.yaml edited since: the weights were trained with what the checkpoint says
        fields = {f.name for f in dataclasses.fields(Recipe)}
        check_same_settings(Recipe(**{k: v for k, v in saved.recipe.items() if k in fields}), recipe, "the checkpoint")
    check_fingerprint(saved.fingerprint, trained_on, allow_changed_data)
    if (saved.examples, saved.total_steps) != (len(training.examples), total_steps) and not allow_changed_data:
        raise UserError(
            f"The data changed since the checkpoint: it had {saved.examples} examples and "
            f"{saved.total_steps} steps, now {len(training.examples)} and {total_steps}.",
            hint="Resume with the data the run started with, or start a new run.",
        )


def _setup_plan(
    plan: dict | None,
    run: RunFolder,
    folder: Path,
    recipe: Recipe,
    training: TrainingData,
    total_steps: int,
    ranks: Ranks,
    vram_limit: float | None = None,
) -> dict:
    """The plan the caller made (auto's), else the plan a resumed run started with (unless a new vram_limit is
    given), else one made now for this machine's GPU (or RAM, or the GPU capped at vram_limit GB) and this run's
    layout, at the longest example: micro-batches are padded only to their longest, so a seq_len longer than every
    example costs nothing."""
    if plan is None and run.resume_from and vram_limit is None:
        plan = distributed.from_main(run.plan(), ranks)
    if plan is not None:
        return plan
    target = choose_target(hardware=probe(check_bnb=False), vram_limit=vram_limit)
    target = replace(target, gpus=ranks.world, strategy=recipe.parallel)
    longest = max(8, min(recipe.seq_len, max(data.lengths_of(training.examples), default=8)))
    forwards = reference_forwards(recipe, total_steps, len(training.examples), len(training.eval_examples), ranks.world)
    return make_plan(str(folder), replace(recipe, seq_len=longest), target, reference_forwards=forwards).to_dict()


def check_vram_limit(vram_limit: float) -> None:
    """--vram-limit caps a GPU this machine has: refused before anything is written when there is none."""
    check_positive(vram_limit, "--vram-limit")
    if not torch.cuda.is_available():
        raise UserError(
            f"--vram-limit {vram_limit:g} caps GPU memory, and this machine has no GPU that torch can use.",
            hint=f"Leave it out to train on the CPU; `qlora-kit plan --vram {vram_limit:g}` plans for such a card.",
        )


def check_fits(plan: dict, device: torch.device, console: Console, force: bool = False) -> None:
    """Stop a CPU run that its plan says cannot fit in free RAM (unless forced): nothing steps down there, the system
    kills the process. On a GPU, out-of-memory errors step the run down, so a plan that does not fit is a warning."""
    if plan["plan"]["verdict"] != "does not fit":
        return
    planned, capacity, fix = plan["plan"]["total_bytes"] / GIB, plan["target"]["capacity_bytes"] / GIB, plan["fix"]
    shape = f"micro-batch {plan['plan']['micro_batch']} x {plan['plan']['seq_len']} tokens"
    if device.type == "cpu" and not force:
        raise UserError(
            f"This run needs about {planned:.1f} GiB of RAM ({shape}), and {capacity:.1f} GiB is free.",
            hint=f"To make it fit: {fix}. `qlora-kit plan` shows where the memory goes; --force starts it anyway.",
        )
    if device.type == "cpu":
        console.print(
            f"[yellow]--force: this run needs about {planned:.1f} GiB of RAM ({shape}) and {capacity:.1f} GiB is "
            "free; the system may stop it for memory (a checkpoint, if one was written, resumes it).[/]"
        )
        return
    console.print(
        f"[yellow]The plan says this run does not fit {plan['target']['name']} ({planned:.1f} of {capacity:.1f} GiB, "
        f"{shape}); it will step down when it runs out of memory. To make it fit: {fix}.[/]"
    )


def _setup_model(folder: Path, recipe: Recipe, dtype, device, ranks: Ranks, trust_remote_code: bool):
    """The base in 4-bit with fresh LoRA weights (the seed fixes their initialisation), checked for the chunked loss."""
    torch.manual_seed(recipe.seed)
    base = load_base_4bit(folder, dtype, device, trust_remote_code, shardable=ranks.active and recipe.parallel != "ddp")
    model = attach_lora(base, recipe)
    check_logits_path(model, device)
    return model


def _report_setup(setup: Run, console: Console) -> None:
    """What the run is about to do, in a few lines, with a warning for each surprise in the data or settings."""
    recipe, training, ranks, total_steps = setup.recipe, setup.training, setup.ranks, setup.total_steps
    trainable, total = parameter_counts(setup.model)
    origin = describe_source(recipe.model)
    examples, per_step = training.examples, recipe.micro_batch * recipe.grad_accum
    console.print(
        f"Model: {escape(printable(recipe.model))}"
        + (f" ({escape(printable(origin))})" if origin else "")
        + f" in 4-bit NF4 (double quant), compute {str(setup.dtype).removeprefix('torch.')} on {setup.device.type}"
    )
    console.print(
        f"Data: {len(examples)} {training.format} examples from {escape(printable(recipe.data))}"
        + (f", {len(training.eval_examples)} held out for evaluation" if training.eval_examples else "")
    )
    if training.truncated:
        console.print(
            f"[yellow]{training.truncated} examples longer than {recipe.seq_len} tokens are cut to it "
            "(--drop-long drops them instead; `qlora-kit data check` shows the lengths).[/]"
        )
    if training.dropped:
        console.print(
            f"[yellow]{training.dropped} examples dropped: "
            + ("longer than seq_len or " if recipe.drop_long else "")
            + "nothing left to learn[/]"
        )
    if recipe.packing:
        fill = sum(examples.lengths) / (len(examples) * recipe.seq_len)
        console.print(
            f"Packing: {training.unpacked} examples in {len(examples)} sequences of up to {recipe.seq_len} tokens, {fill:.0%} full"
        )
    if training.skipped:
        console.print(f"[yellow]Skipped {len(training.skipped)} bad examples, the first: {training.skipped[0]}[/]")
    console.print(
        f"Trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), "
        f"adapter about {trainable * 4 / 2**20:.1f} MiB on disk"
    )
    if ranks.active:
        layout = {
            "ddp": "Data parallel (DDP)",
            "fsdp": "Sharded (FSDP)",
            "fsdp_offload": "Sharded (FSDP, shards in host RAM)",
        }
        console.print(
            f"{layout[recipe.parallel]} over {ranks.world} processes: {per_step} examples each, "
            f"{per_step * ranks.world} a step"
        )
    if not recipe.steps and total_steps < FEW_STEPS:
        epochs = f"{recipe.epochs:g} epoch{'s' * (recipe.epochs != 1)}"
        console.print(
            f"[yellow]Only {total_steps} optimizer step{'s' * (total_steps > 1)}: {epochs} of {len(examples)} "
            f"examples at {per_step * ranks.world} a step. An adapter learns "
            "little from so few; add examples, or pass --epochs or --steps.[/]"
        )
    if setup.plan.get("reference"):
        console.print(f"DPO reference: {describe_reference(setup.plan['reference'])}")
    if setup.plan["faster"]:  # memory this run leaves unused could make every step cheaper
        console.print(f"[dim]Room to go faster: {setup.plan['faster']}.[/]")


def _fit(setup: Run, console: Console, display: str) -> tuple[RunRecord, Exception | None]:
    """Write the run's first files, then run the loop under the dashboard and signal handlers; returns the record
    and what stopped the loop early (a signal, or a UserError such as nothing fitting), if anything did."""
    run, recipe, ranks, device = setup.folder, setup.recipe, setup.ranks, setup.device
    trainable = parameter_counts(setup.model)[0]
    needed = checkpoint.checkpoint_bytes(trainable, optimizer_in_use(recipe, device.type)) * (
        recipe.keep_checkpoints + 1
    )
    distributed.on_main(lambda: check_free_disk(run.path, needed + trainable * 4 + 64 * 2**20), ranks)
    history = distributed.on_main(lambda: run.start(recipe, setup.plan), ranks)
    trackers = _open_trackers(setup, len(history), console)
    try:
        if (setup.plan.get("reference") or {}).get("mode") == "precomputed":
            _precompute_reference(setup, console)
        record = RunRecord(device.type, MetricsLog(run.metrics_path if ranks.main else None), trackers=trackers)
        for line in history:
            record.add(line)
        info = RunInfo(
            run.path.name,
            recipe.model,
            device.type,
            setup.total_steps,
            setup.plan["target"]["capacity_bytes"] / GIB,
            setup.plan["plan"]["total_bytes"] / GIB,
        )
        stopped = None
        with (
            Dashboard(console, info, display) as dashboard,
            StopOnSignal(dashboard, lambda: _stopped_at_once(setup)) as signals,
        ):
            record.dashboard = dashboard
            if trackers:
                trackers.warn = dashboard.note
            if run.resume_from:
                dashboard.note(f"Resuming from {run.resume_from.name}: steps 1-{len(history)} are done.")
            try:
                train_loop(
                    setup.model,
                    setup.training.examples,
                    recipe,
                    total_steps=setup.total_steps,
                    pad_id=setup.tokenizer.pad_token_id,
                    device=device,
                    dtype=setup.dtype,
                    on_step=record.step,
                    on_event=record.step_down,
                    console=console,
                    save=CheckpointWriter(setup, dashboard),
                    resume_from=run.resume_from,
                    stop_requested=lambda: signals.received,
                    ranks=ranks,
                    eval_examples=setup.training.eval_examples,
                    trained_on=setup.trained_on,
                )
            except (Stopped, UserError) as stop:
                stopped = stop  # keep what was learned: the adapter of the last finished step is saved after this
            except KeyboardInterrupt:  # the second Ctrl-C: no more writing, the checkpoints on disk are whole
                dashboard.stop()  # the message below goes under the last frame, not above a frame drawn again
                console.print(_stopped_at_once(setup), highlight=False, markup=False, soft_wrap=True)
                raise
            finally:
                record.metrics.close()
    finally:
        if trackers:
            trackers.close()
    return record, stopped


def _open_trackers(setup: Run, steps_done: int, console: Console) -> Trackers | None:
    """The --report-to trackers, opened by rank 0 before anything slow; one that will not open stops the run in one
    sentence, taking back what the run had written so that the same command can run again."""
    opened = []

    def open_them() -> None:
        config = {
            **dataclasses.asdict(setup.recipe),
            "base_model": setup.base_id,
            "device": setup.device.type,
            "planned_gib": setup.plan["plan"]["total_bytes"] / GIB,
        }
        try:
            opened.append(Trackers(setup.folder.path, setup.report_to, config, config["planned_gib"], steps_done))
        except UserError:
            setup.folder.unstart()
            raise
        for where in opened[0].where:
            console.print(where, highlight=False, markup=False, soft_wrap=True)

    if setup.report_to:
        distributed.on_main(open_them, setup.ranks)
    return opened[0] if opened else None


def _precompute_reference(setup: Run, console: Console) -> None:
    """Give every pair its DPO reference log-probs before the first step: read back when resuming (so the run goes
    on with the very values it started with), else computed with a progress bar and kept in the run folder."""
    training, recipe, ranks = setup.training, setup.recipe, setup.ranks
    sets = {"train": training.examples, **({"eval": training.eval_examples} if training.eval_examples else {})}
    values, damaged = setup.folder.reference_log_probs(setup.trained_on) if setup.folder.resume_from else (None, "")
    if damaged:
        console.print(f"[yellow]{escape(printable(damaged))}: computing the reference again.[/]")
    if values is None or {name: len(v) for name, v in values.items()} != {name: len(s) for name, s in sets.items()}:
        loss = PreferenceLoss(setup.model, "dpo", recipe.beta, recipe.loss_chunk_tokens, recipe.init_adapter)
        columns = (
            TextColumn("DPO reference, once for every pair"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        count, started = sum(map(len, sets.values())), time.perf_counter()
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("", total=count)
                values = {
                    name: reference_log_probs(
                        loss,
                        pairs,
                        recipe.micro_batch,
                        setup.tokenizer.pad_token_id,
                        setup.device,
                        lambda n: progress.advance(task, n),
                    )
                    for name, pairs in sets.items()
                }
        except torch.OutOfMemoryError:
            if ranks.active:  # the other ranks would wait for this one
                raise UserError(
                    f"Out of memory on rank {ranks.rank} while precomputing the DPO reference.",
                    hint="Pass --reference on_the_fly, or lower --micro-batch.",
                ) from None
            console.print("[yellow]Precomputing the DPO reference ran out of memory: each step computes it instead.[/]")
            return
        distributed.on_main(lambda: setup.folder.save_reference_log_probs(values, setup.trained_on), ranks)
        console.print(
            f"DPO reference computed for {count:,} pairs in {time.perf_counter() - started:.0f} s "
            f"(kept in {REFERENCE_FILE} for a resume)."
        )
    training.examples = training.examples.with_references(values["train"])
    if "eval" in values:
        training.eval_examples = training.eval_examples.with_references(values["eval"])


def _stopped_at_once(setup: Run) -> str:
    last = checkpoint.complete_checkpoints(setup.folder.path)
    return "Stopped at once. " + (
        f"Resume from {last[0].name} with: {resume_command(setup)}" if last else "No checkpoint was written yet."
    )


def resume_command(setup: Run) -> str:
    return f"qlora-kit train --out {shown_path(setup.folder.path)} --resume" + (
        f" --gpus {setup.ranks.world}" if setup.ranks.active else ""
    )


@dataclass
class CheckpointWriter:
    """save(step, optimizer, scheduler, scaler, state) for the loop: every rank gathers, rank 0 writes the checkpoint."""

    setup: Run
    dashboard: Dashboard

    def __call__(self, step: int, optimizer, scheduler, scaler, state: TrainerState) -> None:
        setup = self.setup
        lora, optimizer_state = (
            checkpoint.gather_trainable(setup.model),
            checkpoint.gather_optimizer(setup.model, optimizer),
        )
        if not setup.ranks.main:  # every rank helps gather (FSDP shards); rank 0 writes
            return
        if gone := setup.folder.gone():
            raise UserError(f"Could not write the checkpoint of step {step}: {gone}.", hint=FOLDER_GONE_HINT)
        try:
            checkpoint.save_checkpoint(
                setup.folder.path,
                step,
                lambda where: adapter.save_adapter(
                    setup.model, setup.tokenizer, where, setup.base_id, state_dict=lora, base=setup.base
                ),
                optimizer_state,
                scheduler,
                scaler,
                state,
                setup.recipe.keep_checkpoints,
            )
        except OSError as e:
            previous = checkpoint.complete_checkpoints(setup.folder.path)
            kept = f"The checkpoint {previous[0]} is intact. " if previous else ""
            raise UserError(
                f"Could not write the checkpoint of step {step}: {e.strerror or e}.",
                hint=f"{kept}Free disk space or fix the folder, then resume: {resume_command(setup)}",
            ) from None
        self.dashboard.checkpoint(step)


def _finish(setup: Run, record: RunRecord, stopped: Exception | None, console: Console) -> RunSummary:
    """Write the adapter of the last finished step (also after a stop), then say how the run ended."""
    steps, ranks, adapter_dir = len(record.losses), setup.ranks, setup.folder.path / "adapter"
    if not steps:
        if isinstance(stopped, UserError):
            raise stopped
        raise UserError("Stopped before the first step finished; no adapter was written.", hint="Run again.")
    if isinstance(stopped, UserError) and ranks.active:
        raise stopped  # other ranks may not be in step to gather the weights; the last checkpoint holds them
    trainable, total = parameter_counts(setup.model)
    facts = dict(
        steps=steps,
        first_loss=record.losses[0],
        last_loss=record.losses[-1],
        examples=len(setup.training.examples),
        format=setup.training.format,
        eval_loss=record.eval_losses[-1] if record.eval_losses else None,
        peak_memory_gib=max(record.peaks_gib),
        memory_kind="GPU reserved" if setup.device.type == "cuda" else "process RSS",
        trainable_params=trainable,
        precision=str(setup.dtype).removeprefix("torch."),
    )
    lora = checkpoint.gather_trainable(setup.model)
    if gone := setup.folder.gone():
        raise (
            stopped
            if isinstance(stopped, UserError)
            else UserError(f"Could not write the adapter: {gone}.", hint=FOLDER_GONE_HINT)
        )
    try:
        card = adapter.adapter_card(setup.recipe, setup.base_id, facts)
        adapter_bytes = (
            adapter.save_adapter(
                setup.model, setup.tokenizer, adapter_dir, setup.base_id, card, state_dict=lora, base=setup.base
            )
            if ranks.main
            else 0
        )
    except OSError as e:
        if isinstance(stopped, UserError):
            raise stopped from None
        raise UserError(
            f"Could not write the adapter to {adapter_dir}: {e.strerror or e}.",
            hint=f"The last checkpoint holds the same weights; free space and run `{resume_command(setup)}` "
            "to write it.",
        ) from None
    if isinstance(stopped, UserError):
        raise UserError(stopped.message, hint=f"The adapter of step {steps} is saved in {adapter_dir}. {stopped.hint}")
    if isinstance(stopped, Stopped):
        console.print(
            f"Stopped by {stopped}: step {steps} is checkpointed and its adapter is in {adapter_dir}.\n"
            f"Resume with: {resume_command(setup)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    distributed.finish(ranks)
    return RunSummary(
        steps,
        record.losses[0],
        record.losses[-1],
        time.perf_counter() - record.started,
        record.tokens,
        trainable,
        total,
        adapter_dir,
        adapter_bytes,
        best_loss=min(record.losses),
        peak_memory_gib=max(record.peaks_gib),
        padding_pct=sum(record.paddings) / steps,
        stopped_by=stopped.signum if isinstance(stopped, Stopped) else 0,
        step_downs=record.step_downs,
        skipped_updates=record.skipped_updates,
        rewards=record.rewards,
        info=record.dashboard.info,
        rank=ranks.rank,
    )


def train_loop(
    model,
    examples,
    recipe: Recipe,
    *,
    total_steps: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    on_step,
    on_event=lambda event: None,
    console: Console | None = None,
    save=None,
    resume_from: Path | None = None,
    stop_requested=lambda: None,
    ranks: Ranks = Ranks(),
    eval_examples=(),
    trained_on: dict | None = None,
) -> None:
    """Optimizer steps of micro_batch x grad_accum examples per rank; calls on_step(metrics) after each step,
    on_event(event) after an out-of-memory step-down, and save(step, optimizer, scheduler, scaler, state) every
    checkpoint_every steps, at the end and when stop_requested() names a signal (then raises Stopped). Starts after
    resume_from's step when given. Evaluates eval_examples every eval_every steps and after the last."""
    # Wrapped first: FSDP replaces the parameters with sharded ones, which are what the optimizer must hold.
    loss = (
        CausalLMLoss(model, recipe.loss_chunk_tokens)
        if recipe.method == "sft"
        else PreferenceLoss(model, recipe.method, recipe.beta, recipe.loss_chunk_tokens, recipe.init_adapter)
    )
    loss_module = distributed.wrap(loss, ranks, device, recipe.parallel, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe, device, console or Console(quiet=True))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(total_steps, recipe))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    state = TrainerState(
        StepShape.of(recipe),
        total_steps=total_steps,
        examples=len(examples),
        ranks=ranks.world,
        fingerprint=trained_on or {},
        recipe=dataclasses.asdict(recipe),
    )
    if resume_from:
        state = resume(resume_from, model, optimizer, scheduler, scaler, device, recipe, ranks, console)
        state = replace(
            state,
            total_steps=total_steps,
            examples=len(examples),
            ranks=ranks.world,
            fingerprint=trained_on or state.fingerprint,
        )
    per_step = recipe.micro_batch * recipe.grad_accum  # per rank
    stream = data.example_stream(
        examples,
        recipe.seed,
        per_step * ranks.world,
        recipe.group_by_length and not recipe.packing,
        start=state.position,
    )
    model.train()
    for step in range(state.step + 1, total_steps + 1):
        CPU_SHARE.use_free_cores(device)  # as many threads as other programs leave cores free: none waits descheduled
        started = time.perf_counter()
        drawn = [next(stream) for _ in range(per_step * ranks.world)]  # every rank draws alike, then takes its share
        state.position += len(drawn)
        epoch, step_examples = drawn[-1][0], [example for _, example in drawn[ranks.rank :: ranks.world]]
        shrink = functools.partial(step_down, state, model, device, ranks, step, on_event)
        step_loss, step_tokens, padding, step_stats = until_it_fits(
            lambda shape: forward_backward(loss_module, step_examples, shape, pad_id, device, scaler, ranks),  # noqa: B023 (called in this step)
            state,
            shrink,
            before_retry=lambda: optimizer.zero_grad(set_to_none=True),
        )
        grad_norm, finite = apply_update(params, optimizer, scaler, recipe.max_grad_norm, step_loss)
        count_nonfinite(state, finite, step)
        lr, seconds = scheduler.get_last_lr()[0], time.perf_counter() - started
        scheduler.step()
        state.step = step
        evaluated = {}
        if eval_examples and recipe.evaluates_after(step, total_steps):
            eval_loss, eval_stats = until_it_fits(
                lambda shape: evaluate_with_stats(
                    model, eval_examples, shape.micro_batch, pad_id, device, loss_module, shape.seq_len
                ),
                state,
                shrink,
            )
            evaluated = {"eval_loss": eval_loss, **{f"eval_{name}": value for name, value in eval_stats.items()}}
        shape = state.shape
        on_step(
            {
                "step": step,
                "epoch": epoch,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step_tokens,
                **step_stats,
                "step_s": seconds,
                "tokens_per_s": step_tokens / seconds,
                "padding_pct": padding,
                "micro_batch": shape.micro_batch,
                "grad_accum": -(-per_step // shape.micro_batch),
                "seq_len": shape.seq_len,
                **memory_readings(device, ranks),
                **evaluated,
                **({} if finite else {"skipped_update": True, "nonfinite_steps": state.nonfinite_steps}),
            }
        )
        signum = distributed.largest(stop_requested() or 0, ranks)  # all ranks stop after the same step
        if save and (
            signum or step == total_steps or (recipe.checkpoint_every and step % recipe.checkpoint_every == 0)
        ):
            save(step, optimizer, scheduler, scaler, state)
        if signum:
            raise Stopped(signum)


def until_it_fits(work, state: TrainerState, step_down, before_retry=lambda: None):
    """work(state.shape), redone after each out-of-memory error on the shape step_down() leaves (it raises
    UserError when nothing cheaper is left)."""
    while True:
        try:
            return work(state.shape)
        except torch.OutOfMemoryError:
            before_retry()  # the half-done work is redone from scratch
        step_down()  # outside the except block, so the failed attempt's tensors are freed first


def step_down(state: TrainerState, model, device: torch.device, ranks: Ranks, step: int, on_event) -> None:
    """Run the rest of the run on plan.cheaper()'s next shape, with the model's checkpointing to match, and say so."""
    if ranks.active:  # the other ranks are waiting in a collective for this one: no redo in step
        raise UserError(
            f"Out of memory on rank {ranks.rank}.",
            hint="Lower --micro-batch or --seq-len; `qlora-kit plan --gpus N` shows what fits.",
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before, after = state.shape, cheaper(state.shape, device.type)
    if after is None:
        raise UserError(
            f"Out of memory even at micro-batch 1, {before.seq_len}-token sequences"
            + (", with activations offloaded." if device.type == "cuda" else ", recomputing every layer."),
            hint="Use a smaller model or a larger card; `qlora-kit plan` shows what fits.",
        )
    if (after.checkpointing, after.offload, after.uncheckpointed_layers) != (
        before.checkpointing,
        before.offload,
        before.uncheckpointed_layers,
    ):
        set_checkpointing(model, offload=after.offload, uncheckpointed_layers=after.uncheckpointed_layers)
    state.shape = after
    on_event(
        {
            "event": "out_of_memory_step_down",
            "step": step,
            "from": dataclasses.asdict(before),
            "to": dataclasses.asdict(after),
        }
    )


def forward_backward(
    loss_module, examples, shape: StepShape, pad_id: int, device, scaler, ranks: Ranks = Ranks()
) -> tuple[float, int, float, dict]:
    """Accumulate gradients of this rank's share of a step in micro-batches; returns the step's (mean loss, tokens,
    % padding, means of the loss's statistics) over all ranks."""
    # Similar lengths share a micro-batch, so little is padded; the step's examples (and gradient) are the same.
    examples = sorted(data.truncate(examples, shape.seq_len), key=len)
    # Normalise by the whole step's labelled tokens (every rank's), not per micro-batch, so any split gives the same
    # gradient; DistributedDataParallel averages over ranks, so each rank's share is scaled back up by the world size.
    n_targets = distributed.total(data.loss_units(examples), ranks)
    starts = range(0, len(examples), shape.micro_batch)
    step_loss, step_tokens, slots, sums = 0.0, 0, 0, {}
    for start in starts:
        # With DDP, gradients are all-reduced once per step: on the last micro-batch's backward.
        syncing = start == starts[-1] or not hasattr(loss_module, "no_sync")
        with contextlib.nullcontext() if syncing else loss_module.no_sync():
            loss_sum, _, attention_mask, stats = loss_module(
                examples[start : start + shape.micro_batch], pad_id, device
            )
            loss = loss_sum / n_targets
            scaler.scale(loss * ranks.world).backward()
        slots += attention_mask.numel()
        step_loss += loss.item()
        step_tokens += int(attention_mask.sum())
        sums = {name: sums.get(name, 0.0) + value.item() for name, value in stats.items()}
    step_loss, step_tokens, slots = (distributed.total(x, ranks) for x in (step_loss, step_tokens, slots))
    # Only preference losses report statistics, and for pairs n_targets is already the step's pairs (every rank's):
    # no collective for SFT, none twice for DPO.
    means = {name: distributed.total(value, ranks) / n_targets for name, value in sums.items()}
    return step_loss, int(step_tokens), 100 * (1 - step_tokens / max(slots, 1)), means


def apply_update(params, optimizer, scaler, max_grad_norm: float, step_loss: float) -> tuple[float, bool]:
    """Clip and apply the accumulated gradient unless the loss or gradient is NaN/inf; returns (grad norm, applied)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    # fp16's scaler skips overflowing steps itself; otherwise a NaN/inf loss or gradient must never reach the weights.
    finite = math.isfinite(step_loss) and (scaler.is_enabled() or math.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def count_nonfinite(state: TrainerState, finite: bool, step: int) -> None:
    """Count skipped updates; several in a row stop the run (the weights are still those of the last good step)."""
    state.nonfinite_in_a_row = 0 if finite else state.nonfinite_in_a_row + 1
    state.nonfinite_steps += not finite
    if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise UserError(
            f"The loss or gradient was NaN or infinite for {MAX_NONFINITE_IN_A_ROW} steps in a row (up to "
            f"step {step}); those updates were skipped, so the weights are from step {step - MAX_NONFINITE_IN_A_ROW}.",
            hint="Lower --lr, train in bf16 or fp32 (--precision), or look for broken examples with `qlora-kit data check`.",
        )


def resume(
    folder: Path, model, optimizer, scheduler, scaler, device, recipe: Recipe, ranks: Ranks, console
) -> TrainerState:
    """Load a checkpoint into the model and training state; returns its TrainerState."""
    state = checkpoint.load_checkpoint(folder, model, optimizer, scheduler, scaler, device)
    per_step = recipe.micro_batch * recipe.grad_accum
    if state.ranks != ranks.world and console:
        console.print(
            f"[yellow]Resuming on {ranks.world} process(es) instead of {state.ranks}: a step now takes "
            f"{per_step * ranks.world} examples instead of {per_step * state.ranks}, so the run "
            "goes on from the same data position but is not the one it would have been.[/]"
        )
    shape = state.shape
    if shape.checkpointing:  # as the run last stepped, which an out-of-memory step-down may have changed
        set_checkpointing(model, offload=shape.offload, uncheckpointed_layers=shape.uncheckpointed_layers)
    return state


def memory_readings(device, ranks: Ranks) -> dict:
    """This rank's memory readings, and with several ranks every rank's (rank 0 writes them all)."""
    usage = usage_now(device)
    if not ranks.active:
        return usage
    every_rank = distributed.gather({k: usage[k] for k in ("mem_reserved_gib", "nvml_used_gib", "rss_gib")}, ranks)
    return {**usage, "ranks": ranks.world, "rank_memory": every_rank}


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


class StopOnSignal:
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, with a
    checkpoint; a second one stops at once (checkpoints are written atomically, so the last one stays whole).

    Python runs signal handlers only between bytecodes, so a step stuck in one long C call (attention over a huge
    sequence) would not hear either. A watcher thread sees every signal as it arrives (set_wakeup_fd); after the
    second, if the main thread has not stopped within GRACE_S, it ends the process as the second signal asks,
    which is as safe as a kill: the last checkpoint stays whole and resumes exactly."""

    GRACE_S = 3.0

    def __init__(self, dashboard: Dashboard, stopped_at_once=lambda: "Stopped at once."):
        self.dashboard, self.stopped_at_once, self.received, self.previous = dashboard, stopped_at_once, None, {}
        self.done, self.wakeup = threading.Event(), None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals to the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            read, self.wakeup = os.pipe()
            os.set_blocking(self.wakeup, False)
            self.previous_wakeup = signal.set_wakeup_fd(self.wakeup, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(read,), daemon=True, name="qlora-kit-signals").start()
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.dashboard.note(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again to stop at once)."
        )

    def _watch(self, read: int) -> None:
        seen = []
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while not self.done.is_set():
                seen += [byte for byte in pipe.read(16) if byte in (signal.SIGINT, signal.SIGTERM)]
                if len(seen) >= 2 and not self.done.wait(self.GRACE_S):
                    self.dashboard.restore_terminal()
                    os.write(
                        2, f"\n{self.stopped_at_once()} (A long operation did not return to stop by itself.)\n".encode()
                    )
                    os._exit(128 + seen[-1])  # as a shell reports the signal that ended a process

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.wakeup is not None:
            signal.set_wakeup_fd(self.previous_wakeup)
            self.done.set()
            with contextlib.suppress(OSError):  # after a second signal the watcher may have ended already: EPIPE
                os.write(self.wakeup, b"\0")  # wakes the watcher, which then ends
            os.close(self.wakeup)
