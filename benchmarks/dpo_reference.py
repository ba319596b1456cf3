"""What a DPO reference forward pass costs per pair, on the fly (in a step's micro-batches, drawn at random) and
precomputed (every pair once before the first step, by length), in one process on the same pairs, alternated.

    python benchmarks/dpo_reference.py [--model smollm2-135m] [--pairs 48] [--micro-batch 4] [--rounds 2]

The plan precomputes the reference when that takes fewer forward passes than the run would make on the fly; that
rule is right when a precomputed pass costs no more per pair than one on the fly, which this measures. Timings swing
with whatever else runs, so the two are alternated and compared as a ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.preference_memory import PAIRS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from qlora_kit.data import dataset as data
    from qlora_kit.model.load import attach_lora, load_base_4bit, load_tokenizer
    from qlora_kit.objectives.preference import PreferenceLoss, reference_log_probs
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.probe.sources import resolve_model

    folder, cpu = resolve_model(args.model), torch.device("cpu")
    tokenizer = load_tokenizer(folder)
    pairs = data.tokenize(data.read_records(str(PAIRS)).records[: args.pairs], tokenizer, seq_len=512)
    pairs = [pairs[i] for i in range(len(pairs))]
    model = attach_lora(load_base_4bit(folder, torch.float32, cpu), Recipe(rank=16))
    loss = PreferenceLoss(model, "dpo", 0.1)

    def precomputed() -> None:
        reference_log_probs(loss, pairs, args.micro_batch, tokenizer.pad_token_id, cpu)

    def on_the_fly() -> None:  # as train steps draw them: random micro-batches, each computed after its policy pass
        order = random.Random(0).sample(pairs, len(pairs))
        for start in range(0, len(order), args.micro_batch):
            with torch.no_grad(), loss.reference_model():
                loss.answer_log_probs(order[start : start + args.micro_batch], tokenizer.pad_token_id, cpu)

    precomputed()  # warm-up: the first 4-bit forward passes allocate and pack what later ones reuse
    seconds = {"on the fly": [], "precomputed": []}
    for _ in range(args.rounds):
        for name, work in (("on the fly", on_the_fly), ("precomputed", precomputed)):
            started = time.perf_counter()
            work()
            seconds[name].append(time.perf_counter() - started)
    print(
        f"uptime: {os.getloadavg()}; {args.model}, {len(pairs)} pairs, micro-batch {args.micro_batch} pairs, "
        f"{args.rounds} rounds each, alternated"
    )
    for name, times in seconds.items():
        print(
            f"{name:<12} {min(times) / len(pairs):.3f} s a pair (best round; all: "
            f"{', '.join(f'{t:.1f}' for t in times)} s)"
        )
    ratio = min(seconds["precomputed"]) / min(seconds["on the fly"])
    print(f"precomputed / on the fly, per pair: {ratio:.2f}")


if __name__ == "__main__":
    main()
