"""What a run shows and records: a live rich dashboard on a terminal, compact lines elsewhere, metrics.jsonl.

The live view is drawn from the stored state by rich's refresh thread (at most twice a second), so a training
step only stores a dict: the dashboard's cost does not grow with step rate (benchmarks/dashboard_overhead.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from qlora_kit.text import shown_path

SPARK = "▁▂▃▄▅▆▇█"
WARN_FRACTION = 0.95  # memory within 5% of the card turns red


class MetricsLog:
    """Append one JSON object per line (steps and events); flushed every line so a crash loses nothing written."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None  # None: a rank other than 0 writes nothing

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


@dataclass
class RunInfo:
    """The fixed facts a dashboard shows beside the moving ones."""

    name: str
    model: str
    device: str  # "cuda" or "cpu"
    total_steps: int
    capacity_gib: float  # the card's memory, or the host's RAM on CPU
    planned_gib: float  # the plan's total (nvidia-smi on GPU, process memory on CPU)


def sparkline(values: list[float], width: int = 24) -> str:
    """Recent values as a row of block characters, lowest to highest."""
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


def memory_bar(used: float, planned: float, capacity: float, width: int = 30) -> Text:
    """A bar of used memory against the capacity, with the planned peak marked as a caret."""
    capacity = max(capacity, 1e-9)
    filled = min(width, round(used / capacity * width))
    mark = min(width - 1, round(planned / capacity * width))
    colour = "red" if used >= WARN_FRACTION * capacity else "yellow" if used >= 0.85 * capacity else "green"
    bar = Text()
    for i in range(width):
        char = "^" if i == mark else ("█" if i < filled else "·")
        bar.append(char, style="bold magenta" if i == mark else colour if i < filled else "dim")
    return bar


def describe_step(m: dict) -> str:
    """One compact line of a step's metrics, for logs and pipes."""
    memory = (
        f"mem {m['mem_alloc_gib']:.2f}/{m['mem_reserved_gib']:.2f} GiB"
        if m.get("mem_alloc_gib") is not None
        else f"rss {m['rss_gib']:.2f} GiB"
    )
    rewards = f"  accuracy {m['reward_accuracy']:.2f} margin {m['reward_margin']:.3f}" if "reward_accuracy" in m else ""
    return f"loss {m['loss']:.4f}{rewards}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  {m['step_s']:.2f} s/step  {memory}"


def describe_rewards(m: dict) -> str:
    """A preference step's rewards (DPO's beta-scaled log-ratios, ORPO's beta-scaled mean log-probs), and eval's."""
    said = (
        f"chosen {m['reward_chosen']:+.3f}  rejected {m['reward_rejected']:+.3f}  margin {m['reward_margin']:+.3f}  "
        f"accuracy {m['reward_accuracy']:.0%}"
    )
    if m.get("eval_reward_accuracy") is not None:
        said += f"   eval: margin {m['eval_reward_margin']:+.3f}  accuracy {m['eval_reward_accuracy']:.0%}"
    return said


