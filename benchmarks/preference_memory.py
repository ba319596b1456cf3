"""What DPO's reference costs: peak RSS of SFT, DPO and ORPO at the same sequence length and micro-batch on the CPU,
each in its own process, beside what the plan said and what a second copy of the model (the usual reference) would
add. DPO's reference here is the base with the adapter off: one more forward pass with no graph, no second model,
in each step ("DPO") or once for every pair before the first step ("DPO pre", --reference precomputed).

    python benchmarks/preference_memory.py [--model smollm2-135m] [--seq-len 256] [--micro-batch 4] [--steps 3]

A preference example is two sequences, so "SFT x2" (twice the micro-batch, the same number of sequences as the
preference runs) is the like-for-like reference; the ratio to it is what the preference loss and DPO's reference add.
Timings swing with whatever else runs; these are memory figures, which do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.lora_variants import train_in_own_process  # noqa: E402

PAIRS = ROOT / "qlora_kit" / "demo_data" / "pirate_preferences.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="preference-memory-"))
    chosen = work / "chosen.jsonl"  # SFT on the chosen answers: the same prompts and answers, one sequence each
    chosen.write_text(
        "".join(
            json.dumps({"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]}) + "\n"
            for p in map(json.loads, PAIRS.read_text().splitlines())
        )
    )
    common = {
        "model": args.model,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "checkpoint_every": 0,
        "group_by_length": False,
    }
    runs = {
        "SFT": {"data": str(chosen), "micro_batch": args.micro_batch},
        "SFT x2": {"data": str(chosen), "micro_batch": 2 * args.micro_batch},
        "DPO": {"data": str(PAIRS), "method": "dpo", "micro_batch": args.micro_batch},
        "DPO pre": {"data": str(PAIRS), "method": "dpo", "reference": "precomputed", "micro_batch": args.micro_batch},
        "ORPO": {"data": str(PAIRS), "method": "orpo", "micro_batch": args.micro_batch},
    }
    print(
        f"uptime: {os.getloadavg()}; {args.model}, seq {args.seq_len}, micro-batch {args.micro_batch} "
        f"(pairs for DPO/ORPO), {args.steps} steps"
    )
    print(f"{'run':<8}{'sequences':>10}{'peak RSS GiB':>14}{'planned GiB':>13}{'measured/planned':>18}{'s/step':>8}")
    results = {}
    for name, settings in runs.items():
        # Every tensor above 64 KiB its own mmap, returned when freed: the peak is what was live, not what glibc kept.
        result = results[name] = train_in_own_process(
            {**common, **settings}, work / name.replace(" ", ""), env={"MALLOC_MMAP_THRESHOLD_": "65536"}
        )
        sequences = settings["micro_batch"] * (2 if "method" in settings else 1)
        print(
            f"{name:<8}{sequences:>10}{result['peak_gib']:>14.2f}{result['planned_gib']:>13.2f}"
            f"{result['peak_gib'] / result['planned_gib']:>18.2f}{result['step_seconds'] / args.steps:>8.1f}",
            flush=True,
        )
    plan = json.loads((work / "DPO" / "plan.json").read_text())["plan"]["components"]
    copy = (plan["quantized_weights"] + plan["unquantized_weights"]) / 2**30
    extra = results["DPO"]["peak_gib"] - results["SFT x2"]["peak_gib"]
    print(
        f"\nDPO / SFT x2 peak RSS: {results['DPO']['peak_gib'] / results['SFT x2']['peak_gib']:.2f}; DPO adds "
        f"{extra:+.2f} GiB to SFT at the same sequences, where a second copy of the model would add {copy:.2f} GiB."
    )
    fly, pre = (results[name] for name in ("DPO", "DPO pre"))
    # Not a cost comparison: the precomputing run's warm-up happens before its first step (dpo_reference.py compares
    # the passes themselves).
    print(f"DPO step time, reference precomputed / on the fly: {pre['step_seconds'] / fly['step_seconds']:.2f}.")


if __name__ == "__main__":
    main()
