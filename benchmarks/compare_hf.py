"""qlora-kit's loop against the plain Hugging Face QLoRA recipe: same model, data, sequence, batch and rank.

Each side runs in its own fresh process:
  hf   transformers Trainer + prepare_model_for_kbit_training, LoRA on all linear layers, gradient checkpointing,
       paged 8-bit AdamW (torch AdamW on CPU), bf16 on GPU, NF4 with double quantization;
  ours qlora_kit.train.loop.train_model with the same model, data, sequence, batch and rank, and qlora-kit's own choices
       where they differ: LoRA dropout 0 (--ours-dropout) and, where memory allows, the last layers kept whole
       instead of recomputed (--ours-layers auto: the plan's choice under the cap or the device's memory).
The model has its catalogue config and random weights (no download); the data is random tokens of exactly
--seq length. GPU: peak allocated / reserved / nvml memory and tokens/s. CPU: peak RSS and tokens/s.
Results append to benchmarks/results/compare_hf_<device>.jsonl with versions and the command.

  python benchmarks/compare_hf.py --model gemma-2b --seq 2048 --batch 1            # GPU: the one that counts
  python benchmarks/compare_hf.py --model gemma-2b --seq 2048 --batch 1 --cap-gib 4
  python benchmarks/compare_hf.py --model llama-3.1-8b --cap-gib 8 --max-seq         # longest seq at batch 1
  MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/compare_hf.py --model smollm2-135m --seq 512 --batch 4 --device cpu
(the variable makes CPU peak RSS track live memory: glibc otherwise keeps freed memory, on both sides)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.units import GIB  # noqa: E402


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def random_examples(vocab: int, seq: int, count: int) -> list[list[int]]:
    import torch

    return torch.randint(3, vocab, (count, seq), generator=torch.Generator().manual_seed(0)).tolist()


def worker(args) -> dict:
    """Train `steps` steps on one side in this process; returns its measurements."""
    import torch

    cuda = args.device == "cuda"
    if cuda and args.cap_gib:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
        )
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.folder).vocab_size
    rows = random_examples(vocab, args.seq, args.batch * (args.steps + 1))
    step_times: list[float] = []
    settings = {}
    try:
        settings = (train_hf if args.worker == "hf" else train_ours)(args, rows, step_times)
    except torch.OutOfMemoryError:
        return {"status": "oom", **_memory(cuda)}
    timed = step_times[1:] or step_times  # the first step warms up
    return {
        "status": "ok",
        "tokens_per_s": args.batch * args.seq * len(timed) / sum(timed),
        **_memory(cuda),
        "settings": settings,
    }


def _memory(cuda: bool) -> dict:
    if not cuda:
        return {"peak_rss_gib": peak_rss_bytes() / GIB}
    import torch

    from qlora_kit.probe.hardware import gpu_readings

    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "nvml_used_gib": gpu_readings(0)["nvml_used_gib"],
        "peak_rss_gib": peak_rss_bytes() / GIB,
    }


def train_hf(args, rows, step_times) -> dict:
    """The recipe most QLoRA tutorials use, as they write it; returns the settings that differ between the sides."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.folder, quantization_config=quantization, dtype=dtype, device_map={"": 0} if cuda else None
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            ids = torch.tensor(rows[i])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)

    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=2e-4,
        bf16=cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        gradient_checkpointing=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=training, train_dataset=Rows(), callbacks=[StepTimer()]).train()
    return {"dropout": 0.05, "checkpointed_layers": "all"}


