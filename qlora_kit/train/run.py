"""Training: a run, in the order it happens, and the loop at its heart.

run_training() is what `train` and `auto` call. It reads top to bottom as the steps of a run: the run folder,
the data, the plan, the model, the loop (with dashboard, checkpoints and signals), the adapter; one function each.
loop.py holds the loop itself, objectives/ what a micro-batch costs, run_folder.py what lands on disk.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qlora_kit.adapter import folder as adapter
from qlora_kit.data import dataset as data
from qlora_kit.errors import UserError
from qlora_kit.model.load import (
    attach_lora,
    check_logits_path,
    load_base_4bit,
    load_tokenizer,
    parameter_counts,
    pick_device_and_dtype,
    settings_from_adapter,
)
from qlora_kit.objectives.preference import PreferenceLoss, check_method_fits_data, reference_log_probs
from qlora_kit.plan.planner import (
    PlanReport,
    StepShape,
    check_positive,
    choose_target,
    describe_reference,
    make_plan,
    reference_forwards,
)
from qlora_kit.plan.recipes import Recipe, count_steps, optimizer_in_use
from qlora_kit.probe.hardware import cap_gpu_memory, probe
from qlora_kit.probe.sources import describe_source, model_identity, read_model_config, resolve_model
from qlora_kit.text import printable, shown_path
from qlora_kit.train import checkpoint, distributed
from qlora_kit.train.checkpoint import TrainerState
from qlora_kit.train.dashboard import Dashboard, MetricsLog, RunInfo, describe_step_down
from qlora_kit.train.distributed import World
from qlora_kit.train.loop import Hooks, LoopState, Outcome, start_loop, train_loop
from qlora_kit.train.run_folder import (
    REFERENCE_FILE,
    RunFolder,
    absolute_paths,
    check_fingerprint,
    check_free_disk,
    check_same_settings,
    fingerprint,
    open_run_folder,
)
from qlora_kit.train.signals import StopOnSignal
from qlora_kit.train.trackers import Trackers, recorded_trackers
from qlora_kit.units import GIB

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
    plan: PlanReport
    model: object
    tokenizer: object
    base_id: str  # the base model as the adapter names it
    base: dict  # the base's identity (sources.model_identity), kept beside the adapter so its users can check it
    device: torch.device
    dtype: torch.dtype
    world: World
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


@dataclass(frozen=True)
class RunOptions:
    """How to run a recipe, beside the recipe's own settings: the flags of `train` and `auto` that are not settings."""

    display: str = "auto"  # the dashboard: auto, live, plain or quiet
    resume: bool = False  # continue exactly from the run's last good checkpoint
    overwrite: bool = False
    trust_remote_code: bool = False
    plan: PlanReport | None = None  # the plan that chose the settings (auto's), else the run plans for this machine
    allow_changed_data: bool = False  # a resume may go on with other data
    force: bool = False  # start a CPU run its plan says cannot fit
    vram_limit: float | None = None  # GB of this machine's GPU the run may use (and plans for)
    report_to: list[str] | None = None  # trackers the steps also go to (a resume without goes on with the run's own)


