"""`qlora-kit report`: a finished (or running) run's summary from its files, and a PNG of loss and memory.

Reads runs/NAME/metrics.jsonl, plan.json and recipe.yaml; several runs are overlaid for comparison.
Plotting needs matplotlib, an optional extra (`pip install "qlora-kit[plot]"`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from qlora_kit.errors import UserError
from qlora_kit.files import check_not_under_a_file, staged_file
from qlora_kit.plan.recipes import read_settings
from qlora_kit.train.dashboard import describe_rewards, describe_step_down
from qlora_kit.train.run_folder import RunFolder
from qlora_kit.units import GIB

FIGURE_INCHES, DPI = (10, 7), 100  # 1000 x 700 pixels


@dataclass
class Run:
    name: str
    folder: Path
    steps: list[dict]
    events: list[dict] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    planned_gib: float | None = None
    capacity_gib: float | None = None
    device: str = "cpu"


def load_run(folder: str | Path) -> Run:
    """Read a run folder; UserError if it holds no metrics."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(
            f"{folder} holds no metrics.jsonl, so it is not a qlora-kit run.", hint="Pass a folder under runs/."
        )
    records, lines = [], metrics.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # being written right now, or cut short by a full disk: a resume drops it too
                    continue
                raise UserError(
                    f"{metrics}, line {number} is not valid JSON.",
                    hint="The file may be damaged; the other lines are fine.",
                ) from None
    run = Run(folder.name, folder, [r for r in records if "event" not in r], [r for r in records if "event" in r])
    if not run.steps:
        raise UserError(
            f"{folder} has not finished a step yet.", hint="Wait for the first step, then run report again."
        )
    run.recipe = read_settings(folder / "recipe.yaml")
    if plan := RunFolder(folder).plan():
        run.planned_gib, run.capacity_gib = plan.plan.total_bytes / GIB, plan.target.capacity_bytes / GIB
        run.device = plan.plan.device
    return run


