"""What a run shows and records: a rich progress line on a terminal, plain lines elsewhere, metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    """Append one JSON object per optimizer step; flushed every line so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def describe_step(m: dict) -> str:
    """One compact line of a step's metrics, for logs and the progress bar."""
    memory = f"mem {m['mem_alloc_gib']:.2f} GiB" if m.get("mem_alloc_gib") is not None else f"rss {m['rss_gib']:.2f} GiB"
    return f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  {m['step_s']:.2f} s/step  {memory}"


class TrainingProgress:
    """Live progress bar on a terminal; one line every `every` steps when output is a log file or pipe."""

    def __init__(self, console: Console, total_steps: int):
        self.console = console
        self.total = total_steps
        self.every = max(1, total_steps // 20)
        self.progress = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console, refresh_per_second=4,
            )
            self.task = self.progress.add_task("train", total=total_steps, info="")

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def update(self, metrics: dict) -> None:
        line = describe_step(metrics)
        if self.progress:
            self.progress.update(self.task, completed=metrics["step"], info=line)
        elif metrics["step"] % self.every == 0 or metrics["step"] in (1, self.total):
            self.console.print(f"step {metrics['step']}/{self.total}  {line}", highlight=False)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()