def run_training(recipe: Recipe, out_dir: Path, console: Console, options: RunOptions = RunOptions()) -> RunSummary:
    """Validate everything a user can get wrong, then train and write out_dir; nothing is written on bad input."""
    if options.vram_limit is not None:
        check_vram_limit(options.vram_limit)
    recipe = settings_from_adapter(recipe)  # before recipe.yaml is written: it records what the adapter fixed
    recipe = absolute_paths(recipe)  # so that export, generate or a resume run from another folder find the same files
    world = distributed.start()
    out_dir = Path(world.from_main(str(out_dir)))  # a default name (runs/auto-N) is rank 0's choice
    if not world.main:  # rank 0 speaks and writes for all
        console, options = Console(quiet=True), replace(options, display="quiet")
    out = world.on_main(lambda: open_run_folder(out_dir, recipe, options.resume, options.overwrite, console))
    if not world.main:
        out.lock_fd = None  # the lock is rank 0's
    try:
        loaded, held_out = _read_data(recipe)
        pick_device_and_dtype(recipe.precision, world.local_rank)  # a precision this machine lacks, said at once
        # Before the status line: a download shows its own progress (one live display at a time); rank 0 fetches.
        folder = world.on_main(lambda: resolve_model(recipe.model, options.trust_remote_code, console))
        device, dtype = pick_device_and_dtype(recipe.precision, world.local_rank, read_model_config(folder))
        with console.status(f"Preparing {recipe.model} ..."):
            if recipe.init_adapter:
                note = adapter.check_adapter_on_base(Path(recipe.init_adapter), folder, chosen=True)
                if note:
                    console.print(f"[yellow]{escape(note)}[/]", highlight=False)
            base = model_identity(folder, recipe.model)
            tokenizer = load_tokenizer(folder, options.trust_remote_code, recipe.chat_template_kwargs)
            training = _setup_data(recipe, loaded, held_out, tokenizer)
            total_steps = count_steps(len(training.examples), recipe, world.size)
            trained_on = fingerprint([loaded.path, held_out and held_out.path], folder)  # a hub dataset's file
            if out.resume_from:
                _check_resume_point(out, recipe, training, total_steps, trained_on, options.allow_changed_data)
            plan = _setup_plan(options, out, folder, recipe, training, total_steps, world)
            check_fits(plan, device, console, options.force)
            if device.type == "cuda" and (cap := cap_gpu_memory(plan.target.capacity_bytes, device)):
                console.print(
                    f"GPU memory: torch is held to {cap / GIB:.1f} GiB, the plan's {plan.target.name} "
                    "less the CUDA context; past it the run steps down."
                )
            model = _setup_model(folder, recipe, dtype, device, world, options.trust_remote_code)
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
            world,
            total_steps,
            trained_on,
            report_to=options.report_to or (recorded_trackers(out.path) if out.resume_from else []),
        )
        _report_setup(setup, console)
        record, outcome = _fit(setup, console, options.display)
        return _finish(setup, record, outcome, console)
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
    options: RunOptions,
    run: RunFolder,
    folder: Path,
    recipe: Recipe,
    training: TrainingData,
    total_steps: int,
    world: World,
) -> PlanReport:
    """The plan the caller made (auto's), else the plan a resumed run started with (unless a new vram_limit is
    given), else one made now for this machine's GPU (or RAM, or the GPU capped at vram_limit GB) and this run's
    layout, at the longest example: micro-batches are padded only to their longest, so a seq_len longer than every
    example costs nothing."""
    plan = options.plan
    if plan is None and run.resume_from and options.vram_limit is None:
        plan = world.from_main(run.plan())
    if plan is not None:
        return plan
    target = choose_target(hardware=probe(check_bnb=False), vram_limit=options.vram_limit)
    target = replace(target, gpus=world.size, strategy=recipe.parallel)
    longest = max(8, min(recipe.seq_len, max(data.lengths_of(training.examples), default=8)))
    forwards = reference_forwards(recipe, total_steps, len(training.examples), len(training.eval_examples), world.size)
    return make_plan(str(folder), replace(recipe, seq_len=longest), target, reference_forwards=forwards)


def check_vram_limit(vram_limit: float) -> None:
    """--vram-limit caps a GPU this machine has: refused before anything is written when there is none."""
    check_positive(vram_limit, "--vram-limit")
    if not torch.cuda.is_available():
        raise UserError(
            f"--vram-limit {vram_limit:g} caps GPU memory, and this machine has no GPU that torch can use.",
            hint=f"Leave it out to train on the CPU; `qlora-kit plan --vram {vram_limit:g}` plans for such a card.",
        )


def check_fits(plan: PlanReport, device: torch.device, console: Console, force: bool = False) -> None:
    """Stop a CPU run that its plan says cannot fit in free RAM (unless forced): nothing steps down there, the system
    kills the process. On a GPU, out-of-memory errors step the run down, so a plan that does not fit is a warning."""
    if plan.plan.verdict != "does not fit":
        return
    planned, capacity, fix = plan.plan.total_bytes / GIB, plan.target.capacity_bytes / GIB, plan.fix
    shape = f"micro-batch {plan.plan.micro_batch} x {plan.plan.seq_len} tokens"
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
        f"[yellow]The plan says this run does not fit {plan.target.name} ({planned:.1f} of {capacity:.1f} GiB, "
        f"{shape}); it will step down when it runs out of memory. To make it fit: {fix}.[/]"
    )


def _setup_model(folder: Path, recipe: Recipe, dtype, device, world: World, trust_remote_code: bool):
    """The base in 4-bit with fresh LoRA weights (the seed fixes their initialisation), checked for the chunked loss."""
    torch.manual_seed(recipe.seed)
    base = load_base_4bit(folder, dtype, device, trust_remote_code, shardable=world.active and recipe.parallel != "ddp")
    model = attach_lora(base, recipe)
    check_logits_path(model, device)
    return model


