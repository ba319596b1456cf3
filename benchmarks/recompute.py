"""What qlora-kit's speed levers are worth, each configuration of its loop in a fresh process, with ratios against
the first row of each table:

  recomputation and dropout: LoRA dropout 0.05 with every layer recomputed (what most recipes run), then dropout 0,
      then half the layers kept whole, then none recomputed (`uncheckpointed_layers`, `gradient_checkpointing`);
  --micro-batches: tokens per micro-batch (no recomputation, dropout 0), which sets auto's BUSY_TOKENS.

The model has its catalogue config and random weights; each run trains --steps timed steps after one warm-up step
(compare_hf.py's qlora-kit worker). CPU peak RSS is measured with MALLOC_MMAP_THRESHOLD_=65536, so that freed
tensors leave the process and the peak tracks live memory. Results append to results/recompute_<device>.jsonl.

  python benchmarks/recompute.py                                   # smollm2-135m, seq 512 x 4, rank 16
  python benchmarks/recompute.py --micro-batches --seq 256
  python benchmarks/recompute.py --model gemma-2b --seq 2048 --batch 1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_hf import run_side  # noqa: E402
from benchmarks.random_model import build_random_model  # noqa: E402


def configurations(args, layers: int) -> list[tuple[str, dict]]:
    """(label, settings) per row; the first row is the reference the others are divided by."""
    if args.micro_batches:
        return [
            (
                f"{b * args.seq:,} tokens per micro-batch ({b} x {args.seq})",
                dict(batch=b, dropout=0.0, kept=str(layers)),
            )
            for b in (1, 4, 16)
        ]
    return [
        ("dropout 0.05, every layer recomputed", dict(dropout=0.05, kept="0")),
        ("dropout 0, every layer recomputed", dict(dropout=0.0, kept="0")),
        (f"dropout 0, last {layers // 2} of {layers} layers kept whole", dict(dropout=0.0, kept=str(layers // 2))),
        ("dropout 0, nothing recomputed", dict(dropout=0.0, kept=str(layers))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one more runs first to warm up)")
    parser.add_argument("--micro-batches", action="store_true", help="compare tokens per micro-batch instead")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--work", default="/tmp/qlora-kit-bench", help="where random models are saved")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where results are appended")
    args = parser.parse_args()

    import torch

    from qlora_kit.probe.catalog import find_model_shape

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the worker processes
    args.folder = build_random_model(args.model, Path(args.work) / args.model, args.device)
    args.cap_gib = None
    layers = find_model_shape(args.model).num_layers
    device = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else (platform.processor() or platform.machine()) + f" x{os.cpu_count()}"
    )
    memory_key = "peak_allocated_gib" if args.device == "cuda" else "peak_rss_gib"
    print(f"{args.model}, seq {args.seq}, rank {args.rank}, on {device}")
    rows, reference = [], None
    for label, settings in configurations(args, layers):
        run = argparse.Namespace(
            **{
                **vars(args),
                "batch": settings.get("batch", args.batch),
                "ours_dropout": settings["dropout"],
                "ours_layers": settings["kept"],
            }
        )
        result = run_side("ours", run, args.seq)
        rows.append({"label": label, "batch": run.batch, **settings, **result})
        if result["status"] != "ok":
            print(f"  {label:48s} {result['status']} {result.get('error', '')}")
            continue
        reference = reference or result
        print(
            f"  {label:48s} {result['tokens_per_s']:8.1f} tok/s ({result['tokens_per_s'] / reference['tokens_per_s']:.2f}x)"
            f"   {result[memory_key]:6.2f} GiB ({result[memory_key] / reference[memory_key]:.2f}x)"
        )
    record = {
        "model": args.model,
        "seq": args.seq,
        "rank": args.rank,
        "device": device,
        "rows": rows,
        "versions": {p: metadata.version(p) for p in ("torch", "bitsandbytes", "transformers", "peft")},
        "command": " ".join(["python", "benchmarks/recompute.py", *sys.argv[1:]]),
    }
    out = Path(args.results) / f"recompute_{device.replace(' ', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
