"""The same recipe on the same data, trained through run_training, printed to the last digit: run before and after a
change to the training code (a refactor must not move a single bit) and compare the two outputs with diff.

  python benchmarks/same_loss.py > before.txt   # on the old code
  python benchmarks/same_loss.py > after.txt    # on the new code
  diff before.txt after.txt                     # nothing: the same losses, gradients, evaluations and adapter

Three runs on tiny random models (CPU, seconds each): SFT with gradient accumulation, evaluation and checkpoints;
SFT on chats with packing; DPO with a precomputed reference. Each prints every step's loss, grad norm, learning rate
and evaluation as Python writes a float (repr: every digit), then a hash of the saved adapter's weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FIGURES = ("step", "loss", "grad_norm", "lr", "eval_loss", "reward_margin", "micro_batch", "seq_len", "tokens")


def runs(folder: Path) -> dict:
    """name -> (model kind, data records, recipe changes) of the compared runs."""
    from tests.tiny_models import CORPUS

    chats = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(CORPUS[::2], CORPUS[1::2])
    ]
    pairs = [
        {"prompt": "the quick brown", "chosen": "fox jumps over", "rejected": "dog sleeps"},
        {"prompt": "what is two plus two", "chosen": "four, arr", "rejected": "five, I think so"},
    ] * 6
    return {
        "sft": ("llama", [{"text": line} for line in CORPUS] * 3, dict(grad_accum=2, eval_fraction=0.2, eval_every=3)),
        "chat_packed": ("gemma", chats * 4, dict(packing=True, seq_len=64)),
        "dpo": ("llama", pairs, dict(method="dpo", lr=5e-3)),
    }


def train_one(folder: Path, kind: str, records: list, changes: dict) -> list[str]:
    """Train one run in folder; returns its printed lines."""
    import torch
    from rich.console import Console

    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import RunOptions, run_training
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(folder / "model", kind)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = dict(rank=4, micro_batch=2, steps=8, lr=1e-2, warmup_ratio=0.1, checkpoint_every=4, seed=7)
    recipe = Recipe(model=str(model), data=str(data), **{**settings, **changes})
    torch.use_deterministic_algorithms(True)
    run_training(recipe, folder / "run", Console(file=io.StringIO()), RunOptions(display="quiet", force=True))
    lines = []
    for line in (folder / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        lines.append(" ".join(f"{k}={m[k]!r}" for k in FIGURES if k in m) or json.dumps(m))
    weights = (folder / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    lines.append(f"adapter sha256={hashlib.sha256(weights).hexdigest()}")
    return lines


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, records, changes) in runs(Path(tmp)).items():
            print(f"# {name}")
            with contextlib.redirect_stdout(io.StringIO()):  # what building and training print is not compared
                lines = train_one(Path(tmp) / name, kind, records, changes)
            for line in lines:
                print(line)


if __name__ == "__main__":
    main()
