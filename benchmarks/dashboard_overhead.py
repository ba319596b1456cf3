"""What the live dashboard costs a training run, measured in one process.

1. Drawing: the time to render the full dashboard to a terminal console, times the refresh rate (2 Hz),
   as a share of wall time; this runs on rich's refresh thread whatever the step rate.
2. Recording: the time of Dashboard.step() per training step.
3. A/B: real 4-bit training steps of a small Llama on CPU with the live dashboard drawing to a terminal,
   against the same steps in quiet mode, alternated three times; prints the ratio of mean step times.

Usage: python benchmarks/dashboard_overhead.py
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.data import dataset as data
from qlora_kit.model import load as models  # noqa: E402
from qlora_kit.plan.recipes import Recipe  # noqa: E402
from qlora_kit.train.dashboard import Dashboard, RunInfo  # noqa: E402
from qlora_kit.train.loop import Hooks, train_model  # noqa: E402
from tests.conftest import save_tiny_model  # noqa: E402
from tests.test_dashboard import scripted  # noqa: E402

INFO = RunInfo("bench", "tiny-llama", "cuda", total_steps=1000, capacity_gib=8.0, planned_gib=6.0)


def terminal() -> Console:
    return Console(file=open("/dev/null", "w"), force_terminal=True, width=110)


def render_seconds(repeats: int = 200) -> float:
    dashboard = Dashboard(terminal(), INFO, mode="quiet")
    for step in range(1, 300):
        dashboard.step(scripted(step))
    console = terminal()
    started = time.perf_counter()
    for _ in range(repeats):
        console.print(dashboard.render())
    return (time.perf_counter() - started) / repeats


def step_seconds(repeats: int = 20000) -> float:
    dashboard = Dashboard(terminal(), INFO, mode="quiet")
    metrics = scripted(5)
    started = time.perf_counter()
    for _ in range(repeats):
        dashboard.step(metrics)
    return (time.perf_counter() - started) / repeats


def training_step_seconds(folder: Path, mode: str, steps: int = 12) -> float:
    recipe = Recipe(rank=8, micro_batch=4, seq_len=256, dropout=0.0)
    tokenizer = models.load_tokenizer(folder)
    ids = torch.randint(3, len(tokenizer), (64, 256), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [data.Example(row, row) for row in ids]
    torch.manual_seed(0)
    model = models.attach_lora(models.load_base_4bit(folder, torch.float32, torch.device("cpu")), recipe)
    times = []
    info = RunInfo("bench", "tiny", "cpu", steps, 16.0, 2.0)
    with Dashboard(terminal(), info, mode) as dashboard:

        class Shown(Hooks):
            def step(self, metrics: dict) -> None:
                dashboard.step(metrics)
                times.append(metrics["step_s"])

        recipe = dataclasses.replace(recipe, steps=steps)
        train_model(model, examples, recipe, Shown(), pad_id=tokenizer.pad_token_id, dtype=torch.float32)
    return statistics.mean(times[2:])  # the first steps warm up


def main() -> None:
    render = render_seconds()
    record = step_seconds()
    print(f"render: {render * 1e3:.2f} ms per refresh; at 2 refreshes/s that is {2 * render:.2%} of wall time")
    print(f"record: {record * 1e6:.1f} us per step() call")
    folder = save_tiny_model(Path(tempfile.mkdtemp()), "llama")
    live, quiet = [], []
    for _ in range(3):
        live.append(training_step_seconds(folder, "live"))
        quiet.append(training_step_seconds(folder, "quiet"))
    ratio = statistics.median(live) / statistics.median(quiet)
    print(
        f"A/B on CPU: step {statistics.median(live) * 1e3:.1f} ms with the live dashboard vs "
        f"{statistics.median(quiet) * 1e3:.1f} ms quiet: ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
