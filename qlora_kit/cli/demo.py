"""`qlora-kit demo`: fine-tune the shipped SmolLM2-135M-Instruct to answer like a pirate, offline, in minutes.

It ends by loading the saved adapter from disk and printing the base model's and the adapted model's
answers to questions that are not in the training data, side by side.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora_kit.adapter.folder import generate, load_with_adapter
from qlora_kit.plan.recipes import Recipe
from qlora_kit.text import shown_path
from qlora_kit.train.dashboard import summary_table
from qlora_kit.train.run import RunOptions, run_training
from qlora_kit.train.run_folder import next_free_run_dir

DEMO_DATA = Path(str(resources.files("qlora_kit").joinpath("demo_data", "pirate.jsonl")))
# None of these is in the training data (see demo_data/make_pirate_data.py).
DEMO_PROMPTS = ["What is the capital of Japan?", "How can I get better at chess?", "Tell me about the moon."]
# Measured on 2 CPU cores: 32 steps take about 65 s and the pirate voice is unmistakable afterwards.
# Checkpointing is off because host RAM is plentiful for a 135M model and recomputation costs ~27% per step.
DEMO_RECIPE = Recipe(
    model="smollm2-135m",
    data=str(DEMO_DATA),
    rank=16,
    alpha=32,
    dropout=0.0,
    seq_len=128,
    micro_batch=8,
    grad_accum=1,
    steps=32,
    lr=1e-3,
    seed=0,
    gradient_checkpointing=False,
)


def run_demo(out: Path | None, steps: int | None, console: Console, display: str = "auto") -> None:
    """Train the demo adapter, then compare base and adapted answers side by side."""
    out = out or next_free_run_dir(Path("runs"), "demo")
    recipe = DEMO_RECIPE if steps is None else dataclasses.replace(DEMO_RECIPE, steps=steps)
    console.rule("qlora-kit demo: teach SmolLM2-135M to talk like a pirate")
    summary = run_training(recipe, out, console, RunOptions(display=display))
    console.print(summary_table(summary, summary.info))
    with console.status("Loading the saved adapter and answering questions it never saw ..."):
        model, tokenizer = load_with_adapter(recipe.model, summary.adapter_dir)
        rows = []
        for prompt in DEMO_PROMPTS:
            with model.disable_adapter():
                before = generate(model, tokenizer, prompt, max_new_tokens=60)
            rows.append((prompt, before, generate(model, tokenizer, prompt, max_new_tokens=60)))
    table = Table(title="Same prompts, before and after fine-tuning", show_lines=True)
    table.add_column("Prompt (not in training data)", style="bold", ratio=1)
    table.add_column("Base SmolLM2-135M", ratio=2)
    table.add_column("With the adapter", style="green", ratio=2)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        f'Try it yourself: qlora-kit generate --adapter {shown_path(summary.adapter_dir)} --prompt "Tell me a joke."',
        highlight=False,
        soft_wrap=True,
    )
