"""Measure what one training step of qlora-kit's loop allocates on CPU, for checking the memory model.

How: in this process (started with MALLOC_MMAP_THRESHOLD_=65536 so every tensor above 64 KiB is its own
mmap and is returned to the OS when freed), run one warm-up step so optimizer states exist, reset the
kernel's peak-RSS counter (/proc/self/clear_refs), run one more step, and read the peak (VmHWM). The peak
minus the resident size before the step is the step's transient memory: gradients, saved activations,
the recomputed layer and the loss working set, which is what plan/memory.py predicts for those components.

Usage: MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/measure_cpu_memory.py MODEL_DIR '{"seq_len": 1024, ...}'
(the JSON holds Recipe settings). Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from qlora_kit.data import dataset as data
from qlora_kit.model import load as models
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.loop import Hooks, train_model


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(model_dir: Path, recipe: Recipe) -> dict:
    """Transient bytes of one training step of `recipe` on the model in model_dir (see the module doc)."""
    torch.manual_seed(0)
    seq, batch = recipe.seq_len, recipe.micro_batch
    cpu = torch.device("cpu")
    model = models.attach_lora(models.load_base_4bit(model_dir, torch.float32, cpu), recipe)
    vocab = model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # Full-length random sequences: no padding, so every position is a labelled token.
    examples = [
        data.Example(ids, ids) for ids in torch.randint(3, vocab, (4 * batch, seq), generator=generator).tolist()
    ]
    if recipe.method != "sft":  # preference pairs: two full-length answers each
        examples = [data.PreferencePair(a, b) for a, b in zip(examples[::2], examples[1::2])]
    one_step = dataclasses.replace(recipe, steps=1)
    train_model(model, examples, one_step, Hooks(), pad_id=0, dtype=torch.float32)  # warm-up step
    before = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    train_model(model, examples, one_step, Hooks(), pad_id=0, dtype=torch.float32)
    return {"rss_before_step": before, "step_peak_transient": rss_bytes("VmHWM") - before}


if __name__ == "__main__":
    model_dir, recipe_json = sys.argv[1], sys.argv[2]
    print(json.dumps(measure(Path(model_dir), Recipe(**json.loads(recipe_json)))))