def train_ours(args, rows, step_times) -> dict:
    """qlora-kit's loop on the same rows; returns its dropout and how many layers it checkpointed."""
    import torch

    from qlora_kit.data import dataset as data
    from qlora_kit.model import load as models
    from qlora_kit.plan.memory import TIGHT_FRACTION, most_uncheckpointed_layers
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.probe.catalog import find_model_shape
    from qlora_kit.train.loop import StepsKept, train_model

    cuda = args.device == "cuda"
    device, dtype = (torch.device("cuda", 0), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    recipe = Recipe(
        rank=args.rank,
        alpha=2.0 * args.rank,
        dropout=args.ours_dropout,
        seq_len=args.seq,
        micro_batch=args.batch,
        gradient_checkpointing=True,
    )
    shape = find_model_shape(args.model)
    layers = (
        int(args.ours_layers)
        if args.ours_layers != "auto"
        else most_uncheckpointed_layers(shape, recipe, args.device, int(TIGHT_FRACTION * _capacity_bytes(args)))
    )
    recipe = dataclasses.replace(recipe, uncheckpointed_layers=layers)
    model = models.attach_lora(models.load_base_4bit(Path(args.folder), dtype, device), recipe)
    examples = [data.Example(row, row) for row in rows]
    hooks = StepsKept()
    train_model(model, examples, dataclasses.replace(recipe, steps=args.steps + 1), hooks, pad_id=0, dtype=dtype)
    step_times += [m["step_s"] for m in hooks.steps]
    return {"dropout": args.ours_dropout, "checkpointed_layers": shape.num_layers - min(layers, shape.num_layers)}


def _capacity_bytes(args) -> int:
    """The memory a run may use here: the cap, else the GPU's memory, else the RAM available now."""
    if args.cap_gib:
        return int(args.cap_gib * GIB)
    if args.device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    import psutil

    return psutil.virtual_memory().available


def run_side(side: str, args, seq: int) -> dict:
    """One side in a fresh process, so peaks and caches never carry over."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--folder",
        str(args.folder),
        "--seq",
        str(seq),
        "--batch",
        str(args.batch),
        "--rank",
        str(args.rank),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--model",
        args.model,
        "--ours-dropout",
        str(args.ours_dropout),
        "--ours-layers",
        args.ours_layers,
    ]
    if args.cap_gib:
        command += ["--cap-gib", str(args.cap_gib)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"status": "failed", "error": result.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def longest_sequence(side: str, args) -> int:
    """Binary search, in steps of 256 tokens, for the longest sequence at batch 1 that trains under the cap."""
    low, high, best = 256, 32768, 0
    while low <= high:
        mid = (low + high) // 512 * 256 or 256
        if run_side(side, args, mid)["status"] == "ok":
            best, low = mid, mid + 256
        else:
            high = mid - 256
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-2b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one more runs first to warm up)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--cap-gib", type=float, default=None, help="limit torch's GPU memory to this (CUDA only)")
    parser.add_argument(
        "--ours-dropout",
        type=float,
        default=0.0,
        help="qlora-kit's LoRA dropout: 0 is its default (the fast path); 0.05 is the HF recipe's",
    )
    parser.add_argument(
        "--ours-layers",
        default="auto",
        help="layers qlora-kit keeps whole (not recomputed): auto = the plan's choice for the memory; 0 = none",
    )
    parser.add_argument("--sides", default="hf,ours", help="which sides to run: hf,ours (both), hf or ours")
    parser.add_argument("--max-seq", action="store_true", help="search the longest sequence at batch 1 under --cap-gib")
    parser.add_argument("--work", default="/tmp/qlora-kit-bench", help="where random models are saved")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where results are appended")
    parser.add_argument("--worker", choices=["hf", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    from benchmarks.random_model import build_random_model

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.folder = build_random_model(args.model, Path(args.work) / args.model, args.device)
    device_name = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else (platform.processor() or platform.machine()) + f" x{os.cpu_count()}"
    )
    record = {
        "model": args.model,
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "cap_gib": args.cap_gib,
        "device": device_name,
        "versions": {p: metadata.version(p) for p in ("torch", "bitsandbytes", "transformers", "peft")},
        "command": " ".join(["python", "benchmarks/compare_hf.py", *sys.argv[1:]]),
        # glibc keeps freed memory unless this is set, so CPU peak RSS measures the allocator as much as the need
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if args.max_seq:
        assert args.device == "cuda" and args.cap_gib, "--max-seq searches under --cap-gib on a GPU"
        args.batch = 1
        for side in args.sides.split(","):  # each search loads the model a few times: one side fits a 10-minute call
            record[f"max_seq_{side}"] = longest_sequence(side, args)
            print(f"longest sequence at batch 1 under {args.cap_gib} GiB, {side}: {record[f'max_seq_{side}']}")
    else:
        for side in args.sides.split(","):
            record[side] = run_side(side, args, args.seq)
        print_comparison(record)
    out = Path(args.results) / f"compare_hf_{device_name.replace(' ', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {out}")


def print_comparison(record: dict) -> None:
    hf, ours = record.get("hf", {"status": "not run"}), record.get("ours", {"status": "not run"})
    print(
        f"{record['model']} seq {record['seq']} x batch {record['batch']}, rank {record['rank']}, on {record['device']}"
    )
    keys = ["peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib", "peak_rss_gib", "tokens_per_s"]
    for key in keys:
        a, b = hf.get(key), ours.get(key)
        if a is None and b is None:
            continue
        ratio = f"{b / a:.2f}x" if a and b else "-"
        print(f"  {key:20s} HF recipe {_fmt(a):>10s}   qlora-kit {_fmt(b):>10s}   qlora-kit / HF {ratio}")
    for side, result in (("HF recipe", hf), ("qlora-kit", ours)):
        if result.get("settings"):
            print(
                f"  {side}: LoRA dropout {result['settings']['dropout']}, checkpointed layers {result['settings']['checkpointed_layers']}"
            )
        if result["status"] != "ok":
            print(f"  {side}: {result['status']} {result.get('error', '')}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,.2f}"


if __name__ == "__main__":
    main()