def _report_setup(setup: Run, console: Console) -> None:
    """What the run is about to do, in a few lines, with a warning for each surprise in the data or settings."""
    recipe, training, world, total_steps = setup.recipe, setup.training, setup.world, setup.total_steps
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
    if world.active:
        layout = {
            "ddp": "Data parallel (DDP)",
            "fsdp": "Sharded (FSDP)",
            "fsdp_offload": "Sharded (FSDP, shards in host RAM)",
        }
        console.print(
            f"{layout[recipe.parallel]} over {world.size} processes: {per_step} examples each, "
            f"{per_step * world.size} a step"
        )
    if not recipe.steps and total_steps < FEW_STEPS:
        epochs = f"{recipe.epochs:g} epoch{'s' * (recipe.epochs != 1)}"
        console.print(
            f"[yellow]Only {total_steps} optimizer step{'s' * (total_steps > 1)}: {epochs} of {len(examples)} "
            f"examples at {per_step * world.size} a step. An adapter learns "
            "little from so few; add examples, or pass --epochs or --steps.[/]"
        )
    if setup.plan.reference:
        console.print(f"DPO reference: {describe_reference(setup.plan.reference)}")
    if setup.plan.faster:  # memory this run leaves unused could make every step cheaper
        console.print(f"[dim]Room to go faster: {setup.plan.faster}.[/]")


def _fit(setup: Run, console: Console, display: str) -> tuple[RunRecord, Outcome]:
    """Write the run's first files, then run the loop under the dashboard and signal handlers; returns the record
    and how the loop ended (a UserError, such as nothing fitting, ends it as an outcome too: the steps before it
    are kept)."""
    run, recipe, world = setup.folder, setup.recipe, setup.world
    trainable = parameter_counts(setup.model)[0]
    per_checkpoint = checkpoint.checkpoint_bytes(trainable, optimizer_in_use(recipe, setup.device.type))
    world.on_main(lambda: check_free_disk(run.path, per_checkpoint * (recipe.keep_checkpoints + 1) + trainable * 4))
    history = world.on_main(lambda: run.start(recipe, setup.plan))
    trackers = _open_trackers(setup, len(history), console)
    try:
        if (setup.plan.reference or {}).get("mode") == "precomputed":
            _precompute_reference(setup, console)
        record = RunRecord(setup.device.type, MetricsLog(run.metrics_path if world.main else None), trackers=trackers)
        for line in history:
            record.add(line)
        state = start_loop(
            setup.model,
            recipe,
            _progress_at_start(setup),
            device=setup.device,
            dtype=setup.dtype,
            world=world,
            resume_from=run.resume_from,
            console=console,
        )
        with (
            Dashboard(console, _run_info(setup), display) as dashboard,
            StopOnSignal(dashboard, lambda: _stopped_at_once(setup)) as signals,
        ):
            record.dashboard = dashboard
            if trackers:
                trackers.warn = dashboard.note
            if run.resume_from:
                dashboard.note(f"Resuming from {run.resume_from.name}: steps 1-{len(history)} are done.")
            try:
                hooks = RunHooks(setup, record, signals)
                outcome = train_loop(
                    state,
                    setup.training.examples,
                    recipe,
                    hooks,
                    setup.tokenizer.pad_token_id,
                    setup.training.eval_examples,
                )
            except UserError as error:
                outcome = Outcome(error=error)  # keep what was learned: the adapter of the last step is saved
            except KeyboardInterrupt:  # the second Ctrl-C: no more writing, the checkpoints on disk are whole
                dashboard.stop()  # the message below goes under the last frame, not above a frame drawn again
                console.print(_stopped_at_once(setup), highlight=False, markup=False, soft_wrap=True)
                raise
            finally:
                record.metrics.close()
    finally:
        if trackers:
            trackers.close()
    return record, outcome


def _progress_at_start(setup: Run) -> TrainerState:
    """Where a new run stands before its first step (a resume reads the checkpoint's instead)."""
    return TrainerState(
        StepShape.of(setup.recipe),
        total_steps=setup.total_steps,
        examples=len(setup.training.examples),
        ranks=setup.world.size,
        fingerprint=setup.trained_on,
        recipe=dataclasses.asdict(setup.recipe),
    )


def _run_info(setup: Run) -> RunInfo:
    """What the dashboard shows of the run beside its steps."""
    capacity, planned = setup.plan.target.capacity_bytes / GIB, setup.plan.plan.total_bytes / GIB
    return RunInfo(setup.folder.path.name, setup.recipe.model, setup.device.type, setup.total_steps, capacity, planned)


@dataclass
class RunHooks(Hooks):
    """The loop's hooks in a run: steps and step-downs to the record (metrics.jsonl, dashboard, trackers),
    checkpoints to the run folder, stop requests from the signal handlers."""

    setup: Run
    record: RunRecord
    signals: StopOnSignal

    def step(self, metrics: dict) -> None:
        self.record.step(metrics)

    def step_down(self, event: dict) -> None:
        self.record.step_down(event)

    def checkpoint(self, state: LoopState) -> None:
        write_checkpoint(self.setup, state)
        self.record.dashboard.checkpoint(state.progress.step)

    def stop_requested(self) -> int:
        return self.signals.received or 0


