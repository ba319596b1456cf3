"""CPU training and generation beside other busy programs: step time and tokens/s on a free machine and with
competing processes, before (torch's fixed thread count) and after (qlora-kit's threads for the free cores).

Each measurement runs in a fresh process, with busy-loop processes as the competing load. "before" pins
OMP_NUM_THREADS to torch's own default, which is what qlora-kit did until it matched threads to free cores; "after"
is qlora-kit as shipped. Generation is also measured on the 16-bit model folder (what `merge` writes) with plain
transformers, in fp32 and bf16, for the choice of keeping the 4-bit base on CPU. Figures are ratios within one run.

    python benchmarks/cpu_contention.py                  # SmolLM2-135M, 0, 1 and 3 competing processes
    python benchmarks/cpu_contention.py --competitors 0 2 --steps 3 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about the moon."


def train_worker(steps: int, seq: int, batch: int) -> dict:
    """Median seconds of a training step of the demo's shape (LoRA r16 on the 4-bit base), through the training loop."""
    import torch

    from qlora_kit.cli.demo import DEMO_DATA
    from qlora_kit.data import dataset as data
    from qlora_kit.model import load as models
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.probe.sources import resolve_model
    from qlora_kit.train.loop import StepsKept, train_model

    recipe = Recipe(
        rank=16,
        alpha=32,
        seq_len=seq,
        micro_batch=batch,
        grad_accum=1,
        steps=steps + 1,
        lr=1e-3,
        gradient_checkpointing=False,
        group_by_length=False,
    )
    folder = resolve_model("smollm2-135m")
    tokenizer = models.load_tokenizer(folder)
    examples = data.tokenize(data.read_records(DEMO_DATA).records, tokenizer, seq)
    model = models.attach_lora(models.load_base_4bit(folder, torch.float32, torch.device("cpu")), recipe)
    hooks = StepsKept()
    train_model(model, examples, recipe, hooks, pad_id=tokenizer.pad_token_id, dtype=torch.float32)
    seen = hooks.steps
    timed = seen[1:]  # the first step warms allocators and kernels up
    return {
        "step_s": statistics.median(m["step_s"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
        "threads": [m["cpu_threads"] for m in seen],
    }


def generate_worker(kind: str, tokens: int, repeats: int) -> dict:
    """Greedy tokens/s for one chat prompt: qlora-kit's 4-bit path, or plain transformers on the 16-bit folder."""
    import torch

    from qlora_kit.adapter.folder import Sampling, generate_replies
    from qlora_kit.model import load as models
    from qlora_kit.probe.sources import resolve_model

    folder = resolve_model("smollm2-135m")
    tokenizer = models.load_tokenizer(folder)
    if kind == "4bit":
        model = models.load_base_4bit(folder, torch.float32, torch.device("cpu"))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=models.DTYPES[kind])
    model.eval()
    rates, threads = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        if kind == "4bit":  # the product's path, thread choice included
            [reply] = generate_replies(
                model, tokenizer, [[{"role": "user", "content": PROMPT}]], Sampling(max_new_tokens=tokens)
            )
            made = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
            threads.append(torch.get_num_threads())
        else:  # what a user of plain transformers runs
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
            )
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            made = out.shape[1] - inputs["input_ids"].shape[1]
            threads.append(torch.get_num_threads())
        rates.append(made / (time.perf_counter() - started))
    return {"tokens_per_s": statistics.median(rates), "threads": threads}


def measure(what: str, policy: str, competitors: int, args) -> dict:
    """One measurement in a fresh process (OpenMP reads its settings at start), beside `competitors` busy loops."""
    import torch

    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    env.pop("OMP_NUM_THREADS", None)
    if policy == "before":
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # torch's default, fixed: qlora-kit until now
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        command = [
            sys.executable,
            __file__,
            "--worker",
            what,
            "--steps",
            str(args.steps),
            "--seq",
            str(args.seq),
            "--batch",
            str(args.batch),
            "--tokens",
            str(args.tokens),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    finally:
        for process in load:
            process.kill()
    if out.returncode != 0:
        return {"status": "failed", "error": out.stderr[-1500:]}
    return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--competitors", type=int, nargs="+", default=[0, 1, 3], help="busy processes beside each measurement"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="generations per measurement (median)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "train":
        print(json.dumps(train_worker(args.steps, args.seq, args.batch)))
        return
    if args.worker:
        print(json.dumps(generate_worker(args.worker, args.tokens, args.repeats)))
        return

    started, load_at_start = time.time(), os.getloadavg()[0]
    rows = []
    for what in ("train", "4bit"):
        for competitors in args.competitors:
            for policy in ("before", "after"):
                row = {
                    "what": what,
                    "competitors": competitors,
                    "policy": policy,
                    **measure(what, policy, competitors, args),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    for kind in ("fp32", "bf16"):  # plain transformers on the 16-bit model, on a free machine
        row = {"what": kind, "competitors": 0, "policy": "plain transformers", **measure(kind, "after", 0, args)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def figure(what: str, competitors: int, policy: str) -> float | None:
        row = next((r for r in rows if (r["what"], r["competitors"], r["policy"]) == (what, competitors, policy)), None)
        if row is None or row["status"] != "ok":
            return None
        return row["step_s"] if what == "train" else row["tokens_per_s"]

    print(
        f"\nSmolLM2-135M on {os.cpu_count()} cores ({platform.machine()}), load average at the start: {load_at_start:.2f}"
    )
    measures = {
        "train": (f"training step, seq {args.seq} x {args.batch}", "s", 1),
        "4bit": ("4-bit generation", "tok/s", -1),
    }
    for what, (title, unit, power) in measures.items():  # a slowdown is time / free time, or free rate / rate
        print(f"{title} ({unit}); slowdown against the same policy on a free machine")
        for competitors in args.competitors:
            pairs = {
                policy: (figure(what, competitors, policy), figure(what, 0, policy)) for policy in ("before", "after")
            }
            if None in [x for pair in pairs.values() for x in pair]:
                continue
            shown = "   ".join(
                f"{policy} {value:.2f} {unit} ({(value / free) ** power:.1f}x)"
                for policy, (value, free) in pairs.items()
            )
            print(f"  {competitors} competing: {shown}   after/before {pairs['after'][0] / pairs['before'][0]:.2f}")
    four_bit = figure("4bit", 0, "after")
    for kind in ("fp32", "bf16"):
        plain = figure(kind, 0, "plain transformers")
        if four_bit and plain:
            print(
                f"  free machine: qlora-kit 4-bit {four_bit:.1f} tok/s, plain transformers {kind} {plain:.1f} tok/s "
                f"(4-bit / {kind} = {four_bit / plain:.2f})"
            )

    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"cpu_contention_{platform.machine()}_x{os.cpu_count()}.jsonl"
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.time() - started),
        "load_at_start": load_at_start,
        "settings": vars(args) | {"results": None},
        "rows": rows,
    }
    with out.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    print(f"\nresults appended to {out}")


if __name__ == "__main__":
    main()
