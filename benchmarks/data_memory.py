"""What holding tokenized data costs, and what several tokenizer processes save, measured in one script.

Builds N synthetic chat examples, tokenizes them with SmolLM2's tokenizer (chat template, assistant masking), and
compares resident memory per token of
  (a) the reference: every example as Python lists of ints (what a plain loop, and qlora-kit before, kept), and
  (b) qlora-kit's table: int32 Arrow columns written to the cache and memory-mapped back.
Then it times tokenizing with one process against several (datasets.map num_proc).

Usage: python benchmarks/data_memory.py [--examples 20000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.data import dataset as data  # noqa: E402
from qlora_kit.model.load import load_tokenizer  # noqa: E402
from qlora_kit.probe.sources import resolve_model  # noqa: E402


def anonymous_memory() -> int:
    """Bytes of this process's private memory (RssAnon): what the data holds, not the mapped files."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def synthetic_chats(n: int) -> list[dict]:
    words = "the ship sails at dawn with a cargo of rum and maps of every island in the southern sea".split()
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(20 + i % 40))},
                {
                    "role": "assistant",
                    "content": " ".join(words[(i * 3 + k) % len(words)] for k in range(60 + i % 200)),
                },
            ]
        }
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    records = synthetic_chats(args.examples)

    before = anonymous_memory()
    started = time.perf_counter()
    as_lists = [data.Example(*data.tokenize_record(r, tokenizer)) for r in records]
    one_process_s = time.perf_counter() - started
    tokens = sum(len(e) for e in as_lists)
    lists_bytes = anonymous_memory() - before
    del as_lists

    with tempfile.TemporaryDirectory() as cache:
        data.cache_dir = lambda: Path(cache)
        before = anonymous_memory()
        started = time.perf_counter()
        table = data.tokenize(records, tokenizer, seq_len=2**31 - 1, cache_key="bench")
        parallel_s = time.perf_counter() - started
        table_bytes = anonymous_memory() - before
        assert sum(table.lengths) == tokens

    workers = min(os.cpu_count() or 1, 8)
    print(f"{args.examples:,} chat examples, {tokens:,} tokens, {workers} tokenizer processes")
    print(
        f"(a) Python lists:   {lists_bytes / tokens:6.1f} bytes of private memory per token ({lists_bytes / 2**20:,.0f} MiB)"
    )
    print(f"(b) qlora-kit table: {max(table_bytes, 0) / tokens:6.1f} bytes per token ({table_bytes / 2**20:,.0f} MiB)")
    print(f"memory ratio (b)/(a): {max(table_bytes, 0) / max(lists_bytes, 1):.3f}")
    print(
        f"tokenizing: {one_process_s:.1f} s in one process, {parallel_s:.1f} s with datasets.map over {workers} "
        f"(including the cache write): ratio {parallel_s / one_process_s:.2f}"
    )


if __name__ == "__main__":
    main()
