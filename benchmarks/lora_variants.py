"""LoRA, rsLoRA at rank 64, DoRA and LoftQ's start side by side on the demo (SmolLM2-135M, pirate data): eval loss
after the same number of steps (for each seed) and after the same wall time, on the demo's held-out split and on a
second held-out set, with peak RSS and tokens per second, in one run (same machine, same load).

    python benchmarks/lora_variants.py [--steps 30] [--seeds 0 1] [--out /tmp/variants]

Each variant trains in its own process (its peak RSS is its own, model loading included; "run s" is the whole
process, "step s" the training steps alone); then `qlora-kit eval`'s loss on the second set. "Same wall time": each
variant trains again for as many steps as fit in the time plain LoRA's steps took (first seed, its step times
measured above in this run, averaged over the seeds), its schedule set for that many. Timings swing with whatever else runs: read the
ratios, and note `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "LoRA r16": {},
    "rsLoRA r64": {"use_rslora": True, "rank": 64, "alpha": 16},
    "DoRA r16": {"use_dora": True},
    "LoftQ r16": {"lora_init": "loftq"},
}
SECOND_SET = [  # held out from training, in the demo's format: questions the demo data does not ask
    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    for question, answer in [
        ("What is the tallest mountain?", "Arr, matey! The tallest mountain be Everest, a fine peak for any sailor."),
        ("How many legs does a spider have?", "Arr, matey! A spider be havin' eight legs, like a fine rigging."),
        ("What do bees make?", "Arr, matey! Bees be makin' honey, sweeter than any treasure."),
        ("What colour is the sky?", "Arr, matey! The sky be blue as the open sea."),
    ]
]

TRAIN = """
import json, sys, time, re
from pathlib import Path
from rich.console import Console
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import RunOptions, run_training
settings, out = json.loads(sys.argv[1]), Path(sys.argv[2])
started = time.perf_counter()
summary = run_training(Recipe(**settings), out, Console(quiet=True), RunOptions(display="quiet"))
metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
tokens = sum(m.get("tokens", 0) for m in metrics)
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens,
                  "step_seconds": sum(m.get("step_s", 0) for m in metrics),
                  "eval_loss": ([m["eval_loss"] for m in metrics if "eval_loss" in m] or [None])[-1],
                  "planned_gib": json.loads((out / "plan.json").read_text())["plan"]["total_bytes"] / 2**30,
                  "peak_gib": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/variants"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    second = args.out / "second.jsonl"
    second.write_text("".join(json.dumps(r) + "\n" for r in SECOND_SET))
    print(f"uptime: {os.getloadavg()}; smollm2-135m, demo data, 10% held out, seq 256 x 4, lr 2e-4")
    header = (
        f"{'variant':<12}{'seed':>5}{'steps':>6}{'eval loss':>10}{'2nd set loss':>14}{'run s':>8}{'step s':>8}"
        f"{'tokens/s':>10}{'peak RSS GiB':>14}"
    )
    print(f"\nSame steps ({args.steps}):\n{header}")
    step_seconds = {}
    for seed in args.seeds:
        for name, variant in VARIANTS.items():
            result = train_and_report(name, {**variant, "seed": seed}, args.steps, args.out, second)
            step_seconds.setdefault(name, []).append(result["step_seconds"] / args.steps)
    # Each variant's step time averaged over the seeds: one run's swings with what else the machine does.
    step_seconds = {name: sum(times) / len(times) for name, times in step_seconds.items()}
    print(f"\nSame wall time (as LoRA r16's {args.steps} steps took, seed {args.seeds[0]}):\n{header}")
    budget = step_seconds["LoRA r16"] * args.steps
    for name, variant in VARIANTS.items():
        steps = max(1, round(budget / step_seconds[name]))
        if name != "LoRA r16" and steps != args.steps:
            train_and_report(name, {**variant, "seed": args.seeds[0]}, steps, args.out, second)


def train_and_report(name: str, variant: dict, steps: int, out: Path, second: Path) -> dict:
    """Train one variant for steps in its own process, print its row, and return its measurements."""
    demo_data = ROOT / "qlora_kit" / "demo_data" / "pirate.jsonl"
    folder = out / f"{name.replace(' ', '-')}-seed{variant['seed']}-{steps}"
    settings = {
        "model": "smollm2-135m",
        "data": str(demo_data),
        "steps": steps,
        "eval_fraction": 0.1,
        "seq_len": 256,
        "micro_batch": 4,
        "lr": 2e-4,
        "checkpoint_every": 0,
        **variant,
    }
    result = train_in_own_process(settings, folder)
    second_loss = held_out_loss(folder / "adapter", second)
    print(
        f"{name:<12}{variant['seed']:>5}{steps:>6}{result['eval_loss']:>10.4f}{second_loss:>14.4f}{result['seconds']:>8.1f}"
        f"{result['step_seconds']:>8.1f}{result['tokens'] / result['step_seconds']:>10.0f}{result['peak_gib']:>14.2f}",
        flush=True,
    )
    return result


def train_in_own_process(settings: dict, folder: Path, env: dict | None = None) -> dict:
    """Train Recipe(**settings) into folder in a fresh process (with env added to its environment): its seconds,
    tokens, step seconds, last eval loss, peak RSS (model loading included) and planned peak."""
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, json.dumps(settings), str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if done.returncode != 0:
        raise SystemExit(f"{folder.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_out_loss(adapter: Path, data: Path) -> float:
    """Mean loss of the adapted 4-bit model on data's answers, as `qlora-kit eval` computes it."""
    done = subprocess.run(
        [sys.executable, "-m", "qlora_kit", "eval", "--adapter", str(adapter), "--data", str(data), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout)["adapter_loss"]


if __name__ == "__main__":
    main()
