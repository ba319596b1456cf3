"""The memory model's mixture-of-experts and hybrid terms against what one training step allocates on CPU.

Each point builds a 4-layer model of transformers' own config class (h 256, head_dim 64, V 8192, random weights):
experts of width w, k routed a token, E in all; or a hybrid's linear-attention (Gated DeltaNet) or short-convolution
layers beside softmax attention; or Gemma 4's wider full-attention layers. It runs measure_cpu_memory.py on it in a fresh process (the step's peak transient
bytes: activations, loss, LoRA gradients) and prints the estimate beside it. Results append to
results/family_memory_<machine>.jsonl; docs/memory.md shows them, tests/test_memory.py holds some of them to +-10%.

  python benchmarks/family_memory.py                    # the whole grid, about 4 minutes on 2 cores
  python benchmarks/family_memory.py qwen3_5_text lfm2  # the points of these model types
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    head_dim=64,
)
QWEN3_MOE = dict(moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4)
GPT_OSS = dict(intermediate_size=256, num_local_experts=16, num_experts_per_tok=4, sliding_window=512)
RECOMPUTED = dict(seq_len=2048, micro_batch=2, loss_chunk_tokens=32, dropout=0.0)
EVERY_LAYER_KEPT = dict(seq_len=1024, micro_batch=2, loss_chunk_tokens=32, dropout=0.0, gradient_checkpointing=False)
# Gated DeltaNet at Qwen3.5-9B's proportions (key heads x dim = h / 2, value heads x dim = h), and varied
DELTA_NET = dict(linear_num_key_heads=2, linear_key_head_dim=64, linear_num_value_heads=4, linear_value_head_dim=64)
LFM2 = dict(layer_types=["conv", "full_attention", "conv", "full_attention"], full_attn_idxs=[1, 3])
# Gemma 4 26B-A4B's layout: sliding-window layers then a full one of wider heads over 1 KV head (keys as values), a
# dense MLP beside the experts; without the experts, the 31B's
GEMMA4 = dict(
    global_head_dim=128,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=512,
    enable_moe_block=True,
    num_experts=16,
    top_k_experts=4,
    moe_intermediate_size=256,
    hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0,
)
GRID = [  # (model_type, config changes, recipe settings)
    ("qwen3_moe", QWEN3_MOE, RECOMPUTED),
    ("qwen3_moe", QWEN3_MOE | dict(num_experts_per_tok=2, moe_intermediate_size=512), RECOMPUTED),
    ("qwen3_moe", QWEN3_MOE | dict(num_experts_per_tok=8, moe_intermediate_size=128), RECOMPUTED),
    ("qwen3_moe", QWEN3_MOE | dict(moe_intermediate_size=512), RECOMPUTED),
    ("qwen3_moe", QWEN3_MOE | dict(moe_intermediate_size=128), RECOMPUTED),
    ("qwen3_moe", QWEN3_MOE | dict(num_experts=64), RECOMPUTED),
    ("qwen3_moe", QWEN3_MOE, EVERY_LAYER_KEPT),
    ("gpt_oss", GPT_OSS, RECOMPUTED),
    ("gpt_oss", GPT_OSS, EVERY_LAYER_KEPT),
    ("qwen3_5_text", DELTA_NET, RECOMPUTED),
    ("qwen3_5_text", DELTA_NET | dict(linear_num_value_heads=8, linear_value_head_dim=32), RECOMPUTED),
    ("qwen3_5_text", DELTA_NET | dict(linear_key_head_dim=128, linear_num_key_heads=4), RECOMPUTED),
    ("qwen3_5_text", DELTA_NET, EVERY_LAYER_KEPT),
    ("qwen3_next", DELTA_NET | QWEN3_MOE | dict(shared_expert_intermediate_size=256), RECOMPUTED),
    ("lfm2", LFM2, RECOMPUTED),
    ("lfm2", LFM2 | dict(layer_types=["conv"] * 3 + ["full_attention"], full_attn_idxs=[3]), EVERY_LAYER_KEPT),
    ("gemma4_text", GEMMA4, RECOMPUTED),
    ("gemma4_text", GEMMA4 | dict(num_experts=32, top_k_experts=8, moe_intermediate_size=128), RECOMPUTED),
    ("gemma4_text", GEMMA4 | dict(num_hidden_layers=6), RECOMPUTED | dict(seq_len=1024, micro_batch=4)),
    ("gemma4_text", GEMMA4, EVERY_LAYER_KEPT),
    ("gemma4_text", GEMMA4 | dict(enable_moe_block=False, num_experts=None, top_k_experts=None), RECOMPUTED),
]


def measure_point(kind: str, changes: dict, settings: dict, folder: Path) -> dict:
    """Estimate and measurement (bytes) of one grid point, with the model written to folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit.architectures.shape import ModelShape
    from qlora_kit.plan.memory import estimate_peak_memory
    from qlora_kit.plan.recipes import Recipe
    from tests.tiny_models import build_tokenizer

    config = AutoConfig.for_model(kind, **SIZES | changes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    c = estimate_peak_memory(
        ModelShape.from_config(kind, config.to_dict()), Recipe(**settings), device="cpu"
    ).components
    estimate = c["saved_activations"] + c["backward_working_set"] + c["lora_gradients"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "measure_cpu_memory.py"), str(folder), json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])["step_peak_transient"]
    return {
        "model_type": kind,
        "changes": changes,
        "settings": settings,
        "estimate": estimate,
        "measured": measured,
        "ratio": round(estimate / measured, 3),
    }


def main() -> None:
    machine = f"{platform.machine()}_x{os.cpu_count()}"
    results = ROOT / "benchmarks" / "results" / f"family_memory_{machine}.jsonl"
    kinds = sys.argv[1:]
    with tempfile.TemporaryDirectory() as scratch:
        for number, (kind, changes, settings) in enumerate(GRID):
            if kinds and kind not in kinds:
                continue
            point = measure_point(kind, changes, settings, Path(scratch) / str(number))
            print(
                f"{kind:10} {json.dumps(changes):90} {settings['seq_len']} x {settings['micro_batch']}"
                f"{'' if settings.get('gradient_checkpointing', True) else ' no checkpointing'}: "
                f"measured {point['measured'] / 2**20:.0f} MiB, estimate {point['estimate'] / 2**20:.0f} MiB, "
                f"ratio {point['ratio']:.2f}",
                flush=True,
            )
            with results.open("a") as out:
                out.write(json.dumps(point | {"machine": machine}) + "\n")


if __name__ == "__main__":
    main()
