"""The GPU paths the CPU test suite cannot reach, checked in about a minute (benchmarks/gpu_session.sh check).

On a small random Llama, through qlora-kit's own loop: bf16 compute, paged 8-bit AdamW with 8-bit states, the last
layer kept whole and the others checkpointed with their inputs offloaded to pinned host RAM, a checkpoint written
at step 3 and resumed into a fresh model (steps 4-6 must repeat), and fp16 with loss scaling. Prints one line per
check and exits non-zero on the first failure. Without a GPU it runs the same checks on the CPU (fp32, unpaged
8-bit AdamW, no offload, no fp16), which is how it is tested between GPU sessions.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.data import dataset as data
from qlora_kit.model import load as models  # noqa: E402
from qlora_kit.plan.recipes import Recipe  # noqa: E402
from qlora_kit.train import checkpoint
from qlora_kit.train.loop import StepsKept, train_model  # noqa: E402

STEPS, SAVED_AT = 6, 3


def small_model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def train(folder: Path, recipe: Recipe, device, dtype, run_dir: Path, resume_from: Path | None = None) -> list[float]:
    """Losses of a fresh LoRA model trained to STEPS, saving a checkpoint at SAVED_AT; resume_from starts after it."""
    torch.manual_seed(recipe.seed)
    model = models.attach_lora(models.load_base_4bit(folder, dtype, device), recipe)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 1024, (recipe.micro_batch, recipe.seq_len), generator=generator).tolist()
    examples = [data.Example(row, row) for row in rows * STEPS]  # the same rows again and again: the loss must fall

    class SavedOnce(StepsKept):
        def checkpoint(self, state) -> None:
            if state.progress.step != SAVED_AT:
                return
            lora = checkpoint.gather_trainable(model)
            optimizer_state = checkpoint.gather_optimizer(model, state.optimizer)
            checkpoint.save_checkpoint(
                run_dir,
                SAVED_AT,
                lambda where: model.save_pretrained(where, state_dict=lora),
                optimizer_state,
                state.scheduler,
                state.scaler,
                state.progress,
                keep=1,
            )

    hooks = SavedOnce()
    recipe = dataclasses.replace(recipe, steps=STEPS)
    train_model(model, examples, recipe, hooks, pad_id=0, dtype=dtype, resume_from=resume_from)
    return [m["loss"] for m in hooks.steps]


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU'}; torch {torch.__version__}", flush=True)
    recipe = Recipe(
        rank=64,
        seq_len=256,
        micro_batch=2,
        lr=1e-3,
        dropout=0.0,
        gradient_checkpointing=True,
        uncheckpointed_layers=1,
        activation_offload=cuda,
        optimizer="paged_adamw_8bit" if cuda else "adamw_8bit",
        checkpoint_every=SAVED_AT,
    )
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = small_model(work / "model")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        whole = train(folder, recipe, device, dtype, work / "whole")
        check(
            "training",
            all(map(torch.isfinite, torch.tensor(whole))) and whole[-1] < whole[0],
            f"{recipe.optimizer}, {str(dtype).removeprefix('torch.')}, last layer whole, offload {recipe.activation_offload}: "
            f"loss {whole[0]:.3f} -> {whole[-1]:.3f}",
        )
        if cuda:
            print(f"     peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)
        saved = checkpoint.complete_checkpoints(work / "whole")
        check(
            "checkpoint",
            [p.name for p in saved] == [f"step-{SAVED_AT}"] and checkpoint.verify(saved[0]) is None,
            f"{saved[0].name} written and verified",
        )
        resumed = train(folder, recipe, device, dtype, work / "resumed", resume_from=saved[0])
        worst = max(abs(a - b) / abs(b) for a, b in zip(resumed, whole[SAVED_AT:]))
        check(
            "resume",
            len(resumed) == STEPS - SAVED_AT and worst < 1e-3,
            f"steps {SAVED_AT + 1}-{STEPS} repeat within {worst:.1e} relative",
        )
        if cuda:
            fp16 = train(folder, replace(recipe, precision="fp16"), device, torch.float16, work / "fp16")
            check(
                "fp16",
                all(map(torch.isfinite, torch.tensor(fp16))),
                f"loss scaling: loss {fp16[0]:.3f} -> {fp16[-1]:.3f}",
            )


if __name__ == "__main__":
    main()