def _open_trackers(setup: Run, steps_done: int, console: Console) -> Trackers | None:
    """The --report-to trackers, opened by rank 0 before anything slow; one that will not open stops the run in one
    sentence, taking back what the run had written so that the same command can run again."""
    opened = []

    def open_them() -> None:
        config = {
            **dataclasses.asdict(setup.recipe),
            "base_model": setup.base_id,
            "device": setup.device.type,
            "planned_gib": setup.plan.plan.total_bytes / GIB,
        }
        try:
            opened.append(Trackers(setup.folder.path, setup.report_to, config, config["planned_gib"], steps_done))
        except UserError:
            setup.folder.unstart()
            raise
        for where in opened[0].where:
            console.print(where, highlight=False, markup=False, soft_wrap=True)

    if setup.report_to:
        setup.world.on_main(open_them)
    return opened[0] if opened else None


def _precompute_reference(setup: Run, console: Console) -> None:
    """Give every pair its DPO reference log-probs before the first step: read back when resuming (so the run goes
    on with the very values it started with), else computed with a progress bar and kept in the run folder."""
    training, recipe, world = setup.training, setup.recipe, setup.world
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
            if world.active:  # the other ranks would wait for this one
                raise UserError(
                    f"Out of memory on rank {world.rank} while precomputing the DPO reference.",
                    hint="Pass --reference on_the_fly, or lower --micro-batch.",
                ) from None
            console.print("[yellow]Precomputing the DPO reference ran out of memory: each step computes it instead.[/]")
            return
        world.on_main(lambda: setup.folder.save_reference_log_probs(values, setup.trained_on))
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
        f" --gpus {setup.world.size}" if setup.world.active else ""
    )


def write_checkpoint(setup: Run, state: LoopState) -> None:
    """The checkpoint of the state's step: every process gathers (FSDP shards), rank 0 writes."""
    step = state.progress.step
    lora, optimizer_state = (
        checkpoint.gather_trainable(setup.model),
        checkpoint.gather_optimizer(setup.model, state.optimizer),
    )
    if not setup.world.main:
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
            state.scheduler,
            state.scaler,
            state.progress,
            setup.recipe.keep_checkpoints,
        )
    except OSError as e:
        previous = checkpoint.complete_checkpoints(setup.folder.path)
        kept = f"The checkpoint {previous[0]} is intact. " if previous else ""
        raise UserError(
            f"Could not write the checkpoint of step {step}: {e.strerror or e}.",
            hint=f"{kept}Free disk space or fix the folder, then resume: {resume_command(setup)}",
        ) from None


def _finish(setup: Run, record: RunRecord, outcome: Outcome, console: Console) -> RunSummary:
    """Write the adapter of the last finished step (also after a stop or an error), then say how the run ended."""
    adapter_dir, steps = setup.folder.path / "adapter", len(record.losses)
    trainable, total = parameter_counts(setup.model)
    adapter_bytes = _save_final_adapter(setup, record, outcome, trainable)
    match outcome:
        case Outcome(error=UserError() as error):
            raise UserError(error.message, hint=f"The adapter of step {steps} is saved in {adapter_dir}. {error.hint}")
        case Outcome(signum=signum) if signum:
            console.print(
                f"Stopped by {signal.Signals(signum).name}: step {steps} is checkpointed and its adapter is in "
                f"{adapter_dir}.\nResume with: {resume_command(setup)}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    setup.world.finish()
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
        stopped_by=outcome.signum,
        step_downs=record.step_downs,
        skipped_updates=record.skipped_updates,
        rewards=record.rewards,
        info=record.dashboard.info,
        rank=setup.world.rank,
    )


def _save_final_adapter(setup: Run, record: RunRecord, outcome: Outcome, trainable: int) -> int:
    """Write the adapter of the record's last step with its card; returns its bytes (0 on other ranks). Where it
    cannot be written, a failed run's own error is what is raised: it is what the user must act on first."""
    steps, adapter_dir = len(record.losses), setup.folder.path / "adapter"
    if outcome.error and (not steps or setup.world.active):
        raise outcome.error  # other ranks may not be in step to gather the weights; the last checkpoint holds them
    if not steps:
        raise UserError("Stopped before the first step finished; no adapter was written.", hint="Run again.")
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
        raise outcome.error or UserError(f"Could not write the adapter: {gone}.", hint=FOLDER_GONE_HINT)
    if not setup.world.main:
        return 0
    try:
        card = adapter.adapter_card(setup.recipe, setup.base_id, facts)
        return adapter.save_adapter(
            setup.model, setup.tokenizer, adapter_dir, setup.base_id, card, state_dict=lora, base=setup.base
        )
    except OSError as e:
        raise outcome.error or UserError(
            f"Could not write the adapter to {adapter_dir}: {e.strerror or e}.",
            hint=f"The last checkpoint holds the same weights; free space and run `{resume_command(setup)}` "
            "to write it.",
        ) from None
