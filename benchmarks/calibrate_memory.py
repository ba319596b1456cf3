"""Measure qlora-kit's real peak GPU memory over a grid and record it beside the memory model's estimate.

Each model is built from its catalogue config with random weights (no download), saved once in bf16, and loaded
in 4-bit by qlora-kit's own loader. For every grid point, LoRA is attached, three optimizer steps run on random
tokens of exactly `seq` length, and the peaks are read: torch max allocated / reserved, and nvml's used memory
(what nvidia-smi shows). Results append to benchmarks/results/memory_<device>.jsonl, one JSON object per point,
with the estimate made for the same settings; tests/test_memory.py checks every committed point.

Usage (on a CUDA machine):
  python benchmarks/calibrate_memory.py                      # the default grid below
  python benchmarks/calibrate_memory.py --models gemma-2b --seqs 512,2048 --batches 1 --ranks 16 --checkpointing on
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.random_model import build_random_model  # noqa: E402
from qlora_kit.data import dataset as data
from qlora_kit.model import load as models  # noqa: E402
from qlora_kit.plan.memory import estimate_peak_memory  # noqa: E402
from qlora_kit.plan.recipes import Recipe  # noqa: E402
from qlora_kit.probe.catalog import find_model_shape  # noqa: E402
from qlora_kit.probe.hardware import gpu_readings  # noqa: E402
from qlora_kit.train.loop import StepsKept, train_model  # noqa: E402
from qlora_kit.units import GIB  # noqa: E402


def measure_point(base, shape, recipe: Recipe, steps: int = 3) -> dict:
    """Attach LoRA to the loaded base, train `steps` steps, read the peaks, and take the LoRA off again."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    lora = models.attach_lora(base, recipe)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(
        3, shape.vocab_size, (recipe.micro_batch * recipe.grad_accum * steps, recipe.seq_len), generator=generator
    )
    examples = [data.Example(row, row) for row in ids.tolist()]
    timings = []
    result = {}
    try:
        hooks = StepsKept()
        train_model(lora, examples, replace(recipe, steps=steps), hooks, pad_id=0, dtype=torch.bfloat16)
        timings += [m["tokens_per_s"] for m in hooks.steps]
        torch.cuda.synchronize()
        result = {
            "status": "ok",
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(),
            "nvml_used_gib": gpu_readings(0)["nvml_used_gib"],
            "tokens_per_s": timings[-1],
        }
    except torch.OutOfMemoryError:
        result = {
            "status": "oom",
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(),
        }
    finally:
        lora.unload()  # back to the plain 4-bit base for the next point
        if recipe.gradient_checkpointing:
            base.activation_checkpointing_disable()
        del lora
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma-2b,llama-3.1-8b")
    parser.add_argument("--seqs", default="512,2048,8192")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument(
        "--checkpointing", default="on,half,off", help="on: every layer; half: the last half kept whole; off"
    )
    parser.add_argument(
        "--variants", default="lora", help="lora and/or dora (DoRA's magnitudes and the outputs it keeps)"
    )
    parser.add_argument("--work", default="/tmp/qlora-kit-calibration", help="where random models are saved")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "calibration measures GPU memory: run it on a CUDA machine"

    device_name = torch.cuda.get_device_name(0)
    out = Path(args.out) / f"memory_{device_name.replace(' ', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {p: metadata.version(p) for p in ("torch", "bitsandbytes", "transformers", "peft")}
    command = " ".join(["python", "benchmarks/calibrate_memory.py", *sys.argv[1:]])
    for name in args.models.split(","):
        shape = find_model_shape(name)
        folder = build_random_model(name, Path(args.work) / name)
        base = models.load_base_4bit(folder, torch.bfloat16, torch.device("cuda", 0))
        grid = itertools.product(
            [int(s) for s in args.seqs.split(",")],
            [int(b) for b in args.batches.split(",")],
            [int(r) for r in args.ranks.split(",")],
            args.checkpointing.split(","),
            args.variants.split(","),
        )
        for seq, batch, rank, checkpointing, variant in grid:
            recipe = Recipe(
                seq_len=seq,
                micro_batch=batch,
                rank=rank,
                gradient_checkpointing=checkpointing != "off",
                uncheckpointed_layers=shape.num_layers // 2 if checkpointing == "half" else 0,
                use_dora=variant == "dora",
            )
            started = time.time()
            measured = measure_point(base, shape, recipe)
            plan = estimate_peak_memory(shape, recipe, "cuda")
            record = {
                "model": name,
                "seq_len": seq,
                "micro_batch": batch,
                "rank": rank,
                "checkpointing": checkpointing,
                "variant": variant,
                **measured,
                "estimate_allocated": plan.allocated_bytes,
                "estimate_reserved": plan.allocated_bytes + plan.components["allocator_slack"],
                "estimate_total": plan.total_bytes,
                "device": device_name,
                "versions": versions,
                "python": platform.python_version(),
                "command": command,
                "seconds": round(time.time() - started, 1),
                "recipe": dataclasses.asdict(recipe),
            }
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            if measured["status"] == "ok":
                print(
                    f"{name} {variant} seq {seq} x {batch} r{rank} ckpt={checkpointing}: allocated {measured['peak_allocated'] / GIB:.2f} GiB "
                    f"(estimate {plan.allocated_bytes / GIB:.2f}), reserved {measured['peak_reserved'] / GIB:.2f}, "
                    f"{measured['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
            else:
                print(f"{name} {variant} seq {seq} x {batch} r{rank} ckpt={checkpointing}: out of memory", flush=True)
        del base
        torch.cuda.empty_cache()
    print(f"results appended to {out}")


if __name__ == "__main__":
    main()
