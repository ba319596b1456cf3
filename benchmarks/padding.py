"""How much of each step is padding, with and without length grouping, on the same seeded stream of examples.

Tokenizes the shipped pirate data with SmolLM2's tokenizer (or a file given with --data) and counts, over the
steps a run would draw (--steps of --per-step examples, each step padded to its longest example as one
micro-batch), the share of computed positions that are padding: shuffled order against group_by_length.

Usage: python benchmarks/padding.py [--data FILE | --synthetic 2000] [--per-step 8] [--steps 32] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.cli.demo import DEMO_DATA  # noqa: E402
from qlora_kit.data import dataset as data  # noqa: E402
from qlora_kit.model.load import load_tokenizer  # noqa: E402
from qlora_kit.probe.sources import resolve_model  # noqa: E402


def padding_share(lengths: list[int], per_step: int, steps: int, grouped: bool, seed: int = 0) -> float:
    """Padding as a share of computed positions over `steps` steps of the seeded stream."""
    order, epoch = [], 0
    while len(order) < steps * per_step:
        order += data.epoch_order(lengths, seed, epoch, per_step, grouped)
        epoch += 1
    padded = real = 0
    for k in range(steps):
        step = [lengths[i] for i in order[k * per_step : (k + 1) * per_step]]
        padded, real = padded + max(step) * len(step), real + sum(step)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEMO_DATA))
    parser.add_argument(
        "--synthetic", type=int, default=0, help="instead of --data, this many synthetic chats of varied length"
    )
    parser.add_argument("--per-step", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    if args.synthetic:
        from benchmarks.data_memory import synthetic_chats

        records = synthetic_chats(args.synthetic)
    else:
        records = data.read_records(args.data).records
    lengths = data.tokenize(records, tokenizer, args.seq_len).lengths
    shuffled = padding_share(lengths, args.per_step, args.steps, grouped=False)
    grouped = padding_share(lengths, args.per_step, args.steps, grouped=True)
    print(f"{len(lengths)} examples of {min(lengths)}-{max(lengths)} tokens, {args.steps} steps of {args.per_step}")
    print(f"padding: shuffled {100 * shuffled:.1f}%, grouped by length {100 * grouped:.1f}%")
    print(f"computed positions, grouped / shuffled: {(1 - shuffled) / (1 - grouped):.3f}")


if __name__ == "__main__":
    main()