def summary_table(run: Run) -> Table:
    """A run's vital figures as a rich table."""
    steps, last = run.steps, run.steps[-1]
    losses = [s["loss"] for s in steps]
    table = Table(title=f"{run.folder}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", str(run.recipe.get("model", "?")))
    table.add_row(
        "steps",
        f"{last['step']}"
        + (f" (rank {run.recipe['rank']}, seq {run.recipe['seq_len']})" if "rank" in run.recipe else ""),
    )
    seconds = last.get("time_s") or sum(s["step_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    table.add_row("time", f"{seconds:.0f} s ({seconds / len(steps):.2f} s/step)")
    table.add_row("tokens", f"{tokens:,} ({tokens / max(seconds, 1e-9):,.0f}/s)")
    table.add_row("loss", f"first {losses[0]:.4f}, final {losses[-1]:.4f}, best {min(losses):.4f}")
    evals = [s["eval_loss"] for s in steps if s.get("eval_loss") is not None]
    if evals:
        table.add_row("eval loss", f"final {evals[-1]:.4f}, best {min(evals):.4f}")
    if "reward_accuracy" in last:
        table.add_row("rewards", describe_rewards(last))
    peak, label = peak_memory(run)
    planned = f"; planned {run.planned_gib:.2f} GiB" if run.planned_gib is not None else ""
    table.add_row(label, f"{peak:.2f} GiB{planned}")
    for event in run.events:
        table.add_row("[yellow]step-down", f"step {event['step']}: {describe_step_down(event)}")
    weights = run.folder / "adapter" / "adapter_model.safetensors"
    table.add_row(
        "adapter",
        f"{weights.parent} ({weights.stat().st_size / 2**20:.1f} MiB)" if weights.is_file() else "not written yet",
    )
    return table


def peak_memory(run: Run) -> tuple[float, str]:
    """The run's memory peak and what it measures: GPU reserved memory, or the process RSS on CPU."""
    reserved = [s["mem_reserved_gib"] for s in run.steps if s.get("mem_reserved_gib") is not None]
    if reserved:
        return max(reserved), "GPU peak (reserved)"
    return max(s["rss_gib"] for s in run.steps), "process peak (RSS)"


def plot_rewards(axes, run: Run, colour: str) -> None:
    """A preference run's reward margin (and eval's) on axes, with its accuracy on a twin 0-1 axis."""
    stepped = [s for s in run.steps if "reward_margin" in s]
    if not stepped:
        return
    steps = [s["step"] for s in stepped]
    axes.plot(steps, [s["reward_margin"] for s in stepped], color=colour, label=f"{run.name} reward margin")
    evals = [(s["step"], s["eval_reward_margin"]) for s in stepped if s.get("eval_reward_margin") is not None]
    if evals:
        axes.plot(*zip(*evals), color=colour, linestyle=":", marker="o", label=f"{run.name} eval margin")
    axes.set_ylabel("reward margin")
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)
    accuracy = axes.twinx()
    accuracy.plot(
        steps,
        [s["reward_accuracy"] for s in stepped],
        color=colour,
        alpha=0.4,
        linestyle="--",
        label=f"{run.name} accuracy",
    )
    accuracy.set_ylim(0, 1.05)
    accuracy.set_ylabel("reward accuracy")


def png_path(path: str | Path) -> Path:
    """Where --png writes: the file named, or report.png in a folder named; any other name is refused before work."""
    path = Path(path)
    if path.is_dir():
        return path / "report.png"
    if path.suffix.lower() != ".png":
        raise UserError(
            f"--png {path} does not name a .png file.",
            hint=f"Give a name ending in .png, e.g. --png {path.with_suffix('.png')}.",
        )
    check_not_under_a_file(path, hint="Choose another --png.")
    return path


def write_png(runs: list[Run], path: str | Path) -> Path:
    """Loss (and eval loss) and memory over steps for one or more runs, with planned peaks as dashed lines; returns
    the file written (report.png inside a folder given)."""
    path = png_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "Plotting needs matplotlib, which is not installed.", hint='Run: pip install "qlora-kit[plot]"'
        ) from None
    preference = any("reward_accuracy" in s for run in runs for s in run.steps)
    figure, axes = plt.subplots(3 if preference else 2, 1, figsize=FIGURE_INCHES, dpi=DPI, sharex=True)
    loss_axes, memory_axes = axes[0], axes[-1]
    for index, run in enumerate(runs):
        colour = f"C{index}"
        steps = [s["step"] for s in run.steps]
        loss_axes.plot(steps, [s["loss"] for s in run.steps], color=colour, label=f"{run.name} loss")
        evals = [(s["step"], s["eval_loss"]) for s in run.steps if s.get("eval_loss") is not None]
        if evals:
            loss_axes.plot(*zip(*evals), color=colour, linestyle=":", marker="o", label=f"{run.name} eval loss")
        if any(s.get("mem_alloc_gib") is not None for s in run.steps):
            memory_axes.plot(
                steps, [s["mem_alloc_gib"] for s in run.steps], color=colour, label=f"{run.name} allocated"
            )
            memory_axes.plot(
                steps, [s["mem_reserved_gib"] for s in run.steps], color=colour, alpha=0.5, label=f"{run.name} reserved"
            )
        else:
            memory_axes.plot(steps, [s["rss_gib"] for s in run.steps], color=colour, label=f"{run.name} process RSS")
        if run.planned_gib is not None:
            memory_axes.axhline(run.planned_gib, color=colour, linestyle="--", label=f"{run.name} planned peak")
        if preference:
            plot_rewards(axes[1], run, colour)
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper right", fontsize="small")
    loss_axes.grid(alpha=0.3)
    memory_axes.set_ylabel("memory (GiB)")
    memory_axes.set_xlabel("optimizer step")
    memory_axes.set_ylim(bottom=0)
    memory_axes.legend(loc="lower right", fontsize="small")
    memory_axes.grid(alpha=0.3)
    figure.suptitle("qlora-kit: " + ", ".join(run.name for run in runs))
    figure.tight_layout()
    with staged_file(path, hint="Choose another --png.") as staging:
        figure.savefig(staging, format="png")  # fixed size and dpi: tight bbox would change the pixel size
    plt.close(figure)
    return path
