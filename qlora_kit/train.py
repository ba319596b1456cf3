"""Training: check inputs, load the 4-bit model with LoRA, run the loop, write the run directory.

run_training() is what `qlora-kit train` calls; train_loop() is the loop itself, readable top to bottom.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from qlora_kit import adapter, data, model as models
from qlora_kit.dashboard import Dashboard, MetricsLog, RunInfo
from qlora_kit.errors import UserError
from qlora_kit.hardware import usage_now
from qlora_kit.loss import chunked_cross_entropy, default_chunk_tokens
from qlora_kit.recipes import Recipe
from qlora_kit.sources import resolve_model

GIB = 2**30
RUN_FILES = ("recipe.yaml", "plan.json", "metrics.jsonl", "adapter")


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
    interrupted: bool = False
    step_downs: list[str] = field(default_factory=list)
    info: RunInfo | None = None


def run_training(recipe: Recipe, out_dir: Path, console: Console, display: str = "auto") -> RunSummary:
    """Validate everything a user can get wrong, then train and write runs/NAME; nothing is written on bad input."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if not recipe.model or not recipe.data:
        raise UserError("Both a model and a data file are needed.", hint="Pass --model and --data (or a recipe that names them).")
    loaded = data.read_records(recipe.data, recipe.data_format, recipe.skip_bad_lines)
    eval_records = data.read_records(recipe.eval_data, recipe.data_format).records if recipe.eval_data else []
    device, dtype = models.pick_device_and_dtype(recipe.precision)
    with console.status(f"Preparing {recipe.model} ..."):
        folder = resolve_model(recipe.model)
        tokenizer = models.load_tokenizer(folder)
        examples = data.tokenize(loaded.records, tokenizer, recipe.seq_len, recipe.train_on_inputs, recipe.drop_long,
                                 cache_key=data.cache_key(loaded, tokenizer))
        dropped = len(loaded.records) - len(examples)
        loaded.records = None  # the tokenized table replaces the text for the rest of the run
        eval_examples = data.tokenize(eval_records, tokenizer, recipe.seq_len, recipe.train_on_inputs) if eval_records else []
        if recipe.eval_fraction and not eval_examples:
            examples, eval_examples = data.split_off(examples, recipe.eval_fraction, recipe.seed)
        unpacked = len(examples)
        if recipe.packing:
            examples = data.pack(examples, recipe.seq_len, recipe.seed)
        torch.manual_seed(recipe.seed)  # LoRA initialisation is part of what the seed fixes
        model = models.attach_lora(models.load_base_4bit(folder, dtype, device), recipe)
        models.check_logits_path(model, device)
    trainable, total = models.parameter_counts(model)
    console.print(f"Model: {recipe.model} in 4-bit NF4 (double quant), compute {str(dtype).removeprefix('torch.')} on {device.type}")
    console.print(f"Data: {len(examples)} {loaded.format} examples from {recipe.data}"
                  + (f", {len(eval_examples)} held out for evaluation" if eval_examples else ""))
    if dropped:
        console.print(f"[yellow]{dropped} examples dropped: " + ("longer than seq_len or " if recipe.drop_long else "") + "nothing left to learn[/]")
    if recipe.packing:
        fill = sum(examples.lengths) / (len(examples) * recipe.seq_len)
        console.print(f"Packing: {unpacked} examples in {len(examples)} sequences of up to {recipe.seq_len} tokens, {fill:.0%} full")
    if loaded.skipped:
        console.print(f"[yellow]Skipped {len(loaded.skipped)} bad examples, the first: {loaded.skipped[0]}[/]")
    console.print(f"Trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), "
                  f"adapter about {trainable * 4 / 2**20:.1f} MiB on disk")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.yaml").write_text(recipe.to_yaml())
    plan = plan_for_run(folder, recipe)
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    losses, tokens, peaks, paddings, step_downs, stopped = [], 0, [], [], [], None
    start = time.perf_counter()
    total_steps = count_steps(len(examples), recipe)
    base_id = adapter.portable_base_id(recipe.model, folder)
    info = RunInfo(out_dir.name, recipe.model, device.type, total_steps, plan["target"]["capacity_bytes"] / GIB,
                   plan["plan"]["total_bytes"] / GIB)
    with Dashboard(console, info, display) as dashboard:

        def on_step(m: dict) -> None:
            nonlocal tokens
            m["time_s"] = time.perf_counter() - start
            if eval_examples and (m["step"] == total_steps or (recipe.eval_every and m["step"] % recipe.eval_every == 0)):
                m["eval_loss"] = evaluate(model, eval_examples, recipe, tokenizer.pad_token_id, device)
            losses.append(m["loss"])
            tokens += m["tokens"]
            peaks.append(m["mem_reserved_gib"] if device.type == "cuda" else m["rss_gib"])
            paddings.append(m["padding_pct"])
            metrics.write(m)
            dashboard.step(m)
            if recipe.checkpoint_every and m["step"] % recipe.checkpoint_every == 0 and m["step"] < total_steps:
                adapter.save_adapter(model, tokenizer, out_dir / "checkpoints" / f"step-{m['step']}", base_id)
                dashboard.checkpoint(m["step"])

        def on_event(event: dict) -> None:
            step_downs.append(describe_step_down(event))
            metrics.write(event)
            dashboard.note(f"Out of memory at step {event['step']}: {step_downs[-1]}; redoing the step.")

        try:
            train_loop(model, examples, recipe, total_steps, tokenizer.pad_token_id, device, dtype, on_step, console, on_event)
        except (KeyboardInterrupt, UserError) as stop:
            stopped = stop  # keep what was learned: the adapter of the last finished step is saved below
        finally:
            metrics.close()
    if not losses:
        if isinstance(stopped, UserError):
            raise stopped
        raise UserError("Stopped before the first step finished; no adapter was written.", hint="Run again.")
    adapter_dir = out_dir / "adapter"
    adapter_bytes = adapter.save_adapter(model, tokenizer, adapter_dir, base_id)
    if isinstance(stopped, UserError):
        raise UserError(stopped.message, hint=f"The adapter of step {len(losses)} is saved in {adapter_dir}. {stopped.hint}")
    return RunSummary(len(losses), losses[0], losses[-1], time.perf_counter() - start, tokens, trainable, total,
                      adapter_dir, adapter_bytes, best_loss=min(losses), peak_memory_gib=max(peaks),
                      padding_pct=sum(paddings) / len(paddings),
                      interrupted=stopped is not None, step_downs=step_downs, info=info)