class Dashboard:
    """Live view on a terminal ("live"), a line every few steps ("plain"), or nothing until the summary ("quiet")."""

    def __init__(self, console: Console, info: RunInfo, mode: str = "auto"):
        self.console, self.info = console, info
        self.mode = ("live" if console.is_terminal else "plain") if mode == "auto" else mode
        self.every = max(1, info.total_steps // 20)
        # The loss is smoothed as the mean of the last tenth of the run (1-50 steps): a fixed-rate average would
        # trail a short run's falling loss by most of the run.
        self.window = min(50, max(1, info.total_steps // 10))
        self.latest: dict | None = None
        self.losses: list[float] = []
        self.notes: list[str] = []
        self.last_checkpoint: int | None = None
        self.started = time.perf_counter()
        self.live = (
            Live(get_renderable=self.render, console=console, refresh_per_second=2, transient=False)
            if self.mode == "live"
            else None
        )
        self.restore_terminal = lambda: None

    def __enter__(self):
        if self.live:
            self.restore_terminal = hide_control_echo()
            self.live.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        """Draw the last frame and give the terminal back (again: harmless); what is printed next goes below it."""
        if self.live:
            self.live.stop()
            self.restore_terminal()

    def step(self, m: dict) -> None:
        """Take one step's metrics; cheap, since drawing happens on rich's refresh thread."""
        self.latest = m
        self.losses.append(m["loss"])
        if self.mode == "plain" and (m["step"] % self.every == 0 or m["step"] in (1, self.info.total_steps)):
            self.console.print(f"step {m['step']}/{self.info.total_steps}  {describe_step(m)}", highlight=False)

    def checkpoint(self, step: int) -> None:
        self.last_checkpoint = step
        if self.mode == "plain":
            self.console.print(f"checkpoint saved at step {step}", highlight=False)

    def note(self, text: str) -> None:
        """An event worth seeing (an out-of-memory step-down): kept on screen and printed in plain mode."""
        self.notes.append(text)
        if self.mode != "live":
            self.console.print(f"[yellow]{text}[/]")

    def render(self) -> Panel:
        """The whole dashboard as one panel, drawn from the stored state."""
        info, m = self.info, self.latest
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        elapsed = time.perf_counter() - self.started
        if m is None:
            grid.add_row("progress", f"loading, first step running ... {elapsed:.0f} s")
            return Panel(grid, title=f"qlora-kit  {info.name}  {info.model}", border_style="cyan")
        done = m["step"] / info.total_steps
        eta = elapsed / done - elapsed if done else 0
        progress = Text(f"step {m['step']}/{info.total_steps}  ")
        progress.append("█" * round(done * 20), style="cyan").append("·" * (20 - round(done * 20)), style="dim")
        progress.append(f"  {done:.0%}  epoch {m['epoch']}  elapsed {_clock(elapsed)}  eta {_clock(eta)}")
        grid.add_row("progress", progress)
        recent = self.losses[-self.window :]
        mean = f"mean of last {len(recent)} {sum(recent) / len(recent):.4f}  " if len(recent) > 1 else ""
        loss = Text(f"{m['loss']:.4f}  {mean}best {min(self.losses):.4f}  ")
        loss.append(sparkline(self.losses), style="cyan")
        if m.get("eval_loss") is not None:
            loss.append(f"  eval {m['eval_loss']:.4f}")
        grid.add_row("loss", loss)
        if "reward_accuracy" in m:
            grid.add_row("rewards", describe_rewards(m))
        grid.add_row("learning rate", f"{m['lr']:.2e}   grad norm {m['grad_norm']:.3f}")
        threads = f"   {m['cpu_threads']} CPU thread{'s' * (m['cpu_threads'] > 1)}" if m.get("cpu_threads") else ""
        grid.add_row(
            "speed",
            f"{m['tokens_per_s']:,.0f} tokens/s   {m['step_s']:.2f} s/step   "
            f"micro-batch {m['micro_batch']} x {m['grad_accum']}, seq {m['seq_len']}{threads}",
        )
        if info.device == "cuda" and m.get("mem_alloc_gib") is not None:
            shown = m.get("nvml_used_gib") or m["mem_reserved_gib"]
            grid.add_row(
                "GPU memory",
                f"allocated {m['mem_alloc_gib']:.2f}  reserved {m['mem_reserved_gib']:.2f}  "
                f"peak {m['mem_peak_gib']:.2f}  nvidia-smi {_gib(m.get('nvml_used_gib'))} GiB",
            )
            grid.add_row(
                "",
                memory_bar(shown, info.planned_gib, info.capacity_gib).append(
                    f"  of {info.capacity_gib:.1f} GiB, plan ^ {info.planned_gib:.1f}"
                ),
            )
            if m.get("gpu_util_pct") is not None:
                grid.add_row("GPU", f"utilisation {m['gpu_util_pct']}%   temperature {m['gpu_temp_c']} C")
        else:
            grid.add_row(
                "process memory",
                memory_bar(m["rss_gib"], info.planned_gib, info.capacity_gib).append(
                    f"  RSS {m['rss_gib']:.2f} of {info.capacity_gib:.1f} GiB, plan ^ {info.planned_gib:.1f}"
                ),
            )
        if m.get("rank_memory"):
            key = "mem_reserved_gib" if info.device == "cuda" else "rss_gib"
            grid.add_row(
                "every rank",
                "   ".join(f"{r}: {_gib(reading[key])} GiB" for r, reading in enumerate(m["rank_memory"]))
                + ("  (reserved)" if info.device == "cuda" else "  (RSS)"),
            )
        grid.add_row(
            "host",
            f"RSS {m['rss_gib']:.2f} GiB   RAM available {_gib(m.get('ram_available_gib'))} GiB   "
            f"swap used {_gib(m.get('swap_used_gib'))} GiB",
        )
        grid.add_row("checkpoint", f"step {self.last_checkpoint}" if self.last_checkpoint else "none yet")
        for note in self.notes[-3:]:
            grid.add_row("[yellow]note", Text(note, style="yellow"))
        return Panel(grid, title=f"qlora-kit  {info.name}  {info.model}  ({info.device})", border_style="cyan")


def hide_control_echo():
    """Stop the terminal from echoing ^C while the live view is drawn; returns what restores it. The echo lands after
    the panel's last line and wraps it, so the next redraw starts a line too low and leaves a border behind."""
    try:
        import termios

        if not sys.stdin.isatty():
            return lambda: None
        settings = termios.tcgetattr(sys.stdin)
        quiet = [*settings[:3], settings[3] & ~termios.ECHOCTL, *settings[4:]]
        termios.tcsetattr(sys.stdin, termios.TCSANOW, quiet)
    except (ImportError, AttributeError, OSError, ValueError):  # Windows, or stdin closed or replaced
        return lambda: None
    return lambda: termios.tcsetattr(sys.stdin, termios.TCSANOW, settings)


def _gib(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def describe_step_down(event: dict) -> str:
    """What an out-of-memory step-down changed, in words: 'micro-batch 4 -> 2'."""
    before, after = event["from"], event["to"]
    names = {
        "micro_batch": "micro-batch",
        "seq_len": "sequence length",
        "checkpointing": "checkpointing",
        "uncheckpointed_layers": "uncheckpointed layers",
        "offload": "activation offload",
    }
    return ", ".join(
        f"{names[k]} {before.get(k, 0)} -> {after.get(k, 0)}" for k in names if before.get(k, 0) != after.get(k, 0)
    )


def summary_table(summary, info: RunInfo) -> Table:
    """The end-of-run table: time, tokens, losses, peak memory against the plan, and the adapter."""
    table = Table(title=f"{info.name}: {'stopped early' if summary.stopped_by else 'done'}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{summary.steps} of {info.total_steps}")
    table.add_row("time", f"{_clock(summary.seconds)} ({summary.seconds / max(1, summary.steps):.2f} s/step)")
    table.add_row(
        "tokens",
        f"{summary.tokens:,} ({summary.tokens / max(summary.seconds, 1e-9):,.0f}/s), "
        f"{summary.padding_pct:.0f}% padding",
    )
    table.add_row(
        "loss", f"first {summary.first_loss:.4f}, final {summary.last_loss:.4f}, best {summary.best_loss:.4f}"
    )
    if summary.rewards.get("reward_accuracy") is not None:
        table.add_row("rewards", describe_rewards(summary.rewards))
    label = "GPU peak (reserved)" if info.device == "cuda" else "process peak (RSS)"
    table.add_row(
        label, f"{summary.peak_memory_gib:.2f} GiB; planned {info.planned_gib:.2f} GiB of {info.capacity_gib:.1f}"
    )
    if summary.skipped_updates:
        table.add_row(
            "[yellow]skipped",
            f"{summary.skipped_updates} of {summary.steps} updates: the loss or gradient was "
            "NaN/inf, so those steps did not change the weights",
        )
    for change in summary.step_downs:
        table.add_row("[yellow]step-down", change)
    table.add_row("adapter", f"{summary.adapter_dir} ({summary.adapter_bytes / 2**20:.1f} MiB, plain PEFT)")
    return table


def print_summary(console: Console, summary, info: RunInfo) -> None:
    console.print(summary_table(summary, info))
    console.print(
        Text(f'Try it: qlora-kit generate --adapter {shown_path(summary.adapter_dir)} --prompt "..."', style="dim"),
        soft_wrap=True,
    )