def describe_step_down(event: dict) -> str:
    """What an out-of-memory step-down changed, in words: 'micro-batch 4 -> 2'."""
    before, after = event["from"], event["to"]
    names = {"micro_batch": "micro-batch", "seq_len": "sequence length", "checkpointing": "checkpointing", "offload": "activation offload"}
    return ", ".join(f"{names[k]} {before[k]} -> {after[k]}" for k in names if before[k] != after[k])


def plan_for_run(folder: Path, recipe: Recipe) -> dict:
    """The memory estimate for this run on this machine's GPU (or RAM), kept to compare with what it used."""
    from qlora_kit.hardware import probe
    from qlora_kit.plan import choose_target, make_plan

    return make_plan(str(folder), recipe, choose_target(hardware=probe(check_bnb=False))).to_dict()


def next_free_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3 ... so repeated runs never overwrite an earlier one."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def check_out_dir(out_dir: Path) -> None:
    """Refuse to write into a folder that already holds a run, so no earlier result is overwritten."""
    if out_dir.is_file():
        raise UserError(f"{out_dir} is a file, not a run folder.", hint="Choose another --out.")
    if out_dir.is_dir() and any((out_dir / name).exists() for name in RUN_FILES):
        raise UserError(f"{out_dir} already holds a run.", hint="Choose another --out, or delete that folder first.")


@dataclass
class StepShape:
    """How a step's examples are split and bounded; out-of-memory step-downs change it, never the examples drawn."""

    micro_batch: int
    seq_len: int
    checkpointing: bool
    offload: bool


def train_loop(model, examples, recipe: Recipe, total_steps: int, pad_id: int, device, dtype, on_step, console,
               on_event=lambda event: None) -> None:
    """Optimizer steps of micro_batch x grad_accum examples; calls on_step(metrics) after each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe, device, console)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(total_steps, recipe))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    shape = StepShape(recipe.micro_batch, recipe.seq_len, recipe.gradient_checkpointing, recipe.activation_offload)
    per_step = recipe.micro_batch * recipe.grad_accum
    stream = data.example_stream(examples, recipe.seed, per_step, recipe.group_by_length and not recipe.packing)
    model.train()
    for step in range(1, total_steps + 1):
        started = time.perf_counter()
        drawn = [next(stream) for _ in range(per_step)]
        epoch, step_examples = drawn[-1][0], [example for _, example in drawn]
        while True:
            try:
                step_loss, step_tokens, padding = forward_backward(model, step_examples, shape, pad_id, device, scaler, recipe)
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)  # the half-done step is redone from scratch
                before, shape = shape, step_down(shape, model, device)
                on_event({"event": "out_of_memory_step_down", "step": step, "from": before.__dict__, "to": shape.__dict__})
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or math.inf).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - started
        on_step({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                 "step_s": seconds, "tokens_per_s": step_tokens / seconds, "padding_pct": padding, "micro_batch": shape.micro_batch,
                 "grad_accum": -(-per_step // shape.micro_batch), "seq_len": shape.seq_len, **usage_now(device)})


def forward_backward(model, examples, shape: StepShape, pad_id: int, device, scaler, recipe: Recipe) -> tuple[float, int, float]:
    """Accumulate gradients of one step's examples in micro-batches; returns (mean token loss, tokens, % padding)."""
    # Similar lengths share a micro-batch, so little is padded; the step's examples (and gradient) are the same.
    examples = sorted(data.truncate(examples, shape.seq_len), key=len)
    # Normalise by the step's labelled tokens, not per micro-batch, so any split gives the same gradient.
    n_targets = sum(sum(label != data.IGNORE for label in e.labels[1:]) for e in examples)
    step_loss, step_tokens, slots = 0.0, 0, 0
    for start in range(0, len(examples), shape.micro_batch):
        loss_sum, _, attention_mask = micro_batch_loss(model, examples[start:start + shape.micro_batch], pad_id, device, recipe)
        slots += attention_mask.numel()
        loss = loss_sum / n_targets
        scaler.scale(loss).backward()
        step_loss += loss.item()
        step_tokens += int(attention_mask.sum())
    return step_loss, step_tokens, 100 * (1 - step_tokens / slots)


def micro_batch_loss(model, examples, pad_id: int, device, recipe: Recipe):
    """(summed loss over the micro-batch's labelled tokens, their count, its attention mask), via the chunked loss."""
    decoder, head_weight, softcap = models.lm_parts(model)
    chunk_tokens = recipe.loss_chunk_tokens or default_chunk_tokens(head_weight.shape[0])
    hidden, labels, attention_mask = forward(decoder, examples, pad_id, device)
    loss_sum, count = chunked_cross_entropy(hidden, head_weight, labels, chunk_tokens=chunk_tokens, softcap=softcap)
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


def step_down(shape: StepShape, model, device: torch.device) -> StepShape:
    """The next cheaper way to run a step: halve the micro-batch (accumulation grows to keep the effective batch),
    then checkpoint with activations offloaded to host RAM, then halve sequences; UserError when nothing is left."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if shape.micro_batch > 1:
        return replace(shape, micro_batch=shape.micro_batch // 2)
    if not (shape.checkpointing and (shape.offload or device.type != "cuda")):
        models.set_checkpointing(model, offload=device.type == "cuda")
        return replace(shape, checkpointing=True, offload=device.type == "cuda")
    if shape.seq_len > 64:
        return replace(shape, seq_len=shape.seq_len // 2)
    raise UserError("Out of memory even at micro-batch 1, 64-token sequences, with activations offloaded.",
                    hint="Use a smaller model or a larger card; `qlora-kit plan` shows what fits.")


def evaluate(model, examples, recipe: Recipe, pad_id: int, device) -> float:
    """Mean token loss on held-out examples, without gradients or dropout."""
    total, count = 0.0, 0
    with models.no_dropout(model), torch.no_grad():
        for start in range(0, len(examples), recipe.micro_batch):
            loss_sum, n, _ = micro_batch_loss(model, examples[start:start + recipe.micro_batch], pad_id, device, recipe)
            total, count = total + loss_sum.item(), count + n
    return total / max(count, 1)


def count_steps(n_examples: int, recipe: Recipe) -> int:
    """Optimizer steps: recipe.steps, else enough for recipe.epochs passes over the data."""
    if recipe.steps:
        return recipe.steps
    return max(1, math.ceil(recipe.epochs * n_examples / (recipe.micro_batch * recipe.grad_accum)))


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
    """Paged 8-bit AdamW on CUDA (states page to host RAM under pressure); torch AdamW on CPU."""
    name = recipe.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name != "adamw" and device.type != "cuda":
        console.print(f"[yellow]{name} needs CUDA; using torch AdamW with fp32 states on CPU instead.[/]")
        name = "adamw"
    kwargs = dict(lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.999))
    if name == "adamw":
        console.print("Optimizer: torch AdamW (fp32 states)")
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    console.print(f"Optimizer: bitsandbytes {'PagedAdamW8bit' if name == 'paged_adamw_8bit' else 'AdamW8bit'}")
    optimizer_class = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return optimizer_class(params, **kwargs)
